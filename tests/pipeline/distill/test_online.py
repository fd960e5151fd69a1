"""The online reference: `train-student --teacher` distills from the teacher run live, and the
exact KL to the teacher wherever it is at hand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as call
from conftest import save_tiny_model
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cli import main
from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.live_teacher import LiveTeacher
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.pipeline.distill.losses import batch_loss, loss_sums
from kdcache.pipeline.distill.student import build_student
from kdcache.pipeline.distill.student_head import student_head

FAST = ["--threads", "1", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0"]


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> str:
    path = tmp_path_factory.mktemp("online") / "store"
    argv = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus", str(small_corpus_dir)]
    argv += ["--out", str(path), "--top-k", "8", "--seq-len", "48", "--shard-tokens", "480"]
    argv += ["--eval-fraction", "0.3", "--max-tokens", "2000"]
    try:
        main(argv)
    except SystemExit as e:
        assert not e.code
    return str(path)


def test_online_loss_equals_the_full_vocabulary_kl(store: str, tiny_teacher_dir: Path) -> None:
    """Online kl against the live teacher is the top-k kl with k = vocab in float32."""
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    teacher = LiveTeacher(teacher_model)
    batch = next(iter(TeacherLoader(DistillDataset(store, batch_size=3, infinite=False))))
    b = batch_to_device(batch, "cpu")
    b["teacher_hidden"] = teacher.hidden(b["input_ids"], b["attention_mask"])
    student, _ = build_student("tiny", teacher.vocab_size, seed=1)
    logits = student(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
    for t in (1.0, 2.0):
        online = loss_sums(logits, b, loss="auto", temperature=t, chunk_tokens=37, teacher=teacher)
        with torch.no_grad():
            full = torch.log_softmax(teacher_model(input_ids=b["input_ids"]).logits.float(), -1)
        values, ids = full.sort(dim=-1, descending=True)  # k = V: the whole distribution
        offline = {**b, "topk_ids": ids, "topk_logprobs": values}
        reference = loss_sums(logits, offline, loss="kl", temperature=t)
        assert online.kd_tokens == reference.kd_tokens
        torch.testing.assert_close(online.kd_sum, reference.kd_sum, rtol=1e-4, atol=1e-4)
    # and it trains: the gradient reaches the student through its head applied per chunk
    head = student_head(student, None)
    trained = batch_loss(head.rows(student, b), b, head=head, loss="kl", alpha=1.0,
                         temperature=2.0, chunk_tokens=37, teacher=teacher)  # fmt: skip
    torch.testing.assert_close(trained.kd_sum, online.kd_sum, rtol=1e-4, atol=1e-4)
    trained.total.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())


def test_the_teacher_is_at_exact_kl_zero_from_itself(store: str, tiny_teacher_dir: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()

    def batches() -> TeacherLoader:  # the eval split in stored order, one epoch
        return TeacherLoader(
            DistillDataset(store, "eval", batch_size=4, shuffle=False, infinite=False)
        )

    own = evaluate(model, batches(), teacher=LiveTeacher(model), chunk_tokens=50)
    assert own["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    assert own["ghost_kl_to_teacher"] == pytest.approx(0.0, abs=1e-3)
    student, _ = build_student("tiny", model.config.vocab_size, seed=0)
    other = evaluate(student, batches(), teacher=LiveTeacher(model))
    # the (k+1)-bucket KL is a lower bound on the exact one
    assert other["kl_to_teacher"] > other["ghost_kl_to_teacher"] > 0


def test_train_student_with_the_teacher_live(
    store: str, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "online"
    argv = [
        "train-student",
        "--store",
        store,
        "--teacher",
        str(tiny_teacher_dir),
        "--out",
        str(out),
    ]
    code, stdout, err = call([*argv, "--steps", "4", *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["settings"]["loss"] == "kl" and metrics["settings"]["teacher"]
    final = metrics["final"]
    assert final["kl_to_teacher"] > 0 and "ghost_kl_to_teacher" in final
    assert "kl to teacher" in stdout
    # resuming with another teacher (or none) is a changed setting
    code, _, err = call([*argv[:-4], "--out", str(out), "--steps", "4", "--resume", *FAST], capsys)
    assert code == 2 and "teacher" in err


@pytest.mark.parametrize("case", ["ghost", "sampled-kl", "other-tokenizer", "missing"])
def test_bad_online_input_is_one_line_and_exit_2(
    case: str,
    store: str,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    corpus_texts: list[str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    teacher = str(tiny_teacher_dir)
    extra: list[str] = []
    if case in ("ghost", "sampled-kl"):
        extra = ["--loss", case]
    elif case == "other-tokenizer":
        from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer

        tokenizer_dir = tmp_path / "tok"
        train_bpe_tokenizer(corpus_texts[:20], vocab_size=300).save_pretrained(tokenizer_dir)
        teacher = str(save_tiny_model("llama", tokenizer_dir, tmp_path / "other"))
    else:
        teacher = str(tmp_path / "no-such-teacher")
    out = tmp_path / "out"
    argv = ["train-student", "--store", store, "--teacher", teacher, "--out", str(out)]
    code, _, err = call([*argv, "--steps", "2", *FAST, *extra], capsys)
    assert code == 2, err
    assert err.strip().splitlines()[-1].startswith("Error: ") and "Traceback" not in err
    if case == "other-tokenizer":
        assert "tokenizer differs" in err
    if case in ("ghost", "sampled-kl"):
        assert "--teacher" in err and not out.exists()


def test_online_and_offline_runs_of_a_seed_see_the_same_weights_and_data(
    store: str, tiny_teacher_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Paired by seed: only the targets differ, so the first step's CE term is identical."""
    first_ce = []
    for name, extra in (("offline", []), ("online", ["--teacher", str(tiny_teacher_dir)])):
        out = tmp_path / name
        argv = ["train-student", "--store", store, "--out", str(out), "--seed", "3", *extra]
        code, _, err = call([*argv, "--steps", "2", "--loss", "kl", *FAST], capsys)
        assert code == 0, err
        with (out / "log.csv").open() as f:
            first_ce.append(float(list(csv.DictReader(f))[0]["ce"]))
    assert first_ce[0] == first_ce[1]
