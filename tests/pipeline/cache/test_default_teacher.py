"""`kdcache build-teacher`: a tiny default teacher trained on a few files, end to end."""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cache.chat import conventions
from kdcache.pipeline.cache.corpus import CorpusStats, iter_documents, resolve_corpus
from kdcache.pipeline.cache.default_teacher import METADATA_FILE
from kdcache.pipeline.cache.packing import tokenize_documents
from kdcache.pipeline.cache.tokenizer import PYTHON_CHAT_TEMPLATE
from kdcache.pipeline.cli import main

pytestmark = pytest.mark.floors

VOCAB = 400
TINY = [
    "--vocab-size", str(VOCAB), "--hidden-size", "32", "--intermediate-size", "64",
    "--layers", "1", "--heads", "2", "--kv-heads", "1", "--seq-len", "64",
    "--batch-size", "8", "--steps", "40", "--lr", "1e-2", "--warmup", "5",
    "--eval-fraction", "0.2", "--threads", "1",
]  # fmt: skip


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    path = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts[:30]):
        (path / f"doc{i:02d}.txt").write_text(text, encoding="utf-8")
    return path


def run(args: list[str]) -> int:
    try:
        main(["build-teacher", *args])
    except SystemExit as e:
        return int(e.code or 0)
    return 0


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory, corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("built") / "teacher"
    assert run(["--corpus", str(corpus_dir), "--out", str(out), *TINY]) == 0
    return out


def test_output_is_an_ordinary_hf_model_dir(built: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(built)
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert model.config.model_type == "llama"
    assert model.config.vocab_size == len(tokenizer) == VOCAB
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    # the tokenizer is byte-level: any text round-trips
    text = "def f(x):\n    return x ** 2  # ünïcode ✓\n"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text
    ids = tokenizer("import os\n", return_tensors="pt")["input_ids"]
    generated = model.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, ids.shape[1] + 5)
    assert not list(built.parent.glob(".teacher.partial-*"))  # atomic save left nothing behind


def test_metadata_reports_a_learned_held_out_perplexity(built: Path) -> None:
    meta = json.loads((built / METADATA_FILE).read_text())
    assert meta["train_tokens"] == 40 * 8 * 64
    assert meta["eval_tokens"] > 0 and meta["eval_documents"] > 0
    assert meta["eval_perplexity"] == pytest.approx(math.exp(meta["eval_cross_entropy"]))
    # clearly better than a uniform guess over the vocabulary
    assert meta["eval_perplexity"] < VOCAB / 3


def test_the_chat_template_renders_a_stdlib_chat_record_as_python(built: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(built)
    assert tokenizer.chat_template == PYTHON_CHAT_TEMPLATE
    assert conventions(tokenizer).bos_id is None  # text is packed without BOS, as it trained
    files = [p for p in resolve_corpus("stdlib-chat") if p.parent.name == "json"]
    document = next(d for d in iter_documents(files, CorpusStats()) if "\n\n" in d.record[1])
    prompt, completion = document.record
    messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    docstring = "\n".join(("    " + line).rstrip() for line in completion.split("\n")).lstrip()
    assert rendered == f'{prompt}\n    """{docstring}"""\n</s>'
    ast.parse(rendered.removesuffix("</s>"))  # Python: the signature and its docstring
    opening = tokenizer.apply_chat_template(
        messages[:1], tokenize=False, add_generation_prompt=True
    )
    assert opening == f'{prompt}\n    """'
    [example] = tokenize_documents([document], tokenizer, eval_fraction=0.0)
    assert tokenizer.decode(example.ids) == rendered  # ends with the template's EOS: no other
    assert tokenizer.decode(example.ids[example.label_mask]) == f'{docstring}"""\n</s>'


def test_same_seed_gives_identical_weights(built: Path, corpus_dir: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    assert run(["--corpus", str(corpus_dir), "--out", str(again), *TINY]) == 0
    first = AutoModelForCausalLM.from_pretrained(built).state_dict()
    second = AutoModelForCausalLM.from_pretrained(again).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert (built / "tokenizer.json").read_bytes() == (again / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--vocab-size", "100"], "--vocab-size is too small"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--hidden-size", "30", "--heads", "4"], "--hidden-size must be an even multiple"),
        (["--heads", "4", "--kv-heads", "3"], "--heads must be a multiple of --kv-heads"),
        (["--eval-fraction", "1.5"], "--eval-fraction must be between 0 and 1"),
        (["--corpus", "/nonexistent/*.txt"], "corpus matches no files"),
        (["--corpus", "stdlib-chat"], "build-teacher trains on plain text"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str],
    message: str,
    corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = ["--corpus", str(corpus_dir), "--out", str(tmp_path / "t"), *TINY]
    assert run([*base, *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("Error: ") and message in err and "\n" not in err
    assert not (tmp_path / "t").exists()


def test_refuses_to_overwrite_without_force(
    built: Path, corpus_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (built / "model.safetensors").read_bytes()
    assert run(["--corpus", str(corpus_dir), "--out", str(built), *TINY, "--steps", "1"]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (built / "model.safetensors").read_bytes() == before
