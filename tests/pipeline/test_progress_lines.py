"""Progress in logs: with stderr redirected, a plain line every few seconds and a final one —
not a bar frame per batch; on a terminal, the ordinary tqdm bar."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from conftest import write_synthetic_store

from kdcache.pipeline.cli import main
from kdcache.pipeline.progress import DEFAULT_INTERVAL, INTERVAL_ENV, line_interval, progress

ROOT = Path(__file__).resolve().parents[2]
INTERVAL = 0.2
# a script that updates a bar every 5 ms for ~0.6 s: 120 frames' worth of updates
DEMO = """
import time
from kdcache.pipeline.progress import progress
with progress(total=120, desc="demo", unit="step") as bar:
    for i in range(120):
        time.sleep(0.005)
        bar.update(1)
        bar.set_postfix(loss=f"{1 / (i + 1):.3f}")
"""


def plain(text: str) -> bool:
    """No carriage return, no ANSI escape (cursor moves, colours)."""
    return "\r" not in text and "\x1b" not in text


def progress_lines(stderr: str, desc: str) -> list[str]:
    """Lines of the bar called ``desc`` ("" for a bar without one): ``desc: ... [mm:ss...``."""
    prefix = rf"{re.escape(desc)}: " if desc else r" *\d+% "
    return [line for line in stderr.splitlines() if re.match(rf"{prefix}.*\[\d\d:\d\d", line)]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str, float]:
    started = time.perf_counter()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err, time.perf_counter() - started


def test_lines_are_throttled_plain_and_carry_the_facts(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, str(INTERVAL))
    started = time.perf_counter()
    with progress(total=100, desc="work", unit="tok", unit_scale=True) as bar:
        for i in range(100):
            time.sleep(0.01)
            bar.update(1)
            bar.set_postfix(shards=i, refresh=i % 2 == 0)  # refreshes are throttled too
    seconds = time.perf_counter() - started
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert plain(err) and err.endswith("\n")
    assert 2 <= len(lines) <= seconds / INTERVAL + 2, lines
    assert lines == progress_lines(err, "work")
    # done/total, percentage, elapsed<remaining, rate and the postfix, as the bar shows them
    assert re.match(
        r"work: +\d+% \d+\.?\d*/100 \[\d\d:\d\d<\d\d:\d\d, .*tok/s, shards=\d+\]$", lines[0]
    )
    assert lines[-1].startswith("work: 100% 100/100 [") and lines[-1].endswith("shards=99]")


def test_unknown_total_iteration_and_a_bar_that_leaves_nothing(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "0")  # 0: every refresh is a line
    with progress(desc="count", unit="shard") as bar:
        bar.update(3)
    assert capsys.readouterr().err.splitlines()[-1].startswith("count: 3shard [")
    assert list(progress(range(4), desc="steps")) == [0, 1, 2, 3]
    assert capsys.readouterr().err.splitlines()[-1].startswith("steps: 100% 4/4 [")
    monkeypatch.setenv(INTERVAL_ENV, "60")
    with progress(desc="verify", leave=False, total=2) as bar:  # like verify's: no final line
        bar.update(2)
    with progress(desc="off", disable=True, total=2) as bar:  # other ranks: nothing at all
        bar.update(2)
    assert capsys.readouterr().err == ""


def test_the_interval_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert line_interval() == DEFAULT_INTERVAL == 5.0
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert line_interval() == 2.5
    for bad in ("soon", "-1", "inf", "nan"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(Exception, match=f"{INTERVAL_ENV} must be a number of seconds >= 0"):
            line_interval()


def demo_env() -> dict[str, str]:
    return {**os.environ, INTERVAL_ENV: str(INTERVAL), "PYTHONPATH": ""}


def test_a_redirected_process_writes_few_plain_lines(tmp_path: Path) -> None:
    log = tmp_path / "log"
    started = time.perf_counter()
    with log.open("w") as f:
        subprocess.run([sys.executable, "-c", DEMO], stderr=f, env=demo_env(), check=True)
    seconds = time.perf_counter() - started  # interpreter start included: a looser bound
    text = log.read_text()
    lines = progress_lines(text, "demo")
    assert plain(text) and lines == text.splitlines()
    assert 1 <= len(lines) <= seconds / INTERVAL + 2, text
    assert lines[-1].startswith("demo: 100% 120/120 [")


def test_on_a_terminal_the_bar_redraws_in_place() -> None:
    controller, terminal = pty.openpty()
    # a real terminal has a size (a bare pty reports 0 columns, and tqdm then draws nothing)
    fcntl.ioctl(terminal, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    process = subprocess.Popen(
        [sys.executable, "-c", DEMO], stderr=terminal, stdout=terminal, env=demo_env()
    )
    os.close(terminal)
    chunks = []
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # EIO: the child closed its end
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(controller)
    assert process.wait(timeout=60) == 0
    text = b"".join(chunks).decode()
    assert text.count("\r") >= 2 and "demo: 100%" in text and "|" in text  # frames, a bar


def test_cache_teacher_logs_a_few_lines(
    tiny_teacher_dir: Path,
    small_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real command with stderr captured (not a terminal): ~100 batches, a handful of lines."""
    monkeypatch.setenv(INTERVAL_ENV, str(INTERVAL))
    argv = [
        "cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus_dir),
        "--out", str(tmp_path / "store"), "--top-k", "4", "--seq-len", "32", "--batch-size", "1",
        "--shard-tokens", "256", "--max-tokens", "3000",
    ]  # fmt: skip
    code, out, err, seconds = run(argv, capsys)
    assert code == 0, err
    lines = progress_lines(err, "cache-teacher")
    assert plain(err)
    assert 1 <= len(lines) <= seconds / INTERVAL + 2, err
    assert re.match(r"cache-teacher: 100% 3\.00k/3\.00k \[.*tok/s, shards=\d+\]$", lines[-1])


def test_train_student_logs_a_few_lines(
    tiny_tokenizer_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, str(INTERVAL))
    store = write_synthetic_store(
        str(tmp_path / "store"),
        lengths={"train": [[16] * 8], "eval": [[16] * 2]},
        tokenizer_dir=tiny_tokenizer_dir,
    )
    argv = [
        "train-student", "--store", store, "--out", str(tmp_path / "out"), "--steps", "40",
        "--threads", "1", "--batch-size", "2", "--workers", "0",
    ]  # fmt: skip
    code, out, err, seconds = run(argv, capsys)
    assert code == 0, err
    lines = progress_lines(err, "")
    assert plain(err)
    assert 1 <= len(lines) <= seconds / INTERVAL + 2, err
    assert re.search(r"100% 40/40 \[.*, loss=\d\.\d{4}, tok_s=\d+\]$", lines[-1])


def test_a_bad_interval_fails_before_the_command_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(INTERVAL_ENV, "often")
    code, out, err, _ = run(["ls", str(tmp_path)], capsys)
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"Error: {INTERVAL_ENV} must be a number of seconds >= 0, 'often'")
