"""The options of ``kdcache train-student`` (the recipe and its command: ``train_student.py``)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.checks import (
    allow_unfinished_option,
    gradient_checkpointing_option,
    precision_option,
    report_to_option,
    workers_option,
)
from kdcache.pipeline.distill.cross_tokenizer import CROSS_LOSS
from kdcache.pipeline.distill.losses import LOSSES
from kdcache.pipeline.store_commands import shard_cache_options, storage_options_option

# in --help order
OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--store", required=True, help="Logit store: a path or fsspec URL."),
    storage_options_option,
    shard_cache_options,
    allow_unfinished_option,
    click.option(
        "--student",
        default="tiny",
        show_default=True,
        help="Preset (tiny|small|base), config .json/.yaml, or HF model directory. With its own "
        "tokenizer (tokenizer files in the directory, or a `tokenizer:` directory in the config) "
        "it learns across tokenizers from a format-6 store (--loss alm).",
    ),
    click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory."),
    click.option("--steps", default=300, show_default=True, help="Optimizer steps."),
    click.option(
        "--batch-size",
        default=8,
        show_default=True,
        help="Sequences per micro-batch over all processes (each process gets its share; the same "
        "run with any number of processes).",
    ),
    click.option(
        "--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step."
    ),
    click.option("--lr", default=1e-3, show_default=True, help="Peak learning rate (AdamW)."),
    click.option(
        "--warmup", default=None, type=int, help="Warmup steps [default: 10% of --steps]."
    ),
    click.option(
        "--loss",
        type=click.Choice((*LOSSES, CROSS_LOSS)),
        default="auto",
        show_default=True,
        help="KD loss (docs/architecture.md §5): auto = sampled-kl on a store with samples, else "
        "ghost (kl with --teacher); for a student with its own tokenizer sampled-kl (the matched "
        "draws) where its tokens mostly start with the teacher's, else alm (chunk likelihood "
        "matching); kl, ghost, reverse-kl need top-k targets, sampled-kl samples; ce = hard "
        "labels only (the no-teacher baseline).",
    ),
    click.option(
        "--teacher",
        default=None,
        help="Online reference: distill from this teacher (HF id or dir) run live on every batch "
        "(full vocabulary; --loss kl, reverse-kl or ce); the store gives the data and its order.",
    ),
    click.option(
        "--temperature", default=1.0, show_default=True, help="KD temperature T (loss × T²)."
    ),
    click.option("--alpha", default=0.5, show_default=True, help="alpha · KD + (1 − alpha) · CE."),
    click.option(
        "--seed", default=0, show_default=True, help="Seeds the weights and the data order."
    ),
    click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoint."),
    click.option(
        "--eval-every",
        default=100,
        show_default=True,
        help="Evaluate every N steps (0: only at the end).",
    ),
    click.option(
        "--eval-batches", default=20, show_default=True, help="At most this many eval batches."
    ),
    click.option(
        "--checkpoint-every",
        default=100,
        show_default=True,
        help="Checkpoint every N steps (0: only at the end).",
    ),
    report_to_option,
    workers_option,
    precision_option,
    gradient_checkpointing_option,
    click.option(
        "--buffer-size",
        default=1024,
        show_default=True,
        help="Shuffle window, in sequences: each epoch permutes the shards, each shard's sequences, "
        "then every window of this many (docs/architecture.md §5).",
    ),
    click.option(
        "--threads",
        default=0,
        show_default=True,
        help="CPU threads for torch (0: torch's default; 1 is fastest for tiny students on a busy machine).",
    ),
    click.option(
        "--stop-after",
        default=0,
        show_default=True,
        help="Stop (with a checkpoint) after N steps of this invocation; 0: run to --steps.",
    ),
]


def train_student_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every option of ``train-student`` to ``command``, in ``--help`` order."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command
