"""`kdcache verify` and `kdcache inspect`: check and describe a logit store."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import click
import numpy as np
import numpy.typing as npt
from tqdm import tqdm

from kdcache.storage import Store, open_store, verify_store

SAMPLE_ROWS = 65536
# facts of a store with a loss mask; the text output leaves them out for other stores
_MASKED_ONLY = ("trained_positions", "trained_fraction", "bytes_per_trained_position")


@click.command()
@click.argument("store")
@click.pass_context
def verify(ctx: click.Context, store: str) -> None:
    """Recompute every checksum and invariant of STORE; exit 1 naming each bad shard."""
    started = time.perf_counter()
    with tqdm(unit="shard", desc="verify", leave=False, delay=0.5) as bar:

        def progress(_name: str, total: int) -> None:
            bar.total = total
            bar.update(1)

        problems = verify_store(store, on_shard=progress)
    if problems:
        for shard, problem in problems:
            click.echo(f"{shard}: {problem}")
        click.echo(f"{len({s for s, _ in problems})} bad shard(s) in {store}", err=True)
        ctx.exit(1)
    reader = open_store(store)
    seconds = time.perf_counter() - started
    trained = f" ({reader.num_trained:,} trained)" if reader.has_loss_mask else ""
    click.echo(
        f"OK: {store}: {len(reader.shards)} shards, {reader.num_sequences:,} sequences, "
        f"{reader.num_tokens:,} tokens{trained} verified in {seconds:.1f} s "
        f"({reader.num_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )


def _spread_rows(n: int, per: int) -> npt.NDArray[np.int64]:
    """Up to ``per`` row indices spread evenly over ``n`` rows."""
    return np.arange(0, n, max(1, n // per), dtype=np.int64)[:per]


def _quantiles(values: npt.NDArray[Any]) -> dict[str, float]:
    """mean, p50 and p99 of ``values`` (1-D) as plain floats."""
    p50, p99 = np.percentile(values, [50, 99])
    return {"mean": float(values.mean()), "p50": float(p50), "p99": float(p99)}


def target_statistics(reader: Store, max_rows: int = SAMPLE_ROWS) -> dict[str, Any]:
    """Statistics of up to ``max_rows`` target rows (trained positions) spread over up to 4
    shards.

    Top-k stores: mean top-k mass and top-1 probability, and the exact mass outside the top-k
    (``exp(topk_tail_logprob)``; version-2 stores, None for version 1, whose tail is only
    ``1 - mean_topk_mass``). Sampled stores: distinct ids per position.
    """
    picked = reader.spread_shards()
    per = max(1, max_rows // max(1, len(picked)))
    logprobs, tails, distinct = [], [], []
    for record in picked:
        arrays = reader.read_shard(record, check=False)
        rows = _spread_rows(arrays.num_targets, per)  # (r,) target rows
        if arrays.topk_logprobs is not None:
            logprobs.append(arrays.topk_logprobs[rows].astype(np.float64))  # (r, k)
        if arrays.topk_tail_logprob is not None:
            tails.append(arrays.topk_tail_logprob[rows].astype(np.float64))  # (r,)
        if arrays.sampled_distinct is not None:
            distinct.append(arrays.sampled_distinct[rows].astype(np.float64))  # (r,)
    facts: dict[str, Any] = {
        "statistics_rows": sum(len(r) for r in (logprobs or distinct)),
        "mean_topk_mass": None,
        "mean_top1_prob": None,
        "tail_mass": None,
        "sampled_distinct": None,
    }
    if logprobs:
        probs = np.exp(np.concatenate(logprobs))  # (rows, k)
        facts["mean_topk_mass"] = float(probs.sum(axis=1).mean())
        facts["mean_top1_prob"] = float(probs[:, 0].mean())
    if tails and reader.manifest["format_version"] >= 2:
        facts["tail_mass"] = _quantiles(np.exp(np.concatenate(tails)))
    if distinct:
        facts["sampled_distinct"] = _quantiles(np.concatenate(distinct))
    return facts


def bytes_by_field(reader: Store) -> dict[str, float] | None:
    """Bytes per token (all positions, trained or not) of each field, ``loss_mask`` included,
    from the commit records' file sizes (Zarr: one directory per field; an Arrow shard is one
    file, so None). Metadata files count as ``metadata``."""
    if reader.backend != "zarr" or not reader.num_tokens:
        return None
    sizes: dict[str, int] = {}
    for record in reader.shards:
        for rel, info in record.files.items():
            parts = rel[len(record.path) + 1 :].split("/")
            field = parts[0] if len(parts) > 1 else "metadata"
            sizes[field] = sizes.get(field, 0) + info["size"]
    return {field: size / reader.num_tokens for field, size in sorted(sizes.items())}


def describe(store: str) -> dict[str, Any]:
    """The facts `kdcache inspect` shows, as a JSON-ready dict."""
    reader = open_store(store)
    m = reader.manifest
    tokenizer = m["tokenizer"]
    tokenizer_hash = (
        tokenizer.get("sha256")
        or hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode()).hexdigest()
    )
    splits = {
        split: {
            "shards": len(records),
            "sequences": sum(r.num_sequences for r in records),
            "tokens": sum(r.num_tokens for r in records),
        }
        for split in reader.splits
        for records in [reader.shards_of(split)]
    }
    tokens, trained = reader.num_tokens, reader.num_trained
    masked = reader.has_loss_mask
    return {
        "store": reader.url,
        "format_version": m["format_version"],
        "backend": reader.backend,
        "teacher": m["teacher"],
        "tokenizer_sha256": tokenizer_hash,
        "corpus": m["corpus"],
        "vocab_size": reader.vocab_size,
        "tokenizer_size": reader.tokenizer_size,
        "targets": reader.targets,
        "top_k": reader.top_k,
        "samples": reader.samples,
        "sample_seed": m["sample_seed"],
        "seq_len": reader.seq_len,
        "id_dtype": m["id_dtype"],
        "logprob_dtype": m["logprob_dtype"],
        "count_dtype": m["count_dtype"],
        "loss_mask": masked,
        "finished": bool(m.get("finished", False)),
        "splits": splits,
        "shards": len(reader.shards),
        "sequences": reader.num_sequences,
        "tokens": tokens,
        "trained_positions": trained if masked else None,
        "trained_fraction": trained / tokens if masked and tokens else None,
        "bytes_on_disk": reader.nbytes,
        "bytes_per_token": reader.nbytes / tokens if tokens else None,
        "bytes_per_trained_position": reader.nbytes / trained if masked and trained else None,
        "bytes_per_token_by_field": bytes_by_field(reader),
        **target_statistics(reader),
    }


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def inspect(store: str, as_json: bool) -> None:
    """Describe STORE: teacher, tokenizer, corpus, targets, layout, sizes and target statistics."""
    facts = describe(store)
    if as_json:
        click.echo(json.dumps(facts, indent=2, sort_keys=True))
        return
    shown = {
        key: value
        for key, value in facts.items()
        if not (key in _MASKED_ONLY and value is None)  # a store without a mask trains all
        and not (key == "tokenizer_size" and value == facts["vocab_size"])
    }
    width = max(len(k) for k in shown)
    for key, value in shown.items():
        if key == "splits":
            for split, counts in value.items():
                click.echo(f"{'split ' + split:<{width}}  {_short(counts)}")
        else:
            click.echo(f"{key:<{width}}  {_short(value) if value is not None else '-'}")
