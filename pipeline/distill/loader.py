"""Stream a split of a logit store as training batches: one global order, dealt to ranks × workers.

``epoch_order`` gives each epoch's permutation (a function of seed and epoch alone; the epochs
back to back in one stream) and ``Deal`` which positions each *slot* (one DataLoader worker of
one rank) reads, by position alone: every sequence once per epoch, the same stream for any number
of ranks and workers. The loader's position is the number of stream positions consumed (global),
so resuming is cheap and elastic. A slot decodes whole shards (``Store.read_shard``, the next in
a background thread) in the order it first needs them, collates straight from the latest one and
copies out what still waits when the next arrives: memory is its share of a shuffle window plus
three shards.

Batches (torch tensors, in the store's compact dtypes — see ``batches.py`` for every field):
``input_ids`` (B, L) int64, ``labels`` (B, L) int64 (the next token; -100 at the last position
of a sequence, on padding and at positions a store's loss mask does not train),
``attention_mask`` (B, L) int64, ``loss_mask`` (B, L) int64 (the trained positions:
``attention_mask`` for a store without a loss mask), and the store's targets, placed at the
trained positions (zeros elsewhere): top-k ``topk_ids``/``topk_logprobs`` (B, L, k) and
``topk_tail_logprob`` (B, L); sampled ``sampled_ids``/``sampled_counts``/``sampled_logprobs``
(B, L, m), m the most distinct ids a position of the batch drew. Ids and counts are widened by
``batch_to_device``. Shorter sequences are right-padded. B is this rank's rows of a global
micro-batch (training) or a whole micro-batch (eval). Workers collate into a ring of reused
shared-memory buffers (``SharedRing``) sized for the largest batch the store allows (L =
seq_len, m = min(samples, vocab)), so only a slot index crosses processes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
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
from kdcache.pipeline.distill.epoch_order import Deal, epoch_order
from kdcache.storage import Store, StoreError, open_store

META = ("_batch", "_worker", "_buffer")
# ring slots per worker beyond its prefetched batches: the batch just received, the consumer's
# previous one, and one more (e.g. a second accumulated micro-batch)
SPARE_BUFFERS = 3
ORDER_VERSION = 2  # the loader state's meaning; version 1 held per-slot positions
# what a loader state must share with the loader it is loaded into
ORDER_FACTS = ("split", "seed", "shuffle", "buffer_size", "batch_size")


class TeacherDataset(IterableDataset):
    """Batches of one split of a store for one rank (see the module docstring).

    Args:
        store: an open ``Store`` or its URL.
        split: "train" or "eval".
        batch_size: sequences per global micro-batch, over all ranks (B).
        seed: shuffle seed.
        shuffle: permute shards and sequences and shuffle windows (False = stored order).
        buffer_size: the shuffle window, in sequences.
        infinite: epochs back to back forever (a batch may span two epochs); else one epoch,
            ending with a possibly smaller batch.
        rank, world_size: this process and the number of processes.
        deal: "rows" — this rank's rows of every micro-batch (training; needs
            ``batch_size >= world_size``); "batches" — whole micro-batches, round-robin over
            ranks (eval: each batch is the one a single process would see).
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
        deal: str = "rows",
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
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)  # (S+1,)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.buffer_size, self.infinite, self.pad_id = buffer_size, infinite, pad_id
        self.rank, self.world_size = rank, world_size
        if deal not in ("rows", "batches"):
            raise ValueError(f"deal must be 'rows' or 'batches', got {deal!r}")
        self.deal = Deal(batch_size, rank, world_size, rows=deal == "rows")
        self.num_workers = 1  # set by TeacherLoader before the workers start
        self.consumed = 0  # stream positions consumed, over all ranks
        self.ring: SharedRing | None = None  # set by TeacherLoader before workers start

    @property
    def num_sequences(self) -> int:
        return int(self.starts[-1])

    @property
    def num_tokens(self) -> int:
        """Tokens of the split (input positions)."""
        return sum(r.num_tokens for r in self.records)

    @property
    def num_trained(self) -> int:
        """Trained positions of the split (its target rows; ``num_tokens`` without a loss mask)."""
        return sum(r.num_tokens if r.num_trained is None else r.num_trained for r in self.records)

    @property
    def batch_rows(self) -> int:
        """Sequences in this rank's full batches."""
        lo, hi = self.deal.span
        return hi - lo

    def state_dict(self) -> dict[str, Any]:
        facts = {name: getattr(self, name) for name in ORDER_FACTS}
        return {"order": ORDER_VERSION, **facts, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("order") != ORDER_VERSION:
            raise ValueError(
                "loader state from an older kdcache (per-slot positions); its order cannot be "
                "continued, start a new run"
            )
        for name in ORDER_FACTS:
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"loader state is for {name}={state[name]!r}, this loader has "
                    f"{getattr(self, name)!r}; resume with the same settings"
                )
        self.consumed = int(state["consumed"])

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
        start, n = self.consumed, self.num_sequences  # the stream position this pass starts at
        pending: list[Sequence] = []
        micro_batch = -1  # the global micro-batch ``pending`` belongs to

        def batch() -> dict[str, Any]:
            meta = {"_batch": micro_batch, "_worker": worker}
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

        if n == 0:
            return
        epoch = start // n
        with ThreadPoolExecutor(max_workers=1) as pool:
            while self.infinite or epoch == 0:
                first, stop = max(start, epoch * n), (epoch + 1) * n
                positions = self.deal.positions(
                    first, stop, start=start, worker=worker, workers=self.num_workers
                )  # (p,) ascending stream positions this slot reads in this epoch
                order = epoch_order(
                    self.counts,
                    seed=self.seed,
                    epoch=epoch,
                    shuffle=self.shuffle,
                    window=self.buffer_size,
                )  # (N,)
                ids = order[positions - epoch * n]  # (p,) global sequence indices
                owners = (positions // self.batch_size).tolist()
                for owner, sequence in zip(owners, self._read(pool, ids), strict=True):
                    if owner != micro_batch and pending:
                        yield batch()
                        pending = []
                    micro_batch = owner
                    pending.append(sequence)
                epoch += 1
        if pending:
            yield batch()

    def _read(self, pool: ThreadPoolExecutor, ids: np.ndarray) -> Iterator[Sequence]:
        """The sequences ``ids`` ((p,) global indices), in that order, in the store's dtypes.

        Shards are decoded in the order the ids first need them. Sequences are views of their
        decoded shard until the next shard is decoded; those still to be yielded then become
        copies, so the shard is freed: besides the copies, at most two decoded shards are held,
        plus the one decoding in the background.
        """
        if ids.size == 0:
            return
        shard = np.searchsorted(self.starts, ids, side="right") - 1  # (p,)
        local = ids - self.starts[shard]  # (p,) index inside the shard
        shards, first_use = np.unique(shard, return_index=True)
        decode = shards[np.argsort(first_use)].tolist()  # shards in the order first needed
        self.store.prefetch([self.records[s] for s in decode])  # a remote store's cache
        by_shard: dict[int, list[tuple[int, int]]] = {s: [] for s in decode}
        for i, (s, j) in enumerate(zip(shard.tolist(), local.tolist(), strict=True)):
            by_shard[s].append((i, j))

        def submit(k: int) -> Future | None:
            if k >= len(decode):
                return None
            return pool.submit(self.store.read_shard, self.records[decode[k]])

        cache: dict[int, Sequence] = {}  # index into ids → its sequence
        loaded, future = 0, submit(0)
        views: list[int] = []  # cache entries that are views of the latest decoded shard
        for i in range(ids.size):
            while i not in cache:
                assert future is not None, "decode plan out of sync"
                arrays = future.result()
                future = submit(loaded + 1)
                for k in views:  # the previous shard's sequences still waiting: copied out
                    if k in cache:
                        cache[k] = {name: a.copy() for name, a in cache[k].items()}
                views = []
                for k, j in by_shard[decode[loaded]]:
                    cache[k] = sequence_fields(arrays.sequence(j))
                    views.append(k)
                loaded += 1
                del arrays
            yield cache.pop(i)


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
        batch=ds.batch_rows,
        length=store.seq_len,
        top_k=store.top_k if store.has_topk else 0,
        tail=True,  # version-1 stores get theirs from the reader
        samples=min(store.samples, store.vocab_size) if store.has_samples else 0,
        ids=ids,
        logprobs=logprobs,
        counts=manifest["count_dtype"] if store.has_samples else "",
    )


def _batches(
    ds: TeacherDataset, num_workers: int, pin_memory: bool, prefetch_factor: int
) -> Iterator[dict[str, torch.Tensor]]:
    """Batches from a fresh DataLoader, recording the consumed stream position in ``ds``.

    A free function (not a method) so the generator holds no reference to the TeacherLoader:
    dropping the loader then shuts its worker processes down at once, not at a later GC cycle.
    """
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
            micro_batch, worker, index = (int(batch.pop(name)) for name in META)
            ds.consumed = ds.deal.consumed_after(micro_batch)
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

    ``state_dict()`` records the stream position after the last batch handed out (global: the
    same on every rank in lockstep), so ``load_state_dict()`` + iterating continues exactly where
    an uninterrupted run would have (same batches, same order), mid-epoch included — with any
    number of workers, and of ranks when the global batch is the same. ``next(loader)`` keeps
    one iterator open (the training loop); ``iter(loader)`` starts a fresh pass from the recorded
    position (one epoch of an ``infinite=False`` dataset, e.g. eval).
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
        self._iterator: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the open iterator and its worker processes."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _batches(self.dataset, self.num_workers, self.pin_memory, self.prefetch_factor)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._iterator is None:
            self._iterator = iter(self)
        return next(self._iterator)


def eval_batches(
    store: Store,
    batch_size: int,
    pad_id: int,
    *,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the eval split in stored order, from a fresh loader: this rank's share.

    The pass every evaluation uses (train-student, sweep, compare), so their figures agree.
    Batch j of the pass (``batch_size`` sequences, the first ``max_batches`` only) goes to rank
    ``j % world_size``, whole: summed over ranks, every metric is the single process's.
    """
    dataset = TeacherDataset(
        store,
        "eval",
        batch_size=batch_size,
        shuffle=False,
        infinite=False,
        rank=rank,
        world_size=world_size,
        deal="batches",
        pad_id=pad_id,
    )
    batches = iter(TeacherLoader(dataset, pin_memory=pin_memory))
    if max_batches is None:
        return batches
    return islice(batches, len(range(rank, max_batches, world_size)))
