"""Sweep results: a candidate's size and speed, leaderboard tables, the Pareto front and a
plot of it."""

from __future__ import annotations

import csv
import io
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.files import write_text_atomic

# eval metrics that only some stores' targets allow: a column appears when a row has it
TEACHER_METRICS = ("ghost_kl_to_teacher", "sampled_kl_to_teacher", "top1_agreement")
# columns only some stores have: the metrics above, the trained positions of a masked store,
# bits per byte (stores with text spans)
OPTIONAL = (*TEACHER_METRICS, "trained_tokens_seen", "eval_bits_per_byte")
COLUMNS = (
    "candidate",
    "parameters",
    "non_embedding_parameters",
    "tokens_seen",
    "trained_tokens_seen",
    "eval_cross_entropy",
    "eval_bits_per_byte",
    *TEACHER_METRICS,
    "ece",
    "train_tokens_per_s",
    "inference_tokens_per_s",
    "inference_latency_ms",
    "status",
)


def non_embedding_parameters(model: torch.nn.Module) -> int:
    """Parameters outside the token embedding and the LM head (the usual scaling-law count)."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    unique = {id(p): p for p in model.parameters()}
    return sum(p.numel() for i, p in unique.items() if i not in skip)


@torch.inference_mode()
def inference_tokens_per_s(
    model: torch.nn.Module, input_ids: torch.Tensor, repeats: int = 3
) -> float:
    """Forward throughput on one batch (B, L), best of ``repeats`` after a warm-up pass."""
    was_training = model.training
    model.eval()
    model(input_ids=input_ids)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=input_ids)
        if input_ids.device.type != "cpu":  # the kernels are asynchronous: wait for them
            getattr(torch, input_ids.device.type).synchronize()
        best = min(best, time.perf_counter() - start)
    model.train(was_training)
    return input_ids.numel() / best


def ranking_metric(rows: Sequence[dict[str, Any]]) -> str:
    """What ranks the candidates: eval cross-entropy per token while they share a tokenizer
    (every row's ``tokenizer``, when given, the same), else eval bits per byte — the one scale
    students with different tokenizers share.

    Raises:
        ValueError: tokenizers differ and a row has no bits per byte (a store without spans).
    """
    if len({row.get("tokenizer") for row in rows}) <= 1:
        return "eval_cross_entropy"
    if any("eval_bits_per_byte" not in row for row in rows):
        raise ValueError(
            "candidates with different tokenizers are ranked by bits per byte, which this "
            "store cannot give (no text spans); re-cache it with this kdcache"
        )
    return "eval_bits_per_byte"


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """``a`` is no worse than ``b`` in every objective (all minimized) and better in one."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_front(
    rows: Sequence[dict[str, Any]], metric: str | None = None, columns: Sequence[str] = ()
) -> list[dict[str, Any]]:
    """Rows not dominated in (fewer parameters, lower ``metric`` — ``ranking_metric``'s by
    default), sorted by size; with ``columns`` (a multi-objective sweep's, all minimized):
    rows not dominated in those, sorted by the last."""
    if len(columns) > 1:
        points = [[float(r[c]) for c in columns] for r in rows]
        front = [
            r for r, p in zip(rows, points, strict=True) if not any(dominates(q, p) for q in points)
        ]
        return sorted(front, key=lambda r: (float(r[columns[-1]]), float(r[columns[0]])))
    metric = metric or ranking_metric(rows)
    front: list[dict[str, Any]] = []
    best = math.inf
    for row in sorted(rows, key=lambda r: (r["parameters"], r[metric])):
        if row[metric] < best:
            front.append(row)
            best = row[metric]
    return front


def size_class(parameters: int) -> str:
    """Decade buckets by parameter count: '100K-1M', '1M-10M', ..."""
    decade = 10 ** math.floor(math.log10(max(parameters, 1)))
    return f"{_short(decade)}-{_short(decade * 10)}"


def _short(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def best_per_size_class(
    rows: Sequence[dict[str, Any]], size_key: str = "non_embedding_parameters"
) -> dict[str, dict[str, Any]]:
    """The best candidate (``ranking_metric``: eval cross-entropy, or bits per byte across
    tokenizers) per decade of ``size_key`` (non-embedding parameters: at small sizes the
    embedding, fixed by the vocabulary, would put every student in one class).
    """
    best: dict[str, dict[str, Any]] = {}
    metric = ranking_metric(rows) if rows else "eval_cross_entropy"
    for row in rows:
        label = size_class(row[size_key])
        if label not in best or row[metric] < best[label][metric]:
            best[label] = row
    return dict(sorted(best.items(), key=lambda item: item[1][size_key]))


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def stopped(row: dict[str, Any]) -> bool:
    """Whether early stopping ended this candidate at a rung (its row is from there)."""
    return "stopped_at_tokens" in row


def write_leaderboard(
    rows: Sequence[dict[str, Any]],
    out_dir: Path,
    baseline: str | None = None,
    objective_columns: Sequence[str] = (),
) -> None:
    """``leaderboard.csv`` (all columns + settings) and ``leaderboard.md``, best first by
    ``ranking_metric`` (eval CE per token; bits per byte when the tokenizers differ); the
    candidates early stopping ended follow, ranked by what they measured at their rung.

    The Pareto column marks the front among the finished distilled candidates (``baseline``
    excluded), in (parameters, metric), or in the ``objective_columns`` of a multi-objective
    sweep.
    """
    metric = ranking_metric(rows)
    ranked = sorted(rows, key=lambda r: (stopped(r), r[metric]))
    rows = [dict(r, status=_status(r)) for r in ranked]
    ranked = rows
    present = {k for r in ranked for k in r}
    columns = [c for c in COLUMNS if c not in OPTIONAL or c in present]
    extra = sorted(present - set(COLUMNS))
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=[*columns, *extra])
    writer.writeheader()
    writer.writerows(ranked)
    write_text_atomic(out_dir / "leaderboard.csv", table.getvalue())
    students = [r for r in ranked if r["candidate"] != baseline and not stopped(r)]
    front = (
        {id(r) for r in pareto_front(students, columns=objective_columns)} if students else set()
    )
    lines = [
        "| rank | " + " | ".join(columns) + " | pareto |",
        "|" + "---|" * (len(columns) + 2),
    ]
    for rank, row in enumerate(ranked, start=1):
        cells = " | ".join(_format(row.get(c, "")) for c in columns)
        lines.append(f"| {rank} | {cells} | {'*' if id(row) in front else ''} |")
    write_text_atomic(out_dir / "leaderboard.md", "\n".join(lines) + "\n")


def _status(row: dict[str, Any]) -> str:
    if stopped(row):
        return f"stopped at {int(row['stopped_at_tokens']):,} tokens"
    return "finished"


def plot_pareto(
    rows: Sequence[dict[str, Any]],
    path: Path,
    baseline: str | None = None,
    columns: Sequence[str] = (),
) -> None:
    """Parameters (log x; a multi-objective sweep: its second objective) vs eval cross-entropy
    (or its first objective), the Pareto front joined, candidates stopped early in grey, the
    CE-only baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x_key = columns[1] if len(columns) > 1 else "parameters"
    y_key = columns[0] if len(columns) > 1 else "eval_cross_entropy"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    others = [r for r in rows if r["candidate"] != baseline]
    students = [r for r in others if not stopped(r)]
    early = [r for r in others if stopped(r)]
    ax.scatter(
        [r[x_key] for r in students],
        [r[y_key] for r in students],
        color="tab:blue",
        label="candidates (KD)",
    )
    if early:
        ax.scatter(
            [r[x_key] for r in early],
            [r[y_key] for r in early],
            color="tab:gray",
            alpha=0.5,
            label="stopped early (at their rung)",
        )
    for r in students:
        ax.annotate(r["candidate"], (r[x_key], r[y_key]), fontsize=6)
    front = pareto_front(students, columns=columns) if students else []
    front = sorted(front, key=lambda r: r[x_key])
    ax.plot(
        [r[x_key] for r in front],
        [r[y_key] for r in front],
        color="tab:red",
        marker="o",
        label="Pareto front",
    )
    for r in rows:
        if r["candidate"] == baseline:
            ax.scatter(
                [r[x_key]],
                [r[y_key]],
                color="black",
                marker="x",
                s=60,
                label="CE-only baseline (no teacher)",
            )
    ax.set_xscale("log")
    ax.set_xlabel(x_key.replace("_", " "))
    ax.set_ylabel(
        y_key.replace("_", " ") if len(columns) > 1 else "eval cross-entropy (nats/token)"
    )
    ax.set_title("kdcache sweep: size vs quality")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
