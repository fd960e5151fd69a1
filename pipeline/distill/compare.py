"""``kdcache compare``: the teacher and its students side by side, with the teacher at hand.

Every model is evaluated here, on the store's ``eval`` split, with the same evaluation code
(``kdcache.pipeline.distill.evaluation.evaluate``) and the teacher itself run beside it, so every
row measures the same thing on the same tokens, including the exact full-vocabulary
``kl_to_teacher`` (0 for the teacher). Students are train-student output directories (the saved
model; its ``metrics.json`` gives the eval batch size and cap): ``--kd`` and ``--ce`` (the pair
the verdict line compares) and any number of ``--student NAME=DIR``.

Every row counts the store's trained positions only (``loss_mask``; all of them in a store
without a loss mask) over the tokenizer's ids only: a student or teacher embedding at least the
tokenizer's size is fine, padded rows get no probability (``vocabulary.py``).

A student saved with a tokenizer of its own (``cross_tokenizer.py``) reads the eval text in its
own tokens: its row has cross-entropy per *its* token and bits per byte and per character, no
KL to the teacher (the vocabularies differ); when the KD and CE-only students do not share one
tokenizer with the store, the verdict compares bits per byte, the scale they share.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.checks import (
    allow_unfinished_option,
    check_finished,
    precision_option,
)
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.files import write_text_atomic
from kdcache.pipeline.store_commands import shard_cache_options, storage_options_option

# (key, column title, format) in table order; the names of evaluation.METRICS
METRICS = (
    ("cross_entropy", "eval CE (nats)", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("bits_per_byte", "bits/byte", "{:.4f}"),
    ("bits_per_char", "bits/char", "{:.4f}"),
    ("kl_to_teacher", "KL to teacher", "{:.4f}"),
    ("ghost_kl_to_teacher", "ghost KL to teacher", "{:.4f}"),
    ("sampled_kl_to_teacher", "sampled KL to teacher", "{:.4f}"),
    ("top1_agreement", "top-1 agree", "{:.3f}"),
    ("ece", "ECE", "{:.4f}"),
)


def read_student_settings(out_dir: Path, flag: str) -> dict[str, Any]:
    """The settings a train-student run recorded (``metrics.json``, else ``run.json``); {} if none.

    Raises:
        UserError: the directory holds no saved student model.
    """
    if not (out_dir / "config.json").is_file():
        raise UserError(
            f"{flag} holds no saved student (config.json), {out_dir}, "
            f"run `kdcache train-student --out {out_dir}` to the end first"
        )
    for name in ("metrics.json", "run.json"):
        try:
            data = json.loads((out_dir / name).read_text())
        except (OSError, ValueError):
            continue
        settings = data.get("settings") if isinstance(data, dict) else None
        if isinstance(settings, dict):
            return settings
    return {}


def evaluate_models(
    teacher: str,
    store_url: str,
    students: list[tuple[str, Path]],
    batch_size: int,
    max_batches: int | None,
    *,
    storage_options: dict[str, Any] | None = None,
    allow_unfinished: bool = False,
    shard_cache: Any = None,
    precision: str = "auto",
    crossed: set[str] | None = None,
) -> list[tuple[str, dict[str, float]]]:
    """The teacher and each student on the store's eval split, the teacher run beside each, under
    the autocast train-student and the sweep evaluate in (``precision.eval_context``). The names
    of the students with their own tokenizer are added to ``crossed``."""
    crossed = set() if crossed is None else crossed
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from kdcache.pipeline.distill.evaluation import evaluate
    from kdcache.pipeline.distill.live_teacher import load_live_teacher
    from kdcache.pipeline.distill.loader import eval_batches
    from kdcache.pipeline.distill.student_tokenizer import cross_student
    from kdcache.pipeline.distill.vocabulary import check_embedding, embedding_rows
    from kdcache.pipeline.host_memory import keep_freed_memory
    from kdcache.pipeline.precision import compute_device, eval_context, mixed_precision
    from kdcache.storage import open_store, sample_temperature

    store = open_store(store_url, storage_options=storage_options, cache=shard_cache)
    note = check_finished(store, allow_unfinished, "evaluating on")  # refused unless allowed
    if note:
        click.echo(f"Note: {note}", err=True)
    if "eval" not in store.splits:
        raise UserError(
            f"the store has no eval split, {store_url}, re-cache it with --eval-fraction > 0"
        )
    device = compute_device()
    autocast = mixed_precision(precision, device)  # every row under the same autocast
    live = load_live_teacher(teacher, store, device, "float32")
    keep_freed_memory(device)  # CPU only: no page-fault storm per vocab-wide tensor
    pad_id = live.model.config.pad_token_id if live.model.config.pad_token_id is not None else 0

    def measure(model: Any, cross: Any = None) -> dict[str, float]:
        # the same pass train-student evaluates on: the eval split in stored order, one epoch;
        # a student with its own tokenizer reads it re-tokenized (``cross``, its collator)
        batches = eval_batches(
            store, batch_size, pad_id, pin_memory=device.type == "cuda", collate_fn=cross
        )
        with eval_context(device, autocast):
            return evaluate(
                model,
                batches,
                device=device,
                max_batches=max_batches,
                teacher=live if cross is None else None,
                vocab=live.vocab if cross is None else len(cross.tokenizer),
                sample_temperature=sample_temperature(store.manifest) or 1.0,
            )

    rows = [("teacher", measure(live.model))]
    hf_logging.disable_progress_bar()
    for name, directory in students:
        try:
            model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load the student {name}, {directory}, ({e})") from e
        cross = cross_student(str(directory), store, "ce", online=False)
        embedded = embedding_rows(model)
        check_embedding(
            embedded if embedded is not None else model.config.vocab_size,
            store.tokenizer_size if cross is None else len(cross.tokenizer),
            f"the student {name} ({directory})",
        )
        if cross is not None:
            crossed.add(name)
        rows.append((name, measure(model.to(device).eval(), cross)))
        del model
    return rows


def _columns(rows: list[tuple[str, dict[str, float]]]) -> list[tuple[str, str, str]]:
    """The metrics any row has, in ``METRICS`` order."""
    return [m for m in METRICS if any(m[0] in metrics for _, metrics in rows)]


def _cells(metrics: dict[str, float], columns: list[tuple[str, str, str]]) -> list[str]:
    """One row's formatted cells; "-" where this model lacks a metric (e.g. an older run)."""
    return [fmt.format(metrics[key]) if key in metrics else "-" for key, _, fmt in columns]


def format_table(rows: list[tuple[str, dict[str, float]]]) -> str:
    """A fixed-width text table, one row per model, one column per metric."""
    columns = _columns(rows)
    header = ["model", *(title for _, title, _ in columns)]
    body = [[name, *_cells(metrics, columns)] for name, metrics in rows]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in [header]]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)) for line in body]
    return "\n".join(lines)


def format_markdown(rows: list[tuple[str, dict[str, float]]]) -> str:
    """The same table in markdown (for the docs / RESULTS)."""
    columns = _columns(rows)
    header = ["model", *(title for _, title, _ in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for name, metrics in rows:
        lines.append("| " + " | ".join([name, *_cells(metrics, columns)]) + " |")
    return "\n".join(lines)


def verdict(kd: dict[str, float], ce: dict[str, float], per_byte: bool = False) -> str:
    """One line: does distillation help on eval cross-entropy (``per_byte``: on bits per byte,
    for students that do not share the store's tokenizer), and by how much."""
    if per_byte:
        gain = ce["bits_per_byte"] - kd["bits_per_byte"]
        if gain > 0:
            return (
                f"KD student beats the CE-only student by {gain:.4f} bits per byte of the eval "
                f"text ({ce['bits_per_byte']:.4f} -> {kd['bits_per_byte']:.4f})"
            )
        return (
            f"KD student does NOT beat the CE-only student: {kd['bits_per_byte']:.4f} vs "
            f"{ce['bits_per_byte']:.4f} bits per byte of the eval text; try more student steps, "
            "another --loss (alm, sampled-kl) or --alpha"
        )
    gain = ce["cross_entropy"] - kd["cross_entropy"]
    ratio = math.exp(gain)
    if gain > 0:
        return (
            f"KD student beats the CE-only student by {gain:.4f} nats of eval cross-entropy "
            f"(perplexity {ce['perplexity']:.2f} -> {kd['perplexity']:.2f}, {ratio:.3f}x better)"
        )
    return (
        f"KD student does NOT beat the CE-only student: eval cross-entropy {kd['cross_entropy']:.4f}"
        f" vs {ce['cross_entropy']:.4f} nats; try --loss auto (ghost on top-k, sampled-kl on "
        "samples), a store with a larger --top-k or with samples, more student steps, or another "
        "--temperature/--alpha"
    )


def parse_students(
    kd_dir: str | None, ce_dir: str | None, named: tuple[str, ...]
) -> list[tuple[str, Path, str]]:
    """(row name, directory, flag) of every student asked for, in table order."""
    students = [("KD student", Path(kd_dir), "--kd")] if kd_dir else []
    students += [("CE-only student", Path(ce_dir), "--ce")] if ce_dir else []
    for spec in named:
        name, sep, directory = spec.partition("=")
        if not sep or not name.strip() or not directory:
            raise UserError(
                f"--student takes NAME=DIR, got {spec!r}, e.g. --student small=runs/small"
            )
        students.append((name.strip(), Path(directory), "--student"))
    names = [name for name, _, _ in students]
    if not students:
        raise UserError("no student to compare, got none, pass --kd/--ce or --student NAME=DIR")
    if len(set(names)) != len(names):
        raise UserError(f"student names must differ, got {names}, rename one --student")
    return students


def write_output(path: str, text: str, flag: str) -> None:
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(path), text)
    except OSError as e:
        raise UserError(f"cannot write {flag}, {path} ({e.strerror}), give a writable path") from e


@click.command("compare")
@click.option("--teacher", required=True, help="Teacher the store was cached from (HF id or dir).")
@click.option("--store", "store_url", required=True, help="Logit store (path or fsspec URL).")
@storage_options_option
@shard_cache_options
@allow_unfinished_option
@click.option("--kd", "kd_dir", default=None, type=click.Path(), help="KD student's --out dir.")
@click.option(
    "--ce", "ce_dir", default=None, type=click.Path(), help="CE-only student's --out dir."
)
@click.option(
    "--student",
    "named",
    multiple=True,
    metavar="NAME=DIR",
    help="Another student (a train-student --out dir) to compare; repeatable.",
)
@click.option(
    "--batch-size",
    type=int,
    default=None,
    help="Eval batch size [default: the first student's].",
)
@click.option(
    "--eval-batches",
    type=int,
    default=None,
    help="Cap on eval batches [default: the first student's].",
)
@precision_option
@click.option(
    "--markdown",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write the table as markdown here.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="Also write every row's metrics as JSON here.",
)
def command(
    teacher: str,
    store_url: str,
    kd_dir: str | None,
    ce_dir: str | None,
    named: tuple[str, ...],
    batch_size: int | None,
    eval_batches: int | None,
    precision: str,
    markdown: str | None,
    json_path: str | None,
    storage_options: dict[str, Any] | None,
    allow_unfinished: bool,
    shard_cache: Any,
) -> None:
    """Compare the teacher and its students on the store's eval split (exact KL to the teacher)."""
    started = time.perf_counter()
    students = parse_students(kd_dir, ce_dir, named)
    # every directory checked before the long part; the first one's settings are the defaults
    settings = [read_student_settings(path, flag) for _, path, flag in students][0]
    batch_size = batch_size or int(settings.get("batch_size") or 8)
    if eval_batches is None and settings.get("eval_batches"):
        eval_batches = int(settings["eval_batches"])
    for flag, value in (("--batch-size", batch_size), ("--eval-batches", eval_batches)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be at least 1, got {value}, pass a positive number")
    pairs = [(name, path) for name, path, _ in students]
    crossed: set[str] = set()
    rows = evaluate_models(
        teacher,
        store_url,
        pairs,
        batch_size,
        eval_batches,
        storage_options=storage_options,
        allow_unfinished=allow_unfinished,
        shard_cache=shard_cache,
        precision=precision,
        crossed=crossed,
    )
    by_name = dict(rows)
    line = ""
    if kd_dir and ce_dir:
        per_byte = bool(crossed & {"KD student", "CE-only student"})
        line = verdict(by_name["KD student"], by_name["CE-only student"], per_byte)
    click.echo(format_table(rows))
    if line:
        click.echo(line)
    if markdown:
        write_output(
            markdown, format_markdown(rows) + "\n" + (f"\n{line}\n" if line else ""), "--markdown"
        )
    if json_path:
        facts = {"store": store_url, "teacher": rows[0][1], "students": dict(rows[1:])}
        write_output(json_path, json.dumps(facts, indent=2) + "\n", "--json")
    click.echo(
        f"compared {len(rows)} models on {int(rows[0][1]['tokens']):,} eval tokens in "
        f"{time.perf_counter() - started:.1f}s"
    )
