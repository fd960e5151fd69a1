"""What both backends share: the in-memory shard, commit records, checksums and invariants.

A backend (``_zarr.py``, ``_arrow.py``) only turns a ``ShardArrays`` into files (bytes keyed by
a path relative to the shard) and back; everything else — commit protocol, checksums, record
validation, invariant checks — lives here and in ``writer.py``/``reader.py``.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from .errors import StoreCorrupt
from .manifest import dumps

SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^([a-z][a-z0-9_]*)-(\d{5,})$")
RECORD_VERSION = 1


@dataclass(frozen=True)
class TeacherSequence:
    """One teacher forward input: tokens (L,), topk_ids (L, k), topk_logprobs (L, k)."""

    tokens: npt.NDArray[Any]
    topk_ids: npt.NDArray[Any]
    topk_logprobs: npt.NDArray[Any]
    shard: str
    index: int


@dataclass
class ShardArrays:
    """A decoded shard: N tokens in S sequences; sequence i is rows seq_offsets[i]:seq_offsets[i+1].

    Attributes:
        tokens: int32 (N,).
        topk_ids: uint16 or uint32 (N, k).
        topk_logprobs: float16 or float32 (N, k); bfloat16 stores are returned as float32.
        seq_offsets: int64 (S+1,), starts at 0, ends at N.
        shard: name of the shard these came from.
    """

    tokens: npt.NDArray[Any]
    topk_ids: npt.NDArray[Any]
    topk_logprobs: npt.NDArray[Any]
    seq_offsets: npt.NDArray[np.int64]
    shard: str = ""

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
        return TeacherSequence(
            self.tokens[a:b], self.topk_ids[a:b], self.topk_logprobs[a:b], self.shard, i
        )

    def __len__(self) -> int:
        return self.num_sequences

    def __iter__(self) -> Iterator[TeacherSequence]:
        for i in range(self.num_sequences):
            yield self.sequence(i)


@dataclass(frozen=True)
class ShardRecord:
    """The commit record of a shard; its presence in the store means the shard is committed.

    ``path`` and the keys of ``files`` are relative to the store root
    (``shards/train-00003.zarr``, ``shards/train-00003.zarr/topk_ids/c/0/0``); each file maps
    to ``{"size": bytes, "sha256": hex}``. On disk the record also carries its own sha256.
    """

    name: str
    split: str
    index: int
    backend: str
    path: str
    num_sequences: int
    num_tokens: int
    corpus_range: dict[str, Any] | None
    nbytes: int
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: str = ""

    @property
    def record_path(self) -> str:
        return f"{SHARDS_DIR}/{self.name}.json"

    def to_bytes(self) -> bytes:
        """Canonical JSON with a checksum of its own content, so any flipped byte is caught."""
        body = asdict(self)
        body["record_version"] = RECORD_VERSION
        body["record_sha256"] = sha256(dumps(body))
        return dumps(body)

    @classmethod
    def from_bytes(cls, data: bytes, name: str) -> ShardRecord:
        """Parse and validate a commit record named ``name`` (raises ``StoreCorrupt``)."""
        try:
            body = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise StoreCorrupt(f"commit record of {name} is not valid JSON, {e}", shard=name) from e
        if not isinstance(body, dict):
            raise StoreCorrupt(f"commit record of {name} is not a JSON object", shard=name)
        if dumps(body) != data:
            raise StoreCorrupt(f"commit record of {name} is not in canonical form", shard=name)
        checksum = body.pop("record_sha256", None)
        if checksum != sha256(dumps(body)):
            raise StoreCorrupt(f"commit record of {name} fails its own checksum", shard=name)
        if body.pop("record_version", None) != RECORD_VERSION:
            raise StoreCorrupt(f"commit record of {name} has an unknown record_version", shard=name)
        try:
            record = cls(**body)
        except TypeError as e:
            raise StoreCorrupt(f"commit record of {name} has wrong fields, {e}", shard=name) from e
        record.validate(name)
        return record

    def validate(self, name: str) -> None:
        """Check names and paths (no traversal), counts and file entries."""

        def bad(problem: str) -> StoreCorrupt:
            return StoreCorrupt(f"commit record of {name}: {problem}", shard=name)

        match = SHARD_NAME.match(self.name) if isinstance(self.name, str) else None
        if self.name != name or match is None:
            raise bad(f"names shard {self.name!r}")
        if self.split != match.group(1) or self.index != int(match.group(2)):
            raise bad(f"split/index {self.split!r}/{self.index!r} do not match the name")
        expected = f"{SHARDS_DIR}/{name}{BACKEND_SUFFIX.get(self.backend, '?')}"
        if self.path != expected:
            raise bad(f"path {self.path!r} is not {expected!r} (path traversal or wrong backend)")
        for key in ("num_sequences", "num_tokens", "nbytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{key} is {value!r}")
        if self.num_tokens < self.num_sequences:
            raise bad(f"{self.num_tokens} tokens in {self.num_sequences} sequences")
        if not isinstance(self.files, dict) or not self.files:
            raise bad("lists no files")
        total = 0
        for rel, info in self.files.items():
            parts = rel.split("/") if isinstance(rel, str) else [""]
            if not (rel == self.path or rel.startswith(self.path + "/")) or any(
                p in ("", ".", "..") for p in parts
            ):
                raise bad(f"file {rel!r} is outside the shard (path traversal)")
            if not isinstance(info, dict) or not isinstance(info.get("size"), int):
                raise bad(f"file {rel!r} has no size")
            if not re.fullmatch(r"[0-9a-f]{64}", str(info.get("sha256"))):
                raise bad(f"file {rel!r} has no sha256")
            total += info["size"]
        if total != self.nbytes:
            raise bad(f"nbytes {self.nbytes} != sum of file sizes {total}")


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sortable_bits(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Map float bit patterns to unsigned ints with the same order (the IEEE total-order trick).

    ``values``: any shape, float16/float32 or raw bfloat16 (uint16). Lets the "sorted
    descending" check run on integers, which numpy compares far faster than float16.
    """
    if values.dtype.itemsize == 2:
        raw16 = values.view(np.uint16)
        return np.where(raw16 >= 0x8000, ~raw16, raw16 | np.uint16(0x8000))
    raw32 = values.view(np.uint32)
    return np.where(raw32 >= 0x80000000, ~raw32, raw32 | np.uint32(0x80000000))


def rows_sorted_descending(raw: npt.NDArray[Any]) -> bool:
    """True when every row of ``raw`` (N, k) — float16/32 or raw bfloat16 bits — is descending.

    Fast path: for negative floats the signed-integer view grows as the value falls, so a row
    whose integer view is non-decreasing and ends negative is all negative and sorted — the
    usual case for log-probs, settled in one integer pass. Anything else (zeros, positive
    values, NaN) is decided by comparing exact total-order keys.
    """
    if raw.shape[0] == 0 or raw.shape[1] < 2:
        return True
    signed: npt.NDArray[np.signedinteger[Any]] = raw.view(
        np.int16 if raw.dtype.itemsize == 2 else np.int32
    )  # (N, k)
    if (signed[:, -1] < 0).all() and not (signed[:, 1:] < signed[:, :-1]).any():
        return True
    keys = sortable_bits(raw)
    return not bool((keys[:, 1:] > keys[:, :-1]).any())


def check_invariants(
    arrays: ShardArrays,
    *,
    raw_logprobs: npt.NDArray[Any],
    top_k: int,
    vocab_size: int,
    record: ShardRecord | None = None,
) -> None:
    """Cheap whole-shard checks: shapes, offsets, id range, rows sorted descending.

    ``raw_logprobs`` is the array as stored (bfloat16 still as uint16) so the sort check needs
    no conversion. Raises ``StoreCorrupt`` naming the shard.
    """
    name = arrays.shard

    def bad(problem: str) -> StoreCorrupt:
        return StoreCorrupt(f"shard {name} is corrupt: {problem}, run `kdcache verify`", shard=name)

    n = arrays.tokens.shape[0]
    if arrays.tokens.ndim != 1 or arrays.topk_ids.shape != (n, top_k):
        raise bad(f"topk_ids shape {arrays.topk_ids.shape} for {n} tokens at k={top_k}")
    if arrays.topk_logprobs.shape != (n, top_k):
        raise bad(f"topk_logprobs shape {arrays.topk_logprobs.shape} for {n} tokens at k={top_k}")
    offsets = arrays.seq_offsets
    if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n:
        raise bad(f"seq_offsets do not span the {n} tokens")
    if (np.diff(offsets) < 1).any():
        raise bad("a sequence is empty or offsets decrease")
    if record is not None and (record.num_tokens, record.num_sequences) != (
        n,
        arrays.num_sequences,
    ):
        raise bad(
            f"{n} tokens/{arrays.num_sequences} sequences, "
            f"record says {record.num_tokens}/{record.num_sequences}"
        )
    if n and int(arrays.topk_ids.max()) >= vocab_size:
        raise bad(f"id {int(arrays.topk_ids.max())} >= vocab_size {vocab_size}")
    if n and (arrays.tokens.min() < 0 or arrays.tokens.max() >= vocab_size):
        raise bad(f"a token id is outside [0, {vocab_size})")
    if n:
        if not rows_sorted_descending(raw_logprobs):
            raise bad("top-k log-probs are not sorted descending")
        first = arrays.topk_logprobs[:, 0]
        last = arrays.topk_logprobs[:, -1]
        if not (first <= 0).all() or np.isnan(last).any():
            raise bad("a log-prob is positive or NaN")


class ShardCodec(ABC):
    """One backend: a ShardArrays <-> files (relative key -> bytes). "" keys a single-file shard."""

    suffix: str

    @abstractmethod
    def encode(self, arrays: ShardArrays, logprob_dtype: str) -> dict[str, bytes]:
        """Encode a shard; ``arrays.topk_logprobs`` is already in the stored dtype (raw bf16)."""

    @abstractmethod
    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[ShardArrays, npt.NDArray[Any], str]:
        """Decode to (arrays with float logprobs, raw stored logprobs, stored logprob dtype)."""


BACKEND_SUFFIX = {"zarr": ".zarr", "arrow": ".arrow"}


def get_codec(backend: str) -> ShardCodec:
    """The codec of ``backend`` (imported lazily: a zarr reader need not import pyarrow)."""
    if backend == "zarr":
        from ._zarr import ZarrCodec

        return ZarrCodec()
    from ._arrow import ArrowCodec

    return ArrowCodec()


def bf16_to_float32(raw: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Raw bfloat16 bit patterns (any shape) -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: npt.NDArray[Any]) -> npt.NDArray[np.uint16]:
    """float32 (any shape) -> raw bfloat16 bit patterns, round-to-nearest-even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def record_name(entry: str) -> str | None:
    """The shard name of a commit record file name ("train-00003.json"), else None."""
    if not entry.endswith(".json"):
        return None
    name = entry[: -len(".json")]
    return name if SHARD_NAME.match(name) else None


def temporary_target(entry: str) -> str | None:
    """For a temporary ".tmp-<32 hex>-<target>", the target file name; else None."""
    match = re.fullmatch(r"\.tmp-[0-9a-f]{32}-(.+)", entry)
    return match.group(1) if match else None
