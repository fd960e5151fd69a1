"""A store deleted while a student reads it: one clear line, exit 2, and the student's last
checkpoint intact (a rerun with --resume on a restored store continues from it)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_synthetic_store

pytestmark = pytest.mark.slow


def checkpoint_step(out: Path) -> int:
    """The step of the student's checkpoint (its ``<trainee>.json``)."""
    (trainee,) = [p for p in (out / "checkpoint").glob("*.json") if p.name != "loader.json"]
    return int(json.loads(trainee.read_text())["step"])


def test_a_store_deleted_mid_training_is_one_line_and_keeps_the_checkpoint(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    store = tmp_path / "store"
    lengths = {"train": [[32] * 8 for _ in range(12)], "eval": [[32] * 4]}
    write_synthetic_store(str(store), lengths=lengths, tokenizer_dir=tiny_tokenizer_dir)
    backup = tmp_path / "backup"
    shutil.copytree(store, backup)
    out = tmp_path / "run"
    command = [sys.executable, "-m", "kdcache.pipeline", "train-student", "--store", str(store)]
    command += ["--student", "tiny", "--steps", "100000", "--batch-size", "2", "--out", str(out)]
    command += ["--checkpoint-every", "5", "--threads", "1"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (out / "checkpoint" / "loader.json").is_file():
        assert process.poll() is None, (
            process.stderr.read().decode()[-1000:] if process.stderr else ""
        )
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.2)
    time.sleep(1.0)  # past the first epoch's shards in memory, mid-training
    shutil.rmtree(store)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        process.kill()
    lines = [line for line in err.decode().splitlines() if line.startswith("Error")]
    assert process.returncode == 2, err.decode()[-2000:]
    assert len(lines) == 1 and str(store) in lines[0], err.decode()[-2000:]
    assert "Traceback" not in err.decode()

    # the last checkpoint is whole: with the store back, --resume continues from it
    shutil.copytree(backup, store)
    step = checkpoint_step(out)
    assert step >= 5 and step % 5 == 0
    resumed = [*command, "--resume", "--stop-after", "5"]
    done = subprocess.run(resumed, env=env, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    assert checkpoint_step(out) == step + 5  # continued from the checkpoint the failure left
