"""`kdcache verify` and `kdcache inspect`: check and describe a logit store."""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import click
import numpy as np
from tqdm import tqdm

from kdcache.storage import open_store, verify_store

SAMPLE_ROWS = 65536


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
    click.echo(
        f"OK: {store}: {len(reader.shards)} shards, {reader.num_sequences:,} sequences, "
        f"{reader.num_tokens:,} tokens verified in {seconds:.1f} s "
        f"({reader.num_tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )


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
    sample = reader.sample_logprobs(SAMPLE_ROWS)  # (rows, k) float32
    probs = np.exp(sample.astype(np.float64))
    tokens = reader.num_tokens
    return {
        "store": reader.url,
        "format_version": m["format_version"],
        "backend": reader.backend,
        "teacher": m["teacher"],
        "tokenizer_sha256": tokenizer_hash,
        "corpus": m["corpus"],
        "vocab_size": reader.vocab_size,
        "top_k": reader.top_k,
        "seq_len": reader.seq_len,
        "id_dtype": m["id_dtype"],
        "logprob_dtype": m["logprob_dtype"],
        "finished": bool(m.get("finished", False)),
        "splits": splits,
        "shards": len(reader.shards),
        "sequences": reader.num_sequences,
        "tokens": tokens,
        "bytes_on_disk": reader.nbytes,
        "bytes_per_token": reader.nbytes / tokens if tokens else None,
        "sampled_rows": int(sample.shape[0]),
        "mean_topk_mass": float(probs.sum(axis=1).mean()) if sample.size else None,
        "mean_top1_prob": float(probs[:, 0].mean()) if sample.size else None,
    }


def _short(value: Any) -> str:
    if isinstance(value, dict):
        return ", ".join(f"{k}={_short(v)}" for k, v in value.items())
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@click.command()
@click.argument("store")
@click.option("--json", "as_json", is_flag=True, help="Print the facts as one JSON object.")
def inspect(store: str, as_json: bool) -> None:
    """Describe STORE: teacher, tokenizer, corpus, layout, sizes and target statistics."""
    facts = describe(store)
    if as_json:
        click.echo(json.dumps(facts, indent=2, sort_keys=True))
        return
    width = max(len(k) for k in facts)
    for key, value in facts.items():
        if key == "splits":
            for split, counts in value.items():
                click.echo(f"{'split ' + split:<{width}}  {_short(counts)}")
        else:
            click.echo(f"{key:<{width}}  {_short(value) if value is not None else '-'}")
