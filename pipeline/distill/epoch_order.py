"""The order in which one epoch of a split leaves the loader, computed from sequence counts alone.

Order of one epoch, for one *slot* (= one DataLoader worker of one Accelerate rank):

1. the split's committed shards are permuted with ``(seed, epoch)``;
2. with at least as many shards as slots, shard ``j`` of that order goes to slot ``j % slots``;
   with fewer shards than slots, every slot reads every shard and keeps the sequences whose
   global index ``% slots`` is its own — either way the slots partition the split exactly;
3. the slot's sequences (each shard's in a seeded order) pass through a shuffle buffer of
   ``buffer_size`` sequences.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class SlotPlan:
    """One epoch of one slot: the shards to decode and the order sequences leave the buffer.

    Attributes:
        shards: indices into the split's records, in decoding order.
        items: (n, 2) int64 — (position in ``shards``, sequence index in that shard), in the
            order the sequences enter the buffer.
        order: (n,) int64 — indices into ``items`` in emission order.
    """

    shards: list[int]
    items: np.ndarray
    order: np.ndarray


def buffer_order(n: int, buffer_size: int, rng: np.random.Generator) -> np.ndarray:
    """Emission order of a shuffle buffer fed items 0..n-1: (n,) int64.

    While the buffer is full, each new item replaces (and emits) a uniformly chosen resident;
    the residents left at the end leave in random order.
    """
    if buffer_size <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    buffer = list(range(min(buffer_size, n)))
    picks = rng.integers(0, len(buffer), size=max(0, n - len(buffer))).tolist()
    for emitted, incoming in enumerate(range(len(buffer), n)):
        j = picks[emitted]
        out[emitted] = buffer[j]
        buffer[j] = incoming
    out[n - len(buffer) :] = rng.permutation(np.asarray(buffer, dtype=np.int64))
    return out


def plan_slot(
    counts: list[int],
    *,
    seed: int,
    epoch: int,
    slot: int,
    slots: int,
    shuffle: bool,
    buffer_size: int,
) -> SlotPlan:
    """The epoch plan of ``slot`` out of ``slots`` over shards holding ``counts`` sequences."""
    rng = np.random.default_rng([seed, epoch, 0])
    shard_order = rng.permutation(len(counts)) if shuffle else np.arange(len(counts))
    starts = np.concatenate([[0], np.cumsum(counts)])  # global index of each shard's first sequence
    slot_rng = np.random.default_rng([seed, epoch, 1, slot])
    shards: list[int] = []
    parts: list[np.ndarray] = []
    for j, shard in enumerate(shard_order.tolist()):
        if len(counts) >= slots:
            if j % slots != slot:
                continue
            seqs = np.arange(counts[shard], dtype=np.int64)
        else:  # fewer shards than slots: stride over global sequence indices
            first = (slot - starts[shard]) % slots
            seqs = np.arange(first, counts[shard], slots, dtype=np.int64)
        if seqs.size == 0:
            continue
        if shuffle:
            seqs = slot_rng.permutation(seqs)
        parts.append(np.stack([np.full_like(seqs, len(shards)), seqs], axis=1))
        shards.append(shard)
    items = np.concatenate(parts) if parts else np.zeros((0, 2), np.int64)
    order = buffer_order(len(items), buffer_size if shuffle else 1, slot_rng)
    return SlotPlan(shards, items, order)
