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

from typing import Any

import torch

from kdcache.pipeline.logit_head import ChunkScratch, default_chunk_tokens, logit_head


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
