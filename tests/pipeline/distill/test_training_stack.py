"""The store in the user's own training stack: DistillDataset in a DataLoader (ranks, workers,
resume), DistillCollator's Hugging Face batches, DistillLoss, and DistillTrainer against
`kdcache train-student` (the same losses and eval), resumed, bf16, DDP, TensorBoard."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import write_synthetic_store
from torch.utils.data import DataLoader

from kdcache.pipeline.cli import main
from kdcache.pipeline.distill import (
    DistillCollator,
    DistillDataset,
    DistillLoss,
    load_store_tokenizer,
    make_optimizer,
)
from kdcache.pipeline.distill.loader import TeacherLoader
from kdcache.pipeline.distill.student import build_student
from kdcache.pipeline.errors import UserError
from kdcache.storage import open_store

LENGTHS = {"train": [[24] * 6, [24] * 5, [24] * 6], "eval": [[24] * 4, [24] * 3 + [11]]}
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("stack") / "store"
    return write_synthetic_store(str(path), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir)


def _ids(batches) -> list[list[int]]:
    return [b["input_ids"][:, :4].tolist() for b in batches]


@pytest.mark.parametrize("workers", [0, 2])
def test_a_dataloader_over_the_dataset_gives_train_students_batches(store: str, workers: int):
    # 17 sequences, 3 per micro-batch: batches cross epochs; 2 ranks take 2 + 1 rows of each
    reference = TeacherLoader(DistillDataset(store, batch_size=3, seed=2, buffer_size=5))
    expected = [next(reference) for _ in range(9)]
    for rank in (0, 1):
        ds = DistillDataset(store, batch_size=3, seed=2, buffer_size=5, rank=rank, world_size=2)
        loader = DataLoader(
            ds, batch_size=ds.batch_rows, num_workers=workers, collate_fn=DistillCollator(ds)
        )
        got = [b for _, b in zip(range(9), loader, strict=False)]
        rows = slice(0, 2) if rank == 0 else slice(2, 3)
        assert _ids(got) == [e["input_ids"][rows, :4].tolist() for e in expected]
        for g, e in zip(got, expected, strict=True):
            for name in ("labels", "loss_mask", "topk_ids", "topk_logprobs"):
                assert torch.equal(g[name], e[name][rows]), name


def test_state_dict_and_skip_batches_resume_where_the_loop_stopped(store: str) -> None:
    def loader(ds: DistillDataset):
        return iter(DataLoader(ds, batch_size=ds.batch_rows, collate_fn=DistillCollator(ds)))

    ds = DistillDataset(store, batch_size=4, seed=1)
    it = loader(ds)
    [next(it) for _ in range(5)]  # crosses into the second epoch
    state = ds.state_dict()
    expected = _ids([next(it) for _ in range(3)])
    resumed = DistillDataset(store, batch_size=4, seed=1)
    resumed.load_state_dict(state)
    assert _ids([next(loader(resumed)) for _ in range(1)]) == expected[:1]
    skipped = DistillDataset(store, batch_size=4, seed=1)
    skipped.skip_batches(5)
    it = loader(skipped)
    assert _ids([next(it) for _ in range(3)]) == expected


def test_set_epoch_reads_that_epoch_of_the_stream(store: str) -> None:
    stream = DistillDataset(store, batch_size=1, seed=3)
    n = stream.num_sequences
    it = iter(stream)
    whole = [next(it)["tokens"][:4].tolist() for _ in range(3 * n)]
    epoch = DistillDataset(store, batch_size=1, seed=3, infinite=False)
    epoch.set_epoch(1)
    assert [s["tokens"][:4].tolist() for s in epoch] == whole[n : 2 * n]
    assert [s["tokens"][:4].tolist() for s in epoch] == whole[2 * n :]  # the next pass: epoch 2
    assert whole[n : 2 * n] != whole[2 * n :]


def test_labels_follow_hugging_face_so_the_models_own_loss_is_the_ce(store: str) -> None:
    st = open_store(store)
    model, _ = build_student("tiny", st.tokenizer_size, tokenizer=load_store_tokenizer(st))
    ds = DistillDataset(st, batch_size=4, seed=0)
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=DistillCollator(ds))))
    loss_fn = DistillLoss(ds, loss="ce")
    ours = loss_fn(model, batch).total
    inputs = loss_fn.to_device(batch, model)
    theirs = model(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
        labels=inputs["labels"],
    ).loss  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    # the logits path gives the same loss as the hidden-state path
    logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
    kd = DistillLoss(ds, loss="ghost", alpha=0.7)
    torch.testing.assert_close(
        kd.from_logits(logits, inputs).total, kd(model, batch).total, rtol=1e-5, atol=1e-6
    )


def test_the_collator_refuses_sequences_of_another_store(
    store: str, tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    other = write_synthetic_store(
        str(tmp_path / "other"), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir, seed=5
    )
    theirs = next(iter(DistillDataset(other, batch_size=2)))
    collator = DistillCollator(DistillDataset(store, batch_size=2))
    with pytest.raises(ValueError, match="another store"):
        collator([theirs])


def test_a_student_on_another_tokenizer_is_refused(store: str, corpus_texts: list[str]) -> None:
    from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer

    other = train_bpe_tokenizer(corpus_texts[10:30], vocab_size=300)
    st = open_store(store)
    model, _ = build_student("tiny", st.tokenizer_size, tokenizer=load_store_tokenizer(st))
    with pytest.raises(UserError, match="tokenizer is not the store's") as e:
        DistillLoss(st).check_student(model, other)
    assert "\n" not in str(e.value)


# --- the Hugging Face Trainer ------------------------------------------------------------------


def _trainer(store: str, out: Path, steps: int = 4, **overrides):
    from transformers import TrainingArguments

    from kdcache.pipeline.distill import DistillTrainer

    st = open_store(store)
    tokenizer = load_store_tokenizer(st)
    model, _ = build_student("tiny", st.tokenizer_size, tokenizer=tokenizer, seed=0)
    settings = dict(
        output_dir=str(out), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, max_grad_norm=1.0, disable_tqdm=True,
    )  # fmt: skip
    args = TrainingArguments(**{**settings, **overrides})
    return DistillTrainer(
        model, args, store=st, processing_class=tokenizer,
        optimizers=make_optimizer(model, lr=3e-3, steps=steps, warmup=1),
    )  # fmt: skip


def _losses(trainer) -> list[float]:
    return [e["loss"] for e in trainer.state.log_history if "loss" in e]


def test_the_trainer_trains_as_train_student_does(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["train-student", "--store", store, "--out", str(tmp_path / "cli"), "--steps", "4",
            "--batch-size", "4", "--grad-accum", "2", "--lr", "3e-3", "--warmup", "1",
            "--threads", "1"]  # fmt: skip
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    with (tmp_path / "cli" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    # the Trainer's default remove_unused_columns=True: the teacher's fields still reach the loss
    trainer = _trainer(store, tmp_path / "hf", eval_strategy="steps", eval_steps=4)
    assert trainer.args.remove_unused_columns
    trainer.train()
    assert _losses(trainer) == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    # the same gradients: their norm before clipping, step by step
    norms = [e["grad_norm"] for e in trainer.state.log_history if "grad_norm" in e]
    assert norms == pytest.approx([float(r["grad_norm"]) for r in rows], rel=1e-4)
    final = trainer.evaluate()
    for name in ("cross_entropy", "ghost_kl_to_teacher", "tokens"):
        assert final[f"eval_{name}"] == pytest.approx(cli["final"][name], rel=1e-5), name


def test_the_trainer_resumes_from_its_checkpoint_exactly(store: str, tmp_path: Path) -> None:
    whole = _trainer(store, tmp_path / "whole", save_strategy="steps", save_steps=2)
    whole.train()
    resumed = _trainer(store, tmp_path / "resumed")
    resumed.train(resume_from_checkpoint=str(tmp_path / "whole" / "checkpoint-2"))
    assert _losses(resumed)[-2:] == pytest.approx(_losses(whole)[-2:], rel=1e-5)
    for a, b in zip(whole.model.parameters(), resumed.model.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_the_trainer_trains_under_bf16_and_reports_to_tensorboard(
    store: str, tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "bf16"  # the Trainer's TensorBoard logs go under output_dir
    trainer = _trainer(
        store, logs, steps=2, bf16=True, report_to=["tensorboard"], eval_strategy="steps",
        eval_steps=2,
    )  # fmt: skip
    trainer.train()
    fp32 = _trainer(store, tmp_path / "fp32", steps=2)
    fp32.train()
    assert _losses(trainer) == pytest.approx(_losses(fp32), rel=2e-2)
    files = list(logs.rglob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/loss" in tags and "eval/cross_entropy" in tags
    assert [e.value for e in events.Scalars("train/loss")] == pytest.approx(_losses(trainer))


def test_the_trainer_refuses_what_it_cannot_honour(store: str, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="max_steps"):
        _trainer(store, tmp_path / "a", steps=-1, num_train_epochs=1)
    from transformers import TrainingArguments

    from kdcache.pipeline.distill import DistillTrainer

    st = open_store(store)
    model, _ = build_student("tiny", st.tokenizer_size, tokenizer=load_store_tokenizer(st))
    args = TrainingArguments(output_dir=str(tmp_path / "b"), max_steps=2, use_cpu=True)
    with pytest.raises(UserError, match="drop train_dataset"):
        DistillTrainer(model, args, store=st, train_dataset=[1, 2])


@pytest.mark.slow
def test_the_trainer_under_ddp_takes_the_one_process_steps(store: str, tmp_path: Path) -> None:
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    worker = str(HERE / "hf_ddp_worker.py")
    one = tmp_path / "one"
    one.mkdir()
    subprocess.run(
        [sys.executable, worker, store, str(one), "4"], env=environment, check=True,
        capture_output=True, timeout=300,
    )  # fmt: skip
    single = json.loads((one / "result.json").read_text())
    assert single["world"] == 1
    # DDP; then the FSDP configuration, which Accelerate applies on GPUs only: on the CPU the
    # two processes train data-parallel, with one note
    for extra, port in (([], 0), (["fsdp"], 1)):
        out = tmp_path / f"two{port}"
        out.mkdir()
        launched = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(29700 + os.getpid() % 100 + port), worker, store, str(out),
             "2", *extra],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert launched.returncode == 0, launched.stderr[-3000:]
        ddp = json.loads((out / "result.json").read_text())
        assert ddp["world"] == 2
        assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4)
        for name in ("eval_cross_entropy", "eval_tokens"):
            assert ddp["eval"][name] == pytest.approx(single["eval"][name], rel=1e-4)
        notes = launched.stderr.count("Note: the FSDP configuration is not applied on the cpu")
        assert notes == (1 if extra else 0)


def test_train_student_reports_to_tensorboard_and_plots_its_curves(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    argv = ["train-student", "--store", store, "--out", str(out), "--steps", "4",
            "--batch-size", "4", "--eval-every", "2", "--threads", "1",
            "--report-to", "tensorboard"]  # fmt: skip
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    with (out / "log.csv").open() as f:
        logged = [float(line.split(",")[3]) for line in list(f)[1:]]
    files = list((out / "tensorboard").rglob("events.out.tfevents.*"))
    assert files
    events = EventAccumulator(str(files[0].parent))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(logged, rel=1e-6)
    assert [e.step for e in events.Scalars("eval/cross_entropy")] == [2, 4]
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
