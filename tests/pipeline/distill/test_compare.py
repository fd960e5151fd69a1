"""`kdcache compare`: the teacher evaluated on the store's eval split beside two students' metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import cache_small_store

from kdcache.pipeline.cli import main
from kdcache.pipeline.distill.compare import format_markdown, format_table, verdict

pytestmark = pytest.mark.floors


def run(args: list[str]) -> int:
    try:
        main(["compare", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, corpus_texts: list[str]
) -> Path:
    return cache_small_store(tmp_path_factory, tiny_teacher_dir, corpus_texts)


def write_student(path: Path, seed: int, batch_size: int = 4) -> Path:
    """A train-student output dir as far as compare reads it: the saved model and its settings."""
    from kdcache.pipeline.distill.student import build_student

    model, _ = build_student("tiny", 512, seed=seed)
    model.save_pretrained(path)
    settings = {"batch_size": batch_size, "eval_batches": None}
    (path / "metrics.json").write_text(json.dumps({"final": None, "settings": settings}))
    return path


def test_every_row_is_measured_here_with_the_teacher_at_hand(
    store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdcache.storage import open_store

    kd, ce = write_student(tmp_path / "kd", 1), write_student(tmp_path / "ce", 2)
    other = write_student(tmp_path / "other", 3)
    table, facts = tmp_path / "table.md", tmp_path / "facts.json"
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store), "--kd", str(kd)]
    args += ["--ce", str(ce), "--student", f"third={other}", "--markdown", str(table)]
    assert run([*args, "--json", str(facts)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[0] == "model" and "KL to teacher" in lines[0]
    # a top-k store: the exact KL, the ghost KL and top-1 columns, no sampled KL
    assert "ghost KL to teacher" in lines[0] and "sampled KL" not in lines[0]
    names = [line.split("  ")[0].strip() for line in lines[2:6]]
    assert names == ["teacher", "KD student", "CE-only student", "third"]
    data = json.loads(facts.read_text())
    teacher, students = data["teacher"], data["students"]
    assert list(students) == ["KD student", "CE-only student", "third"]
    # the teacher is at exact KL 0 and ghost KL ~0 (float16 rounding) from itself, agrees with
    # its own stored top-1, however much mass lies beyond the top-k
    assert teacher["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert abs(teacher["ghost_kl_to_teacher"]) < 1e-3
    assert teacher["top1_agreement"] == pytest.approx(1.0, abs=1e-3)
    tail = [
        -np.log(np.exp(seq.topk_logprobs.astype(np.float64)).sum(-1))
        for seq in open_store(store).iter_sequences("eval")
    ]
    assert float(np.concatenate(tail).mean()) > 0.1  # the old, misleading "KL to itself"
    assert teacher["perplexity"] == pytest.approx(math.exp(teacher["cross_entropy"]), rel=1e-6)
    for metrics in students.values():  # the exact KL is bounded below by the (k+1)-bucket one
        assert metrics["kl_to_teacher"] >= metrics["ghost_kl_to_teacher"] > 0
        assert metrics["tokens"] == teacher["tokens"]
    assert verdict(students["KD student"], students["CE-only student"]) in out
    assert table.read_text().startswith(
        "| model | eval CE (nats) | perplexity | bits/byte | bits/char | KL to teacher |"
    )  # a format-6 store gives the text: bits per byte, the teacher's too
    # the teacher measured live equals its stored realized-token log-probs (float16 rounding)
    assert teacher["bits_per_byte"] == pytest.approx(teacher["teacher_bits_per_byte"], rel=2e-3)


def test_verdict_says_when_kd_does_not_help() -> None:
    kd = {"cross_entropy": 5.2, "perplexity": math.exp(5.2)}
    ce = {"cross_entropy": 5.0, "perplexity": math.exp(5.0)}
    assert "does NOT beat" in verdict(kd, ce)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no-model", "--ce holds no saved student (config.json)"),
        ("bad-spec", "--student takes NAME=DIR"),
        ("none", "no student to compare"),
        ("same-name", "student names must differ"),
    ],
)
def test_bad_students_are_one_line_exit_2(
    case: str,
    message: str,
    store: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    kd = write_student(tmp_path / "kd", 5)
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store)]
    if case == "no-model":
        args += ["--kd", str(kd), "--ce", str(tmp_path / "nowhere")]
    elif case == "bad-spec":
        args += ["--student", str(kd)]
    elif case == "same-name":
        args += ["--student", f"a={kd}", "--student", f"a={kd}"]
    assert run(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err


def test_unwritable_markdown_is_one_line_exit_2(
    store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kd, ce = write_student(tmp_path / "kd", 5), write_student(tmp_path / "ce", 6)
    (tmp_path / "a_file").write_text("x")
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store), "--kd", str(kd)]
    assert run([*args, "--ce", str(ce), "--markdown", str(tmp_path / "a_file" / "t.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: cannot write --markdown") and "\n" not in err


def test_a_teacher_embedding_fewer_ids_than_the_tokenizer_is_refused(
    store: Path, tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import save_tiny_model

    other = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "other", vocab_size=400)
    kd = write_student(tmp_path / "kd", 5)
    ce = write_student(tmp_path / "ce", 6)
    args = ["--teacher", str(other), "--store", str(store), "--kd", str(kd), "--ce", str(ce)]
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("Error: the store's tokenizer has 512 ids but the teacher embeds 400, ")
    assert "id 400 has no row" in err


def test_a_student_without_a_metric_shows_a_dash() -> None:
    # e.g. a metrics.json written before the metric names changed: compare still works
    rows = [
        ("teacher", {"cross_entropy": 4.0, "perplexity": 54.6, "ghost_kl_to_teacher": 0.0,
                     "top1_agreement": 1.0, "ece": 0.01}),
        ("KD student", {"cross_entropy": 5.0, "perplexity": 148.4, "ece": 0.05}),
    ]  # fmt: skip
    table = format_table(rows).splitlines()
    assert table[0].split("  ")[0] == "model" and "sampled KL" not in table[0]
    assert table[3].split()[-3:] == ["-", "-", "0.0500"]
    assert format_markdown(rows).splitlines()[3].endswith("| - | - | 0.0500 |")
