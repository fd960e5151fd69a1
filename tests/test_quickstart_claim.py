"""The quickstart's stable claim, on the embedded default: the KD student beats its CE-only twin.

`make cache-teacher train-student` itself (the Makefile's defaults: teacher, store, students),
with every output under a temporary directory. The figures differ slightly from CPU to CPU (the
README says which machine measured them); the comparison does not. About 5 minutes on 2 cores,
so not part of `make test`: `make test-quickstart` runs it, and CI after the suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.quickstart
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(1800)
def test_the_kd_student_beats_its_ce_only_twin_on_the_default(tmp_path: Path) -> None:
    venv = Path(sys.prefix)
    paths = {
        "VENV": str(venv),
        "DEFAULT_TEACHER": str(tmp_path / "teacher"),
        "STORE": str(tmp_path / "store"),
        "OUT": str(tmp_path / "kd"),
        "CE_OUT": str(tmp_path / "ce"),
        "LAST_STORE_FILE": str(tmp_path / "last-store"),
        "LAST_TEACHER_FILE": str(tmp_path / "last-teacher"),
    }
    overrides = [f"{k}={v}" for k, v in paths.items()]
    command = ["make", "--no-print-directory", "-C", str(ROOT), "cache-teacher", "train-student"]
    done = subprocess.run([*command, *overrides], capture_output=True, text=True, timeout=1700)
    assert done.returncode == 0, done.stderr[-3000:]
    kd, ce = (json.loads((tmp_path / n / "metrics.json").read_text()) for n in ("kd", "ce"))
    kd_ce, ce_ce = kd["final"]["cross_entropy"], ce["final"]["cross_entropy"]
    assert kd_ce < ce_ce, f"KD {kd_ce:.4f} is not below CE-only {ce_ce:.4f}"
    assert "KD student beats the CE-only student by" in done.stdout, done.stdout[-1500:]
