"""Several processes train the one-process student: torchrun with 2 ranks (gloo on CPU), a rank
killed with -9 mid-run, the run resumed — with torchrun, and elastically with one process."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import write_synthetic_store

from kdcache.pipeline.cli import main

pytestmark = [pytest.mark.slow, pytest.mark.floors]

LENGTHS = {"train": [[24] * 7, [24] * 5, [24] * 9 + [11]], "eval": [[24] * 4, [24] * 3 + [11]]}
STEPS = 40
# --batch-size is global: 1 process reads 8 sequences a step, each of 2 processes 4
ARGS = ["--steps", str(STEPS), "--batch-size", "8", "--lr", "3e-3", "--eval-every", "20",
        "--checkpoint-every", "4", "--threads", "1"]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def torchrun(store: str, out: Path, *extra: str) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29800 + os.getpid() % 100 + len(extra)),
            "-m", "kdcache.pipeline", "train-student", "--store", store, "--out", str(out),
            *ARGS, *extra]  # fmt: skip
    return subprocess.Popen(
        argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def rank_pid(parent: int, rank: int) -> int | None:
    """The torchrun worker of ``parent`` running ``rank`` (from /proc), if it has started."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) != parent:
                continue
            environ = (stat.parent / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    return None


def checkpointed_step(out: Path) -> int:
    try:
        return int(json.loads((out / "checkpoint" / "student.json").read_text())["step"])
    except (OSError, ValueError):
        return 0


def log(out: Path) -> list[dict[str, str]]:
    with (out / "log.csv").open() as f:
        return list(csv.DictReader(f))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoint" / "student.pt", weights_only=True)["model"]


def assert_same_run(a: Path, b: Path) -> None:
    rows_a, rows_b = log(a), log(b)
    assert (
        [r["step"] for r in rows_a]
        == [r["step"] for r in rows_b]
        == [str(s) for s in range(1, STEPS + 1)]
    )
    # the same global batches (token counts exactly) and the same losses, up to float order
    assert [r["tokens"] for r in rows_a] == [r["tokens"] for r in rows_b]
    for name in ("loss", "kd", "ce", "grad_norm"):
        got = [float(r[name]) for r in rows_b]
        assert got == pytest.approx([float(r[name]) for r in rows_a], rel=1e-4), name
    wa, wb = weights(a), weights(b)
    assert max(float((wa[n] - wb[n]).abs().max()) for n in wa) < 1e-4
    final_a = json.loads((a / "metrics.json").read_text())["final"]
    final_b = json.loads((b / "metrics.json").read_text())["final"]
    assert final_b == pytest.approx(final_a, rel=1e-5)


def test_two_ranks_train_the_one_process_student_and_a_killed_rank_resumes(
    tmp_path: Path, tiny_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = write_synthetic_store(
        str(tmp_path / "store"), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir
    )
    one = tmp_path / "one"
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--store", store, "--out", str(one), *ARGS])
        raise SystemExit(0)
    assert done.value.code == 0, capsys.readouterr().err

    # 2 ranks, rank 1 killed once a checkpoint is there: torchrun fails
    two = tmp_path / "two"
    process = torchrun(store, two, "--workers", "2")
    deadline = time.monotonic() + 240
    while checkpointed_step(two) < 4:
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    victim = rank_pid(process.pid, 1)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, err[-2000:]
    killed_at = checkpointed_step(two)
    assert 4 <= killed_at < STEPS and not (two / "metrics.json").exists()

    # elastic: the same checkpoint resumed by one process and one worker
    elastic = tmp_path / "elastic"
    shutil.copytree(two, elastic)
    capsys.readouterr()
    with pytest.raises(SystemExit) as done:
        main(["train-student", "--store", store, "--out", str(elastic), *ARGS, "--resume"])
        raise SystemExit(0)
    printed = capsys.readouterr()
    assert done.value.code == 0, printed.err
    after_kill = sum(int(r["tokens"]) for r in log(elastic)[killed_at:])
    assert f"for {STEPS} steps: {after_kill:,} tokens" in printed.out  # it did resume

    # torchrun again with --resume: continues from the checkpoint, reports once
    resumed = torchrun(store, two, "--workers", "2", "--resume")
    stdout, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]
    summaries = [line for line in stdout.splitlines() if line.startswith("trained preset tiny")]
    assert len(summaries) == 1  # the main process reports, the other rank is silent
    run = json.loads((two / "run.json").read_text())
    assert run["processes"] == 2 and run["settings"]["batch_size"] == 8

    assert_same_run(one, two)
    assert_same_run(one, elastic)
