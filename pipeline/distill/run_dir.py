"""A student's output directory — created for a new run, or checked before ``--resume`` continues
one — and ``Run``, what the train-student recipe's steps share.

OUT holds ``run.json`` (the store's fingerprint and every setting), ``log.csv``, ``metrics.json``,
the saved student and ``checkpoint/``. A resumed run must ask for exactly what the recorded one did.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.trainee import LOG_FIELDS, RESUMABLE_SETTINGS
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.files import create_out_dir

RUN_FILE = "run.json"


def prepare_out(out: Path, resume: bool, run: dict[str, Any]) -> bool:
    """Create OUT or check it for resuming; True if a checkpoint is there to resume from.

    ``--resume`` on an empty or missing OUT starts a new run, so a job script can always pass it.
    """
    has_files = out.is_dir() and any(out.iterdir())
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, {out}, give a directory")
    if has_files and not resume:
        raise UserError(
            f"--out already holds files, {out}, pass --resume to continue that run "
            "or choose an empty directory"
        )
    if not has_files:
        create_out_dir(out)
        return False
    previous_file = out / RUN_FILE
    if not previous_file.is_file():
        raise UserError(
            f"--out holds files but no kdcache run (run.json), {out}, "
            "choose an empty directory or drop --resume"
        )
    damaged = f"--out holds a damaged {RUN_FILE}, {previous_file}, use a new --out"
    try:
        previous = json.loads(previous_file.read_text())
    except ValueError as e:
        raise UserError(damaged) from e
    if not isinstance(previous, dict) or not isinstance(previous.get("settings"), dict):
        raise UserError(damaged)
    differences = [
        f"{key}: run has {previous['settings'].get(key)!r}, this command asks {run['settings'].get(key)!r}"
        for key in RESUMABLE_SETTINGS
        if previous["settings"].get(key) != run["settings"].get(key)
    ]
    # the precision the run computes in (older runs recorded it only here)
    for key in ("manifest_fingerprint", "train_shards", "train_records", "mixed_precision"):
        if key == "train_records" and key not in previous:  # a run of an older kdcache
            continue
        if previous.get(key) != run[key]:
            differences.append(f"{key}: run has {previous.get(key)!r}, store now has {run[key]!r}")
    if differences:
        raise UserError(
            f"--resume with different settings, {'; '.join(differences)}, "
            "repeat the original command or use a new --out"
        )
    # a kill between the two renames of save_checkpoint leaves only checkpoint.old
    checkpoint, old = out / "checkpoint", out / "checkpoint.old"
    if not checkpoint.is_dir() and old.is_dir():
        old.rename(checkpoint)
    return checkpoint.is_dir()  # no checkpoint yet: start over with the same settings


def truncate_log(path: Path, up_to_step: int) -> None:
    """Keep the per-step log rows of steps <= ``up_to_step`` (those the checkpoint covers)."""
    rows = []
    if path.is_file():
        with path.open(newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= up_to_step]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class Run:
    """One train-student run: what every step of the recipe reads and writes."""

    s: dict[str, Any]  # the settings, "auto" loss resolved
    accelerator: Any
    store: Any
    out: Path
    tokenizer: Any = None  # the student's: the store's, or its own (``cross``)
    cross: Any = None  # a CrossTokenizerCollator for a student with its own tokenizer
    vocab: int = 0  # the ids the student's logits cover
    model: Any = None
    source: str = ""
    facts: dict[str, Any] = field(default_factory=dict)  # run.json
    trainee: Any = None
    loader: Any = None
    teacher: Any = None
    eval_history: list[dict[str, float]] = field(default_factory=list)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def note(self, line: str | None) -> None:
        if line and self.main:
            click.echo(f"Note: {line}", err=True)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return pad if pad is not None else 0

    @property
    def has_eval(self) -> bool:
        return bool(self.store.shards_of("eval"))
