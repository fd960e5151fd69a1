"""Stream a split of a logit store as training batches: shuffled, split across ranks and workers, resumable.

Each epoch follows ``epoch_order.plan_slot`` (one plan per *slot* = one DataLoader worker of one
Accelerate rank), computed from the commit records alone (sequence counts), so resuming is
cheap: a slot's position is ``(epoch, sequences emitted)``, and on resume only the shards that
still hold pending sequences are decoded. Shards are decoded whole with ``Store.read_shard``
(the next one in a background thread); sequences are collated straight from the latest shard,
and those still in the buffer when the next shard arrives are copied out in the store's compact
dtypes, so memory is bounded by the buffer plus three shards.

Batches (torch tensors, in the store's compact dtypes — see ``batches.py`` for every field):
``input_ids`` (B, L) int64, ``labels`` (B, L) int64 (the next token; -100 at the last position
of a sequence, on padding and at positions a store's loss mask does not train),
``attention_mask`` (B, L) int64, ``loss_mask`` (B, L) int64 (the trained positions:
``attention_mask`` for a store without a loss mask), and the store's targets, placed at the
trained positions (zeros elsewhere): top-k
``topk_ids``/``topk_logprobs`` (B, L, k) and ``topk_tail_logprob`` (B, L); sampled
``sampled_ids``/``sampled_counts``/``sampled_logprobs`` (B, L, m), m the most distinct ids a
position of the batch drew. Ids and counts are widened by ``batch_to_device`` (which
``train_step`` and ``evaluate`` use). Sequences shorter than the longest in the batch are
right-padded. DataLoader workers collate into a ring of reused shared-memory buffers
(``SharedRing``), so only a slot index crosses processes; its slots hold the largest batch the
store allows (L = seq_len, m = min(samples, vocab)).
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kdcache.pipeline.distill.batches import (
    Layout,
    Sequence,
    SharedRing,
    batch_layout,
    collate,
    compact_dtypes,
    layout_of,
    sequence_fields,
)
from kdcache.pipeline.distill.epoch_order import plan_slot
from kdcache.storage import Store, StoreError, open_store

META = ("_slot", "_epoch", "_emitted", "_worker", "_buffer")
# ring slots per worker beyond its prefetched batches: the batch just received, the consumer's
# previous one, and one more (e.g. a second accumulated micro-batch)
SPARE_BUFFERS = 3


class TeacherDataset(IterableDataset):
    """Batches of one split of a store for one Accelerate rank (see the module docstring).

    Args:
        store: an open ``Store`` or its URL.
        split: "train" or "eval".
        batch_size: sequences per batch.
        seed: shuffle seed.
        shuffle: permute shards and sequences and use the buffer (False = stored order).
        buffer_size: shuffle buffer capacity in sequences.
        infinite: loop over epochs forever (a batch may span two epochs); else one epoch,
            ending with a possibly smaller batch.
        rank, world_size: this process and the number of processes (Accelerate).
        pad_id: ``input_ids`` value of padding.
        storage_options: fsspec options when ``store`` is a URL.
    """

    def __init__(
        self,
        store: Store | str,
        split: str = "train",
        *,
        batch_size: int = 8,
        seed: int = 0,
        shuffle: bool = True,
        buffer_size: int = 1024,
        infinite: bool = True,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.store = (
            store
            if isinstance(store, Store)
            else open_store(store, storage_options=storage_options)
        )
        self.split = split
        self.records = self.store.shards_of(split)
        self.counts = [r.num_sequences for r in self.records]
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.buffer_size, self.infinite, self.pad_id = buffer_size, infinite, pad_id
        self.rank, self.world_size = rank, world_size
        self.num_workers = 1  # set by TeacherLoader before the workers start
        self.worker_offset = 0  # DataLoader worker w serves logical worker (w + offset) % W
        self.positions: dict[int, tuple[int, int]] = {}  # slot → (epoch, sequences emitted)
        self.ring: SharedRing | None = None  # set by TeacherLoader before workers start

    @property
    def num_tokens(self) -> int:
        """Tokens of the split (input positions)."""
        return sum(r.num_tokens for r in self.records)

    @property
    def num_trained(self) -> int:
        """Trained positions of the split (its target rows; ``num_tokens`` without a loss mask)."""
        return sum(r.num_tokens if r.num_trained is None else r.num_trained for r in self.records)

    def slots(self) -> list[int]:
        """The slots of this rank, one per logical worker."""
        return [self.rank * self.num_workers + w for w in range(self.num_workers)]

    def state_dict(self) -> dict[str, Any]:
        return {
            "split": self.split,
            "seed": self.seed,
            "world_size": self.world_size,
            "num_workers": self.num_workers,
            "positions": {str(s): list(p) for s, p in self.positions.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in ("split", "seed", "world_size", "num_workers"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"loader state is for {name}={state[name]!r}, this loader has "
                    f"{getattr(self, name)!r}; resume with the same settings"
                )
        self.positions = {int(s): (int(p[0]), int(p[1])) for s, p in state["positions"].items()}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        try:
            yield from self._iter_batches()
        except StoreError as e:
            # handed to the main process as data: a DataLoader worker would wrap the exception
            # in a multi-line traceback, and a damaged shard deserves one clean line
            yield {"_error": str(e)}

    def _iter_batches(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker = 0 if info is None else info.id
        ring = None if info is None else self.ring
        logical = (worker + self.worker_offset) % self.num_workers
        slot = self.rank * self.num_workers + logical
        epoch, skip = self.positions.get(slot, (0, 0))
        pending: list[Sequence] = []

        def batch(epoch: int, emitted: int) -> dict[str, Any]:
            meta = {"_slot": slot, "_epoch": epoch, "_emitted": emitted, "_worker": worker}
            layout = layout_of(pending)
            nbytes = batch_layout(layout)[1]
            if ring is not None:
                buffer, index = ring.acquire(worker, nbytes)
                if buffer is not None:  # only the slot index crosses the process boundary
                    collate(pending, self.pad_id, out=buffer)
                    return {**meta, "_buffer": index, "_layout": layout}
            out = None
            if info is not None:  # a one-off batch, in the shared memory it is sent through
                out = torch.empty(0, dtype=torch.uint8)
                out.set_(torch.UntypedStorage._new_shared(nbytes))
            return {**collate(pending, self.pad_id, out=out), **meta, "_buffer": -1}

        with ThreadPoolExecutor(max_workers=1) as pool:
            while self.infinite or epoch == 0:
                emitted = skip
                for sequence in self._epoch(pool, epoch, slot, skip):
                    pending.append(sequence)
                    emitted += 1
                    if len(pending) == self.batch_size:
                        yield batch(epoch, emitted)
                        pending = []
                if emitted == 0 and skip == 0:
                    break  # this slot has no data at all: never spin
                epoch, skip = epoch + 1, 0
        if pending:
            yield batch(epoch - 1, emitted)

    def _epoch(
        self, pool: ThreadPoolExecutor, epoch: int, slot: int, skip: int
    ) -> Iterator[Sequence]:
        """The slot's sequences of one epoch after the first ``skip``, in the store's dtypes.

        Sequences are views of their decoded shard until the next shard is decoded; those still
        waiting in the shuffle buffer then become copies, so the shard is freed: besides the
        copies, at most two decoded shards are held, plus the one decoding in the background.
        """
        plan = plan_slot(
            self.counts,
            seed=self.seed,
            epoch=epoch,
            slot=slot,
            slots=self.world_size * self.num_workers,
            shuffle=self.shuffle,
            buffer_size=self.buffer_size,
        )
        todo = plan.order[skip:]
        if todo.size == 0:
            return
        # shards that still hold a pending sequence, in decoding order
        needed = np.zeros(len(plan.items), dtype=bool)
        needed[todo] = True
        positions = sorted(set(plan.items[needed, 0].tolist()))
        cache: dict[int, Sequence] = {}
        loaded = 0  # how many of `positions` are decoded into the cache
        first_item = np.searchsorted(plan.items[:, 0], np.arange(len(plan.shards) + 1))
        future: Future | None = None

        def submit(i: int) -> Future | None:
            if i >= len(positions):
                return None
            return pool.submit(self.store.read_shard, self.records[plan.shards[positions[i]]])

        future = submit(0)
        views: list[int] = []  # cache entries that are views of the latest decoded shard
        for item in todo.tolist():
            while item not in cache:
                assert future is not None, "plan/cache out of sync"
                arrays = future.result()
                future = submit(loaded + 1)
                # the previous shard's sequences still in the buffer are copied out, so it is
                # freed; the rest were collated straight from it (in stored order: all of them)
                for idx in views:
                    if idx in cache:
                        cache[idx] = {name: a.copy() for name, a in cache[idx].items()}
                p = positions[loaded]
                loaded += 1
                views = [idx for idx in range(first_item[p], first_item[p + 1]) if needed[idx]]
                for idx in views:
                    cache[idx] = sequence_fields(arrays.sequence(int(plan.items[idx, 1])))
                del arrays
            yield cache.pop(item)


def largest_batch(ds: TeacherDataset) -> Layout:
    """The layout of the largest batch ``ds`` can yield: full-length, and for sampled targets
    as many entries per position as a position can have distinct ids (min(samples, vocab)).

    Typical batches come close: m is the most distinct ids of any of the B·L positions.
    """
    store, manifest = ds.store, ds.store.manifest
    logprob_dtype = (
        "float32" if manifest["logprob_dtype"] == "bfloat16" else manifest["logprob_dtype"]
    )
    ids, logprobs = compact_dtypes(np.dtype(manifest["id_dtype"]), np.dtype(logprob_dtype))
    return Layout(
        batch=ds.batch_size,
        length=store.seq_len,
        top_k=store.top_k if store.has_topk else 0,
        tail=True,  # version-1 stores get theirs from the reader
        samples=min(store.samples, store.vocab_size) if store.has_samples else 0,
        ids=ids,
        logprobs=logprobs,
        counts=manifest["count_dtype"] if store.has_samples else "",
    )


class _Cursor:
    """Which logical worker's batch comes next (shared by a TeacherLoader and its iterator)."""

    def __init__(self) -> None:
        self.next_logical = 0


def _batches(
    ds: TeacherDataset, cursor: _Cursor, num_workers: int, pin_memory: bool, prefetch_factor: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a fresh DataLoader, recording the consumed position in ``ds``/``cursor``.

    A free function (not a method) so the generator holds no reference to the TeacherLoader:
    dropping the loader then shuts its worker processes down at once, not at a later GC cycle.
    """
    ds.worker_offset = cursor.next_logical  # DataLoader starts with its worker 0
    ds.ring = ring = None
    if num_workers:
        # prefetched batches + the ones a consumer holds
        slots = prefetch_factor + SPARE_BUFFERS
        ds.ring = ring = SharedRing(num_workers, slots, batch_layout(largest_batch(ds))[1])
    pin = pin_memory and torch.cuda.is_available()
    loader = DataLoader(
        ds,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin,
        prefetch_factor=prefetch_factor if num_workers else None,
    )
    try:
        for batch in loader:
            if "_error" in batch:
                raise StoreError(batch["_error"])
            slot, epoch, emitted, worker, index = (int(batch.pop(name)) for name in META)
            ds.positions[slot] = (epoch, emitted)
            cursor.next_logical = (slot - ds.rank * ds.num_workers + 1) % ds.num_workers
            if ring is not None:
                ring.release()  # slots of batches the consumer has dropped since the last one
                if index >= 0:
                    batch = ring.batch(worker, index, Layout(*batch.pop("_layout")), pin)
            yield batch
    finally:
        if ds.ring is ring:  # the shared memory lives on only in batches still held
            ds.ring = None


class TeacherLoader:
    """A resumable DataLoader over a ``TeacherDataset``: yields batches, tracks what was consumed.

    ``state_dict()`` records, per slot, the position after the last batch handed out, and which
    worker comes next, so ``load_state_dict()`` + iterating continues exactly where an
    uninterrupted run would have (same batches, same order), mid-epoch included. ``next(loader)``
    keeps one iterator open (the training loop); ``iter(loader)`` starts a fresh pass from the
    recorded position (one epoch of an ``infinite=False`` dataset, e.g. eval).
    """

    def __init__(
        self,
        dataset: TeacherDataset,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int = 4,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.prefetch_factor = prefetch_factor
        dataset.num_workers = max(1, num_workers)
        self._cursor = _Cursor()
        self._iterator: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"dataset": self.dataset.state_dict(), "next_worker": self._cursor.next_logical}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self._cursor.next_logical = int(state["next_worker"])
        self.close()

    def close(self) -> None:
        """Stop the open iterator and its worker processes."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _batches(
            self.dataset, self._cursor, self.num_workers, self.pin_memory, self.prefetch_factor
        )

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self)
        return next(self._iterator)


def eval_batches(
    store: Store, batch_size: int, pad_id: int, *, pin_memory: bool = False
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the eval split in stored order, from a fresh loader.

    The pass every evaluation uses (train-student, sweep, compare), so their figures agree.
    """
    dataset = TeacherDataset(
        store, "eval", batch_size=batch_size, shuffle=False, infinite=False, pad_id=pad_id
    )
    return iter(TeacherLoader(dataset, pin_memory=pin_memory))
