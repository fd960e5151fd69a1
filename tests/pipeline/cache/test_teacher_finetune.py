"""`kdcache build-teacher --from`: a tiny teacher tuned on the training split of chat records."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cache.corpus import CorpusStats, is_eval_document, iter_documents
from kdcache.pipeline.cache.corpus import resolve_corpus as resolve
from kdcache.pipeline.cache.teacher_finetune import split_examples
from kdcache.pipeline.cache.teacher_training import METADATA_FILE, save_teacher_dir
from kdcache.pipeline.cli import main

pytestmark = pytest.mark.floors

BASE = [
    "--vocab-size", "400", "--hidden-size", "32", "--intermediate-size", "64", "--layers", "1",
    "--heads", "2", "--kv-heads", "1", "--seq-len", "64", "--batch-size", "8", "--steps", "40",
    "--lr", "1e-2", "--warmup", "5", "--eval-fraction", "0.2", "--threads", "1",
]  # fmt: skip
SEQ_LEN = 160
TUNE = [
    "--seq-len",
    str(SEQ_LEN),
    "--batch-size",
    "8",
    "--steps",
    "30",
    "--lr",
    "3e-3",
    "--threads",
    "1",
]
EVAL_FRACTION = 0.2
RECORDS = 300


def run(args: list[str]) -> int:
    try:
        main(["build-teacher", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    """A tiny default teacher (its tokenizer has the Python chat template) built on code."""
    corpus = tmp_path_factory.mktemp("code")
    for i, text in enumerate(corpus_texts[:30]):
        (corpus / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("base") / "teacher"
    assert run(["--corpus", str(corpus), "--out", str(out), *BASE]) == 0
    return out


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The first stdlib-chat records (signature -> docstring) as a prompt/completion .jsonl."""
    documents = iter_documents(resolve("stdlib-chat"), CorpusStats())
    path = tmp_path_factory.mktemp("chat") / "records.jsonl"
    with path.open("w") as f:
        for _, document in zip(range(RECORDS), documents, strict=False):
            prompt, completion = document.record
            f.write(json.dumps({"prompt": prompt, "completion": completion}) + "\n")
    return path


def tune_args(base: Path, records: Path, out: Path) -> list[str]:
    return ["--from", str(base), "--corpus", str(records), "--out", str(out), *TUNE,
            "--eval-fraction", str(EVAL_FRACTION)]  # fmt: skip


@pytest.fixture(scope="module")
def tuned(tmp_path_factory: pytest.TempPathFactory, base: Path, records: Path) -> Path:
    out = tmp_path_factory.mktemp("tuned") / "teacher-chat"
    assert run(tune_args(base, records, out)) == 0
    return out


def split_records(records: Path, tokenizer: Any) -> tuple[list[list[dict]], list[list[dict]]]:
    """(training, held-out) records by the store's content hash, as conversations, without those
    longer than the sequence length (skipped as cache-teacher skips them)."""
    train: list[list[dict]] = []
    held_out: list[list[dict]] = []
    for document in iter_documents([records], CorpusStats()):
        prompt, completion = document.record
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        if len(tokenizer(rendered(tokenizer, messages))["input_ids"]) <= SEQ_LEN:
            held = is_eval_document(document.text, EVAL_FRACTION)
            (held_out if held else train).append(messages)
    return train, held_out


def rendered(tokenizer: Any, messages: list[dict]) -> str:
    return str(tokenizer.apply_chat_template(messages, tokenize=False))


def completion_cross_entropy(teacher: Path, conversations: list[list[dict]]) -> float:
    """Mean CE of the assistant turns, each record rendered alone with the chat template and
    scored with Hugging Face's own ``labels`` loss (independent of the fine-tune's code)."""
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    total, count = 0.0, 0
    for messages in conversations:
        opening = tokenizer.apply_chat_template(
            messages[:1], tokenize=False, add_generation_prompt=True
        )
        encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
        ids = torch.tensor([encode(rendered(tokenizer, messages))])
        n_prompt = len(encode(opening))
        labels = ids.clone()
        labels[:, :n_prompt] = -100
        with torch.no_grad():
            loss = model(input_ids=ids, labels=labels).loss.item()
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss * n, count + n
    return total / count


def test_the_tuned_teacher_predicts_held_out_completions_better(
    base: Path, tuned: Path, records: Path
) -> None:
    _, held_out = split_records(records, AutoTokenizer.from_pretrained(base))
    assert len(held_out) >= 30
    before = completion_cross_entropy(base, held_out)
    after = completion_cross_entropy(tuned, held_out)
    assert after < before - 0.2
    meta = json.loads((tuned / METADATA_FILE).read_text())
    assert meta["eval_cross_entropy"] < meta["eval_cross_entropy_before"] - 0.2
    assert meta["eval_cross_entropy_before"] == pytest.approx(before, abs=0.05)
    assert meta["eval_documents"] == len(held_out)


def test_it_trains_on_the_training_records_only(base: Path, records: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(base)
    settings = {"corpus": str(records), "eval_fraction": EVAL_FRACTION, "seq_len": SEQ_LEN,
                "text_field": "text", "eval_sequences": None}  # fmt: skip
    train, held_out, facts = split_examples(settings, tokenizer, tokenizer.eos_token_id)
    stream = tokenizer.decode(np.concatenate([q for q, _ in train]))  # packed end to end
    trained = tokenizer.decode(np.concatenate([q[1:][m[:-1]] for q, m in train]))
    train_records, held_out_records = split_records(records, tokenizer)
    assert len(train_records) == facts["train_documents"] > 100
    assert all(rendered(tokenizer, r) in stream for r in train_records)
    assert not any(rendered(tokenizer, r) in stream for r in held_out_records)
    # the loss sees the docstrings, not the signatures
    assert "def " not in trained and '"""' in trained
    assert len(held_out) == facts["eval_documents"] > 0


def test_the_tuned_directory_keeps_the_tokenizer_and_says_where_it_came_from(
    base: Path, tuned: Path
) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (tuned / name).read_bytes() == (base / name).read_bytes()
    meta = json.loads((tuned / METADATA_FILE).read_text())
    assert meta["tuned_from"] == str(base.resolve())
    assert meta["base"] == json.loads((base / METADATA_FILE).read_text())
    assert meta["settings"]["steps"] == 30 and meta["trained_positions_seen"] > 0
    base_weights = AutoModelForCausalLM.from_pretrained(base).state_dict()
    tuned_weights = AutoModelForCausalLM.from_pretrained(tuned).state_dict()
    assert base_weights.keys() == tuned_weights.keys()
    assert not torch.equal(base_weights["lm_head.weight"], tuned_weights["lm_head.weight"])
    assert not list(tuned.parent.glob(".*.partial-*"))


def test_a_failed_save_leaves_the_old_directory_whole(base: Path, tmp_path: Path) -> None:
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "config.json").write_text("{}")

    def broken(directory: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        save_teacher_dir(out, AutoModelForCausalLM.from_pretrained(base), broken, {})
    assert [p.name for p in tmp_path.iterdir()] == ["teacher"]  # no partial directory left
    assert [p.name for p in out.iterdir()] == ["config.json"]


def test_refuses_to_overwrite_without_force(
    base: Path, tuned: Path, records: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (tuned / "model.safetensors").read_bytes()
    assert run([*tune_args(base, records, tuned), "--steps", "1"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (tuned / "model.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--steps", "0"], "--steps must be at least 1"),
        (["--lr", "0"], "--lr must be a positive number"),
        (["--eval-fraction", "0"], "--eval-fraction must be between 0 and 1"),
        (["--hidden-size", "64"], "--hidden-size is the --from teacher's"),
        (["--from", "{missing}"], "--from is not a teacher directory (does not exist)"),
        (["--from", "{records_dir}"], "--from is not a teacher directory (holds no config.json)"),
        (["--out", "{base}"], "--out is the --from teacher"),
        (["--corpus", "{messages}", "--from", "{bare}"], "has no chat template"),
        (["--eval-fraction", "1e-9"], "the corpus yields no held-out examples"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    base: Path,
    records: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    messages = tmp_path / "messages.jsonl"
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]
    messages.write_text(json.dumps({"messages": chat}) + "\n")
    names = {"missing": tmp_path / "nowhere", "records_dir": records.parent, "base": base,
             "messages": messages, "bare": tiny_teacher_dir}  # fmt: skip
    args = [arg.format(**names) for arg in args]
    assert run([*tune_args(base, records, tmp_path / "t"), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err
    assert not (tmp_path / "t").exists()
