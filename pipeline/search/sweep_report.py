"""The end of a sweep: the leaderboard and Pareto plot in OUT, and what the terminal shows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.search.leaderboard import (
    best_per_size_class,
    plot_pareto,
    stopped,
    write_leaderboard,
)
from kdcache.pipeline.search.strategy import OBJECTIVES

BASELINE = "baseline-ce"


def report(rows: list[dict[str, Any]], out: Path, objectives: list[str], wall: float) -> None:
    """Write ``leaderboard.{csv,md}`` and ``pareto.png`` and print the table, the best finished
    candidate per size class and a one-line summary (main process)."""
    if not rows:
        click.echo(f"sweep done: no candidate finished; results in {out}")
        return
    columns = [OBJECTIVES[name] for name in objectives] if len(objectives) > 1 else []
    write_leaderboard(rows, out, baseline=BASELINE, objective_columns=columns)
    has_baseline = any(r["candidate"] == BASELINE for r in rows)
    plot_pareto(
        rows, out / "pareto.png", baseline=BASELINE if has_baseline else None, columns=columns
    )
    click.echo((out / "leaderboard.md").read_text())
    students = [r for r in rows if r["candidate"] != BASELINE and not stopped(r)]
    for label, row in best_per_size_class(students).items():
        click.echo(
            f"best {label} non-embedding parameters: {row['candidate']} "
            f"({row['non_embedding_parameters']:,} of {row['parameters']:,} parameters, "
            f"eval CE {row['eval_cross_entropy']:.4f}"
            + (
                f", {row['eval_bits_per_byte']:.4f} bits/byte)"
                if "eval_bits_per_byte" in row
                else ")"
            )
        )
    tokens = sum(int(r["tokens_seen"]) for r in rows)
    early = sum(stopped(r) for r in rows)
    click.echo(
        f"sweep done: {len(rows)} candidates"
        + (f" ({early} stopped early)" if early else "")
        + f", {tokens:,} training tokens in {wall:.1f} s "
        f"({tokens / max(wall, 1e-9):,.0f} tokens/s over all candidates); results in {out}"
    )
