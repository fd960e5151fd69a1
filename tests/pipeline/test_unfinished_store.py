"""A store whose cache-teacher run did not finish (no ``finished`` in its manifest): train-student,
sweep and compare refuse it in one line unless --allow-unfinished, which uses the committed
shards and says how many."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import run_cli as run
from conftest import write_synthetic_store

LENGTHS = {"train": [[24] * 4, [24] * 3], "eval": [[24] * 4]}
SWEEP = """
base: tiny
seed: 1
budget: {steps: 2}
batch_size: 4
eval_batches: 1
search:
  hidden_size: [32]
baseline: false
"""


@pytest.fixture(scope="module")
def unfinished(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("unfinished") / "store"
    return write_synthetic_store(
        str(path), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir, finished=False
    )


def commands(store: str, tmp_path: Path, teacher: Path) -> dict[str, list[str]]:
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    return {
        "train-student": ["train-student", "--store", store, "--out", str(tmp_path / "student"),
                          "--steps", "2", "--batch-size", "4", "--threads", "1", "--workers", "0",
                          "--eval-batches", "1"],
        "sweep": ["sweep", "--store", store, "--config", str(config), "--out",
                  str(tmp_path / "sweep"), "--threads", "1", "--workers", "0"],
        # a saved model stands in for the student: compare only needs one to load
        "compare": ["compare", "--teacher", str(teacher), "--store", store, "--kd", str(teacher),
                    "--eval-batches", "1"],
    }  # fmt: skip


@pytest.mark.parametrize("command", ["train-student", "sweep", "compare"])
def test_refused_in_one_line_then_allowed(
    unfinished: str,
    tmp_path: Path,
    tiny_teacher_dir: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    argv = commands(unfinished, tmp_path, tiny_teacher_dir)[command]
    code, out, err = run(argv, capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    assert "the store is unfinished (its cache-teacher run did not complete" in line
    assert "committed: eval 1 shard, 96 tokens; train 2 shards, 168 tokens" in line
    assert unfinished in line and "--allow-unfinished" in line
    assert not (tmp_path / "student").exists() and not (tmp_path / "sweep").exists()

    code, out, err = run([*argv, "--allow-unfinished"], capsys)
    doing = "evaluating on" if command == "compare" else "training on"
    assert f"Note: {doing} 3 committed shards of an unfinished store, {unfinished}" in err
    if command == "compare":  # past the store: the synthetic store has no teacher to match
        assert code == 2 and "the teacher's tokenizer differs from the store's" in err
    else:
        assert code == 0, err


def test_a_finished_store_needs_no_flag(
    tmp_path: Path, tiny_tokenizer_dir: Path, tiny_teacher_dir: Path, capsys
) -> None:
    store = write_synthetic_store(
        str(tmp_path / "store"), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir
    )
    code, _, err = run(commands(store, tmp_path, tiny_teacher_dir)["train-student"], capsys)
    assert code == 0 and "unfinished" not in err
