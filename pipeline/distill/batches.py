"""Loader batches: compact dtypes, collation, a shared-memory ring for workers, device transfer.

A batch holds ``input_ids`` (B, L) int64, ``labels`` (B, L) int64, ``attention_mask`` (B, L)
int64, ``topk_logprobs`` (B, L, k) float16 (float32 for float32/bfloat16 stores) and
``topk_ids`` (B, L, k) uint16 (int32 for stores with more than 65 536 ids): the store's compact
dtypes, ~280 bytes per token at k = 64 instead of ~790 with int64 ids and float32 log-probs.
``batch_to_device`` moves a batch and widens ``topk_ids`` to int64 on the device.

All five fields are views of one flat byte buffer (``batch_layout``), so a batch is one piece of
memory: one allocation, one shared-memory segment, one weak reference to know when it is free.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch.multiprocessing.reductions import StorageWeakRef

from kdcache.pipeline.distill.losses import IGNORE_INDEX, widen_ids

FIELDS = ("input_ids", "labels", "attention_mask", "topk_logprobs", "topk_ids")
_ALIGN = 64  # byte alignment of each field inside a batch buffer
Layout = tuple[int, int, int, str, str]  # (B, L, k, ids dtype, logprobs dtype)


def compact_dtypes(ids: np.dtype, logprobs: np.dtype) -> tuple[str, str]:
    """Batch dtype names of ``topk_ids`` and ``topk_logprobs`` for a store's numpy dtypes.

    uint16 ids stay uint16; uint32 ids travel as int32 (the same bits, since ids < vocab < 2³¹);
    log-probs keep float16, anything else is float32.
    """
    return (
        "uint16" if ids == np.uint16 else "int32",
        "float16" if logprobs == np.float16 else "float32",
    )


def batch_layout(layout: Layout) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    """Where each field lives in a flat buffer: ([(name, dtype, shape, byte offset)], bytes)."""
    b, length, k, ids, logprobs = layout
    dtypes = {"topk_ids": getattr(torch, ids), "topk_logprobs": getattr(torch, logprobs)}
    fields, offset = [], 0
    for name in FIELDS:
        dtype = dtypes.get(name, torch.int64)
        shape = (b, length, k) if name in dtypes else (b, length)
        fields.append((name, dtype, shape, offset))
        offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return fields, offset


def carve(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The batch fields as views of ``flat``, a uint8 tensor of at least the layout's bytes."""
    fields, _ = batch_layout(layout)
    return {
        name: flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, dtype, shape, offset in fields
    }


def layout_of(sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> Layout:
    """The layout of the batch of ``sequences`` (tokens (L,), topk_ids (L, k), topk_logprobs)."""
    ids, logprobs = sequences[0][1], sequences[0][2]
    length = max(s[0].shape[0] for s in sequences)
    return (len(sequences), length, ids.shape[1], *compact_dtypes(ids.dtype, logprobs.dtype))


def collate(
    sequences: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    pad_id: int = 0,
    *,
    out: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Pad and stack (tokens (L,), topk_ids (L, k), topk_logprobs (L, k)) into a batch.

    Args:
        sequences: per sequence, numpy arrays in the store's dtypes.
        pad_id: ``input_ids`` value of padding.
        out: a uint8 buffer to write the batch into (else fresh memory), e.g. a ring slot.
    """
    layout = layout_of(sequences)
    if out is None:
        out = torch.empty(batch_layout(layout)[1], dtype=torch.uint8)
    batch = carve(out, layout)
    a = {name: t.numpy() for name, t in batch.items()}  # numpy views of the same memory
    if layout[3] == "int32":
        a["topk_ids"] = a["topk_ids"].view(np.uint32)  # same bits; ids < 2³¹
    for i, (tokens, ids, logprobs) in enumerate(sequences):
        n = tokens.shape[0]
        a["input_ids"][i, :n] = tokens  # (n,) int32 → int64
        a["input_ids"][i, n:] = pad_id
        a["labels"][i, : n - 1] = tokens[1:]  # row t predicts the token after tokens[t]
        a["labels"][i, n - 1 :] = IGNORE_INDEX
        a["attention_mask"][i, :n] = 1
        a["attention_mask"][i, n:] = 0
        a["topk_ids"][i, :n] = ids  # (n, k), same width: a plain copy
        a["topk_ids"][i, n:] = 0
        a["topk_logprobs"][i, :n] = logprobs
        a["topk_logprobs"][i, n:] = 0.0
    return batch


class SharedRing:
    """Batch buffers in shared memory, reused: DataLoader workers write, the main process reads.

    A fresh shared-memory tensor per batch costs a new shm file, a file descriptor passed
    between processes per field, and a page fault per 4 KiB on both sides — more than collating
    the batch. The main process creates this ring before the workers start (they inherit it);
    worker ``w`` collates into a free slot of row ``w`` and sends only the slot's index. The main
    process hands out views of the slot and clears its flag once nothing references them
    (``release``). A worker finding no free slot (the consumer holds many batches) or a batch
    too large falls back to a one-off buffer, so it never waits for the consumer.

    Args:
        workers: DataLoader workers.
        slots: buffers per worker (prefetched batches + those the consumer holds).
        slot_bytes: bytes per buffer; torch reserves ``workers · slots · slot_bytes`` of shared
            memory (/dev/shm) at once, about what the prefetched batches took before.
    """

    def __init__(self, workers: int, slots: int, slot_bytes: int) -> None:
        storage = torch.UntypedStorage._new_shared(workers * slots * slot_bytes)
        self.buffers = torch.empty(0, dtype=torch.uint8).set_(storage).view(workers, slots, -1)
        self.flags = torch.zeros((workers, slots), dtype=torch.int8)  # 1 = in use
        self.flags.share_memory_()
        self._held: list[tuple[StorageWeakRef, int, int]] = []  # main process: (ref, w, slot)

    def __getstate__(self) -> dict[str, Any]:
        # sent to spawned workers before any batch: the main process's bookkeeping stays here
        return {**self.__dict__, "_held": []}

    def acquire(self, worker: int, nbytes: int) -> tuple[torch.Tensor | None, int]:
        """Worker side: a free slot's buffer (flagged in use) and its index, or (None, -1)."""
        flags = self.flags[worker].numpy()
        free = np.flatnonzero(flags == 0)
        if nbytes > self.buffers.shape[2] or free.size == 0:
            return None, -1
        flags[free[0]] = 1
        return self.buffers[worker, int(free[0])], int(free[0])

    def batch(self, worker: int, slot: int, layout: Layout, pin: bool) -> dict[str, torch.Tensor]:
        """Main side: the batch in ``slot`` of ``worker``, tracked until it is dropped.

        The views share a storage of their own (aliasing the slot), whose weak reference tells
        when the consumer has let go of every view. With ``pin`` the batch is copied to pinned
        memory and the slot is free at once.
        """
        nbytes = batch_layout(layout)[1]
        flat = torch.from_numpy(self.buffers[worker, slot, :nbytes].numpy())  # own storage
        if pin:
            flat = flat.pin_memory()
            self.flags[worker, slot] = 0
        else:
            self._held.append((StorageWeakRef(flat.untyped_storage()), worker, slot))
        return carve(flat, layout)

    def release(self) -> None:
        """Main side: free the slots of every batch nothing references any more."""
        held = []
        for ref, worker, slot in self._held:
            if ref.expired():
                self.flags[worker, slot] = 0
            else:
                held.append((ref, worker, slot))
        self._held = held


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Copy a loader batch to ``device``, then widen ``topk_ids`` to int64 there.

    The batch crosses the host→device link in its compact dtypes (~3× fewer bytes than
    int64/float32); ``topk_logprobs`` stays float16, the losses upcast it per token chunk.
    """
    return {
        name: widen_ids(t, device) if name == "topk_ids" else t.to(device, non_blocking=True)
        for name, t in batch.items()
    }
