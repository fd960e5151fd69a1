"""``curves.png``: a run's training loss and eval metrics per step (matplotlib, Agg canvas).

Drawn by the main process at every checkpoint and at the end of a run — in train-student's OUT,
in each sweep candidate's directory, and in the sweep's OUT with every candidate's loss — from
``log.csv`` and the eval history. Written to a temporary name and renamed over the last one, so a
reader never sees half a file. Drawing never fails a run: an error is one warning line.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.evaluation import TEACHER_DISTANCES

CURVES = "curves.png"
TRAIN_TERMS = ("loss", "kd", "ce")  # kd and ce drawn when the run has them (not all 0)
EVAL_NATS = ("cross_entropy", *TEACHER_DISTANCES)
EVAL_SHARES = ("top1_agreement", "ece")
PANEL_INCHES, DPI = (4.8, 3.6), 100
Rows = Sequence[Mapping[str, Any]]


def read_log(path: Path) -> list[dict[str, float]]:
    """The rows of a ``log.csv`` as numbers (empty cells as NaN); [] when there is none."""
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [
            {k: float(v) if v else math.nan for k, v in row.items()} for row in csv.DictReader(f)
        ]


def _never_fails(write: Callable[..., Path | None]) -> Callable[..., Path | None]:
    """A plot is a convenience: any error drawing it (an odd log, a full disk) is one warning."""

    @functools.wraps(write)
    def guarded(out: Path, *args: Any, **kwargs: Any) -> Path | None:
        try:
            return write(out, *args, **kwargs)
        except Exception as e:
            reason = (str(e).strip().splitlines() or [""])[0]
            click.echo(
                f"warning: could not draw {out / CURVES} ({type(e).__name__}: {reason}), "
                "training goes on",
                err=True,
            )
            return None

    return guarded


@_never_fails
def write_curves(out: Path, log: Path | Rows, eval_history: Rows = ()) -> Path | None:
    """Draw ``out/curves.png``: the training terms of ``log`` (``log.csv`` or its rows) per step,
    and ``eval_history`` (``[{"step": s, **evaluate(...)}, ...]``) per step.

    Returns:
        The file, or None when there is nothing to draw or drawing failed (then warned).
    """
    rows = read_log(log) if isinstance(log, Path) else list(log)
    if not rows and not eval_history:
        return None
    nats = [m for m in EVAL_NATS if any(m in e for e in eval_history)]
    shares = [m for m in EVAL_SHARES if any(m in e for e in eval_history)]
    panels = 1 + bool(nats) + bool(shares)

    def draw(axes: list[Any]) -> None:
        train = axes[0]
        for term in TRAIN_TERMS:
            values = [r.get(term, math.nan) for r in rows]
            if term == "loss" or any(v and not math.isnan(v) for v in values):
                train.plot([r["step"] for r in rows], values, label=term)
        _finish(train, "training (nats/token)", legend=True)
        evals = [(nats, "eval (nats/token)"), (shares, "eval (share)")]
        for ax, (metrics, title) in zip(axes[1:], [e for e in evals if e[0]], strict=True):
            for name in metrics:
                points = [(e["step"], e[name]) for e in eval_history if name in e]
                ax.plot(*zip(*points, strict=True), marker="o", label=name)
            _finish(ax, title, legend=True)

    return _save(out / CURVES, panels, f"{out.name}: training and eval", draw)


@_never_fails
def write_sweep_curves(out: Path, logs: Mapping[str, Path]) -> Path | None:
    """Draw ``out/curves.png`` of a sweep: every candidate's training loss (its ``log.csv``) per
    step, one line each. Returns as ``write_curves``."""
    runs = {name: read_log(path) for name, path in logs.items()}
    runs = {name: rows for name, rows in runs.items() if rows}
    if not runs:
        return None

    def draw(axes: list[Any]) -> None:
        for name, rows in runs.items():
            axes[0].plot([r["step"] for r in rows], [r["loss"] for r in rows], label=name)
        _finish(axes[0], "training loss (nats/token)", legend=len(runs) <= 30)

    return _save(out / CURVES, 1, f"{out.name}: {len(runs)} candidates", draw, wide=True)


def _finish(ax: Any, title: str, legend: bool) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.set_title(title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    if legend and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def _save(
    path: Path, panels: int, title: str, draw: Callable[[list[Any]], None], wide: bool = False
) -> Path | None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    width, height = PANEL_INCHES
    fig = Figure(figsize=(width * (2 if wide else panels), height), layout="constrained")
    FigureCanvasAgg(fig)  # Agg: no display, no pyplot state shared with other threads
    axes = list(fig.subplots(1, panels, squeeze=False, sharex=True)[0])
    draw(axes)
    fig.suptitle(title, fontsize=10)
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)  # a reader sees the last plot or this one, never a part
    finally:
        tmp.unlink(missing_ok=True)
    return path
