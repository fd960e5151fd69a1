"""One shard being written: sequences buffered in memory, committed atomically (data first,
record last; docs/architecture.md §3)."""

from __future__ import annotations

import time
import uuid
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ._arrays import ShardArrays, ShardLayout
from ._base import ATTEMPT_VERSION, SHARDS_DIR, ShardRecord, sha256
from ._fs import TMP_PREFIX
from ._validate import prepare_sequence
from .errors import ShardExists
from .manifest import utc_now

if TYPE_CHECKING:
    from .writer import StoreWriter


def _numpy(values: Any) -> npt.NDArray[Any]:
    """numpy view of an array-like; torch tensors (any device, bfloat16 too) are moved to CPU."""
    if hasattr(values, "detach") and hasattr(values, "cpu"):  # a torch.Tensor, not imported
        values = values.detach().cpu()
        if str(values.dtype) == "torch.bfloat16":
            values = values.float()
        values = values.numpy()
    return np.asarray(values)


class ShardWriter:
    """Collects sequences of one shard in memory; ``commit()`` makes them visible atomically."""

    def __init__(
        self, store: StoreWriter, split: str, index: int, corpus_range: dict[str, Any] | None
    ) -> None:
        self._store = store
        self.split = split
        self.index = index
        self.name = f"{split}-{index:05d}"
        self.corpus_range = corpus_range
        self.num_sequences = 0
        self.num_tokens = 0
        self._parts: list[dict[str, npt.NDArray[Any]]] = []  # per sequence: stored fields
        self._done = False
        self._layout = ShardLayout.of(store.manifest)

    def append(
        self,
        tokens: Any,
        topk_ids: Any = None,
        topk_logprobs: Any = None,
        *,
        topk_tail_logprob: Any = None,
        sampled_distinct: Any = None,
        sampled_ids: Any = None,
        sampled_counts: Any = None,
        sampled_logprobs: Any = None,
        loss_mask: Any = None,
        next_token_logprob: Any = None,
        text: Any = None,
        token_ends: Any = None,
    ) -> None:
        """Add one sequence of L >= 1 tokens (numpy arrays or torch tensors on any device).

        Target arrays have one row per trained position: T = L, or T = loss_mask.sum().

        Args:
            tokens: (L,) ints, the teacher's input ids.
            topk_ids: (T, k) ints; topk_logprobs: (T, k) floats, each row descending.
            topk_tail_logprob: (T,) floats <= 0 (-inf: no mass outside the top-k), the
                teacher's logsumexp over the other ids; when omitted it is computed as
                log(1 - sum(exp(row))) in float64 (inexact for a tiny tail).
            sampled_distinct: (T,) ints >= 1, distinct ids drawn at each target row.
            sampled_ids: (M,) ints, M = sum(sampled_distinct), ascending within a row.
            sampled_counts: (M,) ints >= 1, summing to the store's ``samples`` per row.
            sampled_logprobs: (M,) floats <= 0, the teacher's log-prob of each drawn id.
            loss_mask: (L,) bools or 0/1 ints, 1 where position t is trained (its target rows
                are given, in order); required in a store with a loss mask (at least one 1:
                skip sequences with none), refused in one without.
            next_token_logprob: (L,) floats, the teacher's log-prob of ``tokens[t+1]`` at t,
                NaN at t = L-1; required in a store with ``next_token_logprob``, else refused.
            text: the text the tokens spell (str, UTF-8 bytes or (B,) uint8); token_ends: (L,)
                ints, token i spans ``text[ends[i-1]:ends[i]]``, the last = B; required (both)
                in a store with ``text``, else refused.

        The store's targets kind decides which targets are required; the others must be None.

        Raises:
            ValueError: a missing or extra array, wrong shapes, ids outside the vocabulary,
                rows not sorted descending, counts that do not sum to ``samples``, a mask that
                is not 0/1 or trains no position.
        """
        if self._done:
            raise ValueError(f"shard {self.name} is already committed or aborted, open a new one")
        given = {
            name: _numpy(value)
            for name, value in (
                ("topk_ids", topk_ids),
                ("topk_logprobs", topk_logprobs),
                ("topk_tail_logprob", topk_tail_logprob),
                ("sampled_distinct", sampled_distinct),
                ("sampled_ids", sampled_ids),
                ("sampled_counts", sampled_counts),
                ("sampled_logprobs", sampled_logprobs),
            )
            if value is not None
        }
        mask = None if loss_mask is None else _numpy(loss_mask)
        per_position = {
            "next_token_logprob": None
            if next_token_logprob is None
            else _numpy(next_token_logprob),
            "text": text,
            "token_ends": None if token_ends is None else _numpy(token_ends),
        }
        part = prepare_sequence(self._layout, _numpy(tokens), given, self.name, mask, per_position)
        self._parts.append(part)
        self.num_sequences += 1
        self.num_tokens += part["tokens"].shape[0]

    def commit(self) -> ShardRecord:
        """Write the shard's files, then its commit record (docs/architecture.md §3).

        The files go to keys unique to this attempt (``<shard>.<attempt><suffix>``, locally a
        temporary tree renamed there) and the record, which names them, is created only if
        absent (``StoreFS.create_exclusive``): of two writers of one shard exactly one commits,
        and the other can never overwrite data a record names; the loser deletes its attempt
        and raises ``ShardExists``.
        """
        if self._done:
            raise ValueError(f"shard {self.name} is already committed or aborted")
        if self.num_sequences == 0:
            raise ValueError(f"shard {self.name} has no sequences, append before committing")
        lengths = np.array([p["tokens"].shape[0] for p in self._parts], np.int64)
        fields = {
            name: np.concatenate([p[name] for p in self._parts]) for name in self._layout.fields
        }
        arrays = ShardArrays.from_fields(
            fields, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64), self.name
        )
        self._parts = []
        store = self._store
        codec, layout = store.codec, self._layout
        blobs = codec.encode(arrays, layout.logprob_dtype, layout.codec, layout.format_version)
        # format 7: this attempt's own keys (see ATTEMPT); an older store resumed as it is keeps
        # the one name its readers know (and the old hazard: a racing writer may overwrite it)
        legacy = layout.format_version < ATTEMPT_VERSION
        attempt = "" if legacy else f".{int(time.time()) & 0xFFFFFFFF:08x}{uuid.uuid4().hex[:8]}"
        final = f"{SHARDS_DIR}/{self.name}{attempt}{codec.suffix}"
        tmp = f"{SHARDS_DIR}/{TMP_PREFIX}{uuid.uuid4().hex}-{self.name}{attempt}{codec.suffix}"
        files: dict[str, dict[str, Any]] = {
            (f"{final}/{key}" if key else final): {"size": len(data), "sha256": sha256(data)}
            for key, data in sorted(blobs.items())
        }
        record = ShardRecord(
            name=self.name,
            split=self.split,
            index=self.index,
            backend=store.manifest["backend"],
            path=final,
            num_sequences=self.num_sequences,
            num_tokens=self.num_tokens,
            corpus_range=self.corpus_range,
            nbytes=sum(f["size"] for f in files.values()),
            files=files,
            created_at=utc_now(),
            num_trained=arrays.num_targets if self._layout.loss_mask else None,
        )
        fs = store._fs
        try:
            self._refuse_if_committed()  # early: another writer's record is there already
            if fs.is_local:  # a fsynced temporary tree renamed into place, then the record
                fs.write_tree(tmp, blobs)
                if legacy:
                    fs.remove(final)  # an uncommitted leftover of an earlier crash
                fs.move(tmp, final)
            else:  # no rename on an object store (a "move" copies every object)
                fs.write_tree(final, blobs)
            won = fs.create_exclusive(record.record_path, record.to_bytes())
        except BaseException:
            self._done = True
            if fs.is_local:
                fs.remove(tmp)
            if not legacy and not self._names(final):  # never data a record names
                fs.remove(final)
            raise
        self._done = True
        if not won:  # another writer committed this shard meanwhile: its data stays untouched
            if not legacy:
                fs.remove(final)
            raise self._committed_meanwhile()
        return record

    def _names(self, path: str) -> bool:
        """Whether this shard's commit record exists and names ``path`` (a commit interrupted
        after its record was created: the data is committed, and stays)."""
        fs = self._store._fs
        try:
            return bool(
                ShardRecord.from_bytes(fs.read(f"{SHARDS_DIR}/{self.name}.json"), self.name).path
                == path
            )
        except Exception:  # no record, or one that cannot be read: not ours to keep
            return False

    def _committed_meanwhile(self) -> ShardExists:
        return ShardExists(
            f"shard committed by another writer meanwhile, {self.name} in {self._store.url}, "
            "run one writer per store (rerunning afterwards resumes it)"
        )

    def _refuse_if_committed(self) -> None:
        if self._store._fs.exists(f"{SHARDS_DIR}/{self.name}.json"):
            raise self._committed_meanwhile()

    def abort(self) -> None:
        """Drop the buffered sequences; nothing of this shard becomes visible."""
        self._parts = []
        self._done = True

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.commit()
        else:
            self.abort()
