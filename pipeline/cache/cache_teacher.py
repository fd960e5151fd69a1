"""Stage one: run a teacher once over a corpus and cache its soft targets in a logit store.

The recipe, top to bottom: check every setting (nothing is touched before that) → fingerprint the
teacher, tokenizer and corpus into a manifest → create or reopen the store (rank 0 first) → load
the teacher and self-check the exact chunked targets (top-k and/or samples), while a background
thread already reads and tokenizes the corpus into the shard plan → stream the plan: each rank
computes the shards whose index % world_size == its rank, skipping committed ones, while a
background thread writes and commits them → barrier → rank 0 marks the store finished and prints
a summary.

Launch with ``kdcache cache-teacher ...``, ``torchrun --nproc_per_node N -m kdcache.pipeline
cache-teacher ...`` or ``accelerate launch -m kdcache.pipeline cache-teacher ...``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import click
import numpy as np

from kdcache.pipeline.cache.background import BatchSequences, Prefetcher, ShardSink, to_host
from kdcache.pipeline.cache.batching import padded, teacher_batches
from kdcache.pipeline.cache.corpus import CorpusError, CorpusStats, iter_documents
from kdcache.pipeline.cache.packing import ShardPlan, needs_loss_mask
from kdcache.pipeline.cache.report import PlanFacts, progress_bar, summarize, summary_line
from kdcache.pipeline.cache.settings import (
    PROBE_TEXT,
    CacheSettings,
    check_settings,
    check_token_ids,
    codec_option,
    corpus_facts,
)
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.store_commands import storage_options_option


def open_store_on_all_ranks(
    accelerator: Any, s: CacheSettings, manifest: dict[str, Any], tokenizer: dict[str, bytes]
) -> Any:
    """Rank 0 creates (or reopens) the store and writes the tokenizer; then the others join."""
    from accelerate.utils import broadcast_object_list

    from kdcache.storage import StoreIncompatible, StoreUnavailable, create_store

    writer, failure = None, [None]
    if accelerator.is_main_process:
        try:
            writer = create_store(s.out, manifest, storage_options=s.storage_options)
            writer.write_tokenizer(tokenizer)
        except StoreIncompatible as e:
            lines = "; ".join(e.differences) or str(e)
            failure[0] = (
                f"the store at {s.out} was made with other settings ({lines}), rerun with its "
                "settings to resume, or give a new --out"
            )
        except StoreUnavailable as e:
            failure[0] = str(e)
        except (OSError, ValueError) as e:
            failure[0] = f"cannot create the store, {s.out}, ({e})"
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        if not accelerator.is_main_process:
            raise SystemExit(2)  # rank 0 prints the one error line
        raise UserError(failure[0])
    accelerator.wait_for_everyone()
    if writer is None:
        writer = create_store(s.out, manifest, storage_options=s.storage_options)
    return writer


def cache_teacher(s: CacheSettings) -> dict[str, Any]:
    """Run stage one; returns the summary facts (also printed by the main process)."""
    started = time.perf_counter()
    files = check_settings(s)

    # Teacher config + tokenizer first: cheap, and enough to validate --top-k and --seq-len.
    import torch
    from accelerate import Accelerator

    from kdcache.pipeline.cache.targets import TeacherTargets
    from kdcache.pipeline.host_memory import keep_freed_memory
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
    vocab_size, eos_id, real_vocab = source.vocab_size, source.eos_id, source.tokenizer_size
    if s.stored_top_k > real_vocab:
        raise UserError(
            f"--top-k exceeds the teacher's vocabulary of {real_vocab}, got {s.top_k}, "
            f"pass at most {real_vocab}"
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
    masked = needs_loss_mask(corpus["kind"], corpus["packing"], corpus["train_on"])

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    dtype = resolve_dtype(s.dtype, source.config, device)
    tokenizer = tokenizer_files(source)
    manifest = make_manifest(
        backend=s.format,
        teacher=teacher_fingerprint(source, dtype),
        tokenizer=tokenizer_fingerprint(tokenizer, real_vocab),
        vocab_size=vocab_size,
        seq_len=s.seq_len,
        corpus=corpus,
        shard_tokens=s.shard_tokens,
        loss_mask=masked,
        **s.target_facts,  # targets, top_k, samples, sample_seed, codec
    )
    writer = open_store_on_all_ranks(accelerator, s, manifest, tokenizer)
    already = set(writer.committed())

    # Reading and tokenizing run in a background thread from here on, so the first shards are
    # planned while the teacher loads; results go through a bounded queue to the writer thread.
    stats = CorpusStats()
    plan_facts = PlanFacts()
    make_plan = lambda: shard_plan(s, files, stats, source, corpus, plan_facts)  # noqa: E731
    with closing(Prefetcher(make_plan, maxsize=2)) as plan:
        model = load_model(source, dtype, device, trust_remote_code=s.trust_remote_code)
        keep_freed_memory(device, large_blocks=False)  # CPU: no page faults per activation
        targets = TeacherTargets(
            model,
            s.stored_top_k,
            s.stored_samples,
            s.sample_seed,
            chunk_tokens=s.chunk_tokens,
            real_vocab=real_vocab if real_vocab < vocab_size else None,
        )
        note = targets.self_check(torch.tensor([probe], device=device))
        if note and accelerator.is_main_process:
            click.echo(f"Note: {note}", err=True)
        setup_seconds = time.perf_counter() - started
        estimate = corpus_bytes // 3 if s.max_tokens is None else min(s.max_tokens, corpus_bytes)
        with progress_bar(estimate, enabled=accelerator.is_main_process) as advance:
            try:
                sampled = compute_shards(
                    plan, writer, targets, device, s, already, rank, world, advance
                )
            except CorpusError as e:  # a file damaged past the checks; committed shards stay
                raise UserError(f"{e}; the shards committed so far are kept") from e

    accelerator.wait_for_everyone()
    # distinct sampled ids over the positions every rank computed in this run
    sampled = accelerator.reduce(torch.tensor(sampled, device=device), reduction="sum").tolist()
    records = writer.committed()
    if not records:  # every example skipped: say why instead of finishing an empty store
        raise UserError(
            f"the corpus gave no sequence to cache ({stats.summary()}), {s.corpus}, "
            "check --seq-len, --train-on and the records"
        )
    summary = summarize(records, already, stats, time.perf_counter() - started, targets.method)
    summary |= plan_facts.summary(corpus)
    if s.wants_samples:
        summary["samples"] = s.samples
        summary["sampled_distinct_per_position"] = sampled[0] / sampled[1] if sampled[1] else None
    summary["setup_seconds"] = round(setup_seconds, 3)  # config, store, model load, self-check
    if accelerator.is_main_process:
        writer.mark_finished(summary)
        click.echo(summary_line(summary, s.out))
    accelerator.wait_for_everyone()
    return summary


def shard_plan(
    s: CacheSettings,
    files: list[Path],
    stats: CorpusStats,
    source: Any,
    corpus: dict[str, Any],
    facts: PlanFacts,
) -> Iterator[ShardPlan]:
    """Documents → token ids (BOS/EOS as the tokenizer has them) → packed sequences with their
    trained positions → the shard plan (every rank the same)."""
    from kdcache.pipeline.cache.packing import conventions, plan_shards, tokenize_documents

    tokenizer = source.tokenizer
    rules = conventions(tokenizer, source.eos_id)
    plan = plan_shards(
        tokenize_documents(
            iter_documents(files, stats, s.text_field),
            tokenizer,
            eval_fraction=s.eval_fraction,
            max_tokens=s.max_tokens,
            train_on=corpus["train_on"],
            seq_len=s.seq_len,
            packing=corpus["packing"],
            stats=stats,
            tokenizer_conventions=rules,
        ),
        seq_len=s.seq_len,
        sequences_per_shard=max(1, s.shard_tokens // s.seq_len),
        packing=corpus["packing"],
        bos_id=rules.bos_id,
        stats=stats,
        masked=needs_loss_mask(corpus["kind"], corpus["packing"], corpus["train_on"]),
    )
    for shard in plan:
        facts.count(shard)
        yield shard


def compute_shards(
    plan: Iterable[ShardPlan],
    writer: Any,
    targets: Any,
    device: Any,
    s: CacheSettings,
    already: set[str],
    rank: int,
    world: int,
    advance: Callable[..., None],
) -> tuple[int, int]:
    """This rank's shards of the plan (index % world == rank), minus those committed before:
    teacher forward and targets on the device, compression and commits in the writer thread.

    Only the trained positions (the shard's loss masks; every position without them) get
    targets. Sequences of unequal length are batched longest first and right-padded: causal
    attention keeps the padding out of every real position, and the padding gets no targets.
    Sampling keys each position by (split, shard index, sequence in the shard, t), so its draws
    are the same whichever rank computes it, in whatever batch (docs/architecture.md §3).

    Returns:
        the distinct sampled ids written and the positions they cover (0, 0 without samples).
    """
    import torch

    from kdcache.pipeline.cache.sampling import position_keys

    vocab_size, packing = writer.manifest["vocab_size"], writer.manifest["corpus"]["packing"]
    pad_id = 0  # any id: causal attention keeps padding out of the real positions
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
            lengths = [len(q) for q in shard.sequences]
            for group in teacher_batches(lengths, s.batch_size, pad=packing == "separate"):
                batch = BatchSequences(
                    [shard.sequences[i] for i in group],
                    group,
                    None if shard.loss_masks is None else [shard.loss_masks[i] for i in group],
                )
                tokens, rows = padded(batch, pad_id)  # (B, S) int32, (B, S) bool or None
                check_token_ids(tokens, vocab_size, s.teacher)
                if device.type == "cuda":
                    tokens = tokens.pin_memory()
                input_ids = tokens.to(device, non_blocking=True).long()
                if rows is not None:
                    rows = rows.to(device, non_blocking=True)
                keys = None
                if s.wants_samples:  # (B, S, 4)
                    keys = position_keys(shard.split, shard.index, group, tokens.shape[1], device)
                computed = targets(input_ids, keys, rows).compact(logprob_dtype, s.stored_samples)
                arrays = computed.arrays()  # R rows (the trained positions), on the device
                *host, event = to_host(*arrays.values())
                sink.put(batch, dict(zip(arrays, host, strict=True)), event)
                advance(sum(len(q) for q in batch.tokens))
            sink.commit()
            advance(0, shards_done=len(already) + sink.committed)
    return sink.sampled_entries, sink.sampled_positions


@click.command("cache-teacher")
@click.option("--teacher", required=True, help="Hugging Face model directory or hub id.")
@click.option(
    "--corpus",
    required=True,
    help="Directory, file or glob of .txt/.md/.py/.jsonl/.parquet (text, chat `messages` or "
    "`prompt`/`completion` records), or `stdlib` / `stdlib-chat` (built in, offline).",
)
@click.option("--out", required=True, help="Store directory or fsspec URL (created, or resumed).")
@storage_options_option
@click.option(
    "--targets",
    default="topk",
    show_default=True,
    help="What to store per position: topk (the k most likely ids), sampled (N draws from the "
    "full softmax as distinct ids + counts: unbiased) or topk+sampled (both, one forward).",
)
@click.option(
    "--top-k", default=64, show_default=True, help="Log-probs kept per position (topk targets)."
)
@click.option(
    "--samples",
    default=32,
    show_default=True,
    help="Draws per position, with replacement, for sampled targets (at most 65535).",
)
@click.option(
    "--sample-seed",
    default=0,
    show_default=True,
    help="Seed of the draws; each position's draws depend only on it and the position.",
)
@click.option("--seq-len", default=1024, show_default=True, help="Tokens per teacher input.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per forward.")
@click.option(
    "--format", "format_", default="zarr", show_default=True, help="Store backend: zarr or arrow."
)
@codec_option
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
    "--packing",
    default="auto",
    show_default=True,
    help="concat (documents joined and cut to --seq-len, for pretraining text), separate (one "
    "example per sequence, never mixed) or auto (separate for chat and prompt/completion "
    "records, concat for text).",
)
@click.option(
    "--train-on",
    default="assistant",
    show_default=True,
    help="For chat and prompt/completion records: assistant (the loss, and the stored targets, "
    "only on the assistant's or completion's tokens) or all.",
)
@click.option(
    "--trust-remote-code",
    is_flag=True,
    help="Allow the teacher's own Python code (only for teachers you trust).",
)
def command(format_: str, **options: Any) -> None:
    """Run a teacher once over a corpus and cache its soft targets in a logit store."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    explicit = frozenset(
        name
        for name in ("top_k", "samples", "sample_seed", "train_on")
        if ctx.get_parameter_source(name)
        not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    )
    cache_teacher(CacheSettings(format=format_, explicit=explicit, **options))
