"""Exact top-k teacher targets without a float32 [batch, seq, vocab] tensor.

The decoder body runs once per batch and gives the final hidden states (B, S, H). The vocabulary
projection, the architecture's own final-logit transform, a float32 log-softmax over the full
vocabulary and the top-k then run per chunk of tokens, on the device. Peak memory is one chunk's
worth of vocab-wide floats, whatever the batch size.

Exactness is checked, not assumed: ``TopkTargets.self_check`` compares the chunked path with the
model's own ``forward`` on a probe sequence and falls back to that forward (one row at a time) when
they disagree, e.g. for a remote-code model with a final-logit transform we do not know.
"""

from __future__ import annotations

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
        """Whether ``__call__(hidden, out=...)`` fills ``out`` (a plain ``nn.Linear`` head)."""
        return type(self.lm_head) is torch.nn.Linear

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
    vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES, itemsize: int = 4
) -> int:
    """Tokens per chunk so that the chunk's scratch (see ``ChunkScratch``) fits the budget."""
    per_row = vocab_size * (8 if itemsize == 4 else itemsize + 8)
    return max(1, budget_bytes // per_row)


class ChunkScratch:
    """Vocab-wide buffers reused from chunk to chunk and batch to batch.

    A fresh (C, V) tensor per chunk costs a page fault per 4 KiB on the CPU (glibc maps blocks of
    32 MiB or more afresh on every allocation): that was most of the target math's time there.
    The buffers hold one chunk: logits in the model's dtype, their float32 copy (not needed for a
    float32 model) and the float32 log-softmax.
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


def chunked_topk(
    hidden: torch.Tensor,
    head: Any,
    top_k: int,
    chunk_tokens: int,
    scratch: ChunkScratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(head(hidden))`` over the full vocabulary, one token chunk at a time.

    Args:
        hidden: (N, H) final hidden states, or (N, V) logits when ``head`` is the identity.
        head: hidden (C, H) -> logits (C, V); a ``LogitHead`` writes into a reused buffer.
        top_k: k.
        chunk_tokens: rows per chunk.
        scratch: buffers to reuse across calls (a fresh set when ``None``).

    Returns:
        ids (N, k) int32 and logprobs (N, k) float32, sorted descending per row, on the device.
    """
    scratch = ChunkScratch() if scratch is None else scratch
    n = hidden.shape[0]
    ids = torch.empty((n, top_k), dtype=torch.int32, device=hidden.device)
    logprobs = torch.empty((n, top_k), dtype=torch.float32, device=hidden.device)
    weight = head.lm_head.weight if getattr(head, "writes_into_buffer", False) else None
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        rows = hidden[start:stop]
        if weight is not None:
            shape = (stop - start, int(weight.shape[0]))
            logits = head(rows, out=scratch.get("logits", rows, shape, weight.dtype))  # (C, V)
        else:
            logits = head(rows)  # (C, V)
        if logits.dtype != torch.float32:
            logits = scratch.get("float32", logits, tuple(logits.shape), torch.float32).copy_(
                logits
            )
        # the model's own kernel, so the values are the reference's to the last bit
        chunk = scratch.get("logprobs", logits, tuple(logits.shape), torch.float32)
        torch.log_softmax(logits, dim=-1, out=chunk)  # (C, V)
        values, indices = torch.topk(chunk, top_k, dim=-1, sorted=True)  # (C, k)
        logprobs[start:stop] = values
        ids[start:stop] = indices
    return ids, logprobs


class TopkTargets:
    """Computes the stored targets of a batch: (B, S) input ids -> (B, S, k) ids and logprobs.

    Args:
        model: a causal LM in eval mode.
        top_k: k.
        chunk_tokens: rows per chunk of the vocab-wide computation (default: 128 MiB of floats).
    """

    def __init__(self, model: Any, top_k: int, chunk_tokens: int | None = None) -> None:
        self.model = model
        self.top_k = top_k
        self.head = logit_head(model)
        weight = self.head.lm_head.weight
        vocab, itemsize = int(weight.shape[0]), weight.element_size()
        self.chunk_tokens = chunk_tokens or default_chunk_tokens(vocab, itemsize=itemsize)
        self.scratch = ChunkScratch()
        self.use_model_forward = False  # set by self_check when the chunked path disagrees

    @property
    def method(self) -> str:
        if self.use_model_forward:
            return "model forward, one row at a time"
        return f"decoder body + chunked {self.head.describe()}"

    def _chunked(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s = input_ids.shape
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        ids, logprobs = chunked_topk(
            hidden.reshape(b * s, -1), self.head, self.top_k, self.chunk_tokens, self.scratch
        )
        return ids.view(b, s, -1), logprobs.view(b, s, -1)  # (B, S, k)

    def _model_forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows_ids, rows_logprobs = [], []
        for row in input_ids:  # (S,): one row's (S, V) logits at a time
            logits = self.model(input_ids=row[None], use_cache=False).logits[0]  # (S, V)
            ids, logprobs = chunked_topk(
                logits, _identity, self.top_k, self.chunk_tokens, self.scratch
            )
            rows_ids.append(ids)
            rows_logprobs.append(logprobs)
        return torch.stack(rows_ids), torch.stack(rows_logprobs)  # (B, S, k)

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, S) -> ids (B, S, k) int32, logprobs (B, S, k) float32, on the model's device."""
        if self.use_model_forward:
            return self._model_forward(input_ids)
        return self._chunked(input_ids)

    @torch.inference_mode()
    def self_check(self, probe_ids: torch.Tensor) -> str | None:
        """Compare the chunked path with the model's own forward on ``probe_ids`` (1, P).

        Returns:
            ``None`` when they agree; otherwise a one-line explanation, and every later call
            uses the model's own forward.
        """
        logits = self.model(input_ids=probe_ids, use_cache=False).logits[0].float()  # (P, V)
        reference = torch.log_softmax(logits, dim=-1)  # (P, V)
        dtype = next(self.model.parameters()).dtype
        tolerance = 1e-3 + 4 * torch.finfo(dtype).eps * float(logits.abs().max())
        try:
            ids, logprobs = self._chunked(probe_ids)
            ids, logprobs = ids[0].long(), logprobs[0]  # (P, k)
            error = max(
                float((reference.gather(-1, ids) - logprobs).abs().max()),
                float((reference.topk(self.top_k, dim=-1).values - logprobs).abs().max()),
            )
        except Exception as e:  # an unusual architecture: the body or head cannot be split off
            self.use_model_forward = True
            return f"cannot split {type(self.model).__name__} into body and head ({e}); using its own forward"
        if error > tolerance:
            self.use_model_forward = True
            return (
                f"chunked {self.head.describe()} differs from {type(self.model).__name__}'s own "
                f"forward by {error:.3g} (tolerance {tolerance:.3g}); using its own forward"
            )
        return None


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
