"""Exact teacher targets (top-k and/or samples) without a float32 [batch, seq, vocab] tensor.

The decoder body runs once per batch and gives the final hidden states (B, S, H). The vocabulary
projection, the architecture's own final-logit transform, a float32 log-softmax over the full
vocabulary and, from that one log-softmax, the top-k with its exact tail mass and the sampled
draws then run per chunk of tokens, on the device. Peak memory is one chunk's worth of
vocab-wide floats, whatever the batch size.

Exactness is checked, not assumed: ``TeacherTargets.self_check`` compares the chunked path with
the model's own ``forward`` on a probe sequence and falls back to that forward (one row at a time)
when they disagree, e.g. for a remote-code model with a final-logit transform we do not know.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kdcache.pipeline.cache.row_targets import RowTargets
from kdcache.pipeline.cache.sampling import (
    distinct_counts,
    draw,
    scratch_bytes_per_row,
    uniforms,
)
from kdcache.pipeline.logit_head import (
    ChunkScratch,
    default_chunk_tokens,
    logit_head,
    split_verdict,
)


@dataclass
class TargetSpec:
    """What to compute per position: top-k (k > 0) and/or N draws (N > 0) with a seed, from the
    teacher at ``temperature`` (the log-probs stored beside them stay those at T = 1)."""

    top_k: int = 0
    samples: int = 0
    seed: int = 0
    # ids the tokenizer can produce; rows of a padded embedding beyond them are masked out of
    # the softmax (probability 0: never in the top-k, never drawn). None: every row is real.
    real_vocab: int | None = None
    temperature: float = 1.0


def chunked_targets(
    hidden: torch.Tensor,
    head: Any,
    spec: TargetSpec,
    chunk_tokens: int,
    *,
    keys: torch.Tensor | None = None,
    scratch: ChunkScratch | None = None,
    out: RowTargets | None = None,
    row_offset: int = 0,
    next_ids: torch.Tensor | None = None,
) -> RowTargets:
    """Targets from ``log_softmax(head(hidden))`` over the full vocabulary, a chunk at a time.

    Args:
        hidden: (R, H) final hidden states, or (R, V) logits when ``head`` is the identity.
        head: hidden (C, H) -> logits (C, V); a ``LogitHead`` writes into a reused buffer.
        spec: what to compute.
        chunk_tokens: rows per chunk.
        keys: (R, 4) int64 position keys, needed to sample (see ``sampling.uniforms``).
        scratch: buffers to reuse across calls (a fresh set when ``None``).
        out: where to write rows ``row_offset..row_offset+R`` (fresh targets when ``None``).
        next_ids: (R,) int64, the token after each row (-1: none); its log-prob goes to
            ``out.next_token_logprob`` (R,) (NaN for -1).

    Returns:
        ``out``: top-k ids (R, k) and log-probs sorted descending, the log of the mass outside
        the top-k (R,), and the ragged samples, on the device.
    """
    scratch = ChunkScratch() if scratch is None else scratch
    n = hidden.shape[0]
    weight = head.lm_head.weight if getattr(head, "writes_into_buffer", False) else None
    for start in range(0, n, chunk_tokens):
        stop = min(start + chunk_tokens, n)
        rows = hidden[start:stop]
        if weight is not None:
            shape = (stop - start, int(weight.shape[0]))
            logits = head(rows, out=scratch.get("logits", rows, shape, weight.dtype))  # (C, V)
        else:
            logits = head(rows)  # (C, V)
        if out is None:
            out = RowTargets.empty(n, spec.top_k, spec.samples, logits.shape[-1], logits.device)
        if next_ids is not None and out.next_token_logprob is None:
            out.next_token_logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
        if logits.dtype != torch.float32:
            logits = scratch.get("float32", logits, tuple(logits.shape), torch.float32).copy_(
                logits
            )
        if spec.real_vocab is not None and spec.real_vocab < logits.shape[-1]:
            logits[:, spec.real_vocab :] = float("-inf")  # padded embedding rows
        # the model's own kernel, so the values are the reference's to the last bit
        chunk = scratch.get("logprobs", logits, tuple(logits.shape), torch.float32)
        torch.log_softmax(logits, dim=-1, out=chunk)  # (C, V)
        at = slice(row_offset + start, row_offset + stop)
        if next_ids is not None:
            assert out.next_token_logprob is not None
            out.next_token_logprob[at] = gather_next(chunk, next_ids[start:stop])
        if spec.samples:
            assert keys is not None, "sampling needs the rows' position keys"
            u = uniforms(spec.seed, keys[start:stop], spec.samples)  # (C, N) float64
            cdf = scratch.get("cdf", chunk, tuple(chunk.shape), torch.float64)  # (C, V)
            ids = draw(chunk, u, cdf, spec.temperature)  # (C, N)
            distinct, unique, counts = distinct_counts(ids)  # (C,), (C, N) x 2
            out.put_samples(at, distinct, unique, counts, chunk.gather(-1, unique))
        if spec.top_k:  # last: it overwrites the chunk
            out.put_topk(at, *topk_and_tail(chunk, spec.top_k))
    assert out is not None
    return out


def gather_next(logprobs: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """(C,) float32: row r's log-prob of ``next_ids[r]`` from log-softmax rows (C, V); NaN
    where ``next_ids`` is -1 (no next token)."""
    got = logprobs.gather(-1, next_ids.clamp(min=0).to(logprobs.device)[:, None])[:, 0]  # (C,)
    return torch.where(next_ids.to(got.device) >= 0, got, float("nan"))


def topk_and_tail(chunk: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The top-k of log-softmax rows ``chunk`` (C, V) and the log of the mass outside it.

    The tail is a logsumexp over the other ids (never log(1 - sum exp), which rounds a tiny
    tail to log 0), shifted by their largest log-prob, the (k+1)-th, so that even a tail far
    below the top-1 does not underflow. Overwrites ``chunk``.

    Returns:
        log-probs (C, k) sorted descending, their ids (C, k), the tail (C,) (-inf when k = V).
    """
    vocab = chunk.shape[-1]
    values, ids = torch.topk(chunk, min(k + 1, vocab), dim=-1, sorted=True)  # (C, k+1)
    if k == vocab:
        return values, ids, torch.full_like(values[:, 0], float("-inf"))
    shift = values[:, k:]  # (C, 1) the largest log-prob outside the top-k
    mass = chunk.sub_(shift).exp_().scatter_(-1, ids[:, :k], 0.0).sum(-1)  # (C,) >= 1
    tail = torch.where(shift[:, 0] > float("-inf"), shift[:, 0] + mass.log(), shift[:, 0])
    return values[:, :k], ids[:, :k], tail


def chunked_topk(
    hidden: torch.Tensor,
    head: Any,
    top_k: int,
    chunk_tokens: int,
    scratch: ChunkScratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``log_softmax(head(hidden))``: ids (R, k) int32, logprobs (R, k) float32."""
    out = chunked_targets(hidden, head, TargetSpec(top_k=top_k), chunk_tokens, scratch=scratch)
    assert out.topk_ids is not None and out.topk_logprobs is not None
    return out.topk_ids, out.topk_logprobs


class TeacherTargets:
    """Computes the stored targets of a batch: (B, S) input ids -> ``RowTargets`` of B * S rows.

    Args:
        model: a causal LM in eval mode.
        top_k: k (0: no top-k).
        samples: draws N per position (0: no samples).
        seed: the seed of the draws.
        chunk_tokens: rows per chunk of the vocab-wide computation (default: 128 MiB of scratch).
        real_vocab: the tokenizer's size when the embedding is padded beyond it (those rows get
            probability 0); None when every row is a real id.
        sample_temperature: T > 0, the draws come from the teacher at T.
    """

    def __init__(
        self,
        model: Any,
        top_k: int = 0,
        samples: int = 0,
        seed: int = 0,
        chunk_tokens: int | None = None,
        real_vocab: int | None = None,
        sample_temperature: float = 1.0,
    ) -> None:
        assert top_k or samples, "nothing to compute"
        self.model = model
        self.spec = TargetSpec(top_k, samples, seed, real_vocab, sample_temperature)
        self.head = logit_head(model)
        weight = self.head.lm_head.weight
        vocab, itemsize = int(weight.shape[0]), weight.element_size()
        self.chunk_tokens = chunk_tokens or default_chunk_tokens(
            vocab, itemsize=itemsize, cdf=samples > 0, row_bytes=scratch_bytes_per_row(samples)
        )
        self.scratch = ChunkScratch()
        self.use_model_forward = False  # set by self_check when the chunked path disagrees

    @property
    def method(self) -> str:
        if self.use_model_forward:
            return "model forward, one row at a time"
        return f"decoder body + chunked {self.head.describe()}"

    def _chunked(
        self,
        input_ids: torch.Tensor,
        keys: torch.Tensor | None,
        rows: torch.Tensor | None,
        next_ids: torch.Tensor | None = None,
    ) -> RowTargets:
        b, s = input_ids.shape
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        at = self.head.device  # where the head computes (a split model's last device)
        hidden = every = hidden.reshape(b * s, -1).to(at)  # (B*S, H)
        nxt = None if next_ids is None else next_ids.reshape(-1).to(at)  # (B*S,)
        if keys is not None:
            keys = keys.reshape(b * s, -1).to(at)  # (B*S, 4)
        flat = None
        if rows is not None:  # only the positions a student trains on: (R, H), (R, 4)
            flat = rows.reshape(-1).to(at)
            hidden = hidden[flat]
            keys = None if keys is None else keys[flat]
        with self.head.resident():
            out = chunked_targets(
                hidden,
                self.head,
                self.spec,
                self.chunk_tokens,
                keys=keys,
                scratch=self.scratch,
                next_ids=nxt if nxt is None or flat is None else nxt[flat],
            )
            if nxt is not None and flat is not None:  # untrained positions: the head only
                out.next_token_logprob = self._every_position(out, every, nxt, flat)
        return out

    def _every_position(
        self, out: RowTargets, hidden: torch.Tensor, nxt: torch.Tensor, flat: torch.Tensor
    ) -> torch.Tensor:
        """(P,) next-token log-probs of all P = B*S positions: the trained rows' from ``out``,
        the others' from the same head and log-softmax (no top-k, no draws), NaN without a
        next token."""
        assert out.next_token_logprob is not None
        full = torch.full(nxt.shape, float("nan"), dtype=torch.float32, device=nxt.device)
        full[flat] = out.next_token_logprob
        rest = (nxt >= 0) & ~flat  # (P,)
        if bool(rest.any()):
            alone = chunked_targets(
                hidden[rest],
                self.head,
                TargetSpec(real_vocab=self.spec.real_vocab),
                self.chunk_tokens,
                scratch=self.scratch,
                next_ids=nxt[rest],
            )
            assert alone.next_token_logprob is not None
            full[rest] = alone.next_token_logprob
        return full

    def _model_forward(
        self,
        input_ids: torch.Tensor,
        keys: torch.Tensor | None,
        rows: torch.Tensor | None,
        next_ids: torch.Tensor | None = None,
    ) -> RowTargets:
        b, s = input_ids.shape
        total = b * s if rows is None else int(rows.sum())
        out = None
        done = 0
        positions: list[torch.Tensor] = []  # (S,) per row
        for row in range(b):  # one row's (S, V) logits at a time
            logits = self.model(input_ids=input_ids[row][None], use_cache=False).logits[0]
            if next_ids is not None:  # every position's, from the same logits (S, V)
                lp = self._position_logprobs(logits, next_ids[row])
                positions.append(lp)
            row_keys = None if keys is None else keys[row]  # (S, 4)
            if rows is not None:
                logits = logits[rows[row]]  # (R_b, V)
                row_keys = None if row_keys is None else row_keys[rows[row]]
            if out is None:
                vocab = logits.shape[-1]
                spec = self.spec
                out = RowTargets.empty(total, spec.top_k, spec.samples, vocab, logits.device)
            chunked_targets(
                logits,
                _identity,
                self.spec,
                self.chunk_tokens,
                keys=row_keys,
                scratch=self.scratch,
                out=out,
                row_offset=done,
            )
            done += logits.shape[0]
        assert out is not None
        if positions:
            out.next_token_logprob = torch.cat(positions)  # (B*S,)
        return out

    def _position_logprobs(self, logits: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
        """(S,) log-probs of ``next_ids`` (S,) (-1: NaN) from one row's logits (S, V)."""
        logits = logits.float()
        real = self.spec.real_vocab
        if real is not None and real < logits.shape[-1]:
            logits = logits.clone()
            logits[:, real:] = float("-inf")
        return gather_next(torch.log_softmax(logits, dim=-1), next_ids)

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        keys: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
        next_ids: torch.Tensor | None = None,
    ) -> RowTargets:
        """Targets of the positions ``rows`` selects (all when None), row-major.

        Args:
            input_ids: (B, S) ids; right padding is harmless (causal attention: a position
                never sees the ones after it), as long as ``rows`` leaves the padding out.
            keys: (B, S, 4) position keys (to sample).
            rows: (B, S) bool, the positions to compute.
            next_ids: (B, S) int64, the token after each position in its sequence (-1: none);
                given, ``next_token_logprob`` holds its log-prob at every position (B*S,).

        Returns:
            targets of R = rows.sum() (or B * S) rows, in row-major position order.
        """
        if self.use_model_forward:
            return self._model_forward(input_ids, keys, rows, next_ids)
        return self._chunked(input_ids, keys, rows, next_ids)

    @torch.inference_mode()
    def self_check(self, probe_ids: torch.Tensor) -> str | None:
        """Compare the chunked path with the model's own forward on ``probe_ids`` (1, P).

        Returns:
            ``None`` when they agree; otherwise a one-line explanation, and every later call
            uses the model's own forward.
        """
        logits = self.model(input_ids=probe_ids, use_cache=False).logits[0]  # (P, V)
        logits = logits.float().to(self.head.device)
        real = self.spec.real_vocab
        masked = logits
        if real is not None and real < logits.shape[-1]:  # as the chunked path masks padding
            masked = logits.clone()
            masked[:, real:] = float("-inf")
        reference = torch.log_softmax(masked, dim=-1)  # (P, V)
        keys = torch.zeros((*probe_ids.shape, 4), dtype=torch.int64, device=probe_ids.device)
        note = split_verdict(
            self.model,
            self.head,
            logits,
            lambda: _largest_error(
                self._chunked(probe_ids, keys, None), reference, self.spec.top_k
            ),
            probe_ids=probe_ids,
            vocab=real,
        )
        self.use_model_forward = note is not None
        return note


def _largest_error(got: RowTargets, reference: torch.Tensor, top_k: int) -> float:
    """The largest difference of any computed log-prob from the reference log-softmax (P, V)."""
    errors = []
    if got.topk_ids is not None and got.topk_logprobs is not None:
        ids = got.topk_ids.long()  # (P, k)
        errors.append((reference.gather(-1, ids) - got.topk_logprobs).abs().max())
        errors.append((reference.topk(top_k, dim=-1).values - got.topk_logprobs).abs().max())
        if got.topk_tail_logprob is not None and top_k < reference.shape[-1]:
            outside = reference.scatter(-1, ids, float("-inf")).logsumexp(-1)  # (P,)
            errors.append((outside - got.topk_tail_logprob).abs().max())
    distinct, drawn, logprobs = got.sampled_distinct, got.sampled_ids, got.sampled_logprobs
    if distinct is not None and drawn is not None and logprobs is not None:
        m = int(distinct.sum())
        rows = torch.repeat_interleave(distinct.long())  # (M,) the row of each entry
        errors.append((reference[rows, drawn[:m].long()] - logprobs[:m]).abs().max())
    return float(torch.stack(errors).max())


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x
