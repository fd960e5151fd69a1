"""Logit store throughput and size: write/read tokens/s and bytes/token, Zarr vs Arrow, each
with the ``raw`` codec (float16 log-probs) and the ``gaps`` codec (storage/_codec.py).

Rows are realistic rather than uniform: each row's top-k comes from a noisy Zipf-like softmax
(log p = beta * (log zipf(rank) + N(0, 2)) over 256 Zipf-drawn candidates, renormalised with
a random tail mass), so top-1 probability and top-k mass look like a small LM's. Token ids
follow frequency rank noisily, as BPE merge order does; ``--id-order random`` maps ranks to ids
by a random permutation (the pessimistic case for compression).

The codec's fidelity is measured on the same rows: its largest log-prob and probability
errors, and the KL divergence between the stored and the decoded distribution of a row (the k
ids plus the tail mass as one more category), next to what float16 storage itself costs
(the synthetic rows are float32 before storage).

    .venv/bin/python bench/store.py                # 524,288 tokens, k=64, vocab 32k, ~4 min
    .venv/bin/python bench/store.py --tokens 65536 # quick
    .venv/bin/python bench/store.py --real-store STORE ...  # also a store a real teacher wrote
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from report import machine_line

RESULTS = Path(__file__).parent / "results" / "store.md"
CODECS = ("raw", "gaps")


def zipf_rows(
    n: int, k: int, vocab: int, rng: np.random.Generator, id_order: str = "bpe", cands: int = 256
) -> tuple[np.ndarray, np.ndarray]:
    """n rows of (topk_ids (n, k) int64, topk_logprobs (n, k) float32 sorted descending)."""
    ranks = np.arange(vocab)
    zipf = 1.0 / (ranks + 2.7) ** 1.1
    zipf /= zipf.sum()
    cdf = np.cumsum(zipf)
    if id_order == "bpe":  # ids follow frequency rank with log-normal noise
        rank_to_id = np.empty(vocab, np.int64)
        rank_to_id[np.argsort(ranks * np.exp(rng.normal(0, 1.0, vocab)))] = ranks
    else:
        rank_to_id = rng.permutation(vocab)
    ids = np.empty((n, k), np.int64)
    logprobs = np.empty((n, k), np.float32)
    for a in range(0, n, 8192):
        m = min(n, a + 8192) - a
        cand = np.sort(np.searchsorted(cdf, rng.random((m, cands))), axis=1)  # (m, C) ranks
        beta = np.exp(rng.uniform(np.log(0.7), np.log(2.5), (m, 1)))
        logit = beta * (np.log(zipf)[cand] + rng.normal(0, 2.0, (m, cands)))  # (m, C)
        logit[:, 1:][cand[:, 1:] == cand[:, :-1]] = -np.inf  # duplicates drawn twice
        top = np.max(logit, axis=1, keepdims=True)
        lse = top + np.log(np.exp(logit - top).sum(axis=1, keepdims=True))
        lse -= np.log1p(-rng.beta(1, 12, (m, 1)))  # probability outside the candidates
        best = np.argpartition(-logit, k, axis=1)[:, :k]  # (m, k) unsorted
        values = np.take_along_axis(logit, best, 1)
        order = np.argsort(-values, axis=1)
        ids[a : a + m] = rank_to_id[np.take_along_axis(cand, np.take_along_axis(best, order, 1), 1)]
        logprobs[a : a + m] = np.take_along_axis(values, order, 1) - lse
    return ids, logprobs


def rates(tokens: int, wall_start: float, cpu_start: float) -> tuple[float, float]:
    """(tokens per wall second, tokens per CPU second of this process) since the starts."""
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start
    return tokens / max(wall, 1e-9), tokens / max(cpu, 1e-9)


def fmt(rate: tuple[float, float]) -> str:
    return f"{rate[0] / 1e6:.2f}M ({rate[1] / 1e6:.2f}M)"


def run_backend(
    backend: str, codec: str, seqs: list[tuple[np.ndarray, ...]], args: Any, root: Path
) -> dict[str, Any]:
    from kdcache.storage import create_store, make_manifest, open_store

    url = str(root / f"store-{backend}-{codec}")
    manifest = make_manifest(
        codec=codec,
        backend=backend,
        teacher={"name": "synthetic-zipf"},
        tokenizer={"sha256": "-"},
        vocab_size=args.vocab,
        top_k=args.k,
        seq_len=args.seq_len,
        corpus={"spec": "synthetic"},
        shard_tokens=args.shard_tokens,
    )
    tokens = sum(len(s[0]) for s in seqs)
    start, cpu = time.perf_counter(), time.process_time()
    with create_store(url, manifest) as writer:
        for seq in seqs:
            writer.append("train", *seq)
    out: dict[str, Any] = {"backend": backend, "codec": codec, "tokens": tokens}
    out["write"] = rates(tokens, start, cpu)
    store = open_store(url)
    out["bytes_per_token"] = store.nbytes / tokens
    per_field: dict[str, int] = {}
    for record in store.shards:
        for rel, info in record.files.items():
            field = rel[len(record.path) + 1 :].split("/")[0] if rel != record.path else "all"
            per_field[field] = per_field.get(field, 0) + info["size"]
    out["fields"] = {f: b / tokens for f, b in sorted(per_field.items())}
    for label, check in (("read", True), ("read_nocheck", False)):
        best = (0.0, 0.0)
        for _ in range(args.repeats):
            start, cpu = time.perf_counter(), time.process_time()
            for record in store.shards:
                store.read_shard(record, check=check)
            best = max(best, rates(tokens, start, cpu), key=lambda r: r[1])
        out[label] = best
    start, cpu = time.perf_counter(), time.process_time()
    count = sum(len(s.tokens) for s in store.iter_sequences("train"))
    out["iter"] = rates(count, start, cpu)
    # reading the files alone (page cache): the floor under decoding
    start = time.perf_counter()
    for record in store.shards:
        for rel in record.files:
            (root / f"store-{backend}-{codec}" / rel).read_bytes()
    out["raw_read"] = tokens / (time.perf_counter() - start)
    return out


def layout_of(manifest: dict[str, Any], codec: str) -> Any:
    """The ShardLayout of ``manifest`` stored with ``codec``."""
    from kdcache.storage._arrays import ShardLayout
    from kdcache.storage._codec import max_abs_error

    return ShardLayout.of({**manifest, "codec": codec, "codec_max_abs_error": max_abs_error(codec)})


def encode(backend: str, arrays: Any, layout: Any) -> int:
    """Bytes of one shard (decoded ``arrays``) encoded by ``backend`` in ``layout``'s codec."""
    from kdcache.storage._base import get_codec
    from kdcache.storage._stored import to_stored

    blobs = get_codec(backend).encode(to_stored(arrays, layout), layout.logprob_dtype, layout.codec)
    return sum(len(b) for b in blobs.values())


def encoded_bytes(
    backend: str, codec: str, ids: np.ndarray, logprobs: np.ndarray, vocab: int
) -> int:
    """Encoded size of one shard holding these rows (as sequences of 1024, float16)."""
    from kdcache.storage import ShardArrays, make_manifest
    from kdcache.storage._arrays import tail_from_topk

    n, k = ids.shape
    dtype = np.uint16 if vocab <= 65536 else np.uint32
    lp = logprobs.astype(np.float16)
    arrays = ShardArrays(
        tokens=ids[:, 0].astype(np.int32),
        topk_ids=ids.astype(dtype),
        topk_logprobs=lp,
        topk_tail_logprob=tail_from_topk(lp),
        seq_offsets=np.arange(0, n + 1, 1024, dtype=np.int64),
    )
    manifest = make_manifest(backend=backend, teacher={}, tokenizer={}, vocab_size=vocab, top_k=k,
                             seq_len=1024, corpus={}, shard_tokens=n)  # fmt: skip
    return encode(backend, arrays, layout_of(manifest, codec))


def codec_fidelity(
    logprobs: np.ndarray, tail: np.ndarray, reference: Any = None
) -> dict[str, float]:
    """How far the gaps codec moves top-k rows (n, k) and tails (n,) — as stored, e.g. float16 —
    and, given the ``reference`` (rows, tails) before storage (float32), how far storage in
    float16 alone moved them. Per row the distribution is the k ids plus the tail mass (one
    more category), renormalized; KL is KL(stored ‖ decoded) in nats, mean over rows."""
    from kdcache.storage._codec import decode_rows, dequantize, encode_rows, quantize

    def dist(lp: np.ndarray, t: np.ndarray) -> np.ndarray:
        x = np.concatenate([lp.astype(np.float64), t.astype(np.float64)[:, None]], axis=1)
        return x - np.logaddexp.reduce(x, axis=1, keepdims=True)

    def compare(
        a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]
    ) -> dict[str, float]:
        pa, pb = dist(*a), dist(*b)
        fin = np.isfinite(pa)
        la = np.concatenate([a[0].astype(np.float64), a[1].astype(np.float64)[:, None]], 1)
        lb = np.concatenate([b[0].astype(np.float64), b[1].astype(np.float64)[:, None]], 1)
        d = np.abs(np.where(fin, la - lb, 0.0))
        with np.errstate(invalid="ignore"):
            kl = np.where(fin, np.exp(pa) * (pa - pb), 0.0).sum(1)
        return {"max_abs": float(d.max()), "max_prob": float(np.abs(np.exp(la) - np.exp(lb)).max()),
                "kl": float(kl.mean())}  # fmt: skip

    dtype = "float16" if logprobs.dtype == np.float16 else "float32"
    decoded = (decode_rows(encode_rows(logprobs), dtype), dequantize(quantize(tail), "float32"))
    out = {f"gaps_{key}": value for key, value in compare((logprobs, tail), decoded).items()}
    if reference is not None:
        out.update({f"f16_{key}": v for key, v in compare(reference, (logprobs, tail)).items()})
    return out


def fidelity_line(f: dict[str, float], what: str) -> str:
    line = (f"Codec `gaps` on {what}: largest log-prob error {f['gaps_max_abs']:.4f}, largest "
            f"probability error {f['gaps_max_prob']:.5f}, mean KL(stored ‖ decoded) per row "
            f"{f['gaps_kl']:.1e} nats")  # fmt: skip
    if "f16_kl" in f:
        line += (f" (float16 storage itself, vs the float32 rows: {f['f16_max_abs']:.4f}, "
                 f"{f['f16_max_prob']:.5f}, {f['f16_kl']:.1e})")  # fmt: skip
    return line + "."


def real_store_lines(path: str, repeats: int, zarr_synthetic_bpt: float, args_k: int) -> list[str]:
    """Bytes/token, read speed and the codec's fidelity on a store a real teacher wrote."""
    from kdcache.storage import open_store

    store = open_store(path)
    records = store.shards_of("train")
    tokens = sum(r.num_tokens for r in records)
    best = (0.0, 0.0)
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        arrays = [store.read_shard(r) for r in records]
        best = max(best, rates(tokens, start, cpu), key=lambda r: r[1])
    dtype = store.manifest["logprob_dtype"]
    codec = store.manifest["codec"]
    sizes = {
        (backend, c): sum(encode(backend, a, layout_of(store.manifest, c)) for a in arrays) / tokens
        for backend in ("zarr", "arrow")
        for c in CODECS
    }
    raw = sum(sum(f.nbytes for f in a.fields().values()) + a.seq_offsets.nbytes for a in arrays)
    facts = [f"targets {store.targets}", f"codec {codec}"]
    fidelity = []
    if store.has_topk and codec == "raw":
        rows = [(a.topk_logprobs, a.topk_tail_logprob) for a in arrays]
        f = codec_fidelity(
            np.concatenate([r[0] for r in rows]), np.concatenate([r[1] for r in rows])
        )
        fidelity = ["", fidelity_line(f, "these rows (vs their stored " + dtype + ")")]
    if store.has_topk:
        probs = np.exp(np.concatenate([a.topk_logprobs[:4096] for a in arrays]).astype(np.float64))
        facts += [f"k={store.top_k}", f"mean top-1 prob {probs[:, 0].mean():.3f}",
                  f"mean top-k mass {probs.sum(1).mean():.3f}"]  # fmt: skip
    if store.has_samples:
        entries = sum(int(a.sampled_ids.shape[0]) for a in arrays)
        facts += [f"N={store.samples} draws", f"{entries / tokens:.2f} distinct ids per position"]
    teacher = store.manifest["teacher"]
    name = teacher.get("name_or_path", teacher.get("name", "?"))
    return [
        "",
        f"### On a real teacher's store: `{path}`",
        "",
        f"Teacher {name} ({teacher.get('architecture', '?')}), vocab {store.vocab_size:,}, "
        f"{dtype} log-probs, {tokens:,} train tokens in {len(records)} shards "
        f"(backend {store.backend}); {', '.join(facts)}.",
        "",
        "| | bytes/token | read_shard tokens/s (per CPU-s) |",
        "|---|---|---|",
        f"| as stored ({store.backend}, {codec}, all files) | {store.nbytes / store.num_tokens:.1f} | {fmt(best)} |",
        *[f"| re-encoded as {b}, codec {c} | {v:.1f} | |" for (b, c), v in sizes.items()],
        *fidelity,
        "",
        f"Decoded in numpy this is {raw / tokens:.0f} B/token: the stored shards take "
        f"{100 * store.nbytes / store.num_tokens / (raw / tokens):.0f}% of that (the "
        "synthetic rows above: "
        f"{100 * zarr_synthetic_bpt / (4 + args_k * 4):.0f}%).",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=1 << 19, help="tokens to write per backend")
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--shard-tokens", type=int, default=1 << 18)
    parser.add_argument("--repeats", type=int, default=3, help="read passes; the best is kept")
    parser.add_argument("--threads", type=int, default=1, help="codec threads (1 = one core)")
    parser.add_argument("--id-order", choices=["bpe", "random"], default="bpe")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--real-store",
        nargs="*",
        default=["artifacts/store"],
        help="also measure stores written by a real teacher (each skipped when absent)",
    )
    args = parser.parse_args()

    import numcodecs.blosc
    import pyarrow
    import zarr

    numcodecs.blosc.set_nthreads(args.threads)
    pyarrow.set_cpu_count(args.threads)
    zarr.config.set({"threading.max_workers": args.threads})

    rng = np.random.default_rng(0)
    n_seq = max(1, args.tokens // args.seq_len)
    print(f"machine: {machine_line()}")
    print(
        f"generating {n_seq * args.seq_len:,} tokens (k={args.k}, vocab={args.vocab}, ids {args.id_order}) ..."
    )
    ids, logprobs = zipf_rows(n_seq * args.seq_len, args.k, args.vocab, rng, args.id_order)
    probs = np.exp(logprobs.astype(np.float64))
    top1, mass = float(probs[:, 0].mean()), float(probs.sum(1).mean())
    # the token fed next is usually one of the row's likely ids
    nxt = np.where(
        rng.random(len(ids)) < 0.6,
        ids[:, 0],
        ids[np.arange(len(ids)), rng.integers(0, args.k, len(ids))],
    )
    tokens = np.concatenate([[1], nxt[:-1]]).astype(np.int32)
    seqs = [
        (tokens[i : i + args.seq_len], ids[i : i + args.seq_len], logprobs[i : i + args.seq_len])
        for i in range(0, n_seq * args.seq_len, args.seq_len)
    ]
    print(f"rows: mean top-1 prob {top1:.3f}, mean top-{args.k} mass {mass:.3f}")
    root = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    try:
        results = [run_backend(b, c, seqs, args, root) for c in CODECS for b in ("zarr", "arrow")]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    by = {(r["backend"], r["codec"]): r for r in results}
    from kdcache.storage._arrays import tail_from_topk

    tail = tail_from_topk(logprobs)
    fidelity = codec_fidelity(logprobs.astype(np.float16), tail, reference=(logprobs, tail))
    # the pessimistic id order, size only: ranks mapped to ids by a random permutation
    other = "random" if args.id_order == "bpe" else "bpe"
    other_ids, other_lp = zipf_rows(1 << 16, args.k, args.vocab, rng, other)
    other_bpt = {
        (b, c): encoded_bytes(b, c, other_ids, other_lp, args.vocab) / (1 << 16)
        for c in CODECS
        for b in ("zarr", "arrow")
    }
    raw = 4 + args.k * 2 * 2

    def bits(codec: str, field: str) -> str:
        return f"{by['zarr', codec]['fields'][field] * 8 / args.k:.1f}"

    def cost(r: dict[str, Any]) -> str:
        return f"{100 * (1 - r['read'][1] / r['read_nocheck'][1]):.0f}%"

    lines = [
        "## Logit store (bench/store.py)",
        "",
        f"Machine: {machine_line()}. Codec threads: {args.threads}.",
        f"Data: {results[0]['tokens']:,} tokens in sequences of {args.seq_len}, k={args.k}, "
        f"vocab {args.vocab:,}, float16 log-probs, ids in {args.id_order} order; "
        f"mean top-1 prob {top1:.3f}, mean top-k mass {mass:.3f}. Uncompressed: {raw} B/token. "
        "Local disk (page cache), best of "
        f"{args.repeats} read passes. Codec `raw`: float16 log-probs and ids as they are; `gaps`: "
        "log-probs as int16 levels of a grid fine near log-prob 0 (top-k rows as first level "
        "and gaps), ids by their frequency rank in the shard (storage/_codec.py).",
        "",
        "Throughput in tokens/s of wall time, and in brackets per CPU-second of this process "
        "(the one-core figure, robust to other jobs sharing the machine).",
        "",
        "| backend | codec | bytes/token | write | read_shard | read_shard, check=False | "
        "iter_sequences | file read only (wall) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['backend']} | {r['codec']} | {r['bytes_per_token']:.1f} | {fmt(r['write'])} | "
            f"{fmt(r['read'])} | {fmt(r['read_nocheck'])} | {fmt(r['iter'])} | "
            f"{r['raw_read'] / 1e6:.1f}M |"
        )
    lines += [""]
    for c in CODECS:
        zarr_fields = ", ".join(f"{f} {b:.1f}" for f, b in by["zarr", c]["fields"].items())
        lines.append(f"Zarr bytes/token by field, codec {c}: {zarr_fields}.")
    z, a = by["zarr", "raw"], by["arrow", "raw"]
    lines += [
        "",
        fidelity_line(fidelity, "these rows (vs their float16 values)"),
        "",
        f"Ratio Zarr/Arrow bytes (raw): {z['bytes_per_token'] / a['bytes_per_token']:.2f}; "
        f"read (CPU) Zarr/Arrow: {z['read'][1] / a['read'][1]:.2f}; invariant checks cost "
        + ", ".join(f"{cost(r)} ({r['backend']}, {r['codec']})" for r in results)
        + " of read CPU time.",
        f"With ids in {other} order (65,536 tokens): "
        + ", ".join(f"{b} {c} {v:.1f}" for (b, c), v in other_bpt.items())
        + " bytes/token.",
        "",
        f"What bounds the figures: size is bounded by the entropy of the rows — after "
        f"byte-shuffle + zstd, Zarr spends {bits('raw', 'topk_ids')} bits per id (Zipf-like ids; "
        f"more in random id order, see above) and {bits('raw', 'topk_logprobs')} bits per "
        f"float16 log-prob; the gaps codec {bits('gaps', 'topk_ids')} bits per id code and "
        f"{bits('gaps', 'topk_logprobs')} bits per log-prob level gap. "
        "Byte-shuffle (blosc) separates the predictable high bytes, while Arrow IPC has no "
        "shuffle and relies on zstd alone: a raw Arrow store compresses the interleaved bytes, "
        "a gaps one (format 5) stores its (T, k) codes and gaps as byte planes, rank by rank, "
        "each plane one zstd buffer (the shuffle done by hand). Write speed is bound by zstd encoding (plus input "
        "validation and sha256); read speed by zstd decoding, with the invariant checks (id "
        "range, rows sorted) and the gaps codec's decoding the next costs.",
    ]
    for path in args.real_store:
        if Path(path, "manifest.json").is_file():
            lines += real_store_lines(path, args.repeats, z["bytes_per_token"], args.k)
        else:
            lines += ["", f"(No real teacher's store at {path}: run `make cache-teacher` first.)"]
    text = "\n".join(lines) + "\n"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
