"""A teacher's final logits computed from its hidden states, a chunk of tokens at a time.

Both stages need a teacher's full-vocabulary distribution without a float32 [batch, seq, vocab]
tensor: stage one to cache its top-k or samples, stage two to distill from it live (the online
reference). ``LogitHead`` repeats the model's own final-logit computation (projection, scaling,
soft-capping) on a chunk of hidden states; ``ChunkScratch`` keeps the vocab-wide buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

DEFAULT_CHUNK_BYTES = 128 * 1024 * 1024  # vocab-wide float scratch per chunk


@dataclass
class LogitHead:
    """hidden (N, H) -> logits (N, V), the same operations in the same order as the model's forward.

    Attributes:
        lm_head: the output embedding (``model.get_output_embeddings()``).
        hidden_divisor: hidden states divided by this before the head (MiniCPM3).
        logit_multiplier: logits multiplied by this (Cohere ``logit_scale``, Falcon-H1
            ``lm_head_multiplier``, HyperCLOVA X ``logits_scaling``).
        logit_divisor: logits divided by this (Granite ``logits_scaling``).
        softcap: ``cap * tanh(logits / cap)`` (Gemma-2/3 ``final_logit_softcapping``).
    """

    lm_head: torch.nn.Module
    hidden_divisor: float | None = None
    logit_multiplier: float | None = None
    logit_divisor: float | None = None
    softcap: float | None = None

    def __call__(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """hidden (N, H) -> logits (N, V) in the model's dtype.

        The final-logit transforms run in place on the head's output (the same values as the
        model's out-of-place ops). With ``out`` (N, V) and a plain ``nn.Linear`` head, that
        output is ``out`` itself, so a caller can reuse one buffer per chunk instead of a fresh
        vocab-wide allocation.
        """
        if self.hidden_divisor is not None:
            hidden = hidden / self.hidden_divisor
        head = self.lm_head
        if out is not None and self.writes_into_buffer and out.dtype == head.weight.dtype:
            if head.bias is None:
                logits = torch.mm(hidden, head.weight.t(), out=out)
            else:
                logits = torch.addmm(head.bias, hidden, head.weight.t(), out=out)
        else:
            logits = head(hidden)  # (N, V) in the model's dtype, a fresh tensor
        if self.logit_multiplier is not None:
            logits.mul_(self.logit_multiplier)
        if self.logit_divisor is not None:
            logits.div_(self.logit_divisor)
        if self.softcap is not None:
            logits.div_(self.softcap).tanh_().mul_(self.softcap)
        return logits

    @property
    def writes_into_buffer(self) -> bool:
        """Whether ``__call__(hidden, out=...)`` fills ``out`` (a plain ``nn.Linear`` head whose
        weight is an ordinary tensor: not offloaded, not sharded by tensor parallelism)."""
        weight = self.lm_head.weight
        plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and not weight.is_meta
        return type(self.lm_head) is torch.nn.Linear and plain

    @property
    def device(self) -> torch.device:
        """Where the head computes: an offloaded head's execution device, else its weight's."""
        hook = getattr(self.lm_head, "_hf_hook", None)
        where = getattr(hook, "execution_device", None)
        return torch.device(where) if where is not None else self.lm_head.weight.device

    def resident(self) -> contextlib.AbstractContextManager[Any]:
        """Within it, an offloaded head's weights are on its execution device: loaded once for
        all the chunks of a batch instead of once per chunk."""
        from accelerate.utils import align_module_device, has_offloaded_params

        if has_offloaded_params(self.lm_head):
            return align_module_device(self.lm_head)
        return contextlib.nullcontext()

    def describe(self) -> str:
        parts = [
            f"{name}={value:g}"
            for name, value in (
                ("hidden/", self.hidden_divisor),
                ("logits*", self.logit_multiplier),
                ("logits/", self.logit_divisor),
                ("softcap", self.softcap),
            )
            if value is not None
        ]
        return "lm_head" + (f" ({', '.join(parts)})" if parts else "")


def logit_head(model: Any) -> LogitHead:
    """The final-logit computation of ``model``, read from its config and modules."""
    config = model.config.get_text_config()
    model_type = str(getattr(config, "model_type", ""))
    head = LogitHead(lm_head=model.get_output_embeddings())
    if model_type.startswith("granite") and getattr(config, "logits_scaling", None):
        head.logit_divisor = float(config.logits_scaling)
    elif model_type.startswith("hyperclovax") and getattr(config, "logits_scaling", None):
        head.logit_multiplier = float(config.logits_scaling)
    elif model_type.startswith("minicpm") and getattr(config, "logits_scaling", None):
        head.hidden_divisor = float(config.logits_scaling)
    elif model_type.startswith("cohere") and getattr(config, "logit_scale", None) is not None:
        head.logit_multiplier = float(config.logit_scale)
    elif model_type == "falcon_h1" and getattr(config, "lm_head_multiplier", None) is not None:
        head.logit_multiplier = float(config.lm_head_multiplier)
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        head.softcap = float(softcap)
    return head


def default_chunk_tokens(
    vocab_size: int,
    budget_bytes: int = DEFAULT_CHUNK_BYTES,
    itemsize: int = 4,
    *,
    cdf: bool = False,
    row_bytes: int = 0,
) -> int:
    """Tokens per chunk so that the chunk's scratch (see ``ChunkScratch``) fits the budget.

    Args:
        itemsize: bytes per logit in the model's dtype.
        cdf: whether a float64 cumulative distribution is kept too (sampled targets).
        row_bytes: further scratch per row that does not scale with the vocabulary.
    """
    per_entry = 8 if itemsize == 4 else itemsize + 8  # logits (+ float32 copy) + log-softmax
    if cdf:
        per_entry += 8
    return max(1, budget_bytes // (vocab_size * per_entry + row_bytes))


class ChunkScratch:
    """Vocab-wide buffers reused from chunk to chunk and batch to batch.

    A fresh (C, V) tensor per chunk costs a page fault per 4 KiB on the CPU (glibc maps blocks of
    32 MiB or more afresh on every allocation): that was most of the target math's time there.
    The buffers hold one chunk: logits in the model's dtype, their float32 copy (not needed for a
    float32 model), the float32 log-softmax and, to sample from it, its float64 cumulative sum.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def get(
        self, name: str, like: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype
    ) -> torch.Tensor:
        """A (rows, V) buffer of ``dtype`` on ``like``'s device; reallocated only to grow."""
        buffer = self._buffers.get(name)
        fits = (
            buffer is not None
            and buffer.dtype == dtype
            and buffer.device == like.device
            and buffer.shape[1] == shape[1]
            and buffer.shape[0] >= shape[0]
        )
        if not fits:
            buffer = self._buffers[name] = torch.empty(shape, dtype=dtype, device=like.device)
        return buffer[: shape[0]]  # (rows, V), contiguous


def head_gap(
    model: Any, head: LogitHead, probe_ids: torch.Tensor, vocab: int | None = None
) -> tuple[float, float]:
    """How far ``head`` is from ``model``'s own final-logit transform, both in float32.

    The model's forward runs on ``probe_ids`` (1, P) with its body's hidden states upcast to
    float32; its output embedding reads them in their own dtype and its output is upcast, so
    everything after the body but the projection runs in float32. ``head`` then runs on those
    same hidden states. The body's rounding and the projection are common to both: what differs
    is what ``head`` repeats (hidden-state scaling, logit scaling, soft-capping), and an error
    far below a low-precision model's own rounding shows.

    Args:
        vocab: compare the log-softmax over the first ``vocab`` ids (None: all).

    Returns:
        The largest log-prob difference, and the largest |logit| of the model's (float32).
    """
    seen: list[torch.Tensor] = []  # the body's (1, P, H) hidden states, upcast
    body_dtype: list[torch.dtype] = []

    def upcast_body(_module: Any, _args: Any, output: Any) -> Any:
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        body_dtype.append(hidden.dtype)
        seen.append(hidden.float())
        if isinstance(output, tuple):
            return (seen[-1], *output[1:])
        output.last_hidden_state = seen[-1]
        return output

    def head_input(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (args[0].to(body_dtype[0]), *args[1:])  # the projection as the model runs it

    def head_output(_module: Any, _args: Any, output: torch.Tensor) -> torch.Tensor:
        return output.float()

    hooks = [
        model.base_model.register_forward_hook(upcast_body),
        head.lm_head.register_forward_pre_hook(head_input),
        head.lm_head.register_forward_hook(head_output),
    ]
    try:
        theirs = model(input_ids=probe_ids, use_cache=False).logits[0].float()  # (P, V)
        if len(seen) != 1:
            raise RuntimeError(f"its forward ran the body {len(seen)} times, not once")
        with head.resident():
            ours = head(seen[0].to(head.device))[0].float()  # (P, V), the model's call shape
    finally:
        for hook in hooks:
            hook.remove()
    theirs, ours = theirs.to(ours.device)[:, :vocab], ours[:, :vocab]  # (P, V')
    a, b = torch.log_softmax(ours, dim=-1), torch.log_softmax(theirs, dim=-1)
    gap = torch.where(a == b, 0.0, a - b).abs().max()  # equal -inf: no gap (not NaN)
    return float(gap), float(theirs.abs().max())


def split_verdict(
    model: Any,
    head: LogitHead,
    logits: torch.Tensor,
    largest_error: Callable[[], float],
    *,
    probe_ids: torch.Tensor,
    vocab: int | None = None,
) -> str | None:
    """Does the chunked body + head reproduce ``model``'s own forward? None when it does.

    Two checks: the whole chunked path against the model's forward, within the rounding of the
    model's dtype; and ``head`` against the model's final-logit transform in float32
    (``head_gap``), within float32 rounding: a bfloat16 logit near 30 rounds by 0.1, a wrong
    transform of 0.05 nats must not pass as rounding.

    Args:
        model: the causal LM.
        head: its ``LogitHead``.
        logits: (P, V) the model's own logits on the probe, which set the tolerance.
        largest_error: runs the chunked path on the probe and returns its largest log-prob
            difference from the model's own log-softmax.
        probe_ids: (1, P) the probe's ids.
        vocab: the ids the log-probs cover (the tokenizer's; None: every row of the head).

    Returns:
        ``None``, or one line saying why the caller must use the model's own forward instead.
    """
    name = type(model).__name__
    dtype = next(model.parameters()).dtype
    tolerance = 1e-3 + 4 * torch.finfo(dtype).eps * float(logits.abs().max())
    try:
        error = largest_error()
        gap, largest = head_gap(model, head, probe_ids, vocab)
    except Exception as e:  # an unusual architecture: the body or head cannot be split off
        return f"cannot split {name} into body and head ({e}); using its own forward"
    if not error <= tolerance:  # NaN too
        return (
            f"chunked {head.describe()} differs from {name}'s own forward by {error:.3g} "
            f"(tolerance {tolerance:.3g}); using its own forward"
        )
    exact = 1e-3 + 4 * torch.finfo(torch.float32).eps * largest
    if not gap <= exact:
        return (
            f"chunked {head.describe()} differs from {name}'s own final-logit transform by "
            f"{gap:.3g} in float32 (tolerance {exact:.3g}); using its own forward"
        )
    return None
