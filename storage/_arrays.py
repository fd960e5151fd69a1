"""The in-memory shard and sequence: the fields of docs/architecture.md §3 as numpy arrays.

A field a store's targets kind lacks is ``None``. Sampled entries are flat: position t owns
entries ``sampled_offsets[t]:sampled_offsets[t + 1]``, with
``sampled_offsets = [0, cumsum(sampled_distinct)]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .manifest import has_samples, has_topk

# one entry per token: arrays of shape (N,) or (N, k)
TOKEN_FIELDS = ("tokens", "topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct")
# one entry per distinct sampled id: arrays of shape (M,), M = sum(sampled_distinct)
SAMPLE_FIELDS = ("sampled_ids", "sampled_counts", "sampled_logprobs")
FIELDS = (*TOKEN_FIELDS, *SAMPLE_FIELDS)
LOGPROB_FIELDS = ("topk_logprobs", "sampled_logprobs")
# numpy dtype a log-prob field has on disk, by the manifest's logprob_dtype
RAW_LOGPROB_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}

NDArray = npt.NDArray[Any]


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of a store holds, read off its manifest."""

    fields: tuple[str, ...]  # the stored fields, in file order (``seq_offsets`` aside)
    targets: str
    format_version: int
    vocab_size: int
    top_k: int
    samples: int
    id_dtype: str
    count_dtype: str | None
    logprob_dtype: str

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> ShardLayout:
        """The layout of a validated manifest (either format version)."""
        names = ["tokens"]
        if has_topk(manifest):
            names += ["topk_ids", "topk_logprobs"]
            if manifest["format_version"] >= 2:
                names.append("topk_tail_logprob")
        if has_samples(manifest):
            names += ["sampled_distinct", *SAMPLE_FIELDS]
        return cls(
            fields=tuple(names),
            targets=manifest["targets"],
            format_version=manifest["format_version"],
            vocab_size=manifest["vocab_size"],
            top_k=manifest["top_k"],
            samples=manifest["samples"],
            id_dtype=manifest["id_dtype"],
            count_dtype=manifest["count_dtype"],
            logprob_dtype=manifest["logprob_dtype"],
        )


def offsets_of(distinct: NDArray) -> npt.NDArray[np.int64]:
    """(L+1,) int64 ``[0, cumsum(distinct)]`` of per-position entry counts ``distinct`` (L,)."""
    out = np.empty(distinct.shape[0] + 1, np.int64)
    out[0] = 0
    np.cumsum(distinct, dtype=np.int64, out=out[1:])
    return out


def tail_from_topk(logprobs: NDArray, *, complete: bool = False) -> npt.NDArray[np.float32]:
    """log(1 - sum(exp(row))) of top-k rows (N, k), in float64, as float32 (N,).

    The mass is clamped to 1 (then the tail is -inf); ``complete`` (k = vocab) gives -inf
    outright. Inexact for a small tail when the rows are float16: prefer the teacher's
    logsumexp over the other ids where it is at hand.
    """
    if complete:
        return np.full(logprobs.shape[0], -np.inf, np.float32)
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=-1)  # (N,)
    with np.errstate(divide="ignore"):
        tail: npt.NDArray[np.float32] = np.log1p(-np.minimum(mass, 1.0)).astype(np.float32)
    return tail


def bf16_to_float32(raw: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Raw bfloat16 bit patterns (any shape) -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: NDArray) -> npt.NDArray[np.uint16]:
    """float32 (any shape) -> raw bfloat16 bit patterns, round-to-nearest-even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def stored_logprobs(values: NDArray, logprob_dtype: str) -> NDArray:
    """Log-probs (any shape, any float, or raw bfloat16 bits) in the dtype they are stored in."""
    if logprob_dtype == "bfloat16":
        if values.dtype == np.uint16:
            return values
        return float32_to_bf16(values.astype(np.float32, copy=False))
    return values.astype(logprob_dtype, copy=False)


def decoded_logprobs(raw: NDArray, logprob_dtype: str) -> NDArray:
    """Stored log-probs as numbers: float16/float32 as they are, bfloat16 as float32."""
    return bf16_to_float32(raw) if logprob_dtype == "bfloat16" else raw


def _cut(values: NDArray | None, a: int, b: int) -> NDArray | None:
    return None if values is None else values[a:b]


@dataclass(frozen=True)
class TeacherSequence:
    """One teacher input of L tokens, M_s sampled entries; a field the store lacks is None.

    Attributes:
        tokens: int32 (L,).
        topk_ids: id dtype (L, k). topk_logprobs: float16 or float32 (L, k), descending.
        shard, index: where it came from (the index within its shard).
        topk_tail_logprob: float32 (L,), log of the mass outside the top-k (-inf for none).
        sampled_distinct: count dtype (L,), distinct ids drawn at each position (>= 1).
        sampled_ids, sampled_counts, sampled_logprobs: (M_s,) this sequence's entries only.
    """

    tokens: NDArray
    topk_ids: NDArray | None
    topk_logprobs: NDArray | None
    shard: str
    index: int
    topk_tail_logprob: NDArray | None = None
    sampled_distinct: NDArray | None = None
    sampled_ids: NDArray | None = None
    sampled_counts: NDArray | None = None
    sampled_logprobs: NDArray | None = None

    @property
    def sampled_offsets(self) -> npt.NDArray[np.int64] | None:
        """(L+1,) int64: position t owns sampled entries off[t]:off[t+1]; None without samples."""
        return None if self.sampled_distinct is None else offsets_of(self.sampled_distinct)


@dataclass
class ShardArrays:
    """A decoded shard: N tokens in S sequences; sequence i is rows seq_offsets[i]:seq_offsets[i+1].

    Attributes:
        tokens: int32 (N,).
        topk_ids: uint16 or uint32 (N, k); None without top-k targets.
        topk_logprobs: float16 or float32 (N, k); bfloat16 stores are returned as float32.
        seq_offsets: int64 (S+1,), starts at 0, ends at N.
        shard: name of the shard these came from.
        topk_tail_logprob: float32 (N,); for version-1 stores computed from ``topk_logprobs``
            as log(1 - sum(exp(row))), which is inexact for a small tail in float16.
        sampled_distinct: uint8 or uint16 (N,); None without sampled targets.
        sampled_ids: id dtype (M,), ascending within a position.
        sampled_counts: uint8 or uint16 (M,), each position's sum to the store's ``samples``.
        sampled_logprobs: as ``topk_logprobs`` (M,), the teacher's log-prob of each id.
    """

    tokens: NDArray
    topk_ids: NDArray | None
    topk_logprobs: NDArray | None
    seq_offsets: npt.NDArray[np.int64]
    shard: str = ""
    topk_tail_logprob: NDArray | None = None
    sampled_distinct: NDArray | None = None
    sampled_ids: NDArray | None = None
    sampled_counts: NDArray | None = None
    sampled_logprobs: NDArray | None = None
    _offsets: tuple[NDArray, npt.NDArray[np.int64]] | None = field(
        default=None, init=False, repr=False, compare=False
    )

    @classmethod
    def from_fields(
        cls, fields: dict[str, NDArray], seq_offsets: npt.NDArray[np.int64], shard: str
    ) -> ShardArrays:
        """Arrays from ``{field name: array}``; absent fields are None."""
        return cls(
            tokens=fields["tokens"],
            topk_ids=fields.get("topk_ids"),
            topk_logprobs=fields.get("topk_logprobs"),
            seq_offsets=seq_offsets,
            shard=shard,
            topk_tail_logprob=fields.get("topk_tail_logprob"),
            sampled_distinct=fields.get("sampled_distinct"),
            sampled_ids=fields.get("sampled_ids"),
            sampled_counts=fields.get("sampled_counts"),
            sampled_logprobs=fields.get("sampled_logprobs"),
        )

    def fields(self) -> dict[str, NDArray]:
        """``{field name: array}`` of the fields present, in file order (no ``seq_offsets``)."""
        return {name: value for name in FIELDS if (value := getattr(self, name)) is not None}

    @property
    def sampled_offsets(self) -> npt.NDArray[np.int64] | None:
        """(N+1,) int64: token t owns sampled entries off[t]:off[t+1]; None without samples.

        Cached until ``sampled_distinct`` is replaced by another array (in-place edits of it
        are not seen).
        """
        distinct = self.sampled_distinct
        if distinct is None:
            return None
        if self._offsets is None or self._offsets[0] is not distinct:
            self._offsets = (distinct, offsets_of(distinct))
        return self._offsets[1]

    @property
    def num_sequences(self) -> int:
        return int(self.seq_offsets.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def sequence(self, i: int) -> TeacherSequence:
        """Sequence ``i`` as views into the shard arrays."""
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"sequence index out of range, {i}, shard has {self.num_sequences}")
        i %= self.num_sequences
        a, b = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        off = self.sampled_offsets
        sa, sb = (int(off[a]), int(off[b])) if off is not None else (0, 0)
        return TeacherSequence(
            self.tokens[a:b],
            _cut(self.topk_ids, a, b),
            _cut(self.topk_logprobs, a, b),
            self.shard,
            i,
            topk_tail_logprob=_cut(self.topk_tail_logprob, a, b),
            sampled_distinct=_cut(self.sampled_distinct, a, b),
            sampled_ids=_cut(self.sampled_ids, sa, sb),
            sampled_counts=_cut(self.sampled_counts, sa, sb),
            sampled_logprobs=_cut(self.sampled_logprobs, sa, sb),
        )

    def __len__(self) -> int:
        return self.num_sequences

    def __iter__(self) -> Iterator[TeacherSequence]:
        for i in range(self.num_sequences):
            yield self.sequence(i)
