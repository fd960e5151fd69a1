"""The sweep's output directory, and what each candidate records there while it trains.

```
OUT/sweep.json              the plan (YAML, store fingerprint, --together, steps): a rerun resumes
                            the same sweep only
OUT/candidates/<name>/      log.csv (one row per step, train-student's columns), curves.png (at
                            each checkpoint and at the end), the student, then metrics.json — its
                            presence marks the candidate finished
OUT/groups/<a>+<b>+…/       the checkpoint of a group stopped before its last step
OUT/leaderboard.{csv,md}, pareto.png, curves.png (every candidate's training loss)
```

The main process writes; every rank may call.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from kdcache.pipeline.distill.run_dir import truncate_log
from kdcache.pipeline.distill.run_plot import write_curves, write_sweep_curves
from kdcache.pipeline.distill.tracking import log_eval, log_train
from kdcache.pipeline.distill.trainee import LOG_FIELDS, Trainee
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.files import create_out_dir, write_text_atomic

SWEEP_FILE = "sweep.json"
LOG_FILE = "log.csv"


LATER_PLAN_KEYS = ("store_records",)  # plan facts newer than some sweeps on disk
# what workers sharing OUT may create before the plan is written (``study.py``, ``parallel.py``)
WORKER_FILES = ("workers", "study.journal", ".tmp-")


def prepare_out(out: Path, plan: dict[str, Any]) -> None:
    """Create OUT, or check that it holds this same sweep (then finished candidates are kept)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out is a file, {out}, give a directory")
    record = out / SWEEP_FILE
    if record.is_file():
        damaged = f"--out holds a damaged {SWEEP_FILE}, {record}, choose a new --out"
        try:
            previous = json.loads(record.read_text())
        except ValueError as e:
            raise UserError(damaged) from e
        if not isinstance(previous, dict):
            raise UserError(damaged)
        later = {k for k in LATER_PLAN_KEYS if k not in previous}  # a sweep of an older kdcache
        differences = [k for k in plan if k not in later and previous.get(k) != plan[k]]
        if differences:
            raise UserError(
                f"--out holds a different sweep (differs in {', '.join(differences)}), {out}, "
                "rerun the original command to resume it or choose a new --out"
            )
        return
    if out.is_dir() and any(not p.name.startswith(WORKER_FILES) for p in out.iterdir()):
        raise UserError(
            f"--out already holds files that are not a sweep, {out}, choose a new --out"
        )
    create_out_dir(out)
    write_text_atomic(record, json.dumps(plan, indent=2) + "\n")  # first: a worker beside
    (out / "candidates").mkdir(exist_ok=True)  # this one reads the sweep it joins


def candidate_dir(out: Path, name: str) -> Path:
    return out / "candidates" / name


def write_all_curves(out: Path) -> None:
    """OUT/curves.png: the training loss of every candidate trained into OUT (main process)."""
    logs = sorted((out / "candidates").glob(f"*/{LOG_FILE}"))
    write_sweep_curves(out, {log.parent.name: log for log in logs})


class CandidateLogs:
    """A group's per-step records: each candidate's ``log.csv`` rows, its ``curves.png`` and its
    series in the experiment trackers (``tracking.py``)."""

    def __init__(self, out: Path, trainees: list[Trainee], accelerator: Any) -> None:
        """Keep each ``log.csv`` to the steps its trainee (restored or new) has taken."""
        self.accelerator = accelerator
        self.main = accelerator.is_main_process
        self.dirs = {t.name: candidate_dir(out, t.name) for t in trainees}
        if self.main:
            for trainee in trainees:
                self.dirs[trainee.name].mkdir(parents=True, exist_ok=True)
                truncate_log(self.dirs[trainee.name] / LOG_FILE, trainee.step)

    def add(self, trainee: Trainee, row: dict[str, Any], seconds: float) -> None:
        """``train_step``'s row of ``trainee``, completed with its own training time so far."""
        rate = trainee.tokens / max(seconds, 1e-9)
        row.update(elapsed_s=round(seconds, 3), tokens_per_s=round(rate, 1))
        if self.main:
            with (self.dirs[trainee.name] / LOG_FILE).open("a", newline="") as f:
                csv.DictWriter(f, fieldnames=LOG_FIELDS).writerow(row)
        log_train(self.accelerator, row, series=trainee.name)

    def checkpoint(self) -> None:
        """Redraw every candidate's ``curves.png``."""
        if self.main:
            for directory in self.dirs.values():
                write_curves(directory, directory / LOG_FILE)

    def evaluated(self, trainee: Trainee, metrics: dict[str, float]) -> None:
        """The final eval of ``trainee`` (empty without an eval split): logged and drawn."""
        if metrics:
            log_eval(self.accelerator, metrics, trainee.step, series=trainee.name)
        if self.main:
            directory = self.dirs[trainee.name]
            history = [{"step": trainee.step, **metrics}] if metrics else []
            write_curves(directory, directory / LOG_FILE, history)
