"""The Makefile's teacher flow, read from `make -n`: which teacher each target builds and runs."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def dry_run(*args: str) -> str:
    result = subprocess.run(
        ["make", "--no-print-directory", "-n", "-C", str(ROOT), *args],
        capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""}, check=True,
    )  # fmt: skip
    return " ".join(result.stdout.replace("\\\n", " ").split())


@pytest.fixture
def dirs(tmp_path: Path) -> list[str]:
    """Teacher directories that do not exist yet, so `make -n` shows how they are built."""
    return [f"DEFAULT_TEACHER={tmp_path}/teacher", f"CHAT_TEACHER={tmp_path}/chat"]


def test_the_default_corpus_caches_from_the_default_teacher(dirs: list[str], tmp_path: Path):
    out = dry_run("cache-teacher", *dirs)
    assert f"build-teacher --corpus stdlib --out {tmp_path}/teacher" in out
    assert "--from" not in out
    assert f"cache-teacher --teacher {tmp_path}/teacher --corpus stdlib " in out
    assert f'echo "{tmp_path}/teacher" > artifacts/last-teacher' in out


def test_stdlib_chat_caches_from_the_default_tuned_on_its_training_split(
    dirs: list[str], tmp_path: Path
) -> None:
    out = dry_run("cache-teacher", "CORPUS=stdlib-chat", "EVAL_FRACTION=0.05", *dirs)
    build = out.index(f"build-teacher --corpus stdlib --out {tmp_path}/teacher")
    tune = out.index(
        f"build-teacher --from {tmp_path}/teacher --corpus stdlib-chat --out {tmp_path}/chat "
        "--seq-len 256 --eval-fraction 0.05"
    )
    cache = out.index(f"cache-teacher --teacher {tmp_path}/chat --corpus stdlib-chat ")
    assert build < tune < cache
    assert "--eval-fraction 0.05" in out[cache:]  # the split the fine-tune kept out
    assert f'echo "{tmp_path}/chat" > artifacts/last-teacher' in out
    assert "--steps 7" in dry_run("chat-teacher", "TUNE_STEPS=7", *dirs)


def test_a_given_teacher_is_neither_built_nor_tuned(dirs: list[str]) -> None:
    out = dry_run("cache-teacher", "CORPUS=stdlib-chat", "TEACHER=some/model", *dirs)
    assert "build-teacher" not in out
    assert "cache-teacher --teacher some/model --corpus stdlib-chat " in out


def test_compare_runs_the_teacher_the_last_cache_teacher_ran(
    dirs: list[str], tmp_path: Path
) -> None:
    last = tmp_path / "last-teacher"
    last.write_text(f"{tmp_path}/chat\n")
    assert f"compare --teacher {tmp_path}/chat " in dry_run(
        "compare", f"LAST_TEACHER_FILE={last}", *dirs
    )
    assert f"compare --teacher {tmp_path}/chat " in dry_run(
        "train-student", f"LAST_TEACHER_FILE={last}", *dirs
    )
    assert "compare --teacher other " in dry_run(
        "compare", f"LAST_TEACHER_FILE={last}", "TEACHER=other", *dirs
    )
    missing = f"LAST_TEACHER_FILE={tmp_path}/none"
    assert f"compare --teacher {tmp_path}/teacher " in dry_run("compare", missing, *dirs)
