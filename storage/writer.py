"""Writing a store: shards buffered in memory (``ShardWriter``), committed atomically (data first,
record last)."""

from __future__ import annotations

import json
import os
import re
import time
from types import TracebackType
from typing import Any

from ._base import (
    SHARD_NAME,
    SHARDS_DIR,
    ShardRecord,
    data_name,
    get_codec,
    leftover_of,
    sha256,
    temporary_target,
)
from ._fs import TMP_PREFIX, StoreFS
from ._shard_writer import ShardWriter
from .errors import ShardExists, StoreCorrupt, StoreError, StoreIncompatible
from .manifest import dumps, manifest_differences, parse_manifest, validate_manifest
from .reader import MANIFEST, TOKENIZER_DIR, list_records, load_manifest, read_tokenizer_files

_STORE_ENTRIES = {MANIFEST, SHARDS_DIR, TOKENIZER_DIR}


class StoreWriter:
    """Appends shards to a store whose manifest matches this run."""

    def __init__(self, fs: StoreFS, manifest: dict[str, Any]) -> None:
        self._fs = fs
        self.url = fs.url
        self.manifest = manifest
        # Resolved here, in the thread that opens the store: the first import of a backend
        # (zarr: ~130 modules) must not happen in a writer thread that runs beside a forward.
        self.codec = get_codec(manifest["backend"])
        self._open: dict[str, ShardWriter] = {}
        self._next: dict[str, int] = {}

    def committed(self, split: str | None = None) -> dict[str, ShardRecord]:
        """Committed shards by name (re-listed from the store on every call)."""
        records, problems = list_records(self._fs, self.manifest["backend"])
        if problems:
            name, problem = problems[0]
            raise StoreCorrupt(f"{problem}, {self.url}, run `kdcache verify`", shard=name)
        return {n: r for n, r in records.items() if split is None or r.split == split}

    def open_shard(
        self, split: str, index: int, *, corpus_range: dict[str, Any] | None = None
    ) -> ShardWriter:
        """Start shard ``<split>-<index>``; cleans leftovers of that name only."""
        name = f"{split}-{index:05d}" if isinstance(index, int) and index >= 0 else ""
        if not SHARD_NAME.match(name):
            raise ValueError(
                f"bad shard split/index, {split!r}/{index!r}, use a lowercase split and index >= 0"
            )
        entries = self._fs.list_names(SHARDS_DIR)  # one listing (a request on object stores)
        if f"{name}.json" in entries:
            raise ShardExists(f"shard {name} is already committed in {self.url}, skip it")
        self._clean(entries, [name])
        return ShardWriter(self, split, index, corpus_range)

    def append(
        self,
        split: str,
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
    ) -> ShardRecord | None:
        """Add a sequence to ``split``'s rollover shard; returns its record when it filled up
        (at ``shard_tokens`` tokens, trained or not).

        The arrays are those of ``ShardWriter.append``.
        """
        writer = self._open.get(split)
        if writer is None:
            if split not in self._next:
                done = [r.index for r in self.committed(split).values()]
                self._next[split] = max(done, default=-1) + 1
            writer = self._open[split] = self.open_shard(split, self._next[split])
        writer.append(
            tokens,
            topk_ids,
            topk_logprobs,
            topk_tail_logprob=topk_tail_logprob,
            sampled_distinct=sampled_distinct,
            sampled_ids=sampled_ids,
            sampled_counts=sampled_counts,
            sampled_logprobs=sampled_logprobs,
            loss_mask=loss_mask,
        )
        if writer.num_tokens < self.manifest["shard_tokens"]:
            return None
        del self._open[split]
        self._next[split] = writer.index + 1
        return writer.commit()

    def flush(self) -> list[ShardRecord]:
        """Commit every partly filled rollover shard (one whose every append failed: dropped)."""
        records = []
        for split in sorted(self._open):
            writer = self._open.pop(split)
            if writer.num_sequences == 0:  # its index stays free for the next shard
                writer.abort()
                continue
            self._next[split] = writer.index + 1
            records.append(writer.commit())
        return records

    def clean_temporaries(self, names: list[str] | None = None) -> int:
        """Delete leftovers (temporaries, uncommitted shard data) of ``names`` or of all shards.

        ``None`` also removes other writers' in-flight files: use it with a single writer only.
        """
        removed = self._clean(self._fs.list_names(SHARDS_DIR), names)
        if names is None:  # a writer that lost the race and died before deleting its attempt
            named = {r.path.rsplit("/", 1)[-1] for r in self.committed().values()}
            entries = self._fs.list_names(SHARDS_DIR)
            for entry in entries:
                found = data_name(entry)
                if found and entry not in named and f"{found[0]}.json" in entries:
                    self._fs.remove(f"{SHARDS_DIR}/{entry}")
                    removed += 1
        if names is None:
            for base in ("", TOKENIZER_DIR):
                for entry in self._fs.list_names(base):
                    if temporary_target(entry) is not None:
                        self._fs.remove(f"{base}/{entry}" if base else entry)
                        removed += 1
        return removed

    def _clean(self, entries: list[str], names: list[str] | None) -> int:
        """Remove the leftovers among ``entries`` of ``shards/`` (of ``names`` only, if given)."""
        removed, now, present = 0, time.time(), set(entries)
        for entry in entries:
            shard = leftover_of(entry, present, now)
            if shard is not None and (names is None or shard in names):
                self._fs.remove(f"{SHARDS_DIR}/{entry}")
                removed += 1
        return removed

    def mark_finished(self, stats: dict[str, Any]) -> None:
        """Record that the run completed: manifest gains ``finished: true`` and ``stats``."""
        load_manifest(self._fs)  # a missing, damaged or unsupported manifest raises here
        # extended as stored: a version-1 manifest stays one (no v2 keys written into it)
        stored = json.loads(self._fs.read(MANIFEST))
        stored["finished"] = True
        stored["stats"] = dict(stats)
        data = dumps(stored)
        self.manifest = parse_manifest(data, where=f"{self.url}/{MANIFEST}")
        self._fs.write_atomic(MANIFEST, data)

    def write_tokenizer(self, files: dict[str, bytes]) -> None:
        """Store the teacher tokenizer's files under ``tokenizer/`` (identical files: no-op)."""
        expected = self.manifest["tokenizer"].get("files")
        existing = read_tokenizer_files(self._fs)
        for name, data in sorted(files.items()):
            if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", name):
                raise ValueError(f"bad tokenizer file name, {name!r}, use a plain file name")
            if isinstance(expected, dict) and expected.get(name, sha256(data)) != sha256(data):
                raise StoreIncompatible(
                    f"tokenizer file {name} differs from the manifest's sha256, {self.url}, "
                    "use the teacher this store was made with",
                    [f"tokenizer/{name}: sha256 differs from manifest"],
                )
            if name in existing:
                if existing[name] != data:
                    raise StoreIncompatible(
                        f"tokenizer file {name} differs from the stored one, {self.url}, "
                        "use the teacher this store was made with",
                        [f"tokenizer/{name}: stored file differs"],
                    )
                continue
            self._fs.write_atomic(f"{TOKENIZER_DIR}/{name}", data)

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if kind is None:
            self.flush()
        else:
            for writer in self._open.values():
                writer.abort()
            self._open.clear()


def create_store(
    url: str | os.PathLike[str],
    manifest: dict[str, Any],
    *,
    storage_options: dict[str, Any] | None = None,
) -> StoreWriter:
    """Create a store, or open an existing one for appending if its manifest agrees.

    Raises:
        StoreIncompatible: the existing store's manifest differs (``.differences`` lists all).
        StoreError: the location holds something that is not a store.
    """
    wanted = validate_manifest(manifest, error=ValueError)  # older versions: later keys filled
    fs = StoreFS(url, storage_options)
    if fs.exists(MANIFEST):
        existing = load_manifest(fs)
        differences = manifest_differences(existing, wanted)
        if differences:
            raise StoreIncompatible(
                f"the store at {fs.url} was made with other settings: {'; '.join(differences)}; "
                "use the same settings or another output location",
                differences,
            )
        return StoreWriter(fs, existing)
    if fs.exists("") and not fs.isdir(""):
        raise StoreError(f"store location is a file, {fs.url}, pass a directory path")
    others = [
        e for e in fs.list_names("") if e not in _STORE_ENTRIES and not e.startswith(TMP_PREFIX)
    ]
    if others:
        raise StoreError(
            f"store location is not empty and holds no manifest.json, {fs.url} "
            f"(has {', '.join(others[:3])}), pass an empty or new directory"
        )
    fs.write_atomic(MANIFEST, dumps(manifest))  # as given: a version-1 manifest stays one
    return StoreWriter(fs, wanted)
