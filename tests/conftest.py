"""Shared fixtures: a tokenizer trained on the fly and tiny teachers built from configs.

Nothing here downloads anything: the Hugging Face Hub is unreachable in tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """~60 standard-library sources: real code text, the same on every machine with this Python."""
    from kdcache.pipeline.corpus import stdlib_files

    files = stdlib_files()[:60]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    from kdcache.pipeline.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(corpus_texts, vocab_size=TINY_VOCAB).save_pretrained(path)
    return path


def save_tiny_model(model_type: str, tokenizer_dir: Path, path: Path, **overrides: object) -> Path:
    """Build a 2-layer, 64-wide causal LM of ``model_type`` from its config and save it with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_type == "gpt2":
        sizes = {
            "vocab_size": len(tokenizer),
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    sizes.update(overrides)
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny Llama teacher directory (weights + tokenizer), loadable with from_pretrained."""
    return save_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("teacher"))
