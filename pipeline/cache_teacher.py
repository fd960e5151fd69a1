"""Stage one: run a teacher once over a corpus and cache its top-k log-probs in a logit store.

The recipe, top to bottom: check every setting (nothing is touched before that) → fingerprint the
teacher, tokenizer and corpus into a manifest → create or reopen the store (rank 0 first) → load
the teacher and self-check the exact chunked targets, while a background thread already reads
and tokenizes the corpus into the shard plan → stream the plan: each rank computes
the shards whose index % world_size == its rank, skipping committed ones, while a background
thread writes and commits them → barrier → rank 0 marks the store finished and prints a summary.

Launch with ``kdcache cache-teacher ...``, ``torchrun --nproc_per_node N -m kdcache.pipeline
cache-teacher ...`` or ``accelerate launch -m kdcache.pipeline cache-teacher ...``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import numpy as np

from kdcache.pipeline.background import Prefetcher, ShardSink, to_host
from kdcache.pipeline.corpus import CorpusError, CorpusStats, iter_documents, resolve_corpus
from kdcache.pipeline.errors import UserError

FORMATS = ("zarr", "arrow")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
PROBE_TEXT = "def probe(x):\n    return x * 2  # The quick brown fox jumps over the lazy dog.\n"


@dataclass
class CacheSettings:
    """Every option of ``kdcache cache-teacher`` (see ``--help``)."""

    teacher: str
    corpus: str
    out: str
    top_k: int = 64
    seq_len: int = 1024
    batch_size: int = 8
    format: str = "zarr"
    shard_tokens: int = 1 << 19
    dtype: str = "auto"
    eval_fraction: float = 0.02
    max_tokens: int | None = None
    text_field: str = "text"
    trust_remote_code: bool = False
    chunk_tokens: int | None = None  # rows of vocab-wide floats at a time; None = 128 MiB worth


def check_settings(s: CacheSettings) -> list[Path]:
    """Validate what can be validated without the teacher; returns the corpus files."""
    if s.format not in FORMATS:
        raise UserError(f"unknown --format, {s.format}, use one of {', '.join(FORMATS)}")
    if s.dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype, {s.dtype}, use one of {', '.join(DTYPE_CHOICES)}")
    if s.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {s.seq_len}, pass a larger value")
    if s.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {s.top_k}, pass a positive value")
    for name, value in (("--batch-size", s.batch_size), ("--shard-tokens", s.shard_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}, pass a positive value")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {s.max_tokens}, or leave it out")
    if not 0.0 <= s.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {s.eval_fraction}, e.g. 0.02")
    if "://" not in s.out:
        out = Path(s.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"output path is a file, {s.out}, give a directory for the store")
        if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
            raise UserError(
                f"output directory is not empty and not a kdcache store, {s.out}, "
                "give a new or empty directory"
            )
    try:
        return resolve_corpus(s.corpus)
    except CorpusError as e:
        raise UserError(str(e)) from e


def corpus_facts(s: CacheSettings, files: list[Path]) -> tuple[dict[str, Any], int]:
    """The manifest's ``corpus`` entry, and an estimate of the corpus' size in bytes.

    Raises:
        UserError: every document is empty.
    """
    from kdcache.pipeline.corpus import STDLIB, check_parquet_columns, corpus_fingerprint

    stats = CorpusStats()
    try:
        check_parquet_columns(files, s.text_field)
        next(iter_documents(files, stats, s.text_field))
    except StopIteration:
        raise UserError(
            f"corpus has no non-empty documents ({stats.summary()}), {s.corpus}, "
            f"give files with text (field/column {s.text_field!r} for .jsonl/.parquet)"
        ) from None
    except CorpusError as e:
        raise UserError(str(e)) from e
    spec = s.corpus if s.corpus == STDLIB else str(Path(s.corpus).expanduser().absolute())
    facts = {
        "spec": spec,
        "fingerprint": corpus_fingerprint(s.corpus, files),
        "files": len(files),
        "eval_fraction": s.eval_fraction,
        "text_field": s.text_field,
        "max_tokens": s.max_tokens,
    }
    return facts, sum(p.stat().st_size for p in files)


def open_store_on_all_ranks(
    accelerator: Any, out: str, manifest: dict[str, Any], tokenizer: dict[str, bytes]
) -> Any:
    """Rank 0 creates (or reopens) the store and writes the tokenizer; then the others join."""
    from accelerate.utils import broadcast_object_list

    from kdcache.storage import StoreIncompatible, StoreUnavailable, create_store

    writer, failure = None, [None]
    if accelerator.is_main_process:
        try:
            writer = create_store(out, manifest)
            writer.write_tokenizer(tokenizer)
        except StoreIncompatible as e:
            lines = "; ".join(e.differences) or str(e)
            failure[0] = (
                f"the store at {out} was made with other settings ({lines}), rerun with its "
                "settings to resume, or give a new --out"
            )
        except StoreUnavailable as e:
            failure[0] = str(e)
        except (OSError, ValueError) as e:
            failure[0] = f"cannot create the store, {out}, ({e})"
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        if not accelerator.is_main_process:
            raise SystemExit(2)  # rank 0 prints the one error line
        raise UserError(failure[0])
    accelerator.wait_for_everyone()
    if writer is None:
        writer = create_store(out, manifest)
    return writer


def batches(sequences: list[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    """Consecutive sequences of equal length, at most ``batch_size`` each (no padding needed)."""
    groups: list[list[np.ndarray]] = []
    for tokens in sequences:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(tokens):
            groups[-1].append(tokens)
        else:
            groups.append([tokens])
    return groups


def check_token_ids(tokens: Any, vocab_size: int, teacher: str) -> None:
    """The tokenizer may know more tokens than the model embeds; such an id must not reach it."""
    highest = int(tokens.max())
    if highest >= vocab_size:
        raise UserError(
            f"the teacher's tokenizer produced token id {highest}, outside the model's vocabulary "
            f"of {vocab_size}, {teacher}, use the tokenizer the model was trained with"
        )


def cache_teacher(s: CacheSettings) -> dict[str, Any]:
    """Run stage one; returns the summary facts (also printed by the main process)."""
    started = time.perf_counter()
    files = check_settings(s)

    # Teacher config + tokenizer first: cheap, and enough to validate --top-k and --seq-len.
    import torch
    from accelerate import Accelerator

    from kdcache.pipeline.host_memory import keep_freed_memory
    from kdcache.pipeline.targets import TopkTargets
    from kdcache.pipeline.teacher import (
        load_model,
        open_teacher,
        resolve_dtype,
        teacher_fingerprint,
        tokenizer_files,
        tokenizer_fingerprint,
    )
    from kdcache.storage import make_manifest

    source = open_teacher(s.teacher, trust_remote_code=s.trust_remote_code)
    if source.hub_unreachable and int(os.environ.get("RANK", "0")) == 0:
        click.echo(
            f"Note: the Hugging Face Hub is unreachable; {s.teacher} is read from the local "
            f"cache (revision {source.revision})",
            err=True,
        )
    vocab_size, eos_id = source.vocab_size, source.eos_id
    if s.top_k > vocab_size:
        raise UserError(
            f"--top-k exceeds the teacher's vocabulary of {vocab_size}, got {s.top_k}, "
            f"pass at most {vocab_size}"
        )
    text_config = source.config.get_text_config()
    context = getattr(text_config, "max_position_embeddings", None) or getattr(
        text_config, "n_positions", None
    )
    if isinstance(context, int) and s.seq_len > context:
        raise UserError(
            f"--seq-len exceeds the teacher's context of {context} tokens, got {s.seq_len}, "
            f"pass at most {context}"
        )
    probe = source.tokenizer(PROBE_TEXT * 4, add_special_tokens=False)["input_ids"][:64] or [eos_id]
    check_token_ids(np.asarray(probe), vocab_size, s.teacher)
    corpus, corpus_bytes = corpus_facts(s, files)

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    dtype = resolve_dtype(s.dtype, source.config, device)
    tokenizer = tokenizer_files(source)
    manifest = make_manifest(
        backend=s.format,
        teacher=teacher_fingerprint(source, dtype),
        tokenizer=tokenizer_fingerprint(tokenizer),
        vocab_size=vocab_size,
        top_k=s.top_k,
        seq_len=s.seq_len,
        corpus=corpus,
        shard_tokens=s.shard_tokens,
    )
    writer = open_store_on_all_ranks(accelerator, s.out, manifest, tokenizer)
    already = set(writer.committed())

    # Reading and tokenizing run in a background thread from here on, so the first shards are
    # planned while the teacher loads; results go through a bounded queue to the writer thread.
    stats = CorpusStats()
    with closing(Prefetcher(lambda: shard_plan(s, files, stats, source), maxsize=2)) as plan:
        model = load_model(source, dtype, device, trust_remote_code=s.trust_remote_code)
        keep_freed_memory(device, large_blocks=False)  # CPU: no page faults per activation
        targets = TopkTargets(model, s.top_k, s.chunk_tokens)
        note = targets.self_check(torch.tensor([probe], device=device))
        if note and accelerator.is_main_process:
            click.echo(f"Note: {note}", err=True)
        setup_seconds = time.perf_counter() - started
        estimate = corpus_bytes // 3 if s.max_tokens is None else min(s.max_tokens, corpus_bytes)
        with progress_bar(estimate, enabled=accelerator.is_main_process) as advance:
            try:
                compute_shards(plan, writer, targets, device, s, already, rank, world, advance)
            except CorpusError as e:  # a file damaged past the checks; committed shards stay
                raise UserError(f"{e}; the shards committed so far are kept") from e

    accelerator.wait_for_everyone()
    records = writer.committed()
    summary = summarize(records, already, stats, time.perf_counter() - started, targets.method)
    summary["setup_seconds"] = round(setup_seconds, 3)  # config, store, model load, self-check
    if accelerator.is_main_process:
        writer.mark_finished(summary)
        click.echo(summary_line(summary, s.out))
    accelerator.wait_for_everyone()
    return summary


def shard_plan(s: CacheSettings, files: list[Path], stats: CorpusStats, source: Any) -> Any:
    """Documents → token ids → packed sequences → the shard plan (every rank the same)."""
    from kdcache.pipeline.packing import plan_shards, tokenize_documents

    return plan_shards(
        tokenize_documents(
            iter_documents(files, stats, s.text_field),
            source.tokenizer,
            eval_fraction=s.eval_fraction,
            eos_id=source.eos_id,
            max_tokens=s.max_tokens,
        ),
        seq_len=s.seq_len,
        eos_id=source.eos_id,
        sequences_per_shard=max(1, s.shard_tokens // s.seq_len),
    )


@contextmanager
def progress_bar(estimate: int, *, enabled: bool) -> Iterator[Callable[..., None]]:
    """One tqdm bar in tokens; yields ``advance(tokens, shards_done=None)``. Closed (even on an
    error) before the caller prints anything, so an error line never lands inside the bar."""
    from tqdm.auto import tqdm

    bar = tqdm(
        total=estimate,
        unit="tok",
        unit_scale=True,
        desc="cache-teacher",
        disable=not enabled,
        dynamic_ncols=True,
    )

    def advance(tokens: int, shards_done: int | None = None) -> None:
        bar.update(tokens)
        if bar.n > bar.total:  # the size estimate (corpus bytes / 3) was low: keep the ETA sane
            bar.total = int(bar.n * 1.1)
        if shards_done is not None:
            bar.set_postfix(shards=shards_done, refresh=False)

    try:
        yield advance
        bar.total = bar.n
    finally:
        bar.close()


def compute_shards(
    plan: Iterable[Any],
    writer: Any,
    targets: Any,
    device: Any,
    s: CacheSettings,
    already: set[str],
    rank: int,
    world: int,
    advance: Callable[..., None],
) -> None:
    """This rank's shards of the plan (index % world == rank), minus those committed before:
    teacher forward and top-k on the device, compression and commits in the writer thread."""
    import torch

    vocab_size = writer.manifest["vocab_size"]
    logprob_dtype = (
        torch.float16 if writer.manifest["logprob_dtype"] == "float16" else torch.float32
    )
    with ShardSink(writer, maxsize=8) as sink, torch.inference_mode():
        for shard in plan:
            name = f"{shard.split}-{shard.index:05d}"
            if shard.index % world != rank or name in already:
                advance(shard.num_tokens)  # another rank's work, or done in an earlier run
                continue
            sink.open(shard.split, shard.index, shard.corpus_range)
            for group in batches(shard.sequences, s.batch_size):
                tokens = torch.from_numpy(np.stack(group))  # (B, S) int32
                check_token_ids(tokens, vocab_size, s.teacher)
                if device.type == "cuda":
                    tokens = tokens.pin_memory()
                input_ids = tokens.to(device, non_blocking=True).long()
                ids, logprobs = targets(input_ids)  # (B, S, k) each, on the device
                sink.put(tokens.numpy(), *to_host(ids, logprobs.to(logprob_dtype)))
                advance(tokens.numel())
            sink.commit()
            advance(0, shards_done=len(already) + sink.committed)


def summarize(
    records: dict[str, Any], already: set[str], stats: CorpusStats, seconds: float, method: str
) -> dict[str, Any]:
    """The facts of the final summary line (also stored as the manifest's ``stats``)."""
    tokens = sum(r.num_tokens for r in records.values())
    computed = sum(r.num_tokens for name, r in records.items() if name not in already)
    nbytes = sum(r.nbytes for r in records.values())
    return {
        "shards": len(records),
        "shards_resumed": len(already),
        "sequences": sum(r.num_sequences for r in records.values()),
        "tokens": tokens,
        "tokens_by_split": {
            split: sum(r.num_tokens for r in records.values() if r.split == split)
            for split in sorted({r.split for r in records.values()})
        },
        "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1),
        "tokens_computed": computed,
        "seconds": round(seconds, 3),
        "tokens_per_second": computed / max(seconds, 1e-9),
        "documents": stats.documents,
        "empty_documents_skipped": stats.empty_skipped,
        "unparseable_documents_skipped": stats.unparseable_skipped,
        "invalid_utf8_documents_repaired": stats.invalid_utf8_replaced,
        "method": method,
    }


def summary_line(f: dict[str, Any], out: str) -> str:
    resumed = f", {f['shards_resumed']} already there" if f["shards_resumed"] else ""
    return (
        f"cache-teacher: {f['sequences']:,} sequences, {f['tokens']:,} tokens, "
        f"{f['shards']} shards{resumed}, {f['bytes_per_token']:.1f} bytes/token, "
        f"{f['seconds']:.1f} s, {f['tokens_per_second']:,.0f} tokens/s, skipped documents: "
        f"{f['empty_documents_skipped']} empty, {f['unparseable_documents_skipped']} unparseable "
        f"({f['invalid_utf8_documents_repaired']} with invalid UTF-8 repaired) -> {out}"
    )


@click.command("cache-teacher")
@click.option("--teacher", required=True, help="Hugging Face model directory or hub id.")
@click.option(
    "--corpus",
    required=True,
    help="Directory, file or glob of .txt/.md/.py/.jsonl/.parquet, or `stdlib`.",
)
@click.option("--out", required=True, help="Store directory or fsspec URL (created, or resumed).")
@click.option("--top-k", default=64, show_default=True, help="Log-probs kept per position.")
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per teacher input.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per forward.")
@click.option(
    "--format", "format_", default="zarr", show_default=True, help="Store backend: zarr or arrow."
)
@click.option(
    "--shard-tokens",
    default=1 << 19,
    show_default=True,
    help="Tokens per shard (rounded down to whole sequences).",
)
@click.option(
    "--dtype",
    default="auto",
    show_default=True,
    help="auto (config dtype on CUDA, float32 on CPU), float32, bfloat16 or float16.",
)
@click.option(
    "--eval-fraction",
    default=0.02,
    show_default=True,
    help="Fraction of documents (by content hash) in the eval split.",
)
@click.option(
    "--max-tokens",
    type=int,
    default=None,
    help="Cap on the corpus' packed tokens (same cap for any number of processes).",
)
@click.option(
    "--text-field",
    default="text",
    show_default=True,
    help="Field of .jsonl records / column of .parquet files.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow the teacher's own Python code (only for teachers you trust).",
)
def command(format_: str, **options: Any) -> None:
    """Run a teacher once over a corpus and cache its top-k log-probs in a logit store."""
    cache_teacher(CacheSettings(format=format_, **options))
