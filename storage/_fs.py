"""The store's view of a filesystem: fsspec underneath, atomic and durable writes on top.

Local paths: a file is written under a temporary name, flushed to disk (``fsync``) and renamed
into place (``os.replace``, atomic on POSIX), then its directory is fsynced, so a name that
exists after a power cut has all of its content. A shard's directory tree is fsynced file by
file and directory by directory before it is renamed into place (``write_tree``, ``move``).

Object stores (s3://, gs://, ...) and ``memory://``: one PUT per file, atomic there; nothing is
renamed (a "move" on an object store copies and deletes every object: neither atomic nor
cheap), so the writer puts a shard's objects at their final keys and its commit record last
(docs/architecture.md §3). Listings are never served from fsspec's cache (another process may
have committed since), and the errors of the object store's library become ``StoreError``s
naming the URL and the fix (``_remote.py``).
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from . import _retry
from ._remote import S3_PROTOCOLS, precondition_failed, protocol_of, translate, with_defaults
from .errors import StoreUnavailable

TMP_PREFIX = ".tmp-"
T = TypeVar("T")


def fsync_dir(path: str) -> None:
    """Make the entries of directory ``path`` durable (POSIX; a no-op on Windows)."""
    if os.name == "nt":  # pragma: no cover - directories cannot be opened there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(directory: str) -> None:
    """``os.makedirs``, then fsync the parent of each directory it created (top down), so the
    new directories themselves survive a crash."""
    missing = []
    path = directory
    while not os.path.isdir(path):
        missing.append(path)
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    if not missing:
        return
    os.makedirs(directory, exist_ok=True)
    for created in reversed(missing):
        fsync_dir(os.path.dirname(created))


def write_durable(path: str, data: bytes) -> None:
    """Write a local file and fsync it (not its directory: the caller does that once)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


# s3 filesystems by (protocol, options, AWS_* environment, process): fsspec's own instance cache
# ignores the environment, so it would keep the endpoint and credentials it first saw; a new
# instance per store costs ~0.3 s (a botocore session and client)
_REMOTE: dict[str, fsspec.AbstractFileSystem] = {}


def _open(url: str, options: dict[str, Any]) -> tuple[fsspec.AbstractFileSystem, str]:
    options = {k: v for k, v in options.items() if k != "retries"}  # kdcache's (_retry.py)
    key = None
    if options.get("skip_instance_cache"):  # set for s3 by _remote.with_defaults
        environment = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
        key = json.dumps([protocol_of(url), options, environment, os.getpid()], default=repr)
    try:
        fs, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as e:  # fsspec knows the protocol; its package is not installed
        raise StoreUnavailable(
            f"cannot open the store's filesystem, {url}, {e} (for s3:// install kdcache[s3])"
        ) from e
    except TypeError as e:  # an option the filesystem's constructor does not take
        raise StoreUnavailable(
            f"storage options not understood, {url} ({e}), fix --storage-options"
        ) from e
    except ValueError as e:  # fsspec: "Protocol not known: ..."
        raise StoreUnavailable(
            f"unknown storage protocol, {url}, ({e}), give a local path or an fsspec "
            "URL such as s3://bucket/store with its package installed"
        ) from e
    if protocol_of(url) in S3_PROTOCOLS:
        fs.retries = 1  # s3fs's own retry loop off: _retry.call retries whole operations
    if key is not None:
        fs = _REMOTE.setdefault(key, fs)
    return fs, str(root)


class StoreFS:
    """A store root on an fsspec filesystem; every path argument is relative to the root."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url = os.fspath(url)
        self.storage_options = with_defaults(self.url, storage_options)
        # retries of transient failures (an object store's; checked for every store, so a bad
        # value is refused wherever it is given)
        self.retries = _retry.retries_option(dict(self.storage_options))
        fs, root = _open(self.url, self.storage_options)
        self._fs: fsspec.AbstractFileSystem | None = fs
        self._pid = os.getpid()
        self.root: str = root.rstrip("/") or "/"
        self.is_local = isinstance(fs, LocalFileSystem)
        endpoint = self.storage_options.get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        self._endpoint = f"{protocol_of(self.url)}:{endpoint}"

    @property
    def fs(self) -> fsspec.AbstractFileSystem:
        """The filesystem, re-opened in a forked child (DataLoader workers): an async
        filesystem (s3fs) refuses to run in a process other than its own."""
        if self._fs is None or self._pid != os.getpid():
            self._fs, _ = _open(self.url, self.storage_options)
            self._pid = os.getpid()
        return self._fs

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fs"] = None  # re-opened on first use in the receiving process
        return state

    @contextmanager
    def _errors(self, *, writing: bool = False) -> Iterator[None]:
        """Object-store exceptions as ``StoreError``s; local errors pass unchanged."""
        if self.is_local:
            yield
            return
        try:
            yield
        except Exception as e:
            translated = translate(e, self.url, writing=writing)
            if translated is None:
                raise
            raise translated from e

    def _call(self, op: Callable[[], T], *, writing: bool = False) -> T:
        """``op()`` with an object store's errors as ``StoreError``s and its transient failures
        retried with backoff (``_retry.call``); locally ``op()`` as it is."""
        if self.is_local:
            return op()

        def translated() -> T:
            with self._errors(writing=writing):
                return op()

        return _retry.call(translated, endpoint=self._endpoint, url=self.url, retries=self.retries)

    def _put(self, path: str, data: bytes) -> None:
        """One PUT to an object store (tried again on a transient failure: it is idempotent)."""
        self._call(lambda: self.fs.pipe_file(path, data), writing=True)

    def _fresh(self, path: str) -> str:
        """``path``, with fsspec's cached listings of it dropped (object stores)."""
        if not self.is_local:
            self.fs.invalidate_cache(path)
        return path

    def full(self, rel: str) -> str:
        """Absolute path (in the filesystem's own namespace) of ``rel``."""
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self._call(lambda: bool(self.fs.exists(self._fresh(self.full(rel)))))

    def isdir(self, rel: str) -> bool:
        return self._call(lambda: bool(self.fs.isdir(self._fresh(self.full(rel)))))

    def read(self, rel: str) -> bytes:
        data: bytes = self._call(lambda: self.fs.cat_file(self.full(rel)))
        return data

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Fetch several files at once (concurrently on async filesystems such as s3)."""
        if not rels:
            return {}
        full = [self.full(r) for r in rels]
        got: dict[str, bytes] = self._call(lambda: self.fs.cat(full, on_error="raise"))
        return {r: got[f] for r, f in zip(rels, full, strict=True)}

    def list_names(self, rel: str) -> list[str]:
        """Base names directly under ``rel`` ([] when it does not exist)."""
        try:
            entries = self._call(lambda: self.fs.ls(self._fresh(self.full(rel)), detail=False))
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def walk_files(self, rel: str) -> list[str]:
        """Every file under directory ``rel``, relative to the root."""
        found = self._call(lambda: self.fs.find(self._fresh(self.full(rel))))
        prefix = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] if str(p).startswith(prefix) else str(p) for p in found)

    def size(self, rel: str) -> int:
        return self._call(lambda: int(self.fs.size(self._fresh(self.full(rel)))))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing/the old file or all of it; locally
        also durable once this returns (file and directory fsynced)."""
        path = self.full(rel)
        if not self.is_local:
            self._put(path, data)
            return
        directory, name = os.path.split(path)
        make_dirs(directory)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        try:
            write_durable(tmp, data)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        fsync_dir(directory)

    def create_exclusive(self, rel: str, data: bytes) -> bool:
        """Create ``rel`` holding ``data`` only if it does not exist: True when this call
        created it, False when it was there already (its content untouched). Locally a durable
        temporary hard-linked into place (``link`` fails on an existing name, atomically); on an
        object store one conditional PUT (``If-None-Match: *``, answered 412 if the key exists);
        a 412 to a PUT tried again after a lost answer (botocore's retry or ours) finds this
        call's own object there, so the key's content decides: ``data`` (unique: a record names
        its attempt) means created here.
        """
        path = self.full(rel)
        if not self.is_local:

            def put() -> bool:
                try:
                    self.fs.pipe_file(path, data, IfNoneMatch="*")
                except Exception as e:  # a 412 surfaces as an OSError or a translated one
                    if precondition_failed(e):
                        return False
                    raise
                return True

            if self._call(put, writing=True):
                return True
            return bool(self._call(lambda: self.fs.cat_file(path)) == data)
        directory, name = os.path.split(path)
        make_dirs(directory)
        tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
        try:
            write_durable(tmp, data)
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fsync_dir(directory)
        return True

    def write_tree(self, rel: str, files: dict[str, bytes]) -> None:
        """Write files under ``rel`` (keys relative to it; "" = ``rel`` itself is the file).

        Locally every file and every directory of the tree is fsynced (deepest first) before
        this returns; ``rel``'s own entry becomes durable with its parent's fsync (``move``).
        """
        if not self.is_local:
            for key, data in files.items():
                self._put(self.full(f"{rel}/{key}" if key else rel), data)
            return
        top = self.full(rel)
        make_dirs(os.path.dirname(top))
        directories = set()
        for key, data in files.items():
            path = os.path.join(top, key) if key else top
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_durable(path, data)
            directory = os.path.dirname(path)
            while len(directory) > len(top):  # the tree's directories, up to ``top``
                directories.add(directory)
                directory = os.path.dirname(directory)
        if any(files.keys()):
            directories.add(top)
        for directory in sorted(directories, key=len, reverse=True):
            fsync_dir(directory)

    def move(self, src: str, dst: str) -> None:
        """Move a file or directory into place (locally an atomic, durable rename)."""
        if self.is_local:
            os.replace(self.full(src), self.full(dst))
            fsync_dir(os.path.dirname(self.full(dst)))
        else:
            self._call(
                lambda: self.fs.mv(self.full(src), self.full(dst), recursive=True), writing=True
            )

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree; missing is fine."""
        path = self.full(rel)

        def rm() -> None:
            if self.fs.isdir(self._fresh(path)):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm_file(path)

        with suppress(FileNotFoundError):
            self._call(rm)
