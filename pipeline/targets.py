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

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.hidden_divisor is not None:
            hidden = hidden / self.hidden_divisor
        logits = self.lm_head(hidden)  # (N, V) in the model's dtype
        if self.logit_multiplier is not None:
            logits = logits * self.logit_multiplier
        if self.logit_divisor is not None:
            logits = logits / self.logit_divisor
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits

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


def default_chunk_tokens(vocab_size: int, budget_bytes: int = DEFAULT_CHUNK_BYTES) -> int:
    """Tokens per chunk so that the logits (model dtype) plus their float32 copy fit the budget."""
    return max(1, budget_bytes // (vocab_size * 8))


def chunked_topk(
    hidden: torch.Tensor, head: Any, top_k: int, chunk_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(head(hidden))`` over the full vocabulary, one token chunk at a time.

    Args:
        hidden: (N, H) final hidden states, or (N, V) logits when ``head`` is the identity.
        head: hidden (C, H) -> logits (C, V).
        top_k: k.
        chunk_tokens: rows per chunk.

    Returns:
        ids (N, k) int32 and logprobs (N, k) float32, sorted descending per row, on the device.
    """
    n = hidden.shape[0]
    ids = torch.empty((n, top_k), dtype=torch.int32, device=hidden.device)
    logprobs = torch.empty((n, top_k), dtype=torch.float32, device=hidden.device)
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        logits = head(hidden[start:stop]).float()  # (C, V)
        # log_softmax(x) = x - logsumexp(x): the top-k of x are the top-k of its log-softmax,
        # so only the k winners are shifted and no second (C, V) tensor is allocated.
        lse = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, 1)
        values, indices = torch.topk(logits, top_k, dim=-1, sorted=True)  # (C, k)
        logprobs[start:stop] = values - lse
        ids[start:stop] = indices
        del logits
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
        vocab = int(self.head.lm_head.weight.shape[0])
        self.chunk_tokens = chunk_tokens or default_chunk_tokens(vocab)
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
            hidden.reshape(b * s, -1), self.head, self.top_k, self.chunk_tokens
        )
        return ids.view(b, s, -1), logprobs.view(b, s, -1)  # (B, S, k)

    def _model_forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows_ids, rows_logprobs = [], []
        for row in input_ids:  # (S,): one row's (S, V) logits at a time
            logits = self.model(input_ids=row[None], use_cache=False).logits[0]  # (S, V)
            ids, logprobs = chunked_topk(logits, _identity, self.top_k, self.chunk_tokens)
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
