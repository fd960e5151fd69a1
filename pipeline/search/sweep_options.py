"""The options of ``kdcache sweep`` (the recipe and its command: ``sweep.py``)."""

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
from kdcache.pipeline.store_commands import shard_cache_options, storage_options_option

DEFAULT_CONFIG = Path(__file__).parent.parent / "configs" / "sweep.yaml"  # pipeline/configs

# in --help order
OPTIONS: list[Callable[[Any], Any]] = [
    click.option("--store", required=True, help="Logit store: a path or fsspec URL."),
    storage_options_option,
    shard_cache_options,
    allow_unfinished_option,
    click.option(
        "--config",
        default=str(DEFAULT_CONFIG),
        show_default="the shipped example",
        help="Sweep YAML: base student, search space, budget, seed.",
    ),
    click.option("--out", required=True, type=click.Path(path_type=Path), help="Output directory."),
    click.option(
        "--together", default=4, show_default=True, help="Candidates trained per data pass."
    ),
    click.option(
        "--study",
        default=None,
        help="Optuna storage every worker of this search shares: a journal file (on a shared "
        "filesystem for several machines) or a database URL (sqlite:///…, postgresql://…). "
        "Default: OUT/study.journal.",
    ),
    click.option(
        "--study-name", default="kdcache-sweep", show_default=True, help="The study's name in it."
    ),
    click.option(
        "--parallel",
        default=1,
        show_default=True,
        type=int,
        help="Workers on this machine, candidates side by side, each on its own devices "
        "(GPUs: --devices-per-candidate each; CPU: an equal share of the cores).",
    ),
    click.option(
        "--devices-per-candidate",
        default=0,
        type=int,
        help="GPUs each worker trains a candidate on, data parallel (0: all of them, one "
        "worker); with GPUs and no --parallel, the workers are the GPUs // this.",
    ),
    click.option(
        "--stale-after",
        default=300.0,
        show_default=True,
        type=float,
        help="Seconds without a heartbeat after which a worker counts as dead and its running "
        "candidate is rerun by another.",
    ),
    workers_option,
    precision_option,
    gradient_checkpointing_option,
    click.option(
        "--checkpoint-every",
        default=50,
        show_default=True,
        help="Checkpoint every N steps (0: never).",
    ),
    report_to_option,
    click.option(
        "--threads", default=0, show_default=True, help="CPU threads for torch (0: default)."
    ),
    click.option(
        "--stop-after", default=0, hidden=True, help="Stop each group after N steps (tests)."
    ),
]


def sweep_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Apply every option of ``sweep`` to ``command``, in ``--help`` order."""
    for option in reversed(OPTIONS):
        command = option(command)
    return command
