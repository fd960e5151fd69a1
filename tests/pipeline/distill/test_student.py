"""Students from presets, config files and model directories, always on the store's tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VOCAB, save_tiny_model, write_synthetic_store

from kdcache.pipeline.distill.student import (
    PRESETS,
    build_student,
    count_parameters,
    load_store_tokenizer,
)
from kdcache.pipeline.errors import UserError
from kdcache.storage import open_store

pytestmark = pytest.mark.floors


def test_presets_are_llama_on_the_store_vocabulary_and_grow() -> None:
    sizes = []
    for name in ("tiny", "small", "base"):
        model, source = build_student(name, 777)
        assert source == f"preset {name}"
        assert model.config.model_type == "llama" and model.config.vocab_size == 777
        assert model.config.hidden_size == PRESETS[name]["hidden_size"]
        sizes.append(count_parameters(model))
    assert sizes == sorted(sizes) and sizes[-1] < 10_000_000  # sized for a 2-core CPU


def test_presets_are_seeded_and_take_overrides() -> None:
    a, _ = build_student("tiny", 300, seed=1)
    b, _ = build_student("tiny", 300, seed=1)
    c, _ = build_student("tiny", 300, seed=2, overrides={"num_hidden_layers": 1})
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    assert c.config.num_hidden_layers == 1


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_files_take_the_store_vocabulary_when_absent(tmp_path: Path, suffix: str) -> None:
    fields = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    fields |= {"num_attention_heads": 2, "num_key_value_heads": 1}
    path = tmp_path / f"student{suffix}"
    text = (
        json.dumps(fields)
        if suffix == ".json"
        else "\n".join(f"{k}: {v}" for k, v in fields.items())
    )
    path.write_text(text)
    model, source = build_student(str(path), 400)
    assert source == f"config {path}"
    assert model.config.vocab_size == 400 and model.config.hidden_size == 32
    logits = model(input_ids=torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, 400)


def test_an_embedding_smaller_than_the_tokenizer_names_both_sizes_and_the_id(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"vocab_size": 100, "hidden_size": 32, "num_attention_heads": 2}))
    with pytest.raises(UserError, match=r"tokenizer has 512 ids but the student embeds 100, ") as e:
        build_student(str(config), TINY_VOCAB)
    assert "id 100 has no row" in e.value.message and "\n" not in e.value.message
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m")
    with pytest.raises(UserError, match=r"has 1,000 ids but the student embeds 512, .*id 512 has"):
        build_student(str(model_dir), 1000)


def test_a_padded_embedding_larger_than_the_tokenizer_is_a_valid_student(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"vocab_size": 576, "hidden_size": 32, "num_attention_heads": 2}))
    assert build_student(str(config), TINY_VOCAB)[0].config.vocab_size == 576
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m", vocab_size=640)
    assert build_student(str(model_dir), TINY_VOCAB)[0].config.vocab_size == 640
    # a preset takes the tokenizer's size
    assert build_student("tiny", 500)[0].config.vocab_size == 500


def test_a_model_directory_continues_from_its_weights(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    model_dir = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "m")
    model, source = build_student(str(model_dir), TINY_VOCAB, seed=123)
    again, _ = build_student(str(model_dir), TINY_VOCAB, seed=7)
    assert source.startswith("model directory")
    assert all(
        torch.equal(p, q) for p, q in zip(model.parameters(), again.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("huge", "unknown student, 'huge'"),
        ("missing.yaml", "student config not found"),
        ("bad.yaml", "cannot read the student config"),
        ("list.json", "not a mapping"),
        ("odd.json", "invalid student config"),
        ("empty_dir", "not a Hugging Face model directory"),
    ],
)
def test_bad_students_are_one_line_user_errors(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "bad.yaml").write_text("hidden_size: [1, 2\n")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "odd.json").write_text(json.dumps({"hidden_size": 30, "num_attention_heads": 2}))
    (tmp_path / "empty_dir").mkdir()
    target = spec if spec == "huge" else str(tmp_path / spec)
    with pytest.raises(UserError, match=message) as info:
        build_student(target, TINY_VOCAB)
    assert "\n" not in info.value.format_message()


def test_the_store_tokenizer_round_trips(tmp_path: Path, tiny_tokenizer_dir: Path) -> None:
    url = write_synthetic_store(
        str(tmp_path / "s"), lengths={"train": [[4]]}, tokenizer_dir=tiny_tokenizer_dir
    )
    tokenizer = load_store_tokenizer(open_store(url))
    assert len(tokenizer) == TINY_VOCAB
    assert tokenizer("def f(): pass")["input_ids"]
    bare = write_synthetic_store(str(tmp_path / "bare"), lengths={"train": [[4]]})
    with pytest.raises(UserError, match="holds no teacher tokenizer"):
        load_store_tokenizer(open_store(bare))
