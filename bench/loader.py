"""Loader throughput at k=64 (vocab 32k) with 1 and 2 decoding threads, and a tiny student's data-wait share.

    .venv/bin/python bench/loader.py [--tokens 1048576] [--shards 8] [--codecs raw,gaps]

For each store codec (``raw``: float16 log-probs; ``gaps``: int16 levels and id codes, decoded on
read), builds a store of realistic rows (float16 log-probs sorted descending, top-k mass 0.5-0.99,
Zipf-like ids), then measures in the same run: decode-only (``Store.read_shard`` on 1 and 2 threads,
each decoding the whole store), the loader with 1 and 2 decoding threads (``--workers``), and
``train_step`` of a ``tiny`` student fed by the loader, timing how long each step waits for its
batch. Loader rates are steady state: an endless loader is timed over ``--epochs`` passes over the
store after a first, untimed pass (the first shards' decode is reported separately as the time to
the first batch). CPU seconds count every thread of the process over the same window.
Writes ``bench/results/loader.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.pipeline.distill.student import build_student
from kdcache.pipeline.distill.trainee import make_accelerator, make_trainee, train_step
from kdcache.storage import create_store, make_manifest, open_store
from kdcache.storage.manifest import CODECS

VOCAB, K = 32_000, 64
# bytes per token of a batch before this change: int64 ids, float32 log-probs, 3 int64 fields
WIDE_BYTES = K * (8 + 4) + 3 * 8


def build_store(
    path: str, tokens: int, seq_len: int, backend: str, shards: int, codec: str
) -> float:
    """Write ``tokens`` realistic rows into a new store; returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(0)
    manifest = make_manifest(
        codec=codec,
        backend=backend,
        teacher={"name": "bench-synthetic"},
        tokenizer={"name": "none"},
        vocab_size=VOCAB,
        top_k=K,
        seq_len=seq_len,
        corpus={"spec": "synthetic"},
        shard_tokens=max(seq_len, tokens // shards),
    )
    writer = create_store(path, manifest)
    for start in range(0, tokens, seq_len):
        n = min(seq_len, tokens - start)
        scores = np.sort(rng.gumbel(size=(n, K)) * 1.5, axis=1)[:, ::-1]  # (n, k) descending
        mass = rng.uniform(0.5, 0.99, size=(n, 1))  # the teacher's top-k mass
        logprobs = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True) + np.log(mass)
        ids = (VOCAB * rng.random((n, K)) ** 3).astype(np.int64)  # frequent ids are small
        writer.append("train", rng.integers(0, VOCAB, n), ids, logprobs)
    writer.flush()
    return time.perf_counter() - started


def loader_rate(
    url: str,
    workers: int,
    batch_size: int,
    tokens: int,
    epochs: int,
    rank: tuple[int, int] = (0, 1),
) -> tuple[float, float, float, int]:
    """Steady-state loader throughput: (first batch s, wall s, CPU s, tokens) over ``epochs``
    passes over the store (``tokens`` each), timed after a first, untimed pass; ``rank`` (r, R):
    the loader of rank r of R, which reads its rows of every batch (``tokens / R`` a pass).

    The first pass is not timed because a shuffle window as large as the store makes the first
    batches decode most shards, work that a window of one epoch would miss; timed over whole
    epochs after it, every shard is decoded inside the window as often as it is read. CPU
    seconds are the process's (all its threads) over the timed window: tokens per CPU-second
    is what one dedicated core delivers, whatever else the machine is running.
    """
    started = time.perf_counter()
    dataset = DistillDataset(url, batch_size=batch_size, rank=rank[0], world_size=rank[1])
    loader = TeacherLoader(dataset, num_workers=workers)
    tokens //= rank[1]
    seen = int(next(loader)["attention_mask"].sum())
    first = time.perf_counter() - started
    while seen < tokens:
        seen += int(next(loader)["attention_mask"].sum())
    cpu = time.process_time()
    started = time.perf_counter()
    seen = 0
    while seen < tokens * epochs:
        seen += int(next(loader)["attention_mask"].sum())
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    loader.close()
    return first, wall, cpu, seen


def student_wait(url: str, workers: int, batch_size: int, steps: int) -> tuple[float, float, int]:
    """Train a tiny student for ``steps``: (seconds waiting for data, total seconds, tokens)."""
    accelerator = make_accelerator(0)
    model, _ = build_student("tiny", VOCAB)
    trainee = make_trainee(
        "bench", model, accelerator, loss="kl", temperature=1.0, alpha=0.5, lr=1e-3, steps=steps,
        warmup=1,
    )  # fmt: skip
    loader = TeacherLoader(DistillDataset(url, batch_size=batch_size), num_workers=workers)
    train_step(trainee, [next(loader)], accelerator)  # warm-up: worker start, first allocations
    waiting = 0.0
    tokens = 0
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(loader)
        waiting += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        train_step(trainee, [batch], accelerator)
    total = time.perf_counter() - started
    loader.close()
    return waiting, total, tokens


def measure(url: str, args: argparse.Namespace) -> dict:
    """Decode-only and loader rates of the store at ``url``, its batch bytes and data wait."""
    store = open_store(url)
    store.read_shard(store.shards[0])  # warm-up: imports, codec set-up
    n = store.num_tokens
    rows = []
    for threads in (1, 2):  # decoding releases the GIL: 2 threads should decode ~2x on 2 cores
        runs = []
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(args.repeats):
                cpu, started = time.process_time(), time.perf_counter()
                for _ in pool.map(store.read_shard, store.shards * threads):
                    pass
                wall, cpu = time.perf_counter() - started, time.process_time() - cpu
                m = n * threads  # each thread decodes the store once
                label = f"decode only (read_shard), {threads} thread{'s' * (threads > 1)}"
                runs.append((label, "", m / wall, m / wall / threads, m / cpu))
        rows.append(max(runs, key=lambda row: row[4]))  # the best repeat, by tokens per CPU-second
    for workers, rank in ((1, (0, 1)), (2, (0, 1)), (1, (1, 4))):
        label = f"{workers} thread{'s' * (workers > 1)}"
        if rank[1] > 1:  # reads its rows of every batch, decodes only those sequences
            label += f", rank {rank[0] + 1} of {rank[1]}"
        runs = []
        for _ in range(args.repeats):
            first, wall, cpu, tokens = loader_rate(
                url, workers, args.batch_size, args.tokens, args.epochs, rank
            )
            per = tokens / wall / workers
            runs.append((f"loader, {label}", f"{first:.2f} s", tokens / wall, per, tokens / cpu))
        rows.append(max(runs, key=lambda row: row[4]))
    for name, first, rate, per, per_cpu in rows:
        print(
            f"{name}: {rate:,.0f} tokens/s ({per:,.0f} per thread, {per_cpu:,.0f} per "
            f"CPU-second){f', first batch after {first}' if first else ''}"
        )
    batch = next(iter(TeacherLoader(DistillDataset(store, batch_size=args.batch_size))))
    shipped = sum(t.numel() * t.element_size() for t in batch.values())
    shipped /= batch["attention_mask"].numel()
    print(f"batch bytes per token: {shipped:.0f} (was {WIDE_BYTES} with int64/float32)")
    waiting, total, tokens = student_wait(url, 1, args.student_batch, args.student_steps)
    print(
        f"tiny student, 1 thread: {total / args.student_steps:.2f} s/step, "
        f"{tokens / total:,.0f} tokens/s, waiting {waiting / total:.2%}"
    )
    return {"rows": rows, "shipped": shipped, "share": waiting / total,
            "step": total / args.student_steps, "bpt": store.nbytes / n}  # fmt: skip


def verdict(codec: str, m: dict) -> str:
    """Target line of one codec's store: per-worker wall and per-CPU-second rates, 1 and 2
    workers."""
    (_, _, one_wall, one, one_cpu), (_, _, two_wall, two, two_cpu) = m["rows"][2], m["rows"][3]
    decode_cpu, decode_one, decode_two = m["rows"][0][4], m["rows"][0][2], m["rows"][1][2]
    ranked_cpu = m["rows"][4][4]  # rank 2 of 4, per token it reads

    def met(rate: float) -> str:
        return "met" if rate >= 1e6 else "not met"

    return (
        f"- `{codec}`: 1 thread {one:,.0f} tokens/s on the wall clock ({met(one)} in this run), "
        f"{one_cpu:,.0f} per CPU-second ({met(one_cpu)} for a dedicated core); 2 threads "
        f"{two_wall:,.0f} tokens/s ({two_wall / one_wall:.2f}x one thread), {two:,.0f} per thread "
        f"on the wall clock ({met(two)} in this run), {two_cpu:,.0f} per CPU-second "
        f"({met(two_cpu)} for a dedicated core per thread). Decoding alone "
        f"{decode_cpu:,.0f} tokens per CPU-second ({1e6 / decode_cpu:.2f} µs per token; 2 threads "
        f"decode {decode_two / decode_one:.2f}x the tokens/s of one), the "
        f"loader adds {1e6 / one_cpu - 1e6 / decode_cpu:.2f} µs; rank 2 of 4 (its rows of every "
        f"batch, only those sequences decoded) {1e6 / ranked_cpu:.2f} µs per token it reads, "
        f"{one_cpu / ranked_cpu:.2f}x a single rank's (4x if it decoded whole shards); `tiny` "
        f"student waiting on data **{m['share']:.2%}** of step time ({m['step']:.2f} s/step; "
        "target < 2%)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20, help="store size = tokens timed")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=3, help="passes timed, after one untimed")
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is kept")
    parser.add_argument("--backend", default="zarr", choices=("zarr", "arrow"))
    parser.add_argument("--codecs", default="raw,gaps", help="store codecs to measure, in order")
    parser.add_argument("--student-steps", type=int, default=6)
    parser.add_argument("--student-batch", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.md"))
    args = parser.parse_args()
    if min(args.tokens, args.shards, args.student_steps, args.batch_size, args.epochs,
           args.repeats) < 1:  # fmt: skip
        parser.error("--tokens, --shards, --batch-size, --epochs, --repeats, --student-steps: >= 1")
    codecs = [c.strip() for c in args.codecs.split(",")]
    if not codecs or set(codecs) - set(CODECS):
        parser.error(f"--codecs takes a comma-separated list of {', '.join(CODECS)}")

    facts = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "torch threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for name, value in facts.items():
        print(f"{name}: {value}")
    results = {}
    for codec in codecs:
        with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
            url = str(Path(tmp) / "store")
            build_s = build_store(url, args.tokens, args.seq_len, args.backend, args.shards, codec)
            print(f"== codec {codec}: store of {args.tokens:,} tokens built in {build_s:.1f} s")
            results[codec] = measure(url, args)
    shipped = results[codecs[0]]["shipped"]
    lines = [
        "## Loader (`bench/loader.py`)",
        "",
        f"Store: {args.tokens:,} synthetic tokens in {args.shards} shards, vocab {VOCAB:,}, "
        f"k={K}, float16 log-probs, {args.backend}, seq_len {args.seq_len}, batch "
        f"{args.batch_size}; codec `raw` (float16 log-probs, ids) and `gaps` (int16 levels and "
        f"id codes, decoded to the same dtypes on read). Loader rows: {args.epochs} passes over "
        "the store timed after a first, untimed one (the shuffle window holds the whole store, "
        f"so the first batches decode most shards); every row the best of {args.repeats} runs by "
        "tokens per CPU-second. Machine: " + ", ".join(f"{k} {v}" for k, v in facts.items()) + ".",
        "",
        "| codec | bytes/token | what | first batch | tokens/s (wall) | per thread (wall) | "
        "tokens per CPU-second |",
        "|---|---:|---|---:|---:|---:|---:|",
        *[
            f"| {c} | {m['bpt']:.1f} | {n} | {f} | {r:,.0f} | {p:,.0f} | {cpu:,.0f} |"
            for c, m in results.items()
            for n, f, r, p, cpu in m["rows"]
        ],  # fmt: skip
        "",
        f"Batches reach the consumer (and cross the host→device link) in the store's compact "
        f"dtypes — uint16 ids, float16 log-probs — at {shipped:.0f} bytes per token instead of "
        f"{WIDE_BYTES} with int64 ids and float32 log-probs; `train_step` and `evaluate` widen "
        "the ids to int64 on the device.",
        "",
        "Target ≥ 1,000,000 tokens/s per worker (decoding thread):",
        "",
        *[verdict(c, m) for c, m in results.items()],
        "",
        "Wall-clock rates depend on what else the machine runs (see the load average); tokens "
        "per CPU-second (every thread of the process, steady state) is what one dedicated core "
        "delivers. What bounds it: decoding shards (blosc/zstd decompression, for `gaps` the "
        "codec's decoding — a rank-by-rank sum, a table lookup for the log-probs and one for the "
        "ids — and the storage invariant checks: the decode-only rows). The decoding threads "
        "release the GIL in that work, so they run in parallel; each shard is decoded once per "
        "pass whatever the number of threads, and the consuming thread collates each batch "
        "straight from the decoded shards. With 2 threads on "
        f"{os.cpu_count()} cores the consuming thread and zarr's own event-loop thread share the "
        "cores with the decoders, so the per-thread wall rate is below what a dedicated core "
        "gives. The shuffle window here (1,024 sequences) holds the whole store, so each pass "
        "starts by decoding most shards before its first batch, the worst case for overlapping "
        "decoding with collation. A student step at vocab 32k costs far more than its batch, so "
        "the data wait is noise once the first batch is ready.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
