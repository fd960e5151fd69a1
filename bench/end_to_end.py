"""End to end: the embedded default, timed stage by stage, and the KD vs CE-only comparison.

Runs what ``make cache-teacher train-student`` runs (build the default teacher, cache it over the
corpus, train the student with KD and with ``--loss ce``, compare) in a scratch directory and
writes ``bench/results/end_to_end.md``: wall time per stage, the machine's load average while it
ran (a shared machine inflates every time), and the comparison table.

The defaults are the Makefile's, so on an idle 2-core machine this takes about as long as the
quickstart (the issue's budget is 15 minutes including install); ``--quick`` shrinks every size
to check the wiring in a minute.

Usage: ``python bench/end_to_end.py [--quick] [--workdir DIR] [--keep]``
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from report import cpu_model  # noqa: E402  (bench/ is a folder of scripts)

DEFAULTS = {  # keep in sync with the Makefile's defaults
    "teacher_steps": 150,
    "corpus": "stdlib",
    "targets": "sampled",
    "top_k": 32,
    "samples": 32,
    "seq_len": 256,
    "max_tokens": 600_000,
    "eval_fraction": 0.02,
    "student": "tiny",
    "steps": 300,
    "batch_size": 8,
    "loss": "auto",
}
QUICK = {
    **DEFAULTS,
    "teacher_steps": 10,
    "max_tokens": 40_000,
    "steps": 20,
    "seq_len": 128,
    "eval_fraction": 0.2,
}
QUICK_TEACHER = ["--hidden-size", "64", "--intermediate-size", "128", "--layers", "2"]


def kdcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.pipeline", *args]


def target_options(s: dict) -> list[str]:
    """cache-teacher's target options for the settings, as the Makefile passes them."""
    options = ["--targets", s["targets"]]
    if s["targets"] in ("topk", "topk+sampled"):
        options += ["--top-k", str(s["top_k"])]
    if s["targets"] in ("sampled", "topk+sampled"):
        options += ["--samples", str(s["samples"])]
    return options


def timed(name: str, command: list[str], log: Path, times: dict[str, float]) -> None:
    """Run one stage, its output appended to ``log``; exits with the stage's failure."""
    print(f"== {name}: {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n== {name}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    times[name] = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"Error: stage {name} failed (exit {result.returncode}), see {log}")
    print(f"   {times[name]:.0f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the wiring only")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch dir [a temp dir]")
    parser.add_argument("--keep", action="store_true", help="keep the scratch dir")
    parser.add_argument("--threads", type=int, default=2, help="teacher-build CPU threads")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "end_to_end.md")
    args = parser.parse_args(argv)
    s = QUICK if args.quick else DEFAULTS
    work = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache-e2e-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher, store, kd, ce = (work / n for n in ("teacher", "store", "kd", "ce"))
    log, table = work / "log.txt", work / "compare.md"
    times: dict[str, float] = {}
    load_before = os.getloadavg()

    build = ["--corpus", s["corpus"], "--out", str(teacher), "--steps", str(s["teacher_steps"])]
    build += ["--eval-fraction", str(s["eval_fraction"]), "--threads", str(args.threads), "--force"]
    build += QUICK_TEACHER if args.quick else []
    timed("build-teacher", kdcache("build-teacher", *build), log, times)
    timed(
        "cache-teacher",
        kdcache(
            "cache-teacher", "--teacher", str(teacher), "--corpus", s["corpus"],
            "--out", str(store), *target_options(s), "--seq-len", str(s["seq_len"]),
            "--eval-fraction", str(s["eval_fraction"]), "--max-tokens", str(s["max_tokens"]),
        ),
        log,
        times,
    )  # fmt: skip
    student = ["--store", str(store), "--student", s["student"], "--steps", str(s["steps"])]
    student += ["--batch-size", str(s["batch_size"]), "--seed", "0"]
    kd_args = [*student, "--loss", s["loss"], "--out", str(kd)]
    timed(f"train-student (KD, {s['loss']})", kdcache("train-student", *kd_args), log, times)
    ce_args = [*student, "--loss", "ce", "--out", str(ce)]
    timed("train-student (CE-only)", kdcache("train-student", *ce_args), log, times)
    compare = ["--teacher", str(teacher), "--store", str(store), "--kd", str(kd), "--ce", str(ce)]
    timed("compare", kdcache("compare", *compare, "--markdown", str(table)), log, times)
    load_after = os.getloadavg()

    total = sum(times.values())
    lines = [
        "## End to end: `make cache-teacher train-student` (`bench/end_to_end.py`)",
        "",
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}. Load average (1 min) {load_before[0]:.1f} before, "
        f"{load_after[0]:.1f} after"
        + (
            ": above the core count, other jobs shared the machine and every time below is inflated."
            if max(load_before[0], load_after[0]) > (os.cpu_count() or 1)
            else "."
        ),
        "",
        "Settings: "
        + ", ".join(f"{k}={v}" for k, v in s.items())
        + (" (--quick)" if args.quick else ""),
        "",
        "| stage | wall time (s) |",
        "| --- | --- |",
        *(f"| {name} | {seconds:.0f} |" for name, seconds in times.items()),
        f"| **total (without install)** | **{total:.0f}** |",
        "",
        "Eval split of the store (held-out documents), teacher evaluated with the students' code:",
        "",
        table.read_text().strip(),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}: total {total:.0f} s")
    if not args.keep and args.workdir is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
