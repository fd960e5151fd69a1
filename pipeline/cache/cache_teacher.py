"""Stage one: run a teacher once over a corpus and cache its soft targets in a logit store.

The recipe, top to bottom: check every setting (nothing is touched before that) → fingerprint the
teacher, tokenizer and corpus into a manifest → an existing store must agree with it → place the
processes in teacher replicas, load the teacher where its replica says (within --max-memory,
offloading what does not fit), prove a split teacher exact and self-check the chunked targets,
while a background thread already reads and tokenizes the corpus into the shard plan → create or
reopen the store (rank 0 first) → stream the plan: each replica computes the shards whose index %
replicas == its index, skipping committed ones, while a background thread of the replica's
leader writes and commits them → barrier → rank 0 marks the store finished and prints a summary.
Launch with ``kdcache cache-teacher ...``, ``torchrun --nproc_per_node N -m kdcache.pipeline
cache-teacher ...`` or ``accelerate launch -m kdcache.pipeline cache-teacher ...`` (one process
per device; ``--devices-per-teacher`` groups them into teacher replicas).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from typing import Any

import click
import numpy as np

from kdcache.pipeline.cache.background import Prefetcher, ShardSink, to_host
from kdcache.pipeline.cache.batching import batch_of, next_ids, padded, teacher_batches
from kdcache.pipeline.cache.corpus import CorpusError, CorpusStats
from kdcache.pipeline.cache.packing import ShardPlan, needs_loss_mask, shard_plan
from kdcache.pipeline.cache.report import PlanFacts, progress_bar, summarize, summary_line
from kdcache.pipeline.cache.settings import (
    PROBE_TEXT,
    CacheSettings,
    check_settings,
    check_token_ids,
    codec_option,
    corpus_facts,
    dataset_corpus_options,
)
from kdcache.pipeline.cache.store_open import open_store_on_all_ranks
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.store_commands import storage_options_option


def cache_teacher(s: CacheSettings) -> dict[str, Any]:
    """Run stage one; returns the summary facts (also printed by the main process)."""
    started = time.perf_counter()
    files = check_settings(s)

    # Teacher config + tokenizer first: cheap, and enough to validate --top-k and --seq-len.
    import torch
    from accelerate import Accelerator

    from kdcache.pipeline.cache.placed_teacher import load_teacher, memory_facts
    from kdcache.pipeline.cache.placement import replica_of
    from kdcache.pipeline.teacher import (
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
    replica = replica_of(
        rank,
        world,
        int(os.environ.get("LOCAL_WORLD_SIZE", world)),
        s.devices_per_teacher,
        s.split,
        torch.cuda.device_count() if device.type == "cuda" else 0,
        accelerator.local_process_index,
    )
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
        next_token_logprob=True,
        text=bool(getattr(source.tokenizer, "is_fast", False)),  # spans need its offsets
        **s.target_facts,  # targets, top_k, samples, sample_seed, sample_temperature, codec
    )
    # an existing store must agree before the teacher loads (which can take minutes)
    open_store_on_all_ranks(accelerator, s, manifest, tokenizer, create=False)

    # Reading and tokenizing run in a background thread from here on, so the first shards are
    # planned while the teacher loads; results go through a bounded queue to the writer thread.
    stats = CorpusStats()
    plan_facts = PlanFacts()
    make_plan = lambda: shard_plan(s, files, stats, source, corpus, plan_facts)  # noqa: E731
    with closing(Prefetcher(make_plan, maxsize=2)) as plan:
        targets = load_teacher(accelerator, s, source, dtype, replica, probe)
        writer = open_store_on_all_ranks(accelerator, s, manifest, tokenizer)
        already = set(writer.committed())
        setup_seconds = time.perf_counter() - started
        estimate = corpus_bytes // 3 if s.max_tokens is None else min(s.max_tokens, corpus_bytes)
        with progress_bar(estimate, enabled=accelerator.is_main_process) as advance:
            try:
                sampled = compute_shards(
                    plan, writer, targets, device, s, already, replica, advance
                )
            except CorpusError as e:  # a file damaged past the checks; committed shards stay
                raise UserError(f"{e}; the shards committed so far are kept") from e

    accelerator.wait_for_everyone()
    # distinct sampled ids over the positions every rank computed in this run
    sampled = accelerator.reduce(torch.tensor(sampled, device=device), reduction="sum").tolist()
    records = writer.committed()
    method = targets.method if targets is not None else ""  # rank 0 always computes
    if not records:  # every example skipped: say why instead of finishing an empty store
        raise UserError(
            f"the corpus gave no sequence to cache ({stats.summary()}), {s.corpus}, "
            "check --seq-len, --train-on and the records"
        )
    summary = summarize(records, already, stats, time.perf_counter() - started, method)
    summary |= plan_facts.summary(corpus)
    if s.wants_samples:
        summary["samples"] = s.samples
        summary["sampled_distinct_per_position"] = sampled[0] / sampled[1] if sampled[1] else None
    summary["setup_seconds"] = round(setup_seconds, 3)  # config, store, model load, self-check
    summary |= memory_facts(accelerator, replica, s)
    if accelerator.is_main_process:
        writer.mark_finished(summary)
        click.echo(summary_line(summary, s.out))
    accelerator.wait_for_everyone()
    return summary


def compute_shards(
    plan: Iterable[ShardPlan],
    writer: Any,
    targets: Any,
    device: Any,
    s: CacheSettings,
    already: set[str],
    replica: Any,
    advance: Callable[..., None],
) -> tuple[int, int]:
    """This replica's shards of the plan (index % replicas == its index), minus those committed
    before: teacher forward and targets on the device; the replica's leader compresses and
    commits them in the writer thread (the other members of a tensor-parallel replica run the
    same forwards, and processes that only lend their device to a pipeline run none).

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
            mine = shard.index % replica.count == replica.index and replica.computes
            if not mine or name in already:
                advance(shard.num_tokens)  # another replica's work, or done in an earlier run
                continue
            if replica.leader:
                sink.open(shard.split, shard.index, shard.corpus_range)
            lengths = [len(q) for q in shard.sequences]
            for group in teacher_batches(lengths, s.batch_size, pad=packing == "separate"):
                batch = batch_of(shard, group, text=writer.manifest["text"])
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
                following = None
                if writer.manifest["next_token_logprob"]:  # (B, S) the token after each
                    following = next_ids(batch, tokens.shape[1]).to(device, non_blocking=True)
                computed = targets(input_ids, keys, rows, following).compact(
                    logprob_dtype, s.stored_samples
                )
                if replica.leader:
                    arrays = computed.arrays()  # R rows (the trained positions), on the device
                    *host, event = to_host(*arrays.values())
                    sink.put(batch, dict(zip(arrays, host, strict=True)), event)
                advance(sum(len(q) for q in batch.tokens))
            if replica.leader:
                sink.commit()
                advance(0, shards_done=len(already) + sink.committed)
    return sink.sampled_entries, sink.sampled_positions


@click.command("cache-teacher")
@click.option("--teacher", required=True, help="Hugging Face model directory or hub id.")
@click.option(
    "--corpus",
    required=True,
    help="Directory, file or glob of .txt/.md/.py/.jsonl/.parquet (text, chat `messages` or "
    "`prompt`/`completion` records), `stdlib` / `stdlib-chat` (built in, offline), or a Hugging "
    "Face dataset: a save_to_disk directory, a dataset repository folder (or hf:DIR), "
    "hf:org/name[@revision] from the local cache (docs/architecture.md §4).",
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
@click.option(
    "--sample-temperature",
    default=1.0,
    show_default=True,
    help="Draw from the teacher at this temperature T (p^(1/T), normalized); sampled-kl then "
    "trains at --temperature T only. The stored log-probs stay those at T = 1.",
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
    help="auto (the config's dtype on a GPU that runs it natively: bfloat16 becomes float16 "
    "before CUDA compute capability 8.0; float32 on CPU), float32, bfloat16 or float16.",
)
@click.option(
    "--devices-per-teacher",
    default=1,
    show_default=True,
    help="Devices (one process each) per teacher replica: N consecutive processes of a node "
    "share one teacher; the world forms world/N data-parallel replicas.",
)
@click.option(
    "--split",
    default="pipeline",
    show_default=True,
    help="How a replica spans its devices: pipeline (layers spread over the devices, "
    "Accelerate big-model inference) or tensor (each layer split across the processes; refused "
    "unless it matches the single-device forward).",
)
@click.option(
    "--max-memory",
    default=None,
    help="Teacher weights one device may hold, e.g. 70GiB (on a CPU-only machine: the host); "
    "the rest goes to host memory (add ,cpu=SIZE to cap it), then to disk. Default: what is "
    "free.",
)
@click.option(
    "--offload-dir",
    default=None,
    help="Directory for offloaded layers of checkpoints that are not safetensors "
    "(safetensors files are read in place).",
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
    help="Field of .jsonl records / column of .parquet files and datasets.",
)
@dataset_corpus_options
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
        for name in ("top_k", "samples", "sample_seed", "sample_temperature", "train_on")
        if ctx.get_parameter_source(name)
        not in (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    )
    cache_teacher(CacheSettings(format=format_, explicit=explicit, **options))
