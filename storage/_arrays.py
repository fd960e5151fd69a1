"""The in-memory shard and sequence: the fields of docs/architecture.md §3 as numpy arrays.

A field a store lacks is ``None``. Target fields hold one row per trained position: T rows,
with T = N without a loss mask and T = ``loss_mask.sum()`` with one; row r belongs to token
``trained_positions[r]``. Sampled entries are flat: target row r owns entries
``sampled_offsets[r]:sampled_offsets[r + 1]``, with
``sampled_offsets = [0, cumsum(sampled_distinct)]``.

Two representations travel in a ``ShardArrays``: *decoded* (what readers get: log-probs as
floats, ids as ids) and, on the way to a backend, *stored* (``prepare_sequence``'s output):
log-prob fields in their stored form — float16/float32, raw bfloat16 bits (uint16), or for a
``gaps`` store int16 levels (``_codec.py``; top-k rows as first level and gaps), the tail
included. Ids are ids in both; a backend turns a ``gaps`` shard's top-k ids into codes and its
id table (``_stored.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from ._floats import bf16_to_float32 as bf16_to_float32
from ._floats import decoded_logprobs as decoded_logprobs
from ._floats import float32_to_bf16 as float32_to_bf16
from ._floats import stored_logprobs as stored_logprobs
from ._floats import tail_from_topk as tail_from_topk
from .manifest import has_samples, has_topk

# one entry per token: arrays of shape (N,) (``token_bytes``: the bytes of ``text`` each spells)
TOKEN_FIELDS = ("tokens", "loss_mask", "next_token_logprob", "token_bytes")
# one row per trained position (every position without a loss mask): (T,) or (T, k)
TARGET_FIELDS = ("topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct")
# one entry per distinct sampled id: arrays of shape (M,), M = sum(sampled_distinct)
SAMPLE_FIELDS = ("sampled_ids", "sampled_counts", "sampled_logprobs")
# one entry per byte of the sequences' text: (B,) uint8, B = sum(token_bytes)
TEXT_FIELDS = ("text",)
FIELDS = (*TOKEN_FIELDS, *TARGET_FIELDS, *SAMPLE_FIELDS, *TEXT_FIELDS)  # file order
LOGPROB_FIELDS = ("topk_logprobs", "sampled_logprobs", "next_token_logprob")
# a gaps store's shard holds this besides its fields: the top-k ids by frequency (codes index it)
ID_TABLE = "topk_id_table"
# numpy dtype a log-prob field has on disk, by the manifest's logprob_dtype
RAW_LOGPROB_DTYPE = {"float16": "float16", "float32": "float32", "bfloat16": "uint16"}

NDArray = npt.NDArray[Any]


@dataclass(frozen=True)
class ShardLayout:
    """What every shard of a store holds, read off its manifest."""

    fields: tuple[str, ...]  # the stored fields, in file order (``seq_offsets`` aside)
    targets: str
    codec: str  # "raw" or "gaps" (``_codec.py``; every store before version 4: "raw")
    loss_mask: bool  # True: a ``loss_mask`` field, target rows at its trained positions only
    format_version: int
    vocab_size: int
    top_k: int
    samples: int
    id_dtype: str
    count_dtype: str | None
    logprob_dtype: str

    @classmethod
    def of(cls, manifest: dict[str, Any]) -> ShardLayout:
        """The layout of a validated manifest (any readable format version)."""
        names = ["tokens"]
        if manifest["loss_mask"]:
            names.append("loss_mask")
        if manifest["next_token_logprob"]:
            names.append("next_token_logprob")
        if manifest["text"]:
            names.append("token_bytes")
        if has_topk(manifest):
            names += ["topk_ids", "topk_logprobs"]
            if manifest["format_version"] >= 2:
                names.append("topk_tail_logprob")
        if has_samples(manifest):
            names += ["sampled_distinct", *SAMPLE_FIELDS]
        if manifest["text"]:
            names.append("text")
        return cls(
            fields=tuple(names),
            targets=manifest["targets"],
            codec=manifest["codec"],
            loss_mask=manifest["loss_mask"],
            format_version=manifest["format_version"],
            vocab_size=manifest["vocab_size"],
            top_k=manifest["top_k"],
            samples=manifest["samples"],
            id_dtype=manifest["id_dtype"],
            count_dtype=manifest["count_dtype"],
            logprob_dtype=manifest["logprob_dtype"],
        )

    @property
    def stored_fields(self) -> tuple[str, ...]:
        """What a shard's files hold (``seq_offsets`` aside): the fields, and in a ``gaps``
        store with top-k targets the id table its ``topk_ids`` codes index."""
        if self.codec == "gaps" and "topk_ids" in self.fields:
            return (*self.fields, ID_TABLE)
        return self.fields


def offsets_of(distinct: NDArray) -> npt.NDArray[np.int64]:
    """(L+1,) int64 ``[0, cumsum(distinct)]`` of per-position entry counts ``distinct`` (L,)."""
    out = np.empty(distinct.shape[0] + 1, np.int64)
    out[0] = 0
    np.cumsum(distinct, dtype=np.int64, out=out[1:])
    return out


def trained_positions_of(mask: NDArray | None, n: int) -> npt.NDArray[np.int64]:
    """(T,) int64 positions whose ``mask`` (n,) entry is nonzero; ``arange(n)`` without one."""
    if mask is None:
        return np.arange(n, dtype=np.int64)
    return np.flatnonzero(mask).astype(np.int64, copy=False)


def _cut(values: NDArray | None, a: int, b: int) -> NDArray | None:
    return None if values is None else values[a:b]


@dataclass(frozen=True)
class TeacherSequence:
    """One teacher input of L tokens, T_s trained positions, M_s sampled entries; a field the
    store lacks is None.

    Attributes:
        tokens: int32 (L,).
        topk_ids: id dtype (T_s, k). topk_logprobs: float16 or float32 (T_s, k), descending.
        shard, index: where it came from (the index within its shard).
        topk_tail_logprob: float32 (T_s,), log of the mass outside the top-k (-inf for none).
        sampled_distinct: count dtype (T_s,), distinct ids drawn at each target row (>= 1).
        sampled_ids, sampled_counts, sampled_logprobs: (M_s,) this sequence's entries only.
        loss_mask: uint8 (L,), 1 where position t is trained; None in a store without a mask
            (then T_s = L). Target row r is position ``trained_positions[r]``'s.
        next_token_logprob: as ``topk_logprobs`` (L,), the teacher's log-prob of ``tokens[t+1]``
            at position t (every position, trained or not), NaN at t = L-1; None in a store
            without it (format_version < 6).
        text: uint8 (B_s,), the UTF-8 bytes the tokens spell (``.tobytes()``); token_ends:
            int64 (L,), token i spans ``text[ends[i-1]:ends[i]]`` (ends[-1] = 0; special tokens
            spell 0 bytes); both None in a store without text.
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
    loss_mask: NDArray | None = None
    next_token_logprob: NDArray | None = None
    text: NDArray | None = None
    token_ends: NDArray | None = None

    @property
    def sampled_offsets(self) -> npt.NDArray[np.int64] | None:
        """(T_s+1,) int64: target row r owns sampled entries off[r]:off[r+1]; None without
        samples."""
        return None if self.sampled_distinct is None else offsets_of(self.sampled_distinct)

    @cached_property
    def trained_positions(self) -> npt.NDArray[np.int64]:
        """(T_s,) int64: the position each target row belongs to (``arange(L)`` without a mask)."""
        return trained_positions_of(self.loss_mask, int(self.tokens.shape[0]))


@dataclass
class ShardArrays:
    """A decoded shard: N tokens in S sequences, T target rows.

    Sequence i is tokens ``seq_offsets[i]:seq_offsets[i+1]`` and target rows
    ``target_offsets[i]:target_offsets[i+1]`` (the same without a loss mask).

    Attributes:
        tokens: int32 (N,).
        topk_ids: uint16 or uint32 (T, k); None without top-k targets.
        topk_logprobs: float16 or float32 (T, k); bfloat16 stores are returned as float32.
        seq_offsets: int64 (S+1,), starts at 0, ends at N.
        shard: name of the shard these came from.
        topk_tail_logprob: float32 (T,); for version-1 stores computed from ``topk_logprobs``
            as log(1 - sum(exp(row))), which is inexact for a small tail in float16.
        sampled_distinct: uint8 or uint16 (T,); None without sampled targets.
        sampled_ids: id dtype (M,), ascending within a target row.
        sampled_counts: uint8 or uint16 (M,), each row's sum to the store's ``samples``.
        sampled_logprobs: as ``topk_logprobs`` (M,), the teacher's log-prob of each id.
        loss_mask: uint8 (N,), 1 where a position is trained (T = its sum); None in a store
            without a mask (T = N).
        next_token_logprob: as ``topk_logprobs`` (N,), NaN at each sequence's last position.
        token_bytes: uint8, uint16 or uint32 (N,), the bytes of ``text`` each token spells.
        text: uint8 (B,), the sequences' UTF-8 text, one after the other (B = token_bytes sum).
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
    loss_mask: NDArray | None = None
    next_token_logprob: NDArray | None = None
    token_bytes: NDArray | None = None
    text: NDArray | None = None
    # caches, keyed by the arrays they were computed from (replaced arrays are seen, in-place
    # edits are not)
    _offsets: tuple[NDArray, npt.NDArray[np.int64]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _trained: tuple[NDArray, npt.NDArray[np.int64]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _target_offsets: tuple[NDArray, NDArray, npt.NDArray[np.int64]] | None = field(
        default=None, init=False, repr=False, compare=False
    )
    _text_offsets: tuple[NDArray, NDArray, npt.NDArray[np.int64]] | None = field(
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
            loss_mask=fields.get("loss_mask"),
            next_token_logprob=fields.get("next_token_logprob"),
            token_bytes=fields.get("token_bytes"),
            text=fields.get("text"),
        )

    def fields(self) -> dict[str, NDArray]:
        """``{field name: array}`` of the fields present, in file order (no ``seq_offsets``)."""
        return {name: value for name in FIELDS if (value := getattr(self, name)) is not None}

    @property
    def sampled_offsets(self) -> npt.NDArray[np.int64] | None:
        """(T+1,) int64: target row r owns sampled entries off[r]:off[r+1]; None without samples.

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
    def trained_positions(self) -> npt.NDArray[np.int64]:
        """(T,) int64: the token position of each target row, ascending (``arange(N)`` without a
        loss mask). Cached like ``sampled_offsets``."""
        key = self.tokens if self.loss_mask is None else self.loss_mask
        if self._trained is None or self._trained[0] is not key:
            self._trained = (key, trained_positions_of(self.loss_mask, self.num_tokens))
        return self._trained[1]

    @property
    def target_offsets(self) -> npt.NDArray[np.int64]:
        """(S+1,) int64: sequence i owns target rows off[i]:off[i+1] (``seq_offsets`` without a
        loss mask, else the mask's running sum at the sequence boundaries). Cached like
        ``sampled_offsets``."""
        mask = self.loss_mask
        if mask is None:
            return self.seq_offsets
        cached = self._target_offsets
        if cached is None or cached[0] is not mask or cached[1] is not self.seq_offsets:
            cached = (mask, self.seq_offsets, offsets_of(mask)[self.seq_offsets])
            self._target_offsets = cached
        return cached[2]

    @property
    def text_offsets(self) -> npt.NDArray[np.int64] | None:
        """(S+1,) int64: sequence i's text is ``text[off[i]:off[i+1]]``; None without text.
        Cached like ``target_offsets``."""
        lengths = self.token_bytes
        if lengths is None:
            return None
        cached = self._text_offsets
        if cached is None or cached[0] is not lengths or cached[1] is not self.seq_offsets:
            cached = (lengths, self.seq_offsets, offsets_of(lengths)[self.seq_offsets])
            self._text_offsets = cached
        return cached[2]

    @property
    def num_sequences(self) -> int:
        return int(self.seq_offsets.shape[0]) - 1

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def num_targets(self) -> int:
        """T: target rows (trained positions) of the shard."""
        return self.num_tokens if self.loss_mask is None else int(self.target_offsets[-1])

    def sequence(self, i: int) -> TeacherSequence:
        """Sequence ``i`` as views into the shard arrays."""
        if not -self.num_sequences <= i < self.num_sequences:
            raise IndexError(f"sequence index out of range, {i}, shard has {self.num_sequences}")
        i %= self.num_sequences
        a, b = int(self.seq_offsets[i]), int(self.seq_offsets[i + 1])
        rows = self.target_offsets
        ra, rb = int(rows[i]), int(rows[i + 1])
        off = self.sampled_offsets
        sa, sb = (int(off[ra]), int(off[rb])) if off is not None else (0, 0)
        text = ends = None
        spans = self.text_offsets
        if spans is not None and self.token_bytes is not None and self.text is not None:
            ends = np.cumsum(self.token_bytes[a:b], dtype=np.int64)  # (L,)
            text = self.text[int(spans[i]) : int(spans[i + 1])]
        return TeacherSequence(
            self.tokens[a:b],
            _cut(self.topk_ids, ra, rb),
            _cut(self.topk_logprobs, ra, rb),
            self.shard,
            i,
            topk_tail_logprob=_cut(self.topk_tail_logprob, ra, rb),
            sampled_distinct=_cut(self.sampled_distinct, ra, rb),
            sampled_ids=_cut(self.sampled_ids, sa, sb),
            sampled_counts=_cut(self.sampled_counts, sa, sb),
            sampled_logprobs=_cut(self.sampled_logprobs, sa, sb),
            loss_mask=_cut(self.loss_mask, a, b),
            next_token_logprob=_cut(self.next_token_logprob, a, b),
            text=text,
            token_ends=ends,
        )

    def __len__(self) -> int:
        return self.num_sequences

    def __iter__(self) -> Iterator[TeacherSequence]:
        for i in range(self.num_sequences):
            yield self.sequence(i)
