"""Stage two on a store with a loss mask (format v3), end to end: the loader's batches, a
train-student run whose eval counts the trained positions only, online KD with a padded teacher."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli as call
from conftest import save_tiny_model, write_synthetic_store
from transformers import AutoModelForCausalLM

from kdcache.pipeline.distill.batches import collate, sequence_fields
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.storage import create_store, make_manifest, open_store

LENGTHS = {"train": [[24] * 6, [24] * 5 + [13]], "eval": [[24] * 4, [24] * 2 + [11]]}
FAST = ["--threads", "1", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0"]
TARGETS = ("topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct")
ENTRIES = ("sampled_ids", "sampled_counts", "sampled_logprobs")


def write_masked_copy(
    source: str, url: str, *, tokenizer: dict[str, bytes], vocab_size: int, seed: int = 0
) -> str:
    """A copy of store ``source`` with a loss mask (format v3) and ``tokenizer``'s files: each
    sequence leaves a prompt-like quarter and random holes untrained, its targets cut to the
    trained positions. ``vocab_size`` (the teacher's rows) may exceed the tokenizer's size."""
    from kdcache.pipeline.teacher import tokenizer_fingerprint

    src, rng = open_store(source), np.random.default_rng(seed)
    facts = ("backend", "teacher", "top_k", "seq_len", "corpus", "shard_tokens", "logprob_dtype",
             "targets", "samples", "sample_seed")  # fmt: skip
    manifest = make_manifest(
        **{name: src.manifest[name] for name in facts},
        tokenizer=tokenizer_fingerprint(tokenizer, size=src.vocab_size),
        vocab_size=vocab_size,
        loss_mask=True,
    )
    writer = create_store(url, manifest)
    writer.write_tokenizer(tokenizer)
    for split in src.splits:
        for index, record in enumerate(src.shards_of(split)):
            with writer.open_shard(split, index) as shard:
                for seq in src.read_shard(record):
                    n = len(seq.tokens)
                    mask = rng.random(n) < 0.7
                    mask[: n // 4] = False
                    mask[rng.integers(n // 4, n)] = True
                    kept = {name: getattr(seq, name)[mask] for name in TARGETS
                            if getattr(seq, name) is not None}  # fmt: skip
                    if seq.sampled_distinct is not None:
                        entries = np.repeat(mask, seq.sampled_distinct)
                        kept |= {name: getattr(seq, name)[entries] for name in ENTRIES}
                    shard.append(seq.tokens, **kept, loss_mask=mask)
    writer.mark_finished({})  # a complete store (train-student refuses an unfinished one)
    return url


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path) -> str:
    """A masked topk+sampled store whose teacher embeds 576 rows for the tiny 512-id tokenizer,
    and whose tokenizer is the tiny teacher's (so it can run live on it)."""
    from kdcache.pipeline.teacher import open_teacher, tokenizer_files

    tmp = tmp_path_factory.mktemp("masked")
    source = write_synthetic_store(str(tmp / "full"), lengths=LENGTHS, targets="topk+sampled",
                                   samples=16)  # fmt: skip
    files = tokenizer_files(open_teacher(str(tiny_teacher_dir)))
    return write_masked_copy(source, str(tmp / "masked"), tokenizer=files, vocab_size=576)


def test_the_loader_carries_the_mask_through_its_workers(store: str) -> None:
    masked = open_store(store)
    assert masked.has_loss_mask and masked.num_trained < masked.num_tokens
    assert (masked.tokenizer_size, masked.vocab_size) == (512, 576)
    by_key = {int(s.tokens[0]): s for s in masked.iter_sequences("train")}
    dataset = DistillDataset(masked, batch_size=3, seed=1, infinite=False)
    assert dataset.num_trained == sum(int(s.loss_mask.sum()) for s in by_key.values())
    trained = 0
    for batch in TeacherLoader(dataset, num_workers=2):  # collated into shared-memory slots
        keys = batch["input_ids"][:, 0].tolist()
        expected = collate([sequence_fields(by_key[k]) for k in keys])
        assert batch.keys() == expected.keys()
        for name in batch:
            assert torch.equal(batch[name], expected[name]), name
        trained += int(batch["loss_mask"].sum())
    assert trained == dataset.num_trained


def trained_cross_entropy(model: torch.nn.Module, store: str, vocab: int) -> tuple[float, int]:
    """Mean CE over the eval split's trained positions that have a next token, one sequence at a
    time, straight from the stored masks (independent of the loader and of evaluate)."""
    total, count = 0.0, 0
    for seq in open_store(store).iter_sequences("eval"):
        ids = torch.as_tensor(seq.tokens, dtype=torch.long)[None]
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :, :vocab].double()  # (L, vocab)
        positions = [t for t in np.flatnonzero(seq.loss_mask) if t + 1 < len(seq.tokens)]
        log_s = torch.log_softmax(logits[positions], -1)  # (T', vocab)
        total -= float(log_s.gather(-1, ids[0, [t + 1 for t in positions]][:, None]).sum())
        count += len(positions)
    return total / count, count


def test_train_student_trains_and_evaluates_the_trained_positions_only(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a padded student: 640 rows on the 512-id tokenizer, more than the store's 576
    config = tmp_path / "student.json"
    config.write_text(json.dumps({"vocab_size": 640, "hidden_size": 32, "intermediate_size": 64,
                                  "num_hidden_layers": 1, "num_attention_heads": 2}))  # fmt: skip
    out = tmp_path / "out"
    argv = ["train-student", "--store", store, "--out", str(out), "--student", str(config)]
    code, stdout, err = call([*argv, "--steps", "4", "--workers", "1", *FAST], capsys)
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size == 640
    ce, count = trained_cross_entropy(model, store, 512)
    assert metrics["final"]["tokens"] == count
    assert metrics["final"]["cross_entropy"] == pytest.approx(ce, rel=1e-4)
    with (out / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert all(int(r["trained_tokens"]) < int(r["tokens"]) for r in rows)
    train = metrics["train"]
    assert train["trained_tokens"] == sum(int(r["trained_tokens"]) for r in rows)
    line = stdout.strip().splitlines()[-1]
    assert f"{train['tokens']:,} tokens ({train['trained_tokens']:,} trained) in" in line
    run = json.loads((out / "run.json").read_text())
    assert run["train_trained_tokens"] == DistillDataset(store).num_trained


def test_online_kd_with_a_padded_teacher_on_a_masked_store(
    store: str, tiny_tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "padded", vocab_size=640)
    out = tmp_path / "online"
    argv = ["train-student", "--store", store, "--teacher", str(teacher), "--out", str(out)]
    code, _, err = call([*argv, "--steps", "2", *FAST], capsys)
    assert code == 0, err
    final = json.loads((out / "metrics.json").read_text())["final"]
    assert (
        final["kl_to_teacher"] > 0
        and final["tokens"]
        == trained_cross_entropy(AutoModelForCausalLM.from_pretrained(out), store, 512)[1]
    )
    # a teacher without a row for every tokenizer id is refused before anything trains
    small = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "small", vocab_size=500)
    argv = [
        "train-student",
        "--store",
        store,
        "--teacher",
        str(small),
        "--out",
        str(tmp_path / "x"),
    ]
    code, _, err = call([*argv, "--steps", "2", *FAST], capsys)
    assert code == 2 and err.strip().splitlines()[-1].startswith(
        "Error: the store's tokenizer has 512 ids but the teacher embeds 500, "
    )
