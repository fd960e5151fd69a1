"""Several sweep workers sharing one study: `--parallel` on one machine, and two independent
`kdcache sweep` processes, one killed with SIGKILL mid-candidate — every candidate finishes once,
with the results one worker alone gives."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_synthetic_store

from kdcache.pipeline.cli import main

pytestmark = pytest.mark.slow

SWEEP = """
base: tiny
seed: 2
budget: {steps: 40}
batch_size: 4
lr: 0.003
eval_batches: 2
search:
  hidden_size: [16, 32]
  num_hidden_layers: [1, 2]
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("workers") / "store"
    return write_synthetic_store(
        str(path),
        lengths={"train": [[24] * 10, [24] * 10], "eval": [[24] * 6]},
        tokenizer_dir=tiny_tokenizer_dir,
    )


def leaderboard(out: Path) -> dict[str, float]:
    with (out / "leaderboard.csv").open() as f:
        return {r["candidate"]: float(r["eval_cross_entropy"]) for r in csv.DictReader(f)}


def args(store: str, config: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--store", store, "--config", str(config), "--out", str(out), *extra]


def test_parallel_workers_and_a_killed_worker_finish_every_candidate_once(store, tmp_path):
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage
    from optuna.trial import TrialState

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    alone = tmp_path / "alone"
    with pytest.raises(SystemExit) as done:
        main([*args(store, str(config), alone, "--together", "4", "--threads", "1")])
        raise SystemExit(0)
    assert done.value.code == 0
    reference = leaderboard(alone)

    # --parallel 2: two worker processes, candidates side by side
    side = tmp_path / "side"
    with pytest.raises(SystemExit) as done:
        main([*args(store, str(config), side, "--together", "1", "--parallel", "2")])
        raise SystemExit(0)
    assert done.value.code == 0
    assert leaderboard(side) == pytest.approx(reference, rel=1e-4)
    logs = [(side / "workers" / f"worker-{i}.log").read_text() for i in range(2)]
    assert all("sweep: grid search" in log for log in logs), logs  # both joined the study

    # two workers started by hand on one study: the first is killed mid-candidate, the
    # second joins after it and reruns that candidate once it is silent for --stale-after
    out, journal = tmp_path / "shared", tmp_path / "study.journal"
    common = ["--together", "1", "--threads", "1", "--study", str(journal), "--stale-after", "3"]
    command = [sys.executable, "-m", "kdcache.pipeline", *args(store, str(config), out, *common)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    first = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    storage, victim = None, None
    deadline = time.monotonic() + 180
    while victim is None and time.monotonic() < deadline:  # its first candidate, under way
        time.sleep(0.05)
        if not journal.exists():
            continue
        storage = storage or JournalStorage(JournalFileBackend(str(journal)))
        try:
            study = optuna.load_study(study_name="kdcache-sweep", storage=storage)
        except KeyError:  # the journal exists, the study is not in it yet
            continue
        for trial in study.get_trials(states=(TrialState.RUNNING,)):
            log = out / "candidates" / str(trial.user_attrs.get("candidate")) / "log.csv"
            if log.is_file() and 3 < len(log.read_text().splitlines()) < 30:  # of 40 steps
                victim = trial.user_attrs["candidate"]
    assert victim is not None, first.stderr.read().decode()[-500:] if first.stderr else ""
    first.send_signal(signal.SIGKILL)
    first.wait()
    # another machine's worker: its own --out (a restart with the same --out would take the
    # killed worker's slot and resume its candidate as its own)
    elsewhere = tmp_path / "elsewhere"
    command = [
        sys.executable,
        "-m",
        "kdcache.pipeline",
        *args(store, str(config), elsewhere, *common),
    ]
    second = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, err = second.communicate(timeout=300)
    assert second.returncode == 0, err.decode()[-2000:]
    assert leaderboard(elsewhere) == pytest.approx(reference, rel=1e-4), err.decode()[-2000:]
    study = optuna.load_study(study_name="kdcache-sweep", storage=storage)
    trials = study.get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    # (a worker that asks past the last candidate gets a trial it marks surplus, never trained)
    failed = [t for t in trials if t.state == TrialState.FAIL and "surplus" not in t.user_attrs]
    assert sorted(t.user_attrs["candidate"] for t in complete) == sorted(reference)
    assert len(failed) == 1, [(t.number, t.state, t.user_attrs) for t in trials]
    rerun = [t for t in complete if t.user_attrs.get("retry_of") == failed[0].number]
    assert failed[0].user_attrs["candidate"] == victim  # the candidate the kill interrupted
    assert len(rerun) == 1 and rerun[0].user_attrs["candidate"] == victim
