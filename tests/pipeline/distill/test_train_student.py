"""`kdcache train-student` end to end: outputs, exact resume, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_store
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cli import main
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.pipeline.distill.student import build_student
from kdcache.pipeline.distill.trainee import make_accelerator, make_trainee, train_step
from kdcache.storage import open_store

pytestmark = pytest.mark.floors

LENGTHS = {"train": [[24] * 6, [24] * 5, [24] * 6], "eval": [[24] * 4, [24] * 3 + [11]]}
FAST = ["--threads", "1", "--batch-size", "4", "--lr", "3e-3"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("train") / "store"
    return write_synthetic_store(str(path), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir)


@pytest.fixture(scope="module")
def sampled_store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("train") / "sampled"
    return write_synthetic_store(
        str(path), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir, targets="sampled", samples=24
    )


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(["train-student", *argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def losses(out: Path) -> list[float]:
    with (out / "log.csv").open() as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def test_trains_evaluates_and_saves_a_loadable_student(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--store", store, "--out", str(out), "--steps", "8", "--eval-every", "4", *FAST]
    code, stdout, err = run([*argv, "--workers", "1", "--grad-accum", "2"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert [e["step"] for e in metrics["eval_history"]] == [4, 8]
    final = metrics["final"]
    assert final["tokens"] == 7 * 23 + 10  # every labelled eval token
    assert final["cross_entropy"] > 0 and final["perplexity"] > 1 and 0 <= final["ece"] <= 1
    # --loss auto resolves to ghost on a top-k store; what ran is what is recorded
    assert metrics["settings"]["loss"] == "ghost" and metrics["train"]["steps"] == 8
    assert list(final) == ["step", "cross_entropy", "perplexity", "ghost_kl_to_teacher",
                           "top1_agreement", "ece", "tokens"]  # fmt: skip
    rows = losses(out)
    assert len(rows) == 8 and rows[-1] < rows[0]  # it learns
    run_info = json.loads((out / "run.json").read_text())
    assert run_info["store"] == store and len(run_info["manifest_fingerprint"]) == 64
    assert run_info["settings"]["grad_accum"] == 2 and run_info["settings"]["loss"] == "ghost"
    assert "cross_entropy" in stdout and stdout.strip().splitlines()[-1].startswith(
        "trained preset tiny"
    )

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("def main():", return_tensors="pt")
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_auto_trains_sampled_kl_on_a_sampled_store_and_reports_its_own_distance(
    sampled_store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    argv = ["--store", sampled_store, "--out", str(out), "--steps", "6", "--eval-every", "3"]
    code, stdout, err = run([*argv, *FAST, "--workers", "2"], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["loss"] == "sampled-kl"
    assert json.loads((out / "run.json").read_text())["settings"]["loss"] == "sampled-kl"
    final = metrics["final"]
    assert list(final) == ["step", "cross_entropy", "perplexity", "sampled_kl_to_teacher",
                           "ece", "tokens"]  # fmt: skip
    assert final["sampled_kl_to_teacher"] > 0
    assert [e["step"] for e in metrics["eval_history"]] == [3, 6]
    rows = losses(out)
    assert rows[-1] < rows[0]
    assert "sampled_kl_to_teacher" in stdout and "sampled kl to teacher" in stdout


@pytest.mark.parametrize(
    ("loss", "sampled"), [("kl", False), ("ghost", False), ("sampled-kl", True)]
)
def test_resume_continues_the_exact_loss_trajectory(
    store: str,
    sampled_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    loss: str,
    sampled: bool,
) -> None:
    store = sampled_store if sampled else store
    common = ["--store", store, "--steps", "6", "--loss", loss, "--eval-every", "0", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run([*common, "--out", str(whole), "--workers", "1"], capsys)[0] == 0
    code, stdout, _ = run(
        [*common, "--out", str(parts), "--workers", "1", "--stop-after", "3"], capsys
    )
    assert code == 0 and "--resume" in stdout
    assert len(losses(parts)) == 3 and not (parts / "model.safetensors").exists()
    assert run([*common, "--out", str(parts), "--workers", "1", "--resume"], capsys)[0] == 0
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-5)
    a = torch.load(whole / "checkpoint" / "student.pt", weights_only=True)["model"]
    b = torch.load(parts / "checkpoint" / "student.pt", weights_only=True)["model"]
    assert all(torch.allclose(a[name], b[name], atol=1e-6) for name in a)


def test_resume_with_other_workers_continues_the_same_run(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the data order is a function of the seed alone: --workers may change on --resume
    common = ["--store", store, "--steps", "6", "--eval-every", "0", *FAST]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    assert run([*common, "--out", str(whole), "--workers", "0"], capsys)[0] == 0
    assert (
        run([*common, "--out", str(parts), "--workers", "2", "--stop-after", "4"], capsys)[0] == 0
    )
    assert run([*common, "--out", str(parts), "--workers", "1", "--resume"], capsys)[0] == 0
    assert losses(parts) == pytest.approx(losses(whole), rel=1e-5)


def test_resume_refuses_a_checkpoint_of_the_per_process_loader(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    base = ["--store", store, "--out", str(out), "--steps", "2", *FAST]
    assert run([*base, "--stop-after", "1"], capsys)[0] == 0
    (out / "checkpoint" / "loader.json").rename(out / "checkpoint" / "loader-rank0.json")
    code, _, err = run([*base, "--resume"], capsys)
    assert code == 2 and "written by an older kdcache" in err and "Traceback" not in err


def test_resume_refuses_a_store_whose_shards_changed_under_the_same_counts(
    tmp_path: Path, capsys, tiny_tokenizer_dir: Path
) -> None:
    import shutil

    url = tmp_path / "store"
    write_synthetic_store(str(url), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir)
    out = tmp_path / "out"
    base = ["--store", str(url), "--out", str(out), "--steps", "2", *FAST]
    assert run([*base, "--stop-after", "1"], capsys)[0] == 0
    shutil.rmtree(url)  # other shards, as many, with as many tokens
    write_synthetic_store(str(url), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir, seed=5)
    code, _, err = run([*base, "--resume"], capsys)
    assert code == 2 and "train_records: run has" in err and "Traceback" not in err


def test_resume_refuses_changed_settings(store: str, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    base = ["--store", store, "--out", str(out), "--steps", "2", *FAST]
    assert run([*base, "--stop-after", "1"], capsys)[0] == 0
    code, _, err = run([*base, "--resume", "--alpha", "0.9"], capsys)
    assert code == 2 and "alpha: run has 0.5, this command asks 0.9" in err


def _corrupt(store: str, tmp_path: Path) -> str:
    import shutil

    copy = tmp_path / "corrupt"
    shutil.copytree(store, copy)
    for chunk in sorted((copy / "shards").glob("train-00001*.zarr/**/c/**/*")):  # its attempt
        if chunk.is_file():
            chunk.write_bytes(b"\x00garbage" * 8)
    return str(copy)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("missing-store", "does-not-exist"),
        ("unknown-preset", "unknown student, 'gigantic'"),
        ("bad-config", "cannot read the student config"),
        ("vocab", "the store's tokenizer has 512 ids but the student embeds 99, "),
        ("steps", "--steps must be at least 1, got 0"),
        ("out-taken", "--out already holds files"),
        ("out-unwritable", "cannot create --out"),
        ("damaged-run", "--out holds a damaged run.json"),
        ("top1-store", "--loss kl needs at least 2 teacher log-probs"),
        (
            "topk-loss-on-samples",
            "--loss reverse-kl needs the teacher's top-k, the store holds sampled",
        ),
        ("sampled-loss-on-topk", "--loss sampled-kl needs sampled targets, the store holds topk"),
        ("corrupt", "train-00001"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    store: str,
    sampled_store: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    case: str,
    message: str,
) -> None:
    out = tmp_path / "out"
    argv = ["--store", store, "--out", str(out), "--steps", "3", *FAST]
    if case == "missing-store":
        argv[1] = str(tmp_path / "does-not-exist")
    elif case == "unknown-preset":
        argv += ["--student", "gigantic"]
    elif case == "bad-config":
        (tmp_path / "c.yaml").write_text("a: [")
        argv += ["--student", str(tmp_path / "c.yaml")]
    elif case == "vocab":
        (tmp_path / "c.json").write_text('{"vocab_size": 99, "hidden_size": 32}')
        argv += ["--student", str(tmp_path / "c.json")]
    elif case == "steps":
        argv[5] = "0"
    elif case == "out-taken":
        out.mkdir()
        (out / "notes.txt").write_text("someone else's")
    elif case == "out-unwritable":
        (tmp_path / "a_file").write_text("x")
        argv[3] = str(tmp_path / "a_file" / "out")
    elif case == "damaged-run":  # what a non-atomic write cut by kill -9 would leave
        out.mkdir()
        (out / "run.json").write_text('{"settings": {"st')
        argv += ["--resume"]
    elif case == "top1-store":
        argv[1] = write_synthetic_store(str(tmp_path / "k1"), top_k=1, lengths={"train": [[8]]})
        argv += ["--loss", "kl"]
    elif case == "topk-loss-on-samples":
        argv[1] = sampled_store
        argv += ["--loss", "reverse-kl"]
    elif case == "sampled-loss-on-topk":
        argv += ["--loss", "sampled-kl"]
    elif case == "corrupt":
        argv[1] = _corrupt(store, tmp_path)
        argv += ["--steps", "50", "--eval-every", "0", "--workers", "1"]
    code, _, err = run(argv, capsys)
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[-1].startswith("Error: ") and message in lines[-1], err
    assert "Traceback" not in err
    if case.endswith(("-store", "-on-samples", "-on-topk")) or case == "steps":
        assert not out.exists()  # refused before anything is written


def test_end_to_end_from_a_stage_one_store(
    tmp_path: Path,
    tiny_teacher_dir: Path,
    small_corpus_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    store = tmp_path / "store"
    cache = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus_dir)]
    cache += ["--out", str(store), "--top-k", "16", "--seq-len", "64", "--batch-size", "4"]
    cache += ["--shard-tokens", "512", "--eval-fraction", "0.3", "--max-tokens", "3000"]
    try:
        main(cache)
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    # the teacher, evaluated on its own stored eval split, agrees with its stored top-1 and is
    # at ghost KL 0 from itself (up to the float16 rounding of the stored log-probs)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    eval_data = DistillDataset(str(store), "eval", batch_size=4, shuffle=False, infinite=False)
    own = evaluate(teacher, TeacherLoader(eval_data))
    assert own["top1_agreement"] > 0.99
    assert abs(own["ghost_kl_to_teacher"]) < 1e-3
    rows = np.concatenate([s.topk_logprobs for s in open_store(str(store)).iter_sequences("eval")])
    truncation = float(-np.logaddexp.reduce(rows.astype(np.float64), axis=1).mean())
    assert truncation > 0.1  # what the old top-k-renormalized "kl_to_teacher" reported instead

    out = tmp_path / "student"
    argv = ["--store", str(store), "--out", str(out), "--steps", "4", "--eval-every", "0", *FAST]
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert final["top1_agreement"] < own["top1_agreement"]  # an untrained student is worse
    # (the tiny random teacher is near uniform, so both distances are small; the teacher's is ~0)
    assert final["ghost_kl_to_teacher"] > 10 * own["ghost_kl_to_teacher"] + 1e-4


@pytest.mark.parametrize(("loss", "sampled"), [("ghost", False), ("sampled-kl", True)])
def test_gradient_accumulation_equals_one_big_batch(
    store: str, sampled_store: str, loss: str, sampled: bool
) -> None:
    dataset = DistillDataset(sampled_store if sampled else store, batch_size=6, infinite=False)
    batch = next(iter(TeacherLoader(dataset)))
    batch["attention_mask"][5, 20:] = 0  # uneven token counts across micro-batches
    batch["labels"][5, 19:] = -100
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    accelerator = make_accelerator(0)
    params, rows = [], []
    for micro_batches in ([batch], halves):
        model, _ = build_student("tiny", 512, seed=4)
        trainee = make_trainee(
            "t", model, accelerator, loss=loss, temperature=2.0, alpha=0.7, lr=1e-2, steps=5,
            warmup=1,
        )  # fmt: skip
        row = train_step(trainee, micro_batches, accelerator)
        rows.append(row)
        params.append([p.detach().clone() for p in model.parameters()])
        assert row["tokens"] == int(batch["attention_mask"].sum())
    # the accumulated gradient (its norm, before clipping) and the loss equal the big batch's
    assert rows[1]["grad_norm"] == pytest.approx(rows[0]["grad_norm"], rel=1e-5)
    assert rows[1]["loss"] == pytest.approx(rows[0]["loss"], rel=1e-5)
    # Adam's first update g / (|g| + eps) amplifies float noise where g ≈ 0: compare in bulk
    diff = max(float((a - b).abs().max()) for a, b in zip(*params, strict=True))
    assert diff < 1e-4  # one update moves weights by ~lr = 1e-2


def test_a_student_kept_waiting_for_data_is_told_to_raise_workers(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from kdcache.pipeline.distill import loader

    collate = loader.collate
    # a slow loader: every batch takes 30 ms to collate, far more than the tiny student's step
    monkeypatch.setattr(loader, "collate", lambda *a, **kw: time.sleep(0.03) or collate(*a, **kw))
    argv = ["--store", store, "--out", str(tmp_path / "out"), "--steps", "24", "--eval-every", "0",
            "--eval-batches", "1", "--student", "tiny", *FAST]  # fmt: skip
    code, stdout, err = run(argv, capsys)
    assert code == 0, err
    notes = [line for line in err.splitlines() if "waited for data" in line]
    assert len(notes) == 1 and notes[0].startswith("Note: ") and "--workers 4" in notes[0]
    wait = json.loads((tmp_path / "out" / "metrics.json").read_text())["train"]["data_wait_share"]
    assert wait > 0.05


def test_the_data_wait_note_needs_enough_steps_and_waiting() -> None:
    from kdcache.pipeline.distill.loader import data_wait_note

    assert data_wait_note(10.0, 0.4, 100, 2) is None  # 4%: no note
    assert data_wait_note(10.0, 5.0, 10, 2) is None  # too few steps to tell
    assert data_wait_note(0.0, 0.0, 100, 2) is None
    assert "50%" in data_wait_note(10.0, 5.0, 100, 0) and "--workers 2" in data_wait_note(
        10.0, 5.0, 100, 0
    )
