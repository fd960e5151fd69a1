"""Stream a split of a logit store as training batches: one global order, dealt to ranks.

``epoch_order`` gives each epoch's permutation (a function of seed and epoch alone; the epochs
back to back in one stream) and ``Deal`` which positions each rank reads, by position alone:
every sequence once per epoch, the same stream for any number of ranks. The loader's position
is the number of stream positions consumed (global), so resuming is cheap and elastic. A rank
decodes the shards its reads need (``Store.read_shard``), in the order first needed, each once
per pass and only the sequences it reads of it (a rank of R reads ~1/R of every shard),
``workers`` at a time in threads of its own process (``shard_feed.py``), and collates straight
from the decoded shards, which it holds until their last sequence is read: memory is a shuffle
window plus the shards in flight (``workers + 1``) and in use (two or three).

Batches (torch tensors, in the store's compact dtypes — see ``batches.py`` for every field):
``input_ids`` (B, L) int64, ``labels`` (B, L) int64 (the next token; -100 at the last position
of a sequence, on padding and at positions a store's loss mask does not train),
``attention_mask`` (B, L) int64, ``loss_mask`` (B, L) int64 (the trained positions:
``attention_mask`` for a store without a loss mask), and the store's targets, placed at the
trained positions (zeros elsewhere): top-k ``topk_ids``/``topk_logprobs`` (B, L, k) and
``topk_tail_logprob`` (B, L); sampled ``sampled_ids``/``sampled_counts``/``sampled_logprobs``
(B, L, m), m the most distinct ids a position of the batch drew. Ids and counts are widened by
``batch_to_device``. Shorter sequences are right-padded. B is this rank's rows of a global
micro-batch (training) or a whole micro-batch (eval). Each batch is one fresh buffer (pinned
with ``pin_memory`` on a CUDA machine), never reused while the consumer holds it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice, tee
from typing import Any

import numpy as np
import torch

from kdcache.pipeline.distill.batches import (
    Sequence,
    batch_layout,
    collate,
    layout_of,
    sequence_fields,
)
from kdcache.pipeline.distill.epoch_order import Deal, epoch_order
from kdcache.pipeline.distill.shard_feed import ShardFeed
from kdcache.storage import ShardArrays, Store, open_store

ORDER_VERSION = 2  # the loader state's meaning; version 1 held per-slot positions
# what a loader state must share with the loader it is loaded into
ORDER_FACTS = ("split", "seed", "shuffle", "buffer_size", "batch_size")
DATA_WAIT_NOTE = 0.05  # a consumer waiting for batches beyond this share of its time: a note


@dataclass(frozen=True)
class EpochReads:
    """What a rank reads of one epoch from where its pass starts, in stream order (p reads)."""

    shard: np.ndarray  # (p,) int64: the shard of each sequence read
    index: np.ndarray  # (p,) int64: its index among the sequences decoded of its shard
    batch: np.ndarray  # (p,) int64: the global micro-batch it belongs to
    decode: list[int]  # the shards read, in the order first needed
    picks: list[np.ndarray | None]  # per decoded shard: the sequences read (None: all of them)


class TeacherDataset:
    """Batches of one split of a store for one rank (see the module docstring); iterating it
    reads one pass from ``consumed`` with one decoding thread (``TeacherLoader`` for more).

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
        self.consumed = 0  # stream positions consumed, over all ranks

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

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return _batches(self, threads=1, pin=False)

    def epoch_reads(self, start: int) -> Iterator[EpochReads]:
        """This rank's reads, epoch by epoch, from stream position ``start`` on (lazily: an
        endless dataset's never end)."""
        n = self.num_sequences
        if n == 0:
            return
        epoch = start // n
        while self.infinite or epoch == 0:
            first, stop = max(start, epoch * n), (epoch + 1) * n
            positions = self.deal.positions(first, stop)  # (p,) ascending
            order = epoch_order(
                self.counts,
                seed=self.seed,
                epoch=epoch,
                shuffle=self.shuffle,
                window=self.buffer_size,
            )  # (N,)
            ids = order[positions - epoch * n]  # (p,) global sequence indices
            shard = np.searchsorted(self.starts, ids, side="right") - 1  # (p,)
            shards, first_use = np.unique(shard, return_index=True)
            decode = shards[np.argsort(first_use)].tolist()
            # the sequences read of each shard: a rank of R reads ~1/R of every shard, and only
            # those are decoded (``Store.read_shard(sequences=...)``)
            read, inverse = np.unique(ids, return_inverse=True)  # (u,) ascending, (p,)
            read_shard = np.searchsorted(self.starts, read, side="right") - 1  # (u,)
            first_read = np.searchsorted(read_shard, np.arange(len(self.records) + 1))  # (S+1,)
            picks: list[np.ndarray | None] = []
            for s in decode:
                picked = read[first_read[s] : first_read[s + 1]] - self.starts[s]
                picks.append(None if picked.size == self.counts[s] else picked)
            yield EpochReads(
                shard=shard,
                index=inverse - first_read[shard],
                batch=positions // self.batch_size,
                decode=decode,
                picks=picks,
            )
            epoch += 1


def _decode_order(
    ds: TeacherDataset, reads: Iterator[EpochReads]
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(shard, the sequences read of it) to decode, epoch after epoch; tells a remote store's
    cache each epoch's shards."""
    for epoch in reads:
        ds.store.prefetch([ds.records[s] for s in epoch.decode])
        yield from zip(epoch.decode, epoch.picks, strict=True)


def _batches(ds: TeacherDataset, threads: int, pin: bool) -> Iterator[dict[str, torch.Tensor]]:
    """One pass from ``ds.consumed`` (endless for an infinite dataset), recording in ``ds`` the
    stream position after each batch handed out.

    A free function (not a method) so the generator holds no reference to the TeacherLoader:
    dropping the loader then stops its decoding threads at once, not at a later GC cycle.
    """
    reads, ahead = tee(ds.epoch_reads(ds.consumed))  # the feed runs ahead of the reads
    feed = ShardFeed(ds.store, ds.records, _decode_order(ds, ahead), threads)
    pending: list[Sequence] = []
    micro_batch = -1  # the global micro-batch ``pending`` belongs to

    def batch() -> dict[str, torch.Tensor]:
        ds.consumed = ds.deal.consumed_after(micro_batch)
        out = None
        if pin:  # collated straight into page-locked memory: one copy to the device, async
            nbytes = batch_layout(layout_of(pending))[1]
            out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        return collate(pending, ds.pad_id, out=out)

    try:
        for epoch in reads:
            left = np.bincount(epoch.shard, minlength=len(ds.records))  # (S,) reads to come
            held: dict[int, ShardArrays] = {}  # decoded shards with reads to come
            for shard, index, owner in zip(
                epoch.shard.tolist(), epoch.index.tolist(), epoch.batch.tolist(), strict=True
            ):
                if owner != micro_batch and pending:
                    yield batch()
                    pending = []
                micro_batch = owner
                arrays = held.get(shard)
                if arrays is None:
                    arrays = held[shard] = feed.next(expected=shard)
                pending.append(sequence_fields(arrays.sequence(index)))  # views of the shard
                left[shard] -= 1
                if not left[shard]:
                    del held[shard]  # freed once the batches holding its views are collated
        if pending:
            yield batch()
    finally:
        feed.close()


class TeacherLoader:
    """A resumable loader over a ``TeacherDataset``: yields batches, tracks what was consumed.

    ``state_dict()`` records the stream position after the last batch handed out (global: the
    same on every rank in lockstep), so ``load_state_dict()`` + iterating continues exactly where
    an uninterrupted run would have (same batches, same order), mid-epoch included — with any
    number of workers, and of ranks when the global batch is the same. ``next(loader)`` keeps
    one iterator open (the training loop); ``iter(loader)`` starts a fresh pass from the recorded
    position (one epoch of an ``infinite=False`` dataset, e.g. eval).

    Args:
        dataset: what to read.
        num_workers: threads decoding shards (0 or 1: one; see ``shard_feed.py``).
        pin_memory: on a CUDA machine, collate into page-locked memory.
    """

    def __init__(
        self, dataset: TeacherDataset, *, num_workers: int = 0, pin_memory: bool = False
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self._iterator: Iterator[dict[str, Any]] | None = None

    def state_dict(self) -> dict[str, Any]:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.dataset.load_state_dict(state)
        self.close()

    def close(self) -> None:
        """Stop the open iterator and its decoding threads."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]
            self._iterator = None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        pin = self.pin_memory and torch.cuda.is_available()
        return _batches(self.dataset, max(1, self.num_workers), pin)

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


def data_wait_note(wall: float, waited: float, steps: int, workers: int) -> str | None:
    """A note when the student waited for batches more than DATA_WAIT_NOTE of ``wall`` seconds
    (``waited`` of them) after its first batch, over enough ``steps`` to tell."""
    if steps < 20 or wall <= 0 or waited / wall <= DATA_WAIT_NOTE:
        return None
    return (
        f"the student waited for data {waited / wall:.0%} of its training time; more threads "
        f"decoding the store may help, e.g. --workers {2 * max(workers, 1)}"
    )
