"""Reading a store: only committed shards, decoded whole to numpy, with cheap invariant checks."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from ._arrays import (
    LOGPROB_FIELDS,
    ShardArrays,
    ShardLayout,
    TeacherSequence,
    tail_from_topk,
)
from ._base import (
    SHARDS_DIR,
    ShardRecord,
    get_codec,
    record_name,
    sha256,
    temporary_target,
)
from ._fs import StoreFS
from ._select import layout_problem, picked_sequences, select_sequences
from ._stored import decode_fields, stored_dtypes
from ._validate import check_invariants
from .errors import StoreCorrupt, StoreError, StoreNotFound
from .manifest import has_samples, has_topk, parse_manifest, tokenizer_size
from .shard_cache import ShardCache, ShardCacheConfig, open_cache

MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"


def load_manifest(fs: StoreFS) -> dict[str, Any]:
    """Read and validate ``manifest.json`` (``StoreNotFound`` / ``StoreCorrupt`` / unsupported)."""
    try:
        data = fs.read(MANIFEST)
    except (FileNotFoundError, NotADirectoryError) as e:  # the latter: the URL names a file
        raise StoreNotFound(
            f"no logit store (manifest.json missing), {fs.url}, "
            "check the path or create the store with `kdcache cache-teacher`"
        ) from e
    except IsADirectoryError as e:
        raise StoreCorrupt(f"manifest.json is a directory, {fs.url}, remove it") from e
    return parse_manifest(data, where=f"{fs.url}/{MANIFEST}")


def list_records(
    fs: StoreFS, backend: str, *, retry: bool = True
) -> tuple[dict[str, ShardRecord], list[tuple[str, str]]]:
    """Parse every commit record: (valid records by name, [(name, problem)] for bad ones)."""
    names = {}
    for entry in fs.list_names(SHARDS_DIR):
        name = record_name(entry)
        if name is not None:
            names[name] = f"{SHARDS_DIR}/{entry}"
    try:
        blobs = fs.read_many(list(names.values()))
    except FileNotFoundError:  # a record vanished while listing (store being replaced)
        if not retry:
            raise StoreCorrupt(f"commit records vanish while listing, {fs.url}") from None
        return list_records(fs, backend, retry=False)
    records: dict[str, ShardRecord] = {}
    problems: list[tuple[str, str]] = []
    for name, rel in names.items():
        try:
            record = ShardRecord.from_bytes(blobs[rel], name)
            if record.backend != backend:
                raise StoreCorrupt(
                    f"record backend {record.backend!r} != store backend {backend!r}"
                )
            records[name] = record
        except StoreCorrupt as e:
            problems.append((name, str(e)))
    return records, problems


def read_files(fs: StoreFS, record: ShardRecord) -> dict[str, bytes]:
    """The shard's files keyed relative to the shard path ("" for a single-file shard)."""
    try:
        blobs = fs.read_many(list(record.files))
    except (FileNotFoundError, IsADirectoryError) as e:
        raise StoreCorrupt(
            f"shard {record.name} is missing a file, {e}, run `kdcache verify`", shard=record.name
        ) from e
    cut = len(record.path) + 1
    return {rel[cut:] if rel != record.path else "": data for rel, data in blobs.items()}


def decode_shard(
    record: ShardRecord,
    files: dict[str, bytes],
    manifest: dict[str, Any],
    *,
    check: bool,
    thorough: bool = False,
    sequences: npt.NDArray[np.int64] | None = None,
) -> ShardArrays:
    """Decode ``files`` of ``record`` and check dtypes (always) and invariants (``check``).

    ``thorough`` (``verify``): check every decoded value, also those a codec's checked levels
    and codes already guarantee (a gaps store's top-k rows: sorted, <= 0, ids in range).
    ``sequences`` ((s,) ascending): decode only those sequences (``_select.py``)."""
    name = record.name
    if check:
        for rel, info in record.files.items():
            key = rel[len(record.path) + 1 :] if rel != record.path else ""
            if len(files[key]) != info["size"]:
                raise StoreCorrupt(
                    f"shard {name} file {rel} has {len(files[key])} bytes, record says "
                    f"{info['size']}, run `kdcache verify`",
                    shard=name,
                )
    fields, labels = get_codec(record.backend).decode(files, name)
    layout = ShardLayout.of(manifest)
    expected = {*layout.stored_fields, "seq_offsets"}
    if set(fields) != expected:
        raise StoreCorrupt(
            f"shard {name} holds {', '.join(sorted(fields))}; a {layout.targets} store of "
            f"format_version {layout.format_version} holds {', '.join(sorted(expected))}, "
            "run `kdcache verify`",
            shard=name,
        )
    wanted = stored_dtypes(layout)
    for key in layout.stored_fields:
        got = str(fields[key].dtype)
        if key in LOGPROB_FIELDS or key in labels:  # the label says what the stored numbers are
            got = f"{labels.get(key, got)}/{got}"  # (bfloat16 bits, a codec's levels or codes)
        if got not in wanted[key].split("|"):
            raise StoreCorrupt(
                f"shard {name} stores {key} as {got}, the manifest says {wanted[key]}, "
                "run `kdcache verify`",
                shard=name,
            )
    if fields["seq_offsets"].dtype.kind not in "iu":
        raise StoreCorrupt(f"shard {name} has non-integer seq_offsets", shard=name)
    if sequences is not None:  # the record's counts are checked on the whole shard, here
        problem = layout_problem(fields, record)
        if problem is not None:
            raise StoreCorrupt(
                f"shard {name} is corrupt: {problem}, run `kdcache verify`", shard=name
            )
        fields = select_sequences(fields, sequences)
    fields, raw_topk = decode_fields(fields, layout, check=check, shard=name)
    seq_offsets = fields.pop("seq_offsets").astype(np.int64, copy=False)
    arrays = ShardArrays.from_fields(fields, seq_offsets, name)
    if layout.format_version == 1 and arrays.topk_logprobs is not None:
        # version 1 stored no tail; 1 - sum(exp(row)) is the best left (inexact in float16)
        arrays.topk_tail_logprob = tail_from_topk(
            arrays.topk_logprobs, complete=layout.top_k == layout.vocab_size
        )
    if check:
        check_invariants(
            arrays,
            layout=layout,
            raw_topk_logprobs=raw_topk,
            record=record if sequences is None else None,
            decoded_by_codec=layout.codec != "raw" and not thorough,
        )
    return arrays


def read_tokenizer_files(fs: StoreFS) -> dict[str, bytes]:
    """``STORE/tokenizer/*`` as {file name: bytes}, temporaries skipped."""
    names = [n for n in fs.list_names(TOKENIZER_DIR) if temporary_target(n) is None]
    blobs = fs.read_many([f"{TOKENIZER_DIR}/{n}" for n in names])
    return {rel.split("/", 1)[1]: data for rel, data in blobs.items()}


class Store:
    """A logit store opened for reading; sees committed shards only (``refresh()`` re-lists)."""

    def __init__(
        self, fs: StoreFS, manifest: dict[str, Any], cache: ShardCacheConfig | None = None
    ) -> None:
        self._fs = fs
        self.url = fs.url
        self.manifest = manifest
        self.backend: str = manifest["backend"]
        self.top_k: int = manifest["top_k"]  # 0 for a sampled-only store
        self.vocab_size: int = manifest["vocab_size"]
        self.seq_len: int = manifest["seq_len"]
        self.shards: list[ShardRecord] = []
        self._by_name: dict[str, ShardRecord] = {}
        self.refresh()
        # a remote store's shards are read through a bounded local cache (shard_cache.py)
        largest = max((r.nbytes for r in self.shards), default=0)
        self.cache: ShardCache | None = open_cache(fs, cache, largest)

    def refresh(self) -> None:
        """Re-read the manifest's mutable facts and re-list committed shards."""
        self.manifest = load_manifest(self._fs)
        records, problems = list_records(self._fs, self.backend)
        if problems:
            name, problem = problems[0]
            raise StoreCorrupt(f"{problem}, {self.url}, run `kdcache verify`", shard=name)
        self.shards = sorted(records.values(), key=lambda r: (r.split, r.index))
        self._by_name = {r.name: r for r in self.shards}

    @property
    def targets(self) -> str:
        """The store's targets kind: "topk", "sampled" or "topk+sampled" (v1 stores: "topk")."""
        targets: str = self.manifest["targets"]
        return targets

    @property
    def samples(self) -> int:
        """Draws N per position of sampled targets (0 when nothing is sampled)."""
        samples: int = self.manifest["samples"]
        return samples

    @property
    def has_topk(self) -> bool:
        return has_topk(self.manifest)

    @property
    def has_samples(self) -> bool:
        return has_samples(self.manifest)

    @property
    def has_loss_mask(self) -> bool:
        """True when shards carry a ``loss_mask`` and targets only at trained positions (v3)."""
        return bool(self.manifest["loss_mask"])

    @property
    def tokenizer_size(self) -> int:
        """Ids the tokenizer can produce (manifest ``tokenizer.size``, else ``vocab_size``)."""
        return tokenizer_size(self.manifest)

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.shards})

    @property
    def num_tokens(self) -> int:
        return sum(r.num_tokens for r in self.shards)

    @property
    def num_sequences(self) -> int:
        return sum(r.num_sequences for r in self.shards)

    @property
    def num_trained(self) -> int:
        """Trained positions (target rows) of all committed shards; ``num_tokens`` without a
        loss mask."""
        return sum(r.num_tokens if r.num_trained is None else r.num_trained for r in self.shards)

    @property
    def nbytes(self) -> int:
        """Bytes of all committed shard files (excluding manifest and records)."""
        return sum(r.nbytes for r in self.shards)

    def shards_of(self, split: str | None = None) -> list[ShardRecord]:
        return [r for r in self.shards if split is None or r.split == split]

    def read_shard(
        self, shard: ShardRecord | str, *, check: bool = True, sequences: Any = None
    ) -> ShardArrays:
        """Decode one shard: every field of the store's targets kind (see ShardArrays); with
        ``sequences`` (distinct indices, ascending) only those sequences, in that order.

        Raises:
            ValueError: ``sequences`` are not ascending indices of the shard's sequences.
        """
        name = shard if isinstance(shard, str) else shard.name
        record = self._by_name.get(name)
        if record is None:
            raise StoreError(
                f"no committed shard named {name!r} in {self.url}, "
                f"committed: {len(self.shards)} shards (call refresh() to re-list)"
            )
        picked = None if sequences is None else picked_sequences(sequences, record.num_sequences)
        files = self.cache.read(record) if self.cache else read_files(self._fs, record)
        return decode_shard(record, files, self.manifest, check=check, sequences=picked)

    def prefetch(self, records: list[ShardRecord], consumer: str | None = None) -> None:
        """Hint: the shards in the order they will be read, so a remote store's cache fetches
        the next ones in the background (a no-op without a cache); one plan per ``consumer``
        (default: the records' split)."""
        if self.cache is not None:
            self.cache.prefetch(records, consumer)

    def iter_sequences(self, split: str | None = None) -> Iterator[TeacherSequence]:
        """Every sequence of ``split`` (all splits when None), in shard order.

        The next shard is decoded in a background thread while this one is consumed.
        """
        records = self.shards_of(split)
        if not records:
            return
        self.prefetch(records)
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending: Future[ShardArrays] = pool.submit(self.read_shard, records[0])
            for nxt in [*records[1:], None]:
                arrays = pending.result()
                if nxt is not None:
                    pending = pool.submit(self.read_shard, nxt)
                yield from arrays

    def tokenizer_files(self) -> dict[str, bytes]:
        """The teacher tokenizer's files stored with the store ({} when absent)."""
        return read_tokenizer_files(self._fs)

    def spread_shards(self, count: int = 4) -> list[ShardRecord]:
        """Up to ``count`` committed shards spread evenly over the store (for statistics)."""
        step = max(1, len(self.shards) // count)
        return self.shards[::step][:count]

    def sample_logprobs(self, max_rows: int = 65536) -> npt.NDArray[np.float32]:
        """Up to ``max_rows`` top-k rows (rows, k) as float32, spread over up to 4 shards.

        Raises:
            StoreError: the store holds no top-k targets (a "sampled" store).
        """
        if not self.has_topk:
            raise StoreError(
                f"a {self.targets} store has no top-k rows, {self.url}, read its sampled_* fields"
            )
        picked = self.spread_shards()
        if not picked:
            return np.zeros((0, self.top_k), np.float32)
        per = max(1, max_rows // len(picked))
        rows = []
        for record in picked:
            lp = self.read_shard(record, check=False).topk_logprobs
            assert lp is not None
            rows.append(np.asarray(lp[:: max(1, lp.shape[0] // per)][:per], np.float32))
        return np.concatenate(rows)

    def __repr__(self) -> str:
        mask = f", trained={self.num_trained}" if self.has_loss_mask else ""
        return (
            f"Store({self.url!r}, backend={self.backend}, targets={self.targets}, "
            f"k={self.top_k}, samples={self.samples}, "
            f"shards={len(self.shards)}, tokens={self.num_tokens}{mask})"
        )


def open_store(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    cache: ShardCacheConfig | None = None,
) -> Store:
    """Open a store for reading (a local path or an fsspec URL such as ``memory://s``).

    ``cache``: read a remote store (not local, not ``memory://``) through a bounded local shard
    cache (``shard_cache.py``; ``ShardCacheConfig()`` for the defaults); None reads directly."""
    fs = StoreFS(url, storage_options)
    return Store(fs, load_manifest(fs), cache)


def verify_store(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    on_shard: Callable[[str, int], None] | None = None,
) -> list[tuple[str, str]]:
    """Recompute every checksum and check every invariant: [(shard or "manifest", problem)].

    ``on_shard(name, total)`` is called after each shard (for progress bars). Raises ``StoreError``
    when the store itself cannot be opened (missing, unparseable or unsupported manifest).
    """
    fs = StoreFS(url, storage_options)
    manifest = load_manifest(fs)
    records, problems = list_records(fs, manifest["backend"])
    for name in sorted(records, key=lambda n: (records[n].split, records[n].index)):
        record = records[name]
        try:
            files = read_files(fs, record)
            for rel, info in record.files.items():
                key = rel[len(record.path) + 1 :] if rel != record.path else ""
                if len(files[key]) != info["size"] or sha256(files[key]) != info["sha256"]:
                    raise StoreCorrupt(f"checksum mismatch in {rel}", shard=name)
            decode_shard(record, files, manifest, check=True, thorough=True)
        except StoreCorrupt as e:
            problems.append((name, str(e).removesuffix(", run `kdcache verify`")))
        if on_shard is not None:
            on_shard(name, len(records))
    expected = manifest["tokenizer"].get("files")
    if isinstance(expected, dict):
        stored = read_tokenizer_files(fs)
        for file_name, digest in sorted(expected.items()):
            if file_name not in stored:
                problems.append(("tokenizer", f"tokenizer/{file_name} is missing"))
            elif sha256(stored[file_name]) != digest:
                problems.append(("tokenizer", f"tokenizer/{file_name} checksum mismatch"))
    return problems
