"""`kdcache sweep` strategies on Optuna: samplers over ranges, early stopping by rungs of training
tokens, several objectives with their Pareto front, and the study's bad inputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import write_synthetic_store

from kdcache.pipeline.cli import main

pytestmark = pytest.mark.floors

BASE = """
base: tiny
seed: 3
budget: {steps: 9}
batch_size: 4
lr: 0.003
eval_batches: 2
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("strategies") / "store"
    return write_synthetic_store(
        str(path),
        lengths={"train": [[24] * 10, [24] * 10], "eval": [[24] * 6]},
        tokenizer_dir=tiny_tokenizer_dir,
    )


def sweep(store: str, yaml: str, out: Path, tmp_path: Path, *extra: str) -> int:
    config = tmp_path / f"{out.name}.yaml"
    config.write_text(BASE + yaml)
    args = ["sweep", "--store", store, "--config", str(config), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--threads", "1", *extra])
        raise SystemExit(0)
    return int(exit_info.value.code or 0)


def leaderboard(out: Path) -> dict[str, dict[str, str]]:
    with (out / "leaderboard.csv").open() as f:
        return {r["candidate"]: r for r in csv.DictReader(f)}


def steps_trained(out: Path) -> int:
    return sum(
        sum(1 for _ in csv.DictReader(log.open())) for log in (out / "candidates").glob("*/log.csv")
    )


def test_random_search_draws_from_ranges_and_a_rerun_trains_nothing(store, tmp_path, capsys):
    yaml = """
strategy: {sampler: random, trials: 3}
search:
  hidden_size: {low: 16, high: 64, step: 16}
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}
  num_hidden_layers: [1, 2]
"""
    out = tmp_path / "random"
    assert sweep(store, yaml, out, tmp_path, "--together", "2") == 0
    rows = leaderboard(out)
    assert len(rows) == 3 and all(name.startswith("t") for name in rows)
    for row in rows.values():
        assert int(row["hidden_size"]) in (16, 32, 48, 64)
        assert 1e-4 <= float(row["lr"]) <= 1e-2
        assert row["status"] == "finished" and float(row["eval_cross_entropy"]) > 0
    assert len({r["lr"] for r in rows.values()}) == 3  # drawn, not a grid
    capsys.readouterr()
    assert sweep(store, yaml, out, tmp_path, "--together", "2") == 0
    assert "(3 already finished)" in capsys.readouterr().out
    assert leaderboard(out) == rows


def test_successive_halving_stops_weak_candidates_at_rungs_of_tokens(store, tmp_path, capsys):
    # 4 × 24 tokens per step, 9 steps: rungs at 96 and 288 tokens (steps 1 and 3)
    grid = "search:\n  hidden_size: [16, 32, 64]\n  num_hidden_layers: [1, 2]\n"
    halving = "strategy: {early_stopping: asha, min_tokens: 96, reduction_factor: 3}\n"
    full, early = tmp_path / "grid", tmp_path / "asha"
    assert sweep(store, grid, full, tmp_path, "--together", "6") == 0
    capsys.readouterr()
    assert sweep(store, halving + grid, early, tmp_path, "--together", "2") == 0
    printed = capsys.readouterr().out
    assert "rungs at 96, 288 tokens" in printed and "stopped at" in printed

    rows, reference = leaderboard(early), leaderboard(full)
    assert rows.keys() == reference.keys()
    stopped = {n for n, r in rows.items() if r["status"].startswith("stopped at")}
    finished = set(rows) - stopped
    assert stopped and finished
    assert steps_trained(early) < steps_trained(full) == 6 * 9
    # a finished candidate trained exactly as in the grid (the same batches, the same weights)
    for name in finished:
        assert float(rows[name]["eval_cross_entropy"]) == pytest.approx(
            float(reference[name]["eval_cross_entropy"]), rel=1e-4
        )
    # a stopped one reports what it measured at its rung, and says where
    for name in stopped:
        assert int(rows[name]["tokens_seen"]) in (96, 288)
    study = json.loads((early / "sweep.json").read_text())["config"]["strategy"]
    assert study["early_stopping"] == "asha"


def test_two_objectives_mark_the_pareto_front(store, tmp_path):
    yaml = """
strategy: {sampler: tpe, trials: 4}
objectives: [eval_cross_entropy, non_embedding_parameters]
search:
  hidden_size: [16, 32, 64]
  num_hidden_layers: [1, 2]
"""
    out = tmp_path / "pareto"
    assert sweep(store, yaml, out, tmp_path, "--together", "4") == 0
    rows = list(leaderboard(out).values())
    assert len(rows) == 4
    table = (out / "leaderboard.md").read_text().splitlines()[2:]
    front = {line.split("|")[2].strip() for line in table if line.rstrip().endswith("* |")}
    for row in rows:  # on the front exactly when no other row is as good in both and better in one
        point = (float(row["eval_cross_entropy"]), int(row["non_embedding_parameters"]))
        dominated = any(
            (float(o["eval_cross_entropy"]), int(o["non_embedding_parameters"])) != point
            and float(o["eval_cross_entropy"]) <= point[0]
            and int(o["non_embedding_parameters"]) <= point[1]
            for o in rows
        )
        assert (row["candidate"] in front) == (not dominated)
    assert (out / "pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize(
    ("yaml", "message"),
    [
        ("strategy: annealing\nsearch: {hidden_size: [16]}\n", "unknown strategy 'annealing'"),
        ("objectives: [loss]\nsearch: {hidden_size: [16]}\n", "unknown objective 'loss'"),
        (
            "strategy: {sampler: random, trials: 2}\nsearch: {hidden_size: {low: 64, high: 16}}\n",
            "low 64 above high 16",
        ),
        ("search: {lr: {low: 1.0e-4, high: 1.0e-2}}\n", "a range without a step"),
        ("strategy: tpe\nsearch: {hidden_size: [16, 32]}\n", "needs a number of candidates"),
        ("strategy: {sampler: grid, reduction_factor: 1}\nsearch: {hidden_size: [16]}\n", ">= 2"),
    ],
)
def test_a_bad_strategy_is_one_line_and_trains_nothing(store, tmp_path, capsys, yaml, message):
    out = tmp_path / "bad"
    assert sweep(store, yaml, out, tmp_path) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (out / "candidates").exists()


def test_a_study_of_another_sweep_or_an_unreachable_storage_is_refused(store, tmp_path, capsys):
    study = str(tmp_path / "shared.journal")
    grid = "search:\n  hidden_size: [16]\n"
    assert sweep(store, grid, tmp_path / "first", tmp_path, "--study", study) == 0
    capsys.readouterr()
    other = "search:\n  hidden_size: [32]\n"
    assert sweep(store, other, tmp_path / "second", tmp_path, "--study", study) == 2
    err = capsys.readouterr().err
    assert "was created for another sweep (differs in config)" in err and err.count("\n") == 1
    assert not list((tmp_path / "second" / "candidates").glob("*"))

    bad = f"sqlite:///{tmp_path}/no/such/dir/study.db"
    assert sweep(store, grid, tmp_path / "third", tmp_path, "--study", bad) == 2
    err = capsys.readouterr().err
    assert "cannot reach the study storage" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("stopping", "objectives"),
    [("hyperband", "[eval_cross_entropy]"), ("asha", "[eval_cross_entropy, inference_latency]")],
)
def test_hyperband_and_multi_objective_halving_stop_some_at_their_rungs(
    store, tmp_path, stopping, objectives
):
    yaml = f"""
strategy: {{early_stopping: {stopping}, min_tokens: 96, reduction_factor: 3}}
objectives: {objectives}
search:
  hidden_size: [16, 32, 64]
  num_hidden_layers: [1, 2]
"""
    out = tmp_path / stopping
    assert sweep(store, yaml, out, tmp_path, "--together", "3") == 0
    rows = leaderboard(out)
    stopped = [r for r in rows.values() if r["status"].startswith("stopped at")]
    assert len(rows) == 6 and 0 < len(stopped) < 6
    assert all(float(r["inference_latency_ms"]) > 0 for r in rows.values())
    table = (out / "leaderboard.md").read_text()
    for line in table.splitlines()[2:]:  # the front holds finished candidates only
        if line.rstrip().endswith("* |"):
            assert "| finished |" in line
