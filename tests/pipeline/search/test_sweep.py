"""`kdcache sweep`: candidates trained together equal candidates trained alone, resume, outputs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from conftest import TINY_VOCAB, write_synthetic_store

from kdcache.pipeline.cli import main

pytestmark = pytest.mark.floors

SWEEP = """
base: tiny
seed: 1
budget: {steps: 6}
batch_size: 4
lr: 0.003
eval_batches: 2
search:
  hidden_size: [32, 64]
  num_hidden_layers: [1, 2]
baseline: true
"""
METRICS = ("eval_cross_entropy", "ghost_kl_to_teacher", "top1_agreement", "ece", "tokens_seen")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("sweep") / "store"
    return write_synthetic_store(
        str(path),
        lengths={"train": [[24] * 10, [24] * 9 + [7]], "eval": [[24] * 6]},
        tokenizer_dir=tiny_tokenizer_dir,
    )


def run(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([*args])
        raise SystemExit(0)
    return int(exit_info.value.code or 0)


def sweep(store: str, config: Path, out: Path, *extra: str) -> int:
    return run(
        "sweep",
        "--store",
        store,
        "--config",
        str(config),
        "--out",
        str(out),
        "--threads",
        "1",
        *extra,
    )


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "leaderboard.csv").open() as f:
        return {r["candidate"]: r for r in csv.DictReader(f)}


def assert_same_metrics(a: dict[str, dict[str, str]], b: dict[str, dict[str, str]]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for metric in METRICS:
            assert float(a[name][metric]) == pytest.approx(
                float(b[name][metric]), rel=1e-4, abs=1e-6
            ), (
                name,
                metric,
            )


def test_together_equals_alone_and_writes_every_output(store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    assert sweep(store, config, tmp_path / "together", "--together", "5") == 0
    printed = capsys.readouterr().out
    assert sweep(store, config, tmp_path / "alone", "--together", "1") == 0

    together, alone = rows(tmp_path / "together"), rows(tmp_path / "alone")
    assert set(together) == {"h32-l1", "h32-l2", "h64-l1", "h64-l2", "baseline-ce"}
    assert_same_metrics(together, alone)
    # different students really are different
    assert len({together[n]["eval_cross_entropy"] for n in together}) == len(together)

    out = tmp_path / "together"
    assert (out / "pareto.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (out / "leaderboard.md").read_text()
    assert table.count("\n") == 2 + len(together) and "inference_tokens_per_s" in table
    for name, row in together.items():
        assert int(row["parameters"]) > int(row["non_embedding_parameters"]) > 0
        assert int(row["tokens_seen"]) > 0 and float(row["train_tokens_per_s"]) > 0
        assert float(row["eval_cross_entropy"]) > 0
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(out / "candidates" / name)
        assert model.config.vocab_size == TINY_VOCAB
    assert rows(out)["h64-l2"]["num_hidden_layers"] == "2"
    assert "best " in printed and "sweep done: 5 candidates" in printed

    # h64-l2 is the tiny preset itself: `train-student` alone gives the same metrics
    args = ["--store", store, "--student", "tiny", "--steps", "6", "--batch-size", "4"]
    args += ["--lr", "0.003", "--seed", "1", "--eval-batches", "2", "--threads", "1"]
    assert run("train-student", *args, "--out", str(tmp_path / "single")) == 0
    single = json.loads((tmp_path / "single" / "metrics.json").read_text())["final"]
    assert float(together["h64-l2"]["eval_cross_entropy"]) == pytest.approx(
        single["cross_entropy"], rel=1e-4
    )
    assert float(together["h64-l2"]["ghost_kl_to_teacher"]) == pytest.approx(
        single["ghost_kl_to_teacher"], rel=1e-4
    )
    # `loss:` defaults to auto, which the sweep resolves from the store and records
    assert {r["loss"] for n, r in together.items() if n != "baseline-ce"} == {"ghost"}
    assert together["baseline-ce"]["loss"] == "ce"
    assert "sampled_kl_to_teacher" not in together["h32-l1"]


def test_a_sampled_store_trains_sampled_kl_together_and_ranks_by_its_distance(
    tiny_tokenizer_dir, tmp_path, capsys
):
    sampled = write_synthetic_store(
        str(tmp_path / "store"),
        lengths={"train": [[24] * 10], "eval": [[24] * 4]},
        tokenizer_dir=tiny_tokenizer_dir,
        targets="sampled",
        samples=16,
    )
    config = tmp_path / "sweep.yaml"
    small = SWEEP.replace("steps: 6", "steps: 3").replace("[32, 64]", "[32]")
    config.write_text(small)
    assert sweep(sampled, config, tmp_path / "out", "--together", "3", "--workers", "2") == 0
    board = rows(tmp_path / "out")
    assert set(board) == {"h32-l1", "h32-l2", "baseline-ce"}
    for name, row in board.items():
        assert row["loss"] == ("ce" if name == "baseline-ce" else "sampled-kl")
        assert float(row["sampled_kl_to_teacher"]) > 0
        assert "ghost_kl_to_teacher" not in row and "top1_agreement" not in row
    assert "sampled_kl_to_teacher" in (tmp_path / "out" / "leaderboard.md").read_text()
    # a loss that needs top-k targets is refused before anything is written
    config.write_text(small + "loss: reverse-kl\n")
    capsys.readouterr()
    assert sweep(sampled, config, tmp_path / "refused") == 2
    err = capsys.readouterr().err
    assert "--loss reverse-kl needs the teacher's top-k" in err and err.count("\n") == 1
    assert not (tmp_path / "refused").exists()


def test_rerun_skips_finished_and_resumes_an_interrupted_group(store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    reference = tmp_path / "reference"
    assert sweep(store, config, reference, "--together", "3") == 0

    out = tmp_path / "interrupted"
    assert sweep(store, config, out, "--together", "3", "--stop-after", "2") == 0
    assert list((out / "groups").iterdir()), "an interrupted group leaves a checkpoint"
    assert not (out / "leaderboard.csv").exists()
    assert sweep(store, config, out, "--together", "3", "--stop-after", "3") == 0  # step 5 of 6
    capsys.readouterr()
    assert sweep(store, config, out, "--together", "3") == 0
    assert_same_metrics(rows(out), rows(reference))

    # everything finished: a rerun trains nothing and rewrites the same leaderboard
    assert sweep(store, config, out, "--together", "3") == 0
    assert "(5 already finished)" in capsys.readouterr().out
    assert_same_metrics(rows(out), rows(reference))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("budget: {steps: 5}\nsearch: {hidden_size: [32]}\nlayers: [1]\n", "unknown key layers"),
        ("budget: {steps: 5}\nsearch: {}\n", "empty search space"),
        ("budget: {steps: 0}\nsearch: {hidden_size: [32]}\n", "budget steps must be"),
    ],
)
def test_bad_configs_fail_before_training(store, tmp_path, capsys, text, message):
    config = tmp_path / "sweep.yaml"
    config.write_text(text)
    assert sweep(store, config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert err.startswith("Error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_candidates_whose_vocab_cannot_match_the_store_are_refused(store, tmp_path, capsys):
    base = tmp_path / "student.json"
    base.write_text(json.dumps({"model_type": "llama", "vocab_size": 300, "hidden_size": 32}))
    config = tmp_path / "sweep.yaml"
    config.write_text(
        f"base: {base}\nbudget: {{steps: 5}}\nsearch: {{num_hidden_layers: [1, 2]}}\n"
    )
    assert sweep(store, config, tmp_path / "out") == 2
    err = capsys.readouterr().err
    assert "embeds 300" in err and str(TINY_VOCAB) in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_a_different_sweep_in_the_same_out_is_refused(store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.replace("steps: 6", "steps: 2").replace("[32, 64]", "[32]"))
    out = tmp_path / "out"
    assert sweep(store, config, out, "--together", "3") == 0
    config.write_text(SWEEP.replace("steps: 6", "steps: 3").replace("[32, 64]", "[32]"))
    capsys.readouterr()
    assert sweep(store, config, out, "--together", "3") == 2
    assert "holds a different sweep" in capsys.readouterr().err


def test_a_damaged_or_unwritable_out_is_one_line(store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.replace("steps: 6", "steps: 2").replace("[32, 64]", "[32]"))
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "sweep.json").write_text('{"candid')  # a cut write (writes are atomic now)
    (tmp_path / "a_file").write_text("x")
    for out, message in (
        (damaged, "holds a damaged sweep.json"),
        (tmp_path / "a_file" / "out", "cannot create --out"),
    ):
        capsys.readouterr()
        assert sweep(store, config, out) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0], err


def test_small_files_are_replaced_whole(tmp_path):
    from kdcache.pipeline.files import write_text_atomic

    target = tmp_path / "metrics.json"
    write_text_atomic(target, "a,b\r\n")  # csv rows keep their line ends
    assert target.read_bytes() == b"a,b\r\n"
    write_text_atomic(target, "second\n")
    assert target.read_bytes() == b"second\n" and [p.name for p in tmp_path.iterdir()] == [
        target.name
    ]
