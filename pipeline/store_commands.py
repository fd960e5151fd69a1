"""`kdcache verify` and `kdcache inspect`: check and describe a logit store; the
``--storage-options`` option of every command that opens a store, and the shard cache's
``--cache-dir`` / ``--cache-limit`` of those that train or evaluate."""

from __future__ import annotations

import functools
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import click
import numpy as np
import numpy.typing as npt

from kdcache.pipeline.progress import progress as progress_bar
from kdcache.storage import Store, open_store, verify_store
from kdcache.storage.manifest import max_prob_error
from kdcache.storage.shard_cache import ShardCacheConfig, parse_size

SAMPLE_ROWS = 65536
# facts of a store with a loss mask; the text output leaves them out for other stores
_MASKED_ONLY = ("trained_positions", "trained_fraction", "bytes_per_trained_position")


class StorageOptions(click.ParamType):
    """A JSON object of fsspec storage options (its values are not echoed: they may be keys)."""

    name = "JSON"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None or isinstance(value, dict):
            return value
        example = '\'{"endpoint_url": "http://127.0.0.1:9000"}\''
        try:
            options = json.loads(value)
        except ValueError as e:
            self.fail(f"not valid JSON ({e}), pass a JSON object such as {example}", param, ctx)
        if not isinstance(options, dict):
            kind = type(options).__name__
            self.fail(f"not a JSON object, got a {kind}, pass e.g. {example}", param, ctx)
        return options


storage_options_option = click.option(
    "--storage-options",
    type=StorageOptions(),
    default=None,
    help="fsspec options of the store's filesystem, a JSON object, e.g. "
    '\'{"endpoint_url": "http://127.0.0.1:9000", "key": "...", "secret": "..."}\' for s3:// '
    "[default: the AWS_* environment (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...)].",
)


class ByteSize(click.ParamType):
    """Bytes with a unit: 20GB, 512MiB, 4096."""

    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        try:
            return value if value is None or isinstance(value, int) else parse_size(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def shard_cache_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--cache-dir`` and ``--cache-limit``, handed to ``command`` as one ``shard_cache``
    argument (a ``ShardCacheConfig``): how a remote store's shards are cached locally."""

    @functools.wraps(command)
    def wrapper(*args: Any, cache_dir: str | None, cache_limit: int | None, **kw: Any) -> Any:
        return command(*args, shard_cache=ShardCacheConfig(cache_dir, cache_limit), **kw)

    limit = click.option(
        "--cache-limit",
        type=ByteSize(),
        default=None,
        help="Most bytes the shard cache keeps (e.g. 20GB); least recently used shards are "
        "evicted [default: 20% of the cache disk's free space, at most 50GB].",
    )
    directory = click.option(
        "--cache-dir",
        default=None,
        envvar="KDCACHE_CACHE_DIR",
        help="Local cache of a remote store's shards (s3://, gs://, ...; local stores are read "
        "directly) [default: $XDG_CACHE_HOME/kdcache/shards, else ~/.cache/kdcache/shards].",
    )
    return directory(limit(wrapper))


def describe_committed(reader: Store) -> str:
    """What a store has committed, per split: "train 2 shards, 2,048 tokens; eval 1 shard, 512
    tokens" (verify's line and the messages about an unfinished store)."""
    parts = []
    for split in reader.splits:
        records = reader.shards_of(split)
        n, tokens = len(records), sum(r.num_tokens for r in records)
        parts.append(f"{split} {n} shard{'s' * (n != 1)}, {tokens:,} tokens")
    return "; ".join(parts) or "no shard committed yet"


@click.command()
@click.argument("store")
@storage_options_option
@click.pass_context
def verify(ctx: click.Context, store: str, storage_options: dict[str, Any] | None) -> None:
    """Recompute every checksum and invariant of STORE; exit 1 naming each bad shard.

    An unfinished store (its cache-teacher run did not complete) without damage exits 0 with a
    line that says so and what it has committed (docs/architecture.md §3)."""
    started = time.perf_counter()
    with progress_bar(unit="shard", desc="verify", leave=False, delay=0.5) as bar:

        def progress(_name: str, total: int) -> None:
            bar.total = total
            bar.update(1)

        problems = verify_store(store, storage_options=storage_options, on_shard=progress)
    if problems:
        for shard, problem in problems:
            click.echo(f"{shard}: {problem}")
        click.echo(f"{len({s for s, _ in problems})} bad shard(s) in {store}", err=True)
        ctx.exit(1)
    reader = open_store(store, storage_options=storage_options)
    seconds = time.perf_counter() - started
    rate = f"{reader.num_tokens / max(seconds, 1e-9):,.0f} tokens/s"
    trained = f" ({reader.num_trained:,} trained)" if reader.has_loss_mask else ""
    totals = (
        f"{len(reader.shards)} shards, {reader.num_sequences:,} sequences, "
        f"{reader.num_tokens:,} tokens{trained}"
    )
    if not reader.manifest.get("finished"):  # exit 0: nothing is damaged, the line says what is
        click.echo(
            f"UNFINISHED (no damage found): {store}: {totals} committed "
            f"({describe_committed(reader)}) verified in {seconds:.1f} s ({rate}); its "
            "cache-teacher run did not finish, rerun it with the same options to complete the "
            "store (train-student refuses it without --allow-unfinished)"
        )
        return
    click.echo(f"OK: {store}: {totals} verified in {seconds:.1f} s ({rate})")


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


def describe(store: str, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """The facts `kdcache inspect` shows, as a JSON-ready dict."""
    reader = open_store(store, storage_options=storage_options)
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
        "sample_temperature": m["sample_temperature"],  # None without samples
        "seq_len": reader.seq_len,
        "id_dtype": m["id_dtype"],
        "logprob_dtype": m["logprob_dtype"],
        # the store codec (format v4; older stores: raw) and its error bounds against the
        # log-probs in logprob_dtype: the manifest's log-prob bound, the probability bound
        "codec": m["codec"],
        "codec_max_abs_error": m["codec_max_abs_error"],
        "codec_max_prob_error": max_prob_error(m["codec"]),
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
@storage_options_option
def inspect(store: str, as_json: bool, storage_options: dict[str, Any] | None) -> None:
    """Describe STORE: teacher, tokenizer, corpus, targets, layout, sizes and target statistics."""
    facts = describe(store, storage_options)
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
