"""The targets of R token rows as device buffers: top-k rows, and the samples as ragged
entries filled without a host sync; compacted to the dtypes that travel to the host."""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

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
    # per position, not per row: (B*S,) float32, log p(tokens[t+1]) at t, NaN without a next
    # token in the sequence (its last position, padding)
    next_token_logprob: torch.Tensor | None = None

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
        casts["next_token_logprob"] = logprob_dtype
        casts |= {"sampled_distinct": count_dtype, "sampled_counts": count_dtype}
        arrays = self.arrays()
        if self.next_token_logprob is not None:  # finite in the store's dtype (NaN stays)
            floor = torch.finfo(logprob_dtype).min
            arrays["next_token_logprob"] = self.next_token_logprob.clamp(min=floor)
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
