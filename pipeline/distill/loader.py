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
``input_ids`` (B, L) int64, ``labels`` (B, L) int64 (Hugging Face's: unshifted, -100 at
position 0, on padding and after positions a store's loss mask does not train),
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

from collections.abc import Callable, Iterator
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
from kdcache.pipeline.distill.dataset import DistillDataset, EpochReads, Part
from kdcache.pipeline.distill.shard_feed import ShardFeed
from kdcache.storage import ShardArrays, Store

Collate = Callable[[list[Sequence]], dict[str, torch.Tensor]]
DATA_WAIT_NOTE = 0.05  # a consumer waiting for batches beyond this share of its time: a note


def _decode_order(
    ds: DistillDataset, reads: Iterator[EpochReads]
) -> Iterator[tuple[int, np.ndarray | None]]:
    """(shard, the sequences read of it) to decode, epoch after epoch; tells a remote store's
    cache each epoch's shards."""
    for epoch in reads:
        ds.store.prefetch([ds.records[s] for s in epoch.decode])
        yield from zip(epoch.decode, epoch.picks, strict=True)


def stream_sequences(
    ds: DistillDataset,
    threads: int,
    part: Part = Part(),  # noqa: B008
) -> Iterator[tuple[bool, Sequence]]:
    """(last of its micro-batch, sequence) of one pass from ``ds.consumed`` (endless for an infinite
    dataset; ``part`` of the rank's micro-batches), recording in ``ds`` the stream position
    after each micro-batch as its last sequence is handed out.

    A free function (not a method) so the generator holds no reference to a TeacherLoader:
    dropping the loader then stops its decoding threads at once, not at a later GC cycle.
    """
    reads, ahead = tee(ds.epoch_reads(ds.consumed, part))  # the feed runs ahead of the reads
    feed = ShardFeed(ds.store, ds.records, _decode_order(ds, ahead), threads)
    try:
        for epoch in reads:
            left = np.bincount(epoch.shard, minlength=len(ds.records))  # (S,) reads to come
            owners = epoch.batch.tolist()
            held: dict[int, ShardArrays] = {}  # decoded shards with reads to come
            for i, (shard, index) in enumerate(
                zip(epoch.shard.tolist(), epoch.index.tolist(), strict=True)
            ):
                arrays = held.get(shard)
                if arrays is None:
                    arrays = held[shard] = feed.next(expected=shard)
                sequence = sequence_fields(arrays.sequence(index))  # views of the shard
                left[shard] -= 1
                if not left[shard]:
                    del held[shard]  # freed once the batches holding its views are collated
                if i + 1 < len(owners):
                    last = owners[i + 1] != owners[i]
                else:  # the epoch's last read: its micro-batch may go on in the next epoch
                    last = not ds.infinite or ds.deal.last_position(owners[i]) < epoch.end
                if last:  # of its micro-batch: the position after it, as it is handed out
                    ds.consumed = ds.deal.consumed_after(owners[i])
                    if not ds.infinite and i + 1 == len(owners):  # a finite pass ends with
                        ds.consumed = epoch.end  # its epoch (every rank): the next pass starts
                yield last, sequence
    finally:
        feed.close()


def stream_batches(
    ds: DistillDataset, threads: int, pin: bool, collate_fn: Collate | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass of collated batches (one per micro-batch of this rank), page-locked if ``pin``;
    ``collate_fn`` instead of ``batches.collate`` (a cross-tokenizer student's re-tokenizing)."""
    pending: list[Sequence] = []
    sequences = stream_sequences(ds, threads)
    try:
        for last, sequence in sequences:
            pending.append(sequence)
            if not last:
                continue
            if collate_fn is not None:
                yield collate_fn(pending)
                pending = []
                continue
            out = None
            if pin:  # collated straight into page-locked memory: one copy to the device, async
                nbytes = batch_layout(layout_of(pending))[1]
                out = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            yield collate(pending, ds.pad_id, out=out)
            pending = []
    finally:
        sequences.close()


class TeacherLoader:
    """A resumable loader over a ``DistillDataset``: yields batches, tracks what was consumed.

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
        collate_fn: sequences → batch instead of ``batches.collate`` (cross-tokenizer students).
    """

    def __init__(
        self,
        dataset: DistillDataset,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        collate_fn: Collate | None = None,
    ) -> None:
        self.dataset = dataset
        self.num_workers = num_workers
        self.pin_memory = pin_memory
        self.collate_fn = collate_fn
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
        return stream_batches(self.dataset, max(1, self.num_workers), pin, self.collate_fn)

    def __next__(self) -> dict[str, torch.Tensor]:
        """The next batch. An error (a shard that cannot be read or decoded, after the store's
        retries) is raised as it is, and the open pass is closed: the next call starts again
        from the position after the last batch handed out, so a caller that catches it gets
        the batch that failed, never a quiet end. The end of a finite dataset's pass raises
        ``StopIteration`` once; the next call starts the next pass."""
        if self._iterator is None:
            self._iterator = iter(self)
        try:
            return next(self._iterator)
        except BaseException:
            self.close()
            raise


def eval_batches(
    store: Store,
    batch_size: int,
    pad_id: int,
    *,
    max_batches: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
    collate_fn: Collate | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """One pass over the eval split in stored order, from a fresh loader: this rank's share
    (collated by ``collate_fn`` when given: a cross-tokenizer student's batches).

    The pass every evaluation uses (train-student, sweep, compare), so their figures agree.
    Batch j of the pass (``batch_size`` sequences, the first ``max_batches`` only) goes to rank
    ``j % world_size``, whole: summed over ranks, every metric is the single process's.
    """
    dataset = DistillDataset(
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
    batches = iter(TeacherLoader(dataset, pin_memory=pin_memory, collate_fn=collate_fn))
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
