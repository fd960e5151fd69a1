"""A bounded local cache of a remote store's shards: fetched ahead, checked, least recently used out.

``CACHE/<sha256 of the store URL + endpoint>/<shard name>/<sha256 of its commit record>/<files>``:
two stores or two versions of a shard never share an entry. An entry is written under a
temporary name and renamed into place (concurrent fetches: one rename wins), under a per-shard
``flock``, so the threads and ranks of a run fetch a shard once. A fetch is checked against the
record (sizes, sha256) before it is kept, retried once, then ``StoreCorrupt`` (a fetch that
fails midway, e.g. a body cut mid-read, is retried with backoff below, in ``_fs.StoreFS`` /
``_retry.py``: nothing partial is ever kept); its files get a fixed mtime, and a
use re-hashes a file whose mtime changed (written since) — damaged: dropped and fetched again.
Using an entry touches it; the oldest are evicted to fit the limit, never one in use here.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

from ._base import ShardRecord, sha256
from ._fs import StoreFS
from ._sizes import format_size
from ._sizes import parse_size as parse_size  # re-exported: the --cache-limit parser
from .errors import StoreCorrupt, StoreError

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: atomic renames alone keep entries whole
    fcntl = None  # type: ignore[assignment]

MAX_DEFAULT_LIMIT = 50 * 10**9  # the default limit: 20% of the disk's room, at most 50 GB
DEFAULT_SHARE = 0.2
PREFETCH = 2  # shards fetched ahead of the one being read
_TMP = ".tmp-"
# the mtime of every cached file once it matched its record's sha256: any later write to the
# file changes its mtime, so a file still carrying it needs only its size checked on use
_STAMP_NS = 946_684_800 * 10**9  # 2000-01-01


class ShardCacheError(StoreError):
    """The shard cache cannot be used: its directory is not writable, or its limit is too small."""


def default_cache_dir() -> str:
    """``$KDCACHE_CACHE_DIR``, else ``$XDG_CACHE_HOME/kdcache/shards`` (``~/.cache/…``)."""
    if os.environ.get("KDCACHE_CACHE_DIR"):
        return os.environ["KDCACHE_CACHE_DIR"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "kdcache", "shards")


def is_remote(fs: StoreFS) -> bool:
    """A store worth caching: neither a local path nor ``memory://`` (already in memory)."""
    return not fs.is_local and not fs.url.startswith("memory:")


@dataclass(frozen=True)
class ShardCacheConfig:
    """``--cache-dir`` / ``--cache-limit``: None = the defaults; ``enabled=False`` reads directly."""

    directory: str | None = None
    limit: int | None = None
    prefetch: int = PREFETCH
    enabled: bool = True


@dataclass
class _Process:
    """What belongs to one process (a forked process starts its own)."""

    pool: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="kdcache-prefetch")
    )
    lock: threading.Lock = field(default_factory=threading.Lock)
    fetching: dict[str, Future[None]] = field(default_factory=dict)
    busy: dict[str, int] = field(default_factory=dict)  # entry path → readers/fetchers now
    # each consumer's plan (a split's loader: train and eval read side by side)
    plans: dict[str, list[ShardRecord]] = field(default_factory=dict)


class ShardCache:
    """Local copies of one remote store's shards under ``directory``, at most ``limit`` bytes."""

    def __init__(self, fs: StoreFS, directory: str, limit: int, prefetch: int = PREFETCH):
        self.fs, self.directory, self.limit, self.ahead = fs, directory, limit, prefetch
        endpoint = fs.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        key = json.dumps([fs.url.rstrip("/"), endpoint if fs.url.startswith("s3") else None])
        self.root = os.path.join(directory, hashlib.sha256(key.encode()).hexdigest())
        self.fetches = 0  # shard fetches from the store by this process (tests, benchmarks)
        self._pid, self._state = -1, _Process()

    @classmethod
    def open(cls, fs: StoreFS, config: ShardCacheConfig, largest: int) -> ShardCache:
        """The cache of ``fs``'s store, checked: a writable directory and a limit that holds
        ``largest`` (the biggest committed shard's bytes). Raises ``ShardCacheError``."""
        directory = os.path.abspath(os.path.expanduser(config.directory or default_cache_dir()))
        flag = "--cache-dir" if config.directory else "the default --cache-dir"
        try:
            os.makedirs(directory, exist_ok=True)
            tempfile.TemporaryFile(dir=directory).close()  # can files be made there?
        except OSError as e:
            raise ShardCacheError(
                f"the shard cache directory is not writable, {directory} ({e.strerror}), "
                f"give a writable {flag} (remote stores are read through it)"
            ) from e
        limit = config.limit
        if limit is None:
            room = shutil.disk_usage(directory).free + sum(n for _, n, _ in _entries(directory))
            limit = min(MAX_DEFAULT_LIMIT, int(room * DEFAULT_SHARE))
        cache = cls(fs, directory, limit, config.prefetch)
        cache.check_limit(largest, default=config.limit is None)
        return cache

    def check_limit(self, nbytes: int, *, default: bool = False) -> None:
        if nbytes > self.limit:
            which = "the default --cache-limit (20% of the disk's room)" * default
            raise ShardCacheError(
                f"{which or '--cache-limit'} is smaller than one shard, {self.limit:,} < {nbytes:,} bytes "
                f"({format_size(nbytes)}) in {self.directory}, pass a --cache-limit of at least "
                f"{format_size(nbytes)} (a few shards' worth to fetch ahead)"
            )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_pid"], state["_state"] = -1, None
        return state

    @property
    def _mine(self) -> _Process:
        if self._pid != os.getpid():  # a forked or unpickled copy: no threads, locks or futures
            self._pid, self._state = os.getpid(), _Process()
            self.fetches = 0
        return self._state

    def entry(self, record: ShardRecord) -> str:
        return os.path.join(self.root, record.name, sha256(record.to_bytes()))

    # -- reading ----------------------------------------------------------------------------

    def read(self, record: ShardRecord) -> dict[str, bytes]:
        """The shard's files keyed relative to its path, as ``reader.read_files``: from the cache,
        fetched (and kept) first when absent or damaged there."""
        self.check_limit(record.nbytes)
        self._advance(record)
        with self._busy(record):
            wait = self._mine.fetching.get(record.name)
            if wait is not None:
                wait.result()  # being prefetched: wait for it rather than fetch twice
            files = self._load(record)
            if files is None:
                files = self._fetch(record)
        return files

    def prefetch(self, records: list[ShardRecord], consumer: str | None = None) -> None:
        """The shards in the order they will be read: the first ``prefetch`` of them, and then
        those after each shard read, are fetched in a background thread. Each ``consumer``
        (default: the records' split) has a plan of its own, replaced by its next call only, so
        an evaluation mid-epoch leaves the training reads' read-ahead in place."""
        mine = self._mine
        key = consumer if consumer is not None else (records[0].split if records else "")
        with mine.lock:
            mine.plans[key] = list(records)
        for record in records[: self.ahead]:
            self._submit(record)

    def _advance(self, record: ShardRecord) -> None:
        mine = self._mine
        after: list[ShardRecord] = []
        with mine.lock:
            for plan in mine.plans.values():
                names = [r.name for r in plan]
                if record.name in names:
                    after += plan[names.index(record.name) + 1 :][: self.ahead]
        for nxt in after:
            self._submit(nxt)

    def _submit(self, record: ShardRecord) -> None:
        mine = self._mine
        with mine.lock:
            if record.name in mine.fetching or os.path.isdir(self.entry(record)):
                return
            future = mine.pool.submit(self._prefetch_one, record)
            mine.fetching[record.name] = future

    def _prefetch_one(self, record: ShardRecord) -> None:
        try:
            with self._busy(record):
                if not os.path.isdir(self.entry(record)) and self._make_room(record, eager=False):
                    self._fetch(record)
        except Exception:  # the read that needs the shard fetches it again and reports
            pass
        finally:
            with self._mine.lock:
                self._mine.fetching.pop(record.name, None)

    @contextmanager
    def _busy(self, record: ShardRecord) -> Iterator[None]:
        mine, path = self._mine, self.entry(record)
        with mine.lock:
            mine.busy[path] = mine.busy.get(path, 0) + 1
        try:
            yield
        finally:
            with mine.lock:
                mine.busy[path] -= 1
                if not mine.busy[path]:
                    del mine.busy[path]

    def _load(self, record: ShardRecord) -> dict[str, bytes] | None:
        """The cached files when present and matching the record (touched), else None (a
        damaged entry is removed)."""
        path, files, stamped = self.entry(record), {}, True
        try:
            for rel in record.files:
                with open(os.path.join(path, rel), "rb") as f:
                    stamped &= os.fstat(f.fileno()).st_mtime_ns == _STAMP_NS
                    files[rel] = f.read()
        except (FileNotFoundError, NotADirectoryError):  # absent, or evicted meanwhile
            return None
        if _mismatch(record, files, hashes=not stamped) is not None:
            _remove(path)
            return None
        for rel in record.files if not stamped else ():  # checked whole: trusted again
            os.utime(os.path.join(path, rel), ns=(_STAMP_NS, _STAMP_NS))
        with suppress(FileNotFoundError):
            os.utime(path)
        return _relative(record, files)

    def _fetch(self, record: ShardRecord) -> dict[str, bytes]:
        """Fetch ``record``'s files from the store (once more on a mismatch), keep them in the
        cache, and return them."""
        from .reader import read_files  # the reader imports this module

        path = self.entry(record)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with _flock(f"{os.path.dirname(path)}.lock"):
            found = self._load(record)  # another process (worker) fetched it meanwhile
            if found is not None:
                return found
            self._make_room(record, eager=True)
            problem = None
            for _ in range(2):
                self.fetches += 1
                got = read_files(self.fs, record)
                files = {rel: got[key] for rel, key in _keys(record).items()}
                problem = _mismatch(record, files)
                if problem is None:
                    self._keep(path, files)
                    return got
        raise StoreCorrupt(
            f"shard {record.name} does not match its commit record ({problem}) after a refetch, "
            f"{self.fs.url}, run `kdcache verify`",
            shard=record.name,
        )

    def _keep(self, path: str, files: dict[str, bytes]) -> None:
        tmp = os.path.join(os.path.dirname(path), f"{_TMP}{uuid.uuid4().hex}")
        try:
            for rel, data in files.items():
                target = os.path.join(tmp, rel)
                os.makedirs(os.path.dirname(target), exist_ok=True)
                with open(target, "wb") as f:
                    f.write(data)
                os.utime(target, ns=(_STAMP_NS, _STAMP_NS))
            try:
                os.rename(tmp, path)
            except OSError:  # another process put the same entry there first: keep theirs
                if not os.path.isdir(path):
                    raise
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise ShardCacheError(
                f"the shard cache's disk is full, {self.directory} ({e.strerror}), free space "
                "there, or give another --cache-dir or a smaller --cache-limit"
            ) from e
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    # -- eviction ---------------------------------------------------------------------------

    def _make_room(self, record: ShardRecord, *, eager: bool) -> bool:
        """Evict least recently used entries until ``record`` fits; True when it does. A
        prefetch (``eager`` False) evicts nothing this process will read soon, and gives up
        instead; a read evicts everything but the entries in use now."""
        mine = self._mine
        with mine.lock:
            busy = set(mine.busy) - {self.entry(record)}
            planned = {self.entry(r) for plan in mine.plans.values() for r in plan}
        with _flock(os.path.join(self.directory, ".evict.lock")):
            entries = sorted(_entries(self.directory))  # (mtime, bytes, path), oldest first
            total = sum(size for _, size, _ in entries) + record.nbytes
            for _, size, path in entries:
                if total <= self.limit:
                    break
                if path in busy or (not eager and path in planned):
                    continue
                _remove(path)
                total -= size
        return total <= self.limit


def _keys(record: ShardRecord) -> dict[str, str]:
    """Each file of the record (relative to the store) → its key in ``read_files``' answer."""
    cut = len(record.path) + 1
    return {rel: rel[cut:] if rel != record.path else "" for rel in record.files}


def _relative(record: ShardRecord, files: dict[str, bytes]) -> dict[str, bytes]:
    return {key: files[rel] for rel, key in _keys(record).items()}


def _mismatch(record: ShardRecord, files: dict[str, bytes], hashes: bool = True) -> str | None:
    """The first file whose size or (``hashes``) sha256 differs from the record, described;
    else None."""
    for rel, info in record.files.items():
        data = files[rel]
        if len(data) != info["size"]:
            return f"{rel} has {len(data)} bytes, the record says {info['size']}"
        if hashes and sha256(data) != info["sha256"]:
            return f"{rel} fails its sha256"
    return None


def _entries(directory: str) -> Iterator[tuple[float, int, str]]:
    """(mtime, bytes, path) of every complete entry under ``directory`` (all stores)."""
    for store in _subdirs(directory):
        for shard in _subdirs(store):
            for entry in _subdirs(shard):
                try:
                    mtime = os.stat(entry).st_mtime
                except FileNotFoundError:
                    continue
                yield mtime, _tree_bytes(entry), entry


def _subdirs(path: str) -> list[str]:
    try:
        with os.scandir(path) as it:
            return [e.path for e in it if e.is_dir() and not e.name.startswith(_TMP)]
    except (FileNotFoundError, NotADirectoryError):
        return []


def _tree_bytes(path: str) -> int:
    total = 0
    for root, _, names in os.walk(path):
        for name in names:
            with suppress(FileNotFoundError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _remove(path: str) -> None:
    """Remove an entry: renamed away first, so no reader sees half of it."""
    trash = os.path.join(os.path.dirname(path), f"{_TMP}{uuid.uuid4().hex}")
    try:
        os.rename(path, trash)
    except OSError:
        return  # already gone (another process evicted it)
    shutil.rmtree(trash, ignore_errors=True)


@contextmanager
def _flock(path: str) -> Iterator[None]:
    """An exclusive lock between processes (POSIX ``flock``; threads of one process use
    separate file descriptors, so they exclude each other too)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def open_cache(fs: StoreFS, config: ShardCacheConfig | None, largest: int) -> ShardCache | None:
    """The cache a store at ``fs`` reads through: None for local and ``memory://`` stores, or
    when ``config`` is None or disabled."""
    if config is None or not config.enabled or not is_remote(fs):
        return None
    return ShardCache.open(fs, config, largest)
