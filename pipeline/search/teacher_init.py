"""Students initialized from the teacher (``init: teacher``): its weights pruned in depth and width.

Importances are measured once, with one forward of the teacher over one calibration batch read
from the store (Minitron, Muralidharan et al. 2024): a layer's block influence (1 − cosine of its
input and output hidden states), a head's output norm (before ``o_proj``), an MLP channel's
mean |act(gate)·up|, a hidden channel's mean |normed activation| summed over every norm. A shape
keeps the most important units, in their original order. Llama-style layouts only.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.pipeline.distill.vocabulary import check_embedding
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.sweep_config import ARCHITECTURE_KEYS

CALIBRATION_SEQUENCES = 16
_PROJ = [*(f"self_attn.{p}_proj" for p in "qkvo"), "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")
_HEAD_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")  # (head_dim,): kept whole
_LAYER_REQUIRED = {*_NORMS, *(f"{p}.weight" for p in _PROJ)}
_LAYER_ALLOWED = {*_LAYER_REQUIRED, *(f"{p}.bias" for p in _PROJ), *_HEAD_NORMS}
_TOP = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}


def calibration_batch(store: Any, batch_size: int, pad_id: int) -> dict[str, torch.Tensor]:
    """The first ``batch_size`` sequences of the store's train split, in stored order.

    Returns:
        ``input_ids`` (B, L) int64 and ``attention_mask`` (B, L) int64; the targets are not kept.
    """
    order = {"shuffle": False, "infinite": False, "rank": 0, "world_size": 1}  # every rank alike
    dataset = DistillDataset(store, "train", batch_size=batch_size, pad_id=pad_id, **order)
    batches = iter(TeacherLoader(dataset))
    batch = next(batches, None)
    batches.close()  # its decoding threads
    if batch is None:
        raise UserError(f"the store has no train sequences, {store.url}, init: teacher needs some")
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@dataclass
class Importance:
    """The teacher's unit importances on the calibration batch."""

    layers: torch.Tensor  # (L,) block influence
    heads: torch.Tensor  # (L, A) mean L2 norm of each head's output
    channels: torch.Tensor  # (L, I) mean |act(gate) · up|
    hidden: torch.Tensor  # (H,) mean |normed activation|, summed over the norms


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest ``scores`` (earlier first on ties), ascending."""
    return torch.argsort(scores, descending=True, stable=True)[:k].sort().values


def keep_heads(scores: torch.Tensor, kv_heads: int, heads: int, kv: int) -> tuple[Any, Any]:
    """The query heads and KV groups one layer keeps.

    Args:
        scores: (A,) the teacher's head importances; query head j reads KV group j // (A / KV).
        kv_heads: the teacher's KV groups (KV).
        heads, kv: the student's query heads and KV groups (heads / kv ≤ A / KV).

    Returns:
        (heads,) query heads grouped by kept group, and (kv,) kept groups, both ascending.
    """
    per_group = scores.numel() // kv_heads
    grouped = scores.view(kv_heads, per_group)  # (KV, A / KV)
    groups = _top(grouped.sum(1), kv)
    queries = [g * per_group + _top(grouped[g], heads // kv) for g in groups.tolist()]
    return torch.cat(queries), groups


def _rows(units: torch.Tensor, size: int) -> torch.Tensor:
    """The weight rows of ``units`` (U,) of ``size`` rows each → (U · size,)."""
    return (units[:, None] * size + torch.arange(size)).reshape(-1)


class TeacherPruner:
    """A Llama-style teacher on CPU in float32, its importances measured once; pruned copies.

    Args:
        teacher_dir: a model directory written by ``save_pretrained``.
        calibration: ``calibration_batch``'s ``input_ids`` and ``attention_mask`` (B, L).

    Raises:
        UserError: the directory cannot be loaded, or its model is not Llama-style.
    """

    def __init__(self, teacher_dir: str | Path, calibration: dict[str, torch.Tensor]) -> None:
        from transformers import AutoModelForCausalLM

        try:
            model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
        except (OSError, ValueError, KeyError, TypeError) as e:
            reason = " ".join(str(e).split())[:200]
            raise UserError(
                f"cannot load the teacher for init: teacher, {teacher_dir} ({reason}), "
                "name a model directory written by save_pretrained in `teacher:`"
            ) from e
        self.model = model.eval().requires_grad_(False)
        self.source = str(teacher_dir)
        config = model.config
        self.head_dim = int(
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        _check_layout(model, self.head_dim)
        self.teacher = {key: int(getattr(config, key)) for key in ARCHITECTURE_KEYS}
        self.importance = _measure(model, calibration, self.head_dim)

    def shape(self, shape: dict[str, int], vocab: int | None = None) -> dict[str, int]:
        """``shape`` completed with the teacher's values, checked against what it can give (and
        its embedding against the store's ``vocab`` ids)."""
        full = {key: int(shape.get(key, self.teacher[key])) for key in ARCHITECTURE_KEYS}
        for key, value in full.items():
            if value > self.teacher[key]:
                raise UserError(
                    f"init: teacher cannot give {key} {value}, the teacher has "
                    f"{self.teacher[key]}, choose at most {self.teacher[key]}"
                )
        heads, kv = full["num_attention_heads"], full["num_key_value_heads"]
        if heads % kv:
            raise UserError(
                f"init: teacher needs num_attention_heads a multiple of num_key_value_heads, "
                f"got {heads} and {kv}, choose sizes that divide"
            )
        per_group = self.teacher["num_attention_heads"] // self.teacher["num_key_value_heads"]
        if heads // kv > per_group:
            raise UserError(
                f"init: teacher cannot give {heads // kv} query heads per key-value head "
                f"({heads} / {kv}), the teacher has {per_group}, lower num_attention_heads "
                f"or raise num_key_value_heads"
            )
        if full["hidden_size"] % heads:
            raise UserError(
                f"init: teacher needs hidden_size divisible by num_attention_heads, got "
                f"{full['hidden_size']} "
                f"and {heads}, choose sizes that divide"
            )
        if vocab is not None:
            rows = self.model.get_input_embeddings().weight.shape[0]
            check_embedding(rows, vocab, self.source, who="teacher")
        return full

    def student(self, shape: dict[str, int]) -> torch.nn.Module:
        """A new model of ``shape`` (architecture keys; a missing one keeps the teacher's), its
        weights the teacher's most important units, independent of the teacher."""
        full = self.shape(shape)
        imp, kv_heads = self.importance, self.teacher["num_key_value_heads"]
        layers = _top(imp.layers, full["num_hidden_layers"])  # (l,)
        hidden = _top(imp.hidden, full["hidden_size"])  # (h,)
        model = self._empty(full, layers.tolist())
        weights = {  # embedding, final norm, head: (V, H) or (H,) → their kept hidden channels
            name: tensor[:, hidden] if tensor.dim() == 2 else tensor[hidden]
            for name, tensor in self.model.state_dict().items()
            if not name.startswith("model.layers.")
        }
        for new, old in enumerate(layers.tolist()):
            queries, groups = keep_heads(
                imp.heads[old], kv_heads, full["num_attention_heads"], full["num_key_value_heads"]
            )
            q, kv = _rows(queries, self.head_dim), _rows(groups, self.head_dim)
            channels = _top(imp.channels[old], full["intermediate_size"])  # (i,)
            rows = {"q_proj": q, "k_proj": kv, "v_proj": kv, "o_proj": hidden}
            rows |= {"gate_proj": channels, "up_proj": channels, "down_proj": hidden}
            columns = {"o_proj": q, "down_proj": channels}
            for name, tensor in self.model.model.layers[old].state_dict().items():
                weights[f"model.layers.{new}.{name}"] = _cut(name, tensor, hidden, rows, columns)
        model.load_state_dict(weights, strict=True)
        return model

    def _empty(self, shape: dict[str, int], layers: list[int]) -> torch.nn.Module:
        """A model of the teacher's class and config at ``shape`` (weights to be loaded)."""
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.model.config)
        for key, value in shape.items():
            setattr(config, key, value)
        config.head_dim = self.head_dim  # no longer hidden_size / heads once either is pruned
        types = getattr(config, "layer_types", None)  # per layer (sliding or full attention)
        if isinstance(types, list) and len(types) == self.teacher["num_hidden_layers"]:
            config.layer_types = [types[i] for i in layers]
        with torch.random.fork_rng(devices=[]):  # the other candidates' seeded inits unchanged
            return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def _cut(name: str, tensor: torch.Tensor, hidden: torch.Tensor, rows: Any, columns: Any) -> Any:
    """One decoder-layer tensor cut to the kept units (a new tensor).

    Args:
        name: its name in the layer (``self_attn.q_proj.weight``, ``mlp.down_proj.bias``, …).
        tensor: a weight (out, in), a bias (out,) or a norm's weight (H,) or (head_dim,).
        hidden: (h,) the kept hidden channels.
        rows, columns: per projection (``q_proj``, …) the kept output rows and input columns
            (default: ``hidden``); query rows (a · d,), key and value rows (kv · d,), MLP (i,).
    """
    if name in _HEAD_NORMS:
        return tensor.clone()
    if name in _NORMS:
        return tensor[hidden]
    proj = name.split(".")[1]  # "self_attn.q_proj.weight" → "q_proj"
    kept = tensor[rows[proj]]
    return kept[:, columns.get(proj, hidden)] if name.endswith(".weight") else kept


class TeacherInit:
    """The sweep's ``init: teacher`` students: one ``TeacherPruner``, made on first use.

    Args:
        teacher_dir: ``SweepConfig.teacher`` (None: no candidate may ask for it).
        store: the open store the calibration batch is read from.
    """

    def __init__(self, teacher_dir: str | None, store: Any) -> None:
        self.teacher_dir, self.store = teacher_dir, store
        self._pruner: TeacherPruner | None = None

    def pruner(self, pad_id: int) -> TeacherPruner:
        """The pruner, calibrated on the store's tokens (padded with ``pad_id``) on first use."""
        if self._pruner is None:
            assert self.teacher_dir is not None  # sweep_config refuses init: teacher without it
            batch = calibration_batch(self.store, CALIBRATION_SEQUENCES, pad_id)
            self._pruner = TeacherPruner(self.teacher_dir, batch)
        return self._pruner


def _check_layout(model: Any, head_dim: int) -> None:
    """Refuse a model whose parameters are not the Llama layout this module prunes."""
    kind = getattr(model.config, "model_type", type(model).__name__)
    refusal = UserError(f"init: teacher supports Llama-style models, {kind} is not")
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise refusal
    for layer in layers:
        names = {n for n, _ in layer.named_parameters()}
        if not _LAYER_REQUIRED <= names <= _LAYER_ALLOWED:
            raise refusal
        if any(p.shape != (head_dim,) for n, p in layer.named_parameters() if n in _HEAD_NORMS):
            raise refusal
    names = {n for n, _ in model.named_parameters(remove_duplicate=False)}  # tied: both names
    if {n for n in names if not n.startswith("model.layers.")} != _TOP:
        raise refusal


def _measure(model: Any, batch: dict[str, torch.Tensor], head_dim: int) -> Importance:
    """One forward of the teacher's decoder (no head) over ``batch``, hooks summing the
    importances over its real tokens (``attention_mask``)."""
    config, layers = model.config, model.model.layers
    n, heads, width = len(layers), config.num_attention_heads, config.intermediate_size
    hidden = torch.zeros(config.hidden_size)
    imp = Importance(torch.zeros(n), torch.zeros(n, heads), torch.zeros(n, width), hidden)
    mask = batch["attention_mask"].bool()  # (B, T)
    inputs: dict[int, torch.Tensor] = {}  # each layer's input (B, T, H) until its output

    def on_input(i: int, module: Any, args: Any, kwargs: dict[str, Any]) -> None:  # (B, T, H)
        inputs[i] = args[0] if args else kwargs["hidden_states"]

    def on_layer(i: int, module: Any, args: Any, out: Any) -> None:
        out = out[0] if isinstance(out, tuple) else out  # (B, T, H)
        cosine = F.cosine_similarity(inputs.pop(i)[mask], out[mask], dim=-1)  # (N,)
        imp.layers[i] = 1.0 - cosine.mean()

    def on_heads(i: int, module: Any, args: Any) -> None:  # (B, T, A · d), before o_proj
        imp.heads[i] = args[0][mask].view(-1, heads, head_dim).norm(dim=-1).mean(0)

    def on_channels(i: int, module: Any, args: Any) -> None:  # (B, T, I): act(gate) · up
        imp.channels[i] = args[0][mask].abs().mean(0)

    def on_norm(module: Any, args: Any, out: torch.Tensor) -> None:  # (B, T, H)
        imp.hidden.add_(out[mask].abs().mean(0))

    hooks = [model.model.norm.register_forward_hook(on_norm)]
    for i, layer in enumerate(layers):
        hooks += [
            layer.register_forward_pre_hook(partial(on_input, i), with_kwargs=True),
            layer.register_forward_hook(partial(on_layer, i)),
            layer.self_attn.o_proj.register_forward_pre_hook(partial(on_heads, i)),
            layer.mlp.down_proj.register_forward_pre_hook(partial(on_channels, i)),
            layer.input_layernorm.register_forward_hook(on_norm),
            layer.post_attention_layernorm.register_forward_hook(on_norm),
        ]
    try:
        with torch.no_grad():
            model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    finally:
        for hook in hooks:
            hook.remove()
    return imp
