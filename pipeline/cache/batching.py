"""Teacher batches: a shard's sequences grouped, right-padded, with the positions to compute.

Packed text has sequences of one length: batches keep the shard's order and need no padding.
One example per sequence (``--packing separate``) gives many lengths: batches take them longest
first and pad each row on the right. Causal attention keeps the padding out of every real
position (position t sees only positions <= t), and the padding gets no targets.
"""

from __future__ import annotations

import numpy as np
import torch

from kdcache.pipeline.cache.background import BatchSequences
from kdcache.pipeline.cache.packing import ShardPlan


def teacher_batches(lengths: list[int], batch_size: int, *, pad: bool) -> list[list[int]]:
    """Indices of a shard's sequences grouped into batches of at most ``batch_size``.

    Args:
        lengths: (S,) each sequence's tokens.
        pad: allow rows of unequal length in a batch (longest first); without it a batch holds
            consecutive sequences of equal length.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i]) if pad else range(len(lengths))
    groups: list[list[int]] = []
    for i in order:
        last = groups[-1] if groups else None
        if last is not None and len(last) < batch_size and (pad or lengths[last[0]] == lengths[i]):
            last.append(i)
        else:
            groups.append([i])
    return groups


def padded(batch: BatchSequences, pad_id: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, S) int32 tokens, right-padded with ``pad_id``, and the (B, S) bool positions to
    compute: each row's trained positions (all its tokens without loss masks), never padding.
    None when that is every position."""
    width = max(len(q) for q in batch.tokens)
    tokens = np.full((len(batch.tokens), width), pad_id, dtype=np.int32)
    rows = np.zeros(tokens.shape, dtype=bool)
    for b, sequence in enumerate(batch.tokens):
        tokens[b, : len(sequence)] = sequence
        rows[b, : len(sequence)] = True if batch.loss_masks is None else batch.loss_masks[b]
    return torch.from_numpy(tokens), None if rows.all() else torch.from_numpy(rows)


def next_ids(batch: BatchSequences, width: int) -> torch.Tensor:
    """(B, width) int64: the token after each position within its sequence, -1 where there is
    none (a sequence's last position, padding)."""
    out = np.full((len(batch.tokens), width), -1, dtype=np.int64)
    for b, sequence in enumerate(batch.tokens):
        out[b, : len(sequence) - 1] = sequence[1:]
    return torch.from_numpy(out)


def batch_of(shard: ShardPlan, group: list[int], *, text: bool) -> BatchSequences:
    """Sequences ``group`` of ``shard`` as one batch, with their text when the store keeps it."""
    masks = shard.loss_masks
    batch = BatchSequences(
        [shard.sequences[i] for i in group],
        group,
        None if masks is None else [masks[i] for i in group],
    )
    if text:
        assert shard.token_bytes is not None and shard.texts is not None, "no text in the plan"
        batch.token_bytes = [shard.token_bytes[i] for i in group]
        batch.texts = [shard.texts[i] for i in group]
    return batch
