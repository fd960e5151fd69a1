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

from dataclasses import dataclass, fields
from typing import Any

import torch

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

RAGGED = ("sampled_ids", "sampled_counts", "sampled_logprobs")  # sampled_distinct[r] per row


@dataclass
class RowTargets:
    """The targets of R token rows, on one device; fields the targets kind lacks are ``None``.

    Sampled entries are ragged: row r owns ``sampled_distinct[r]`` consecutive entries, rows in
    order, so the first M = ``sampled_distinct.sum()`` entries of the sampled buffers hold them.
    The buffers are sized for the worst case (R * min(N, V) + 1; the last entry takes writes that
    go nowhere), so they are filled without asking the device for M: no host sync.
    """

    topk_ids: torch.Tensor | None = None  # (R, k) int32
    topk_logprobs: torch.Tensor | None = None  # (R, k) float32, sorted descending
    topk_tail_logprob: torch.Tensor | None = None  # (R,) float32, log of the mass outside
    sampled_distinct: torch.Tensor | None = None  # (R,) int32, >= 1
    sampled_ids: torch.Tensor | None = None  # (capacity,) int32, ascending per row
    sampled_counts: torch.Tensor | None = None  # (capacity,) int32, a row's sum to N
    sampled_logprobs: torch.Tensor | None = None  # (capacity,) float32
    filled: torch.Tensor | None = None  # () int64 on the device: sampled entries written so far

    @classmethod
    def empty(
        cls, rows: int, top_k: int, samples: int, vocab: int, device: torch.device
    ) -> RowTargets:
        out = cls()
        if top_k:
            out.topk_ids = torch.empty((rows, top_k), dtype=torch.int32, device=device)
            out.topk_logprobs = torch.empty((rows, top_k), dtype=torch.float32, device=device)
            out.topk_tail_logprob = torch.empty(rows, dtype=torch.float32, device=device)
        if samples:
            capacity = rows * min(samples, vocab) + 1
            out.sampled_distinct = torch.empty(rows, dtype=torch.int32, device=device)
            # only the first M entries are ever written or read: no need to touch the rest
            out.sampled_ids = torch.empty(capacity, dtype=torch.int32, device=device)
            out.sampled_counts = torch.empty(capacity, dtype=torch.int32, device=device)
            out.sampled_logprobs = torch.empty(capacity, dtype=torch.float32, device=device)
            out.filled = torch.zeros((), dtype=torch.int64, device=device)
        return out

    def arrays(self) -> dict[str, torch.Tensor]:
        """The stored fields that this targets kind has, by name (``filled`` is not one)."""
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name != "filled" and getattr(self, f.name) is not None
        }

    def compact(self, logprob_dtype: torch.dtype, samples: int) -> RowTargets:
        """The same targets in the dtypes that travel to the host: log-probs in the store's
        float type, counts as uint8 when N <= 255. On the CPU, where M costs no device sync,
        the sampled buffers are cut to their M entries first."""
        count_dtype = torch.uint8 if samples <= 255 else torch.int32
        casts = {"topk_logprobs": logprob_dtype, "sampled_logprobs": logprob_dtype}
        casts |= {"sampled_distinct": count_dtype, "sampled_counts": count_dtype}
        arrays = self.arrays()
        if self.filled is not None and self.filled.device.type == "cpu":
            m = int(self.filled)
            arrays |= {name: arrays[name][:m] for name in RAGGED}
        return RowTargets(
            **{name: values.to(casts.get(name, values.dtype)) for name, values in arrays.items()}
        )

    def put_samples(
        self,
        at: slice,
        distinct: torch.Tensor,
        unique: torch.Tensor,
        counts: torch.Tensor,
        logprobs: torch.Tensor,
    ) -> None:
        """Append the draws of rows ``at`` (C rows, in order after the rows before them):
        distinct (C,), and unique ids, counts and log-probs (C, N) left-aligned."""
        assert self.sampled_distinct is not None and self.filled is not None
        assert self.sampled_ids is not None
        n = unique.shape[1]
        column = torch.arange(n, device=unique.device)  # (N,)
        ends = distinct.cumsum(0)  # (C,) inclusive
        target = self.filled + (ends - distinct)[:, None] + column  # (C, N)
        spill = self.sampled_ids.shape[0] - 1
        target = torch.where(column < distinct[:, None], target, spill)
        for buffer, values in (
            (self.sampled_ids, unique),
            (self.sampled_counts, counts),
            (self.sampled_logprobs, logprobs),
        ):
            assert buffer is not None
            buffer.index_copy_(0, target.view(-1), values.reshape(-1).to(buffer.dtype))
        self.sampled_distinct[at] = distinct
        self.filled += ends[-1]

    def put_topk(
        self, at: slice, values: torch.Tensor, ids: torch.Tensor, tail: torch.Tensor
    ) -> None:
        """The top-k of rows ``at``: log-probs and ids (C, k), the tail's log-mass (C,)."""
        assert self.topk_ids is not None and self.topk_logprobs is not None
        assert self.topk_tail_logprob is not None
        self.topk_logprobs[at], self.topk_ids[at], self.topk_tail_logprob[at] = values, ids, tail


@dataclass
class TargetSpec:
    """What to compute per position: top-k (k > 0) and/or N draws (N > 0) with a seed."""

    top_k: int = 0
    samples: int = 0
    seed: int = 0
    # ids the tokenizer can produce; rows of a padded embedding beyond them are masked out of
    # the softmax (probability 0: never in the top-k, never drawn). None: every row is real.
    real_vocab: int | None = None


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
        if spec.samples:
            assert keys is not None, "sampling needs the rows' position keys"
            u = uniforms(spec.seed, keys[start:stop], spec.samples)  # (C, N) float64
            cdf = scratch.get("cdf", chunk, tuple(chunk.shape), torch.float64)  # (C, V)
            distinct, unique, counts = distinct_counts(draw(chunk, u, cdf))  # (C,), (C, N) x 2
            out.put_samples(at, distinct, unique, counts, chunk.gather(-1, unique))
        if spec.top_k:  # last: it overwrites the chunk
            out.put_topk(at, *topk_and_tail(chunk, spec.top_k))
    assert out is not None
    return out


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
    """

    def __init__(
        self,
        model: Any,
        top_k: int = 0,
        samples: int = 0,
        seed: int = 0,
        chunk_tokens: int | None = None,
        real_vocab: int | None = None,
    ) -> None:
        assert top_k or samples, "nothing to compute"
        self.model = model
        self.spec = TargetSpec(top_k, samples, seed, real_vocab)
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
        self, input_ids: torch.Tensor, keys: torch.Tensor | None, rows: torch.Tensor | None
    ) -> RowTargets:
        b, s = input_ids.shape
        hidden = self.model.base_model(input_ids=input_ids, use_cache=False).last_hidden_state
        at = self.head.device  # where the head computes (a split model's last device)
        hidden = hidden.reshape(b * s, -1).to(at)  # (B*S, H)
        if keys is not None:
            keys = keys.reshape(b * s, -1).to(at)  # (B*S, 4)
        if rows is not None:  # only the positions a student trains on: (R, H), (R, 4)
            flat = rows.reshape(-1).to(at)
            hidden = hidden[flat]
            keys = None if keys is None else keys[flat]
        with self.head.resident():
            return chunked_targets(
                hidden, self.head, self.spec, self.chunk_tokens, keys=keys, scratch=self.scratch
            )

    def _model_forward(
        self, input_ids: torch.Tensor, keys: torch.Tensor | None, rows: torch.Tensor | None
    ) -> RowTargets:
        b, s = input_ids.shape
        total = b * s if rows is None else int(rows.sum())
        out = None
        done = 0
        for row in range(b):  # one row's (S, V) logits at a time
            logits = self.model(input_ids=input_ids[row][None], use_cache=False).logits[0]
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
        return out

    @torch.inference_mode()
    def __call__(
        self,
        input_ids: torch.Tensor,
        keys: torch.Tensor | None = None,
        rows: torch.Tensor | None = None,
    ) -> RowTargets:
        """Targets of the positions ``rows`` selects (all when None), row-major.

        Args:
            input_ids: (B, S) ids; right padding is harmless (causal attention: a position
                never sees the ones after it), as long as ``rows`` leaves the padding out.
            keys: (B, S, 4) position keys (to sample).
            rows: (B, S) bool, the positions to compute.

        Returns:
            targets of R = rows.sum() (or B * S) rows, in row-major position order.
        """
        if self.use_model_forward:
            return self._model_forward(input_ids, keys, rows)
        return self._chunked(input_ids, keys, rows)

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
