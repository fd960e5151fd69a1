"""`kdcache compare`: the teacher evaluated on the store's eval split beside two students' metrics."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from kdcache.pipeline.cli import main
from kdcache.pipeline.distill.compare import METRICS, verdict


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
    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts[:8]):
        (corpus / f"doc{i:02d}.txt").write_text(text[:2000], encoding="utf-8")
    out = tmp_path_factory.mktemp("stores") / "store"
    try:
        main([
            "cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus", str(corpus),
            "--out", str(out), "--top-k", "8", "--seq-len", "32", "--eval-fraction", "0.3",
            "--shard-tokens", "2048",
        ])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None)
    return out


def write_student(path: Path, cross_entropy: float) -> Path:
    """A train-student output dir as far as compare reads it: metrics.json."""
    path.mkdir(parents=True)
    final = {
        "step": 10,
        "cross_entropy": cross_entropy,
        "perplexity": math.exp(cross_entropy),
        "kl_to_teacher": 0.5,
        "top1_agreement": 0.25,
        "ece": 0.05,
        "tokens": 1000.0,
    }
    metrics = {"final": final, "settings": {"batch_size": 4, "eval_batches": None}}
    (path / "metrics.json").write_text(json.dumps(metrics))
    return path


def test_teacher_row_matches_its_own_stored_targets(
    store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdcache.storage import open_store

    kd = write_student(tmp_path / "kd", 5.0)
    ce = write_student(tmp_path / "ce", 5.5)
    table = tmp_path / "table.md"
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store), "--kd", str(kd)]
    assert run([*args, "--ce", str(ce), "--markdown", str(table)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[0] == "model" and len(lines[0].split("  ")) >= len(METRICS)
    teacher = lines[2].split()
    assert teacher[0] == "teacher"
    # the teacher's argmax is its own stored top-1, and its KL to its own top-k is the tail mass
    assert float(teacher[4]) == pytest.approx(1.0, abs=1e-3)
    tail = [
        -np.log(np.exp(seq.topk_logprobs.astype(np.float64)).sum(-1))
        for seq in open_store(store).iter_sequences("eval")
    ]
    assert float(teacher[3]) == pytest.approx(float(np.concatenate(tail).mean()), abs=2e-3)
    assert float(teacher[2]) == pytest.approx(math.exp(float(teacher[1])), rel=1e-3)
    assert lines[3].startswith("KD student") and lines[4].startswith("CE-only student")
    assert "KD student beats the CE-only student by 0.5000 nats" in out
    assert table.read_text().startswith("| model | eval CE (nats) |")


def test_verdict_says_when_kd_does_not_help() -> None:
    kd = {"cross_entropy": 5.2, "perplexity": math.exp(5.2)}
    ce = {"cross_entropy": 5.0, "perplexity": math.exp(5.0)}
    assert "does NOT beat" in verdict(kd, ce)


def test_missing_metrics_is_one_line_exit_2(
    store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kd = write_student(tmp_path / "kd", 5.0)
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store), "--kd", str(kd)]
    assert run([*args, "--ce", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: --ce has no metrics.json") and "\n" not in err


def test_unwritable_markdown_is_one_line_exit_2(
    store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kd, ce = write_student(tmp_path / "kd", 5.0), write_student(tmp_path / "ce", 5.5)
    (tmp_path / "a_file").write_text("x")
    args = ["--teacher", str(tiny_teacher_dir), "--store", str(store), "--kd", str(kd)]
    assert run([*args, "--ce", str(ce), "--markdown", str(tmp_path / "a_file" / "t.md")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: cannot write --markdown") and "\n" not in err


def test_teacher_with_another_vocabulary_is_refused(
    store: Path, tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from conftest import save_tiny_model

    other = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "other", vocab_size=600)
    kd = write_student(tmp_path / "kd", 5.0)
    ce = write_student(tmp_path / "ce", 5.1)
    args = ["--teacher", str(other), "--store", str(store), "--kd", str(kd), "--ce", str(ce)]
    assert run(args) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("Error: the teacher's vocabulary does not match")
    assert "has 600 and" in err and "has 512" in err
