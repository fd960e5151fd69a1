"""A split of a logit store as a ``torch.utils.data.IterableDataset`` of sequences, in the
global order every kdcache reader shares (``epoch_order.py``), with a collator for its batches.

    from torch.utils.data import DataLoader
    from kdcache.pipeline.distill import DistillCollator, DistillDataset

    dataset = DistillDataset("artifacts/store", batch_size=32, seed=0)  # 32 over all ranks
    loader = DataLoader(dataset, batch_size=dataset.batch_rows, num_workers=2,
                        collate_fn=DistillCollator(dataset))

``batch_size`` is the *global* micro-batch (all ranks together): it fixes the order, so a run
reads the same sequences per step with any number of processes and resumes with any number.
The rank and the number of ranks come from ``torch.distributed`` when it is initialised (else
pass them); each rank reads only its rows of every micro-batch (``Deal``), ``batch_rows`` of
them, and decodes only the shards those rows live in. In DataLoader workers, worker w of W takes
this rank's micro-batches ``w, w + W, ...``: the DataLoader hands them out in stream order, so
its batches are the ones a single process would make (``batch_size=dataset.batch_rows``).

An item is one sequence as the store holds it (numpy arrays: ``tokens`` (L,), the targets in
the store's compact dtypes, ``loss_mask`` in masked stores; ``batches.SEQUENCE_FIELDS``);
``DistillCollator`` pads a list of them into a batch in Hugging Face conventions
(``batches.py``): ``input_ids``, ``attention_mask``, ``labels`` (unshifted, -100 where nothing
is trained: the model's own loss is the right cross-entropy), ``loss_mask`` and the teacher's
targets at the input positions (row t: the teacher's distribution of token t + 1).

Resuming: ``state_dict()`` is the stream position after the last micro-batch handed out
(global), ``load_state_dict`` continues there. In-process iteration (``num_workers=0``) keeps
it current; with workers, the copies in the workers advance, so count the batches you took and
call ``skip_batches(n)`` on a fresh dataset (what the Trainer integration does). ``set_epoch(e)``
starts epoch e (an ``infinite=False`` dataset reads one epoch per pass, the next one by itself).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from kdcache.pipeline.distill.batches import Sequence, collate
from kdcache.pipeline.distill.epoch_order import Deal, epoch_order
from kdcache.storage import Store, open_store

ORDER_VERSION = 2  # the loader state's meaning; version 1 held per-slot positions
# what a loader state must share with the loader it is loaded into
ORDER_FACTS = ("split", "seed", "shuffle", "buffer_size", "batch_size")
_VOLATILE_MANIFEST_FACTS = ("created_at", "kdcache_version", "finished", "stats")
STORE_ID = "store_id"  # the item key naming the store a sequence comes from


@dataclass(frozen=True)
class EpochReads:
    """What a rank reads of one epoch from where its pass starts, in stream order (p reads)."""

    shard: np.ndarray  # (p,) int64: the shard of each sequence read
    index: np.ndarray  # (p,) int64: its index among the sequences decoded of its shard
    batch: np.ndarray  # (p,) int64: the global micro-batch it belongs to
    decode: list[int]  # the shards read, in the order first needed
    picks: list[np.ndarray | None]  # per decoded shard: the sequences read (None: all of them)
    end: int  # the stream position where the epoch ends


@dataclass(frozen=True)
class Part:
    """Which of a rank's micro-batches a reader takes: those with ordinal ≡ ``index`` (mod
    ``parts``), ordinals counted from the pass's first micro-batch (DataLoader workers)."""

    index: int = 0
    parts: int = 1


def _dist_rank() -> tuple[int, int]:
    """(rank, world size) of an initialised ``torch.distributed``, else (0, 1)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class DistillDataset(torch.utils.data.IterableDataset):  # type: ignore[type-arg]
    """One split of a store for one rank, as sequences (see the module docstring).

    Args:
        store: an open ``Store`` or its URL (local path, ``s3://...``).
        split: "train" or "eval".
        batch_size: sequences per global micro-batch, over all ranks (B).
        seed: shuffle seed.
        shuffle: permute shards and sequences and shuffle windows (False = stored order).
        buffer_size: the shuffle window, in sequences.
        infinite: epochs back to back forever (a micro-batch may span two epochs; what
            training reads); else one epoch per pass, the last micro-batch possibly smaller.
        rank: this process; default: from an initialised ``torch.distributed``, else 0.
        world_size: the number of processes; default: from ``torch.distributed``, else 1.
        deal: "rows" — this rank's rows of every micro-batch (training; needs
            ``batch_size >= world_size``); "batches" — whole micro-batches, round-robin over
            ranks (eval: each batch is the one a single process would see).
        pad_id: ``input_ids`` value of padding (``DistillCollator`` takes it from here).
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
        rank: int | None = None,
        world_size: int | None = None,
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
        found_rank, found_world = _dist_rank()
        self.rank = found_rank if rank is None else rank
        self.world_size = found_world if world_size is None else world_size
        if deal not in ("rows", "batches"):
            raise ValueError(f"deal must be 'rows' or 'batches', got {deal!r}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.deal = Deal(batch_size, self.rank, self.world_size, rows=deal == "rows")
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
        """Sequences in this rank's full batches: the DataLoader's ``batch_size``."""
        lo, hi = self.deal.span
        return hi - lo

    def state_dict(self) -> dict[str, Any]:
        facts = {name: getattr(self, name) for name in ORDER_FACTS}
        return {"order": ORDER_VERSION, **facts, "consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (``state_dict()`` of a dataset with the same order facts,
        with any number of ranks).

        Raises:
            ValueError: the state is from an older kdcache or another order.
        """
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

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` at the next pass, unless the position is inside it already
        (a resumed run's epoch continues where it stopped)."""
        n = self.num_sequences
        if not epoch * n <= self.consumed < (epoch + 1) * n:
            self.consumed = epoch * n

    def skip_batches(self, batches: int) -> None:
        """Move past this rank's next ``batches`` micro-batches without reading them (resuming
        from a count of batches taken; every rank in lockstep)."""
        if batches <= 0:
            return
        every = 1 if self.deal.rows else self.world_size
        micro_batch = self.consumed // self.batch_size + (batches - 1) * every
        if not self.deal.rows:  # whole micro-batches: this rank's m-th from the current round
            micro_batch += self.rank
        self.consumed = self.deal.consumed_after(micro_batch)

    def __iter__(self) -> Iterator[Sequence]:
        """This rank's sequences from the stored position (one DataLoader worker's share of
        them in a worker), recording the position after each micro-batch handed out."""
        info = torch.utils.data.get_worker_info()
        part = Part(info.id, info.num_workers) if info is not None else Part()
        from kdcache.pipeline.distill.loader import stream_sequences

        origin = store_id(self.store)
        for _, sequence in stream_sequences(self, threads=1, part=part):
            sequence[STORE_ID] = origin  # type: ignore[assignment]
            yield sequence

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's collated batches from the stored position, in this process (one decoding
        thread; ``TeacherLoader`` for more)."""
        from kdcache.pipeline.distill.loader import stream_batches

        return stream_batches(self, threads=1, pin=False)

    def epoch_reads(self, start: int, part: Part = Part()) -> Iterator[EpochReads]:  # noqa: B008
        """This rank's reads (of ``part`` of its micro-batches), epoch by epoch, from stream
        position ``start`` on (lazily: an endless dataset's never end)."""
        n = self.num_sequences
        if n == 0:
            return
        epoch = first_epoch = start // n
        ordinal = 0  # micro-batches of this rank before this epoch's reads, in this pass
        last_batch = -1  # the last micro-batch of the epoch before (it may continue)
        while self.infinite or epoch == first_epoch:
            first, stop = max(start, epoch * n), (epoch + 1) * n
            positions = self.deal.positions(first, stop)  # (p,) ascending
            owner = positions // self.batch_size  # (p,) micro-batch of each read
            batches, which = np.unique(owner, return_inverse=True)  # (u,), (p,)
            base = ordinal - (1 if batches.size and batches[0] == last_batch else 0)
            if batches.size:
                ordinal, last_batch = base + batches.size, int(batches[-1])
            if part.parts > 1:
                keep = (base + which) % part.parts == part.index  # (p,)
                positions, owner = positions[keep], owner[keep]
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
                batch=owner,
                decode=decode,
                picks=picks,
                end=stop,
            )
            epoch += 1


class DistillCollator:
    """Pads a list of a store's sequences (``DistillDataset`` items) into one batch in Hugging
    Face conventions (``batches.py``); checks they come from the store it was made for.

    Args:
        dataset: the dataset (or its store) whose items it collates; gives the pad id and the
            store's fingerprint.
        pad_id: ``input_ids`` value of padding; default: the dataset's.
    """

    def __init__(self, dataset: DistillDataset | Store, pad_id: int | None = None) -> None:
        store = dataset.store if isinstance(dataset, DistillDataset) else dataset
        default_pad = dataset.pad_id if isinstance(dataset, DistillDataset) else 0
        self.pad_id = default_pad if pad_id is None else pad_id
        self.store_id = store_id(store)

    def __call__(self, sequences: list[Sequence]) -> dict[str, torch.Tensor]:
        """Raises:
        ValueError: a sequence of another store, or no sequences."""
        if not sequences:
            raise ValueError("the collator was given no sequences")
        for sequence in sequences:
            origin = sequence.get(STORE_ID)
            if origin is not None and str(origin) != self.store_id:
                raise ValueError(
                    "the collator was given a sequence of another store "
                    f"({origin} is not {self.store_id}); make one DistillCollator per store"
                )
        return collate(sequences, self.pad_id)


def manifest_fingerprint(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content facts (ignoring timestamps, version, finished flag)."""
    facts = {k: v for k, v in manifest.items() if k not in _VOLATILE_MANIFEST_FACTS}
    return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


def records_fingerprint(records: list[Any]) -> str:
    """sha256 of the commit records of the shards a run reads (``Store.shards_of(split)``): a
    store that gained, lost or replaced a shard since reads in another order — a resume refuses
    it, also when the counts of shards and tokens happen to agree."""
    digests = [[r.name, hashlib.sha256(r.to_bytes()).hexdigest()] for r in records]
    return hashlib.sha256(json.dumps(digests).encode()).hexdigest()


def store_id(store: Store) -> str:
    """A short id of a store's content (its manifest), stamped on the sequences it yields."""
    return manifest_fingerprint(store.manifest)[:16]
