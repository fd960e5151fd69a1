"""``kdcache compare``: the teacher, the KD student and the CE-only student side by side.

The students' figures come from their ``OUT/metrics.json`` (written by ``train-student`` at
the end of training); the teacher is evaluated here, on the same ``eval`` split of the store
with the same evaluation code (``kdcache.pipeline.distill.evaluation.evaluate``), so every row of
the table measures the same thing on the same tokens.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.files import write_text_atomic

METRICS = (
    ("cross_entropy", "eval CE (nats)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("kl_to_teacher", "KL to teacher", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("ece", "ECE", "{:.4f}"),
)


def read_student_metrics(out_dir: str | Path, flag: str) -> dict[str, Any]:
    """The final eval metrics (and settings, when recorded) of a ``train-student`` output dir.

    Raises:
        UserError: when the directory or its metrics.json is missing or lacks the eval figures.
    """
    path = Path(out_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(
            f"{flag} has no metrics.json, {path}, run `kdcache train-student --out {out_dir}` first"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{flag} metrics.json is unreadable, {path}, ({e}); train it again") from e
    metrics = _find_eval(data)
    if metrics is None:
        raise UserError(
            f"{flag} metrics.json holds no eval figures, {path}, "
            "the store may lack an eval split: re-cache with --eval-fraction > 0"
        )
    settings = data.get("settings", {}) if isinstance(data, dict) else {}
    return {**metrics, "settings": settings if isinstance(settings, dict) else {}}


def _find_eval(data: Any) -> dict[str, float] | None:
    """The final eval figures: ``metrics.json["final"]`` as train-student writes it."""
    final = data.get("final") if isinstance(data, dict) else None
    if not isinstance(final, dict) or not all(key in final for key, _, _ in METRICS):
        return None
    return {key: float(final[key]) for key, _, _ in METRICS} | {
        "tokens": float(final.get("tokens", float("nan")))
    }


def evaluate_teacher(
    teacher: str, store_url: str, batch_size: int, max_batches: int | None
) -> dict[str, float]:
    """Evaluate ``teacher`` on the store's eval split with the students' evaluation code."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.distill.evaluation import evaluate
    from kdcache.pipeline.distill.loader import eval_batches
    from kdcache.pipeline.host_memory import keep_freed_memory
    from kdcache.pipeline.teacher import hub_options
    from kdcache.storage import open_store

    store = open_store(store_url)
    if "eval" not in store.splits:
        raise UserError(
            f"the store has no eval split, {store_url}, re-cache it with --eval-fraction > 0"
        )
    hf_logging.disable_progress_bar()  # one line of our own instead of per-file bars
    try:
        options = hub_options(teacher)
        model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32, **options)
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load the teacher, {teacher}, ({e})") from e
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab != store.vocab_size:
        raise UserError(
            f"the teacher's vocabulary does not match the store's, {teacher} has {vocab} and "
            f"{store_url} has {store.vocab_size}, pass the teacher the store was cached from"
        )
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    keep_freed_memory(device)  # CPU only: no page-fault storm per vocab-wide tensor
    # the same pass train-student evaluates on: the eval split in stored order, one epoch
    pad_id = model.config.pad_token_id if model.config.pad_token_id is not None else 0
    batches = eval_batches(store, batch_size, pad_id, pin_memory=device.type == "cuda")
    return evaluate(model, batches, device=device, max_batches=max_batches)


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A fixed-width text table, one row per model, one column per metric."""
    header = ["model", *(title for _, title, _ in METRICS)]
    body = [
        [name, *(fmt.format(metrics[key]) for key, _, fmt in METRICS)] for name, metrics in rows
    ]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in body]
    return "\n".join(lines)


def format_markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    """The same table in markdown (for the README / RESULTS)."""
    header = ["model", *(title for _, title, _ in METRICS)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, metrics in rows:
        cells = [name, *(fmt.format(metrics[key]) for key, _, fmt in METRICS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdict(kd: dict[str, float], ce: dict[str, float]) -> str:
    """One line: does distillation help on eval cross-entropy, and by how much."""
    gain = ce["cross_entropy"] - kd["cross_entropy"]
    ratio = math.exp(gain)
    if gain > 0:
        return (
            f"KD student beats the CE-only student by {gain:.4f} nats of eval cross-entropy "
            f"(perplexity {ce['perplexity']:.2f} -> {kd['perplexity']:.2f}, {ratio:.3f}x better)"
        )
    return (
        f"KD student does NOT beat the CE-only student: eval cross-entropy {kd['cross_entropy']:.4f}"
        f" vs {ce['cross_entropy']:.4f} nats; when the teacher's KL to itself (its tail mass "
        "beyond the top-k) is large, try --loss ghost or a store with a larger --top-k; else more "
        "student steps or another --temperature/--alpha"
    )


@click.command("compare")
@click.option("--teacher", required=True, help="Teacher the store was cached from (HF id or dir).")
@click.option("--store", "store_url", required=True, help="Logit store (path or fsspec URL).")
@click.option("--kd", "kd_dir", required=True, type=click.Path(), help="KD student's --out dir.")
@click.option(
    "--ce", "ce_dir", required=True, type=click.Path(), help="CE-only student's --out dir."
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Teacher eval batch size [default: the KD student's].",
)
@click.option(
    "--eval-batches",
    type=int,
    default=None,
    help="Cap on teacher eval batches [default: the KD student's].",
)
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the table as markdown here.",
)
def command(
    teacher: str,
    store_url: str,
    kd_dir: str,
    ce_dir: str,
    batch_size: int | None,
    eval_batches: int | None,
    markdown: str | None,
) -> None:
    """Compare teacher, KD student and CE-only student on the store's eval split."""
    started = time.perf_counter()
    kd = read_student_metrics(kd_dir, "--kd")
    ce = read_student_metrics(ce_dir, "--ce")
    settings = kd["settings"]
    batch_size = batch_size or int(settings.get("batch_size") or 8)
    if eval_batches is None and settings.get("eval_batches"):
        eval_batches = int(settings["eval_batches"])
    for flag, value in (("--batch-size", batch_size), ("--eval-batches", eval_batches)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}, pass a positive number")
    teacher_metrics = evaluate_teacher(teacher, store_url, batch_size, eval_batches)
    rows = [("teacher", teacher_metrics), ("KD student", kd), ("CE-only student", ce)]
    click.echo(format_table(rows))
    click.echo(verdict(kd, ce))
    if markdown:
        try:
            Path(markdown).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(
                Path(markdown), format_markdown(rows) + "\n\n" + verdict(kd, ce) + "\n"
            )
        except OSError as e:
            raise UserError(
                f"cannot write --markdown, {markdown} ({e.strerror}), give a writable path"
            ) from e
    click.echo(
        f"compared on {int(teacher_metrics['tokens']):,} eval tokens in "
        f"{time.perf_counter() - started:.1f}s"
    )
