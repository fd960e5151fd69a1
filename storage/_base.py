"""What both backends share: commit records, checksums, shard names and the codec interface.

A backend (``_zarr.py``, ``_arrow.py``) only turns a ``ShardArrays`` (``_arrays.py``) into
files (bytes keyed by a path relative to the shard) and back; everything else — commit
protocol, checksums, record validation (here), invariant checks (``_validate.py``) — lives
outside the backends.
"""

from __future__ import annotations

import hashlib
import json
import re
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy.typing as npt

from ._arrays import ShardArrays
from .errors import StoreCorrupt
from .manifest import FORMAT_VERSION, dumps

SHARDS_DIR = "shards"
SHARD_NAME = re.compile(r"^([a-z][a-z0-9_]*)-(\d{5,})$")
RECORD_VERSION = 1


@dataclass(frozen=True)
class ShardRecord:
    """The commit record of a shard; its presence in the store means the shard is committed.

    ``path`` and the keys of ``files`` are relative to the store root
    (``shards/train-00003.zarr``, ``shards/train-00003.zarr/topk_ids/c/0/0``); each file maps
    to ``{"size": bytes, "sha256": hex}``. On disk the record also carries its own sha256.
    ``num_trained`` is the shard's trained positions (``loss_mask.sum()``) in a store with a
    loss mask, None (and absent on disk) otherwise.
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
    num_trained: int | None = None

    @property
    def record_path(self) -> str:
        return f"{SHARDS_DIR}/{self.name}.json"

    def content_files(self) -> dict[str, dict[str, Any]]:
        """``files`` keyed relative to the shard's ``path`` ("" for a one-file shard): the
        shard's content apart from the write attempt that named it, so two writes of the same
        data compare equal."""
        cut = len(self.path) + 1
        return {(k[cut:] if k != self.path else ""): v for k, v in sorted(self.files.items())}

    def to_bytes(self) -> bytes:
        """Canonical JSON with a checksum of its own content, so any flipped byte is caught."""
        body = asdict(self)
        if body["num_trained"] is None:  # stores without a mask: records as before version 3
            del body["num_trained"]
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
        suffix = BACKEND_SUFFIX.get(self.backend, "?")
        expected = f"{SHARDS_DIR}/{name}[.<attempt>]{suffix}"
        if (
            data_name(self.path.rsplit("/", 1)[-1]) != (name, suffix)
            or not self.path.startswith(f"{SHARDS_DIR}/")
            or self.path.count("/") != 1
        ):
            raise bad(f"path {self.path!r} is not {expected!r} (path traversal or wrong backend)")
        for key in ("num_sequences", "num_tokens", "nbytes"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise bad(f"{key} is {value!r}")
        if self.num_tokens < self.num_sequences:
            raise bad(f"{self.num_tokens} tokens in {self.num_sequences} sequences")
        trained = self.num_trained
        if trained is not None and (
            not isinstance(trained, int)
            or isinstance(trained, bool)
            or not self.num_sequences <= trained <= self.num_tokens
        ):
            raise bad(
                f"num_trained is {trained!r} for {self.num_tokens} tokens in "
                f"{self.num_sequences} sequences"
            )
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


class ShardCodec(ABC):
    """One backend: a ShardArrays <-> files (relative key -> bytes). "" keys a single-file shard."""

    suffix: str

    @abstractmethod
    def encode(
        self,
        arrays: ShardArrays,
        logprob_dtype: str,
        codec: str,
        format_version: int = FORMAT_VERSION,
    ) -> dict[str, bytes]:
        """Encode every field present in ``arrays``, a shard in the stored representation of
        the store's ``codec`` (raw: log-probs as floats or raw bfloat16 bits; gaps: int16
        levels), laid out as ``format_version`` lays it out."""

    @abstractmethod
    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
        """Decode to ({field name: array as stored, ``seq_offsets`` included}, {log-prob field:
        its stored dtype label}); raw bfloat16 stays uint16. Raises ``StoreCorrupt``."""


BACKEND_SUFFIX = {"zarr": ".zarr", "arrow": ".arrow"}


def get_codec(backend: str) -> ShardCodec:
    """The codec of ``backend`` (imported lazily: a zarr reader need not import pyarrow)."""
    if backend == "zarr":
        from ._zarr import ZarrCodec

        return ZarrCodec()
    from ._arrow import ArrowCodec

    return ArrowCodec()


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


# a write attempt's data: "<shard>.<8 hex: unix seconds><8 hex: random><suffix>", unique to the
# attempt, so a writer that loses the race for the commit record never overwrites the data a
# record names (docs/architecture.md §3); the legacy "<shard><suffix>" of format ≤ 6 writers
ATTEMPT = re.compile(r"^(.+?)(?:\.([0-9a-f]{16}))?(\.zarr|\.arrow)$")
ATTEMPT_VERSION = 7  # the format version whose writers put data at attempt keys
STALE_ATTEMPT_SECONDS = 3600  # an uncommitted attempt this old is a dead writer's, not a live one


def data_name(entry: str) -> tuple[str, str] | None:
    """(shard name, suffix) of shard data named ``entry`` (an attempt's or legacy), else None."""
    match = ATTEMPT.match(entry)
    if match is None or not SHARD_NAME.match(match.group(1)):
        return None
    return match.group(1), match.group(3)


def attempt_started(entry: str) -> int | None:
    """The unix second a write attempt's data was named at (None: legacy data, not an attempt)."""
    match = ATTEMPT.match(entry)
    return int(match.group(2)[:8], 16) if match and match.group(2) else None


def leftover_of(entry: str, present: set[str], now: float | None = None) -> str | None:
    """The shard whose leftover ``entry`` of ``shards/`` is, else None: a temporary (".tmp-…"),
    or shard data without its commit record among ``present`` — legacy data at once (a killed
    writer's), an attempt only once stale (``now`` − its start > ``STALE_ATTEMPT_SECONDS``: a
    live writer may commit it any moment; ``now`` None: never)."""
    target = temporary_target(entry)
    if target is not None:
        found = data_name(target)
        return found[0] if found else re.sub(r"\.json$", "", target)
    found = data_name(entry)
    if found is None or f"{found[0]}.json" in present:
        return None
    started = attempt_started(entry)
    if started is None or (now is not None and now - started > STALE_ATTEMPT_SECONDS):
        return found[0]
    return None
