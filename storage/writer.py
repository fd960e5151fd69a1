"""Writing a store: shards buffered in memory, committed atomically (data first, record last)."""

from __future__ import annotations

import json
import os
import re
import uuid
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from ._arrays import ShardArrays, ShardLayout
from ._base import (
    SHARD_NAME,
    SHARDS_DIR,
    ShardRecord,
    get_codec,
    leftover_of,
    sha256,
    temporary_target,
)
from ._fs import TMP_PREFIX, StoreFS
from ._validate import prepare_sequence
from .errors import ShardExists, StoreCorrupt, StoreError, StoreIncompatible
from .manifest import dumps, manifest_differences, parse_manifest, utc_now, validate_manifest
from .reader import MANIFEST, TOKENIZER_DIR, list_records, load_manifest, read_tokenizer_files

_STORE_ENTRIES = {MANIFEST, SHARDS_DIR, TOKENIZER_DIR}


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
        part = prepare_sequence(self._layout, _numpy(tokens), given, self.name, mask)
        self._parts.append(part)
        self.num_sequences += 1
        self.num_tokens += part["tokens"].shape[0]

    def commit(self) -> ShardRecord:
        """Write the shard's files, then its commit record (docs/architecture.md §3): locally
        under a temporary name renamed into place, on an object store at the final keys."""
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
        final = f"{SHARDS_DIR}/{self.name}{codec.suffix}"
        tmp = f"{SHARDS_DIR}/{TMP_PREFIX}{uuid.uuid4().hex}-{self.name}{codec.suffix}"
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
            if fs.is_local:  # a fsynced temporary tree renamed into place, then the record
                fs.write_tree(tmp, blobs)
                self._refuse_if_committed()
                fs.remove(final)  # an uncommitted leftover of an earlier crash
                fs.move(tmp, final)
            else:
                # no rename on an object store (a "move" copies every object): final keys, then
                # the record, one PUT, the only atomic step (open_shard deleted any leftover)
                self._refuse_if_committed()
                fs.write_tree(final, blobs)
            fs.write_atomic(record.record_path, record.to_bytes())
        except BaseException:
            self._done = True
            if fs.is_local:
                fs.remove(tmp)
            raise
        self._done = True
        return record

    def _refuse_if_committed(self) -> None:
        if self._store._fs.exists(f"{SHARDS_DIR}/{self.name}.json"):
            raise ShardExists(
                f"shard committed by another writer meanwhile, {self.name} in {self._store.url}, "
                "run one writer per store (rerunning afterwards resumes it)"
            )

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
        if names is None:
            for base in ("", TOKENIZER_DIR):
                for entry in self._fs.list_names(base):
                    if temporary_target(entry) is not None:
                        self._fs.remove(f"{base}/{entry}" if base else entry)
                        removed += 1
        return removed

    def _clean(self, entries: list[str], names: list[str] | None) -> int:
        """Remove the leftovers among ``entries`` of ``shards/`` (of ``names`` only, if given)."""
        removed = 0
        for entry in entries:
            shard = leftover_of(entry, set(entries))
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
