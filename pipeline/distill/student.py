"""The student: a preset, a config file or an HF model directory — on the store's tokenizer.

``--student`` accepts:

- a preset name (``tiny``, ``small``, ``base``): Llama-style decoders sized so a 2-core CPU
  trains them in minutes; their ``vocab_size`` is the store's tokenizer size;
- a path to an HF config (``.json``, ``.yaml``/``.yml``): a mapping of config fields
  (``model_type`` defaults to ``llama``; a missing ``vocab_size`` is the tokenizer size);
- an HF model directory (``config.json`` + weights) to continue training from.

The embedding is checked against the store's tokenizer before any training (``vocabulary.py``):
it needs a row for every tokenizer id; a larger one (padded) works and its extra rows get no
probability, a smaller one is a one-line ``UserError`` naming both sizes. Presets take the
tokenizer size rather than the store's ``vocab_size`` (the teacher's embedding rows): padded
rows would only cost memory and compute, and the saved student then matches the tokenizer saved
beside it. The teacher's tokenizer travels inside the store (``Store.tokenizer_files()``).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml

from kdcache.pipeline.distill.vocabulary import check_embedding, embedding_rows
from kdcache.pipeline.errors import UserError

# Llama-style, tied embeddings (the vocabulary dominates the parameter count at these sizes)
PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "intermediate_size": 192,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "small": {
        "hidden_size": 128,
        "intermediate_size": 384,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
    "base": {
        "hidden_size": 192,
        "intermediate_size": 512,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
    },
}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def load_store_tokenizer(store: Any) -> Any:
    """The teacher tokenizer stored with ``store``, loaded with ``AutoTokenizer``.

    Raises:
        UserError: the store carries no tokenizer files.
    """
    from transformers import AutoTokenizer

    files: dict[str, bytes] = store.tokenizer_files()
    if not files:
        raise UserError(
            f"the store holds no teacher tokenizer, {store.url}, "
            "re-create it with `kdcache cache-teacher` (which stores the tokenizer)"
        )
    with tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-") as tmp:
        for name, data in files.items():
            (Path(tmp) / Path(name).name).write_bytes(data)
        return AutoTokenizer.from_pretrained(tmp)


def _one_line(error: BaseException) -> str:
    """An exception's message on one line, at most 200 characters."""
    text = " ".join(str(error).split())
    return text if len(text) <= 200 else text[:197] + "..."


def _special_ids(tokenizer: Any) -> dict[str, Any]:
    if tokenizer is None:
        return {}
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, yaml.YAMLError) as e:
        reason = _one_line(e)
        raise UserError(
            f"cannot read the student config, {path} ({reason}), "
            "give a readable JSON/YAML mapping of HF config fields"
        ) from e
    if not isinstance(data, dict):
        raise UserError(
            f"the student config is not a mapping, {path}, "
            "write HF config fields such as hidden_size: 128"
        )
    return data


def _config_from_fields(fields: dict[str, Any], source: str) -> Any:
    from transformers import AutoConfig

    fields = dict(fields)
    model_type = fields.pop("model_type", "llama")
    fields.pop("architectures", None)
    try:
        return AutoConfig.for_model(model_type, **fields)
    except Exception as e:  # transformers raises ValueError/TypeError/hub validation errors
        raise UserError(
            f"invalid student config, {source} ({_one_line(e)}), "
            "check model_type and the field names"
        ) from e


def build_student(
    spec: str,
    tokenizer_size: int,
    *,
    tokenizer: Any = None,
    overrides: dict[str, Any] | None = None,
    seed: int = 0,
    max_positions: int = 2048,
) -> tuple[torch.nn.Module, str]:
    """Make the student named by ``spec`` for a store whose tokenizer has ``tokenizer_size`` ids.

    Args:
        spec: preset name, config file path, or HF model directory.
        tokenizer_size: the store's tokenizer size (``Store.tokenizer_size``): a new student's
            default ``vocab_size``, and the least any student may embed.
        tokenizer: the teacher tokenizer (its special ids go into a new config).
        overrides: config fields replacing the preset's/file's (the sweep's architecture
            search); not allowed with a model directory.
        seed: seeds the initial weights of a new model.
        max_positions: minimum ``max_position_embeddings`` of a new model.

    Returns:
        (model in float32, a one-line description of where it came from).

    Raises:
        UserError: unknown preset, unreadable config, an embedding smaller than the tokenizer.
    """
    from transformers import AutoModelForCausalLM

    overrides = dict(overrides or {})
    path = Path(spec)
    if spec in PRESETS:
        fields = {"model_type": "llama", "tie_word_embeddings": True, **PRESETS[spec]}
        fields["vocab_size"] = tokenizer_size
        source = f"preset {spec}"
    elif path.is_dir():
        if overrides:
            raise UserError(
                f"architecture overrides need a preset or config file, got a model directory "
                f"{spec}, pass a preset or a config .json/.yaml"
            )
        if not (path / "config.json").is_file() or not any(
            (path / w).is_file() for w in WEIGHT_FILES
        ):
            raise UserError(
                f"not a Hugging Face model directory (config.json + weights), {spec}, "
                "pass a preset (tiny, small, base), a config .json/.yaml, or a saved model"
            )
        try:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise UserError(
                f"cannot load the student model, {spec} ({_one_line(e)}), "
                "pass a directory written by save_pretrained"
            ) from e
        rows = embedding_rows(model)
        check_embedding(rows if rows is not None else model.config.vocab_size, tokenizer_size, spec)
        return model, f"model directory {spec}"
    elif path.suffix in (".json", ".yaml", ".yml"):
        if not path.is_file():
            raise UserError(f"student config not found, {spec}, check the path")
        fields = _read_config_file(path)
        fields.pop("tokenizer", None)  # the student's own tokenizer (student_tokenizer.py)
        fields.setdefault("vocab_size", tokenizer_size)
        source = f"config {spec}"
    else:
        raise UserError(
            f"unknown student, {spec!r}, pass a preset ({', '.join(PRESETS)}), "
            "a config .json/.yaml, or an HF model directory"
        )
    fields.update(overrides)
    for name, value in _special_ids(tokenizer).items():
        fields.setdefault(name, value)
    fields["max_position_embeddings"] = max(
        int(fields.get("max_position_embeddings", 0)), max_positions
    )
    check_embedding(int(fields["vocab_size"]), tokenizer_size, spec)
    config = _config_from_fields(fields, spec)
    torch.manual_seed(seed)
    try:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except ValueError as e:
        raise UserError(
            f"the student config is not a causal LM, {spec} ({_one_line(e)}), "
            "use a decoder model_type such as llama"
        ) from e
    return model, source


def enable_gradient_checkpointing(model: torch.nn.Module, source: str) -> None:
    """Turn on the model's own activation checkpointing (non-reentrant).

    Raises:
        UserError: the model's class does not support it.
    """
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise UserError(
            f"the student does not support gradient checkpointing, {source} "
            f"({type(model).__name__}), drop --gradient-checkpointing or use another architecture"
        )
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers 5.x's name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.config.use_cache = False


def count_parameters(model: torch.nn.Module) -> int:
    """Distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
