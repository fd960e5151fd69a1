"""Which sequence comes when: one global order per epoch, and the rule that deals it to ranks.

**The stream.** Epoch ``e`` of a split of N sequences is one permutation of them,
``epoch_order(counts, seed, e)``, a function of (seed, epoch) and the shards' sequence counts
alone — never of the number of processes or decoding threads:

1. the shards are permuted with ``(seed, epoch)``;
2. each shard's sequences are permuted and placed shard after shard (shard-sized runs: a reader
   decodes each shard once);
3. the result is cut into windows of ``window`` sequences (the boundaries shifted by a seeded
   offset each epoch) and each window is permuted, which mixes neighbouring shards.

The epochs follow each other into one endless stream: position ``p`` holds sequence
``order(p // N)[p % N]``. A loader's position is the number of positions consumed — global,
the same on every rank — so a run resumed with other ranks or threads continues the same stream.

**The deal.** The stream is cut into global micro-batches of B positions (micro-batch ``m`` =
positions ``[m·B, (m+1)·B)``), and which rank reads a position depends on that position alone
(``Deal``):

- ``rows`` (training): every rank takes its rows of every micro-batch — rank r of R the offsets
  ``[lo_r, hi_r)``, ``lo_r = r·(B // R) + min(r, B % R)`` (the first ``B % R`` ranks one row
  more) — so one optimizer step sees the same sequences for any R;
- ``batches`` (eval): rank r takes the whole micro-batches ``m ≡ r (mod R)``, so each is the
  batch a single process would see.

A rank's decoding threads share its reads (``shard_feed.py``): the number of threads never
changes what is read.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def epoch_order(
    counts: list[int], *, seed: int, epoch: int, shuffle: bool, window: int
) -> np.ndarray:
    """(N,) int64: the split's sequences in epoch ``epoch``'s order, as global indices into the
    shards' stored order (shard i's sequences are ``starts[i] .. starts[i+1]-1``)."""
    n = int(sum(counts))
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([seed, epoch])
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)  # (S+1,)
    # shards in a random order, each shard's sequences in a random order
    runs = [starts[i] + rng.permutation(counts[i]) for i in rng.permutation(len(counts))]
    order = np.concatenate(runs) if runs else np.zeros(0, dtype=np.int64)  # (N,)
    if window <= 1 or n <= 1:
        return order
    # windows of ``window`` places, the first one ``offset`` places short: each permuted by
    # sorting random keys per row; the places before 0 and after N get keys that sort last
    offset = int(rng.integers(window))
    rows = -(-(offset + n) // window)
    keys = rng.random(rows * window)  # (rows·window,)
    keys[:offset] = keys[offset + n :] = 2.0
    places = np.argsort(keys.reshape(rows, window), axis=1) + window * np.arange(rows)[:, None]
    places = places.reshape(-1)
    return order[places[(places >= offset) & (places < offset + n)] - offset]


@dataclass(frozen=True)
class Deal:
    """How the micro-batches of the stream are dealt to the ranks.

    Attributes:
        batch: B, positions per global micro-batch.
        rank, ranks: this rank and the number of ranks (R).
        rows: True — every rank takes rows of every micro-batch (training); False — whole
            micro-batches, round-robin over ranks (eval).
    """

    batch: int
    rank: int = 0
    ranks: int = 1
    rows: bool = True

    def __post_init__(self) -> None:
        if self.rows and self.batch < self.ranks:
            raise ValueError(
                f"a micro-batch of {self.batch} sequences cannot be split over {self.ranks} ranks"
            )

    @property
    def span(self) -> tuple[int, int]:
        """[lo, hi): this rank's offsets inside each of its micro-batches."""
        if not self.rows:
            return 0, self.batch
        share, extra = divmod(self.batch, self.ranks)
        lo = self.rank * share + min(self.rank, extra)
        return lo, lo + share + (self.rank < extra)

    def consumed_after(self, micro_batch: int) -> int:
        """The stream position once this rank (and, in lockstep, every rank) has taken
        ``micro_batch``: the end of its micro-batch, or of its round of R micro-batches."""
        if self.rows:
            return (micro_batch + 1) * self.batch
        return (micro_batch // self.ranks + 1) * self.ranks * self.batch

    def last_position(self, micro_batch: int) -> int:
        """The last stream position this rank reads of ``micro_batch`` (one of its own)."""
        return micro_batch * self.batch + self.span[1] - 1

    def positions(self, first: int, stop: int) -> np.ndarray:
        """(n,) int64 ascending: the stream positions in ``[first, stop)`` this rank reads."""
        if stop <= first:
            return np.zeros(0, dtype=np.int64)
        b = self.batch
        every, phase = (1, 0) if self.rows else (self.ranks, self.rank)  # the rank's micro-batches
        m_first, m_last = first // b, (stop - 1) // b
        ms = np.arange(m_first + (phase - m_first) % every, m_last + 1, every, dtype=np.int64)
        lo, hi = self.span
        pos = (ms[:, None] * b + np.arange(lo, hi, dtype=np.int64)[None, :]).reshape(-1)  # (n,)
        return pos[(pos >= first) & (pos < stop)]
