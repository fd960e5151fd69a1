"""`kdcache sweep` under torchrun: every candidate trained by both ranks (data parallel, the global
batch split) gives the one-process leaderboard; the main process alone writes and reports."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_synthetic_store

from kdcache.pipeline.cli import main

pytestmark = pytest.mark.slow

SWEEP = """
base: tiny
seed: 2
budget: {steps: 8}
batch_size: 6
lr: 0.003
eval_batches: 3
search:
  hidden_size: [32, 64]
baseline: true
"""
METRICS = ("eval_cross_entropy", "ghost_kl_to_teacher", "top1_agreement", "ece", "tokens_seen")


def leaderboard(out: Path) -> dict[str, dict[str, str]]:
    with (out / "leaderboard.csv").open() as f:
        return {row["candidate"]: row for row in csv.DictReader(f)}


def test_two_ranks_give_the_one_process_leaderboard(
    tmp_path: Path, tiny_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = write_synthetic_store(
        str(tmp_path / "store"),
        lengths={"train": [[24] * 8, [24] * 5 + [9]], "eval": [[24] * 5, [24] * 4]},
        tokenizer_dir=tiny_tokenizer_dir,
    )
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    common = ["--store", store, "--config", str(config), "--together", "2", "--threads", "1"]
    with pytest.raises(SystemExit) as done:
        main(["sweep", *common, "--out", str(tmp_path / "one")])
        raise SystemExit(0)
    assert done.value.code == 0, capsys.readouterr().err

    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29900 + os.getpid() % 100), "-m", "kdcache.pipeline", "sweep",
         *common, "--out", str(tmp_path / "two")],
        env=environment, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("sweep done: 3 candidates") == 1  # printed once

    one, both = leaderboard(tmp_path / "one"), leaderboard(tmp_path / "two")
    assert one.keys() == both.keys() == {"h32", "h64", "baseline-ce"}
    for name in one:
        assert both[name]["tokens_seen"] == one[name]["tokens_seen"]  # the same global batches
        for metric in METRICS:
            assert float(both[name][metric]) == pytest.approx(
                float(one[name][metric]), rel=1e-4, abs=1e-6
            ), (name, metric)
