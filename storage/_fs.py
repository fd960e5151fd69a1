"""The store's view of a filesystem: fsspec underneath, atomic writes on top.

Local paths get write-to-temporary + ``os.replace`` (atomic on POSIX); object stores and
``memory://`` get a single PUT per file, which is atomic there.
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

from .errors import StoreUnavailable

TMP_PREFIX = ".tmp-"


class StoreFS:
    """A store root on an fsspec filesystem; every path argument is relative to the root."""

    def __init__(self, url: str | os.PathLike[str], storage_options: dict[str, Any] | None = None):
        self.url = os.fspath(url)
        try:
            fs, root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except ImportError as e:  # fsspec knows the protocol; its package is not installed
            raise StoreUnavailable(f"cannot open the store's filesystem, {self.url}, {e}") from e
        except ValueError as e:  # fsspec: "Protocol not known: ..."
            raise StoreUnavailable(
                f"unknown storage protocol, {self.url}, ({e}), give a local path or an fsspec "
                "URL such as s3://bucket/store with its package installed"
            ) from e
        self.fs: fsspec.AbstractFileSystem = fs
        self.root: str = str(root).rstrip("/") or "/"
        self.is_local = isinstance(fs, LocalFileSystem)

    def full(self, rel: str) -> str:
        """Absolute path (in the filesystem's own namespace) of ``rel``."""
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.full(rel)))

    def isdir(self, rel: str) -> bool:
        return bool(self.fs.isdir(self.full(rel)))

    def read(self, rel: str) -> bytes:
        data: bytes = self.fs.cat_file(self.full(rel))
        return data

    def read_many(self, rels: list[str]) -> dict[str, bytes]:
        """Fetch several files at once (concurrently on async filesystems such as s3)."""
        if not rels:
            return {}
        full = [self.full(r) for r in rels]
        got: dict[str, bytes] = self.fs.cat(full, on_error="raise")
        return {r: got[f] for r, f in zip(rels, full, strict=True)}

    def list_names(self, rel: str) -> list[str]:
        """Base names directly under ``rel`` ([] when it does not exist)."""
        try:
            entries = self.fs.ls(self.full(rel), detail=False)
        except FileNotFoundError:
            return []
        return sorted(str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries)

    def walk_files(self, rel: str) -> list[str]:
        """Every file under directory ``rel``, relative to the root."""
        base = self.full(rel)
        found = self.fs.find(base)
        prefix = self.root.rstrip("/") + "/"
        return sorted(str(p)[len(prefix) :] if str(p).startswith(prefix) else str(p) for p in found)

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.full(rel)))

    def write_atomic(self, rel: str, data: bytes) -> None:
        """Write ``data`` so that readers see either nothing/the old file or all of it."""
        path = self.full(rel)
        if self.is_local:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            directory, name = os.path.split(path)
            tmp = os.path.join(directory, f"{TMP_PREFIX}{uuid.uuid4().hex}-{name}")
            try:
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except BaseException:
                if os.path.exists(tmp):
                    os.remove(tmp)
                raise
        else:
            self.fs.pipe_file(path, data)

    def write_tree(self, rel: str, files: dict[str, bytes]) -> None:
        """Write files under ``rel`` (keys relative to it; "" = ``rel`` itself is the file)."""
        for key, data in files.items():
            path = self.full(f"{rel}/{key}" if key else rel)
            if self.is_local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, "wb") as f:
                    f.write(data)
            else:
                self.fs.pipe_file(path, data)

    def move(self, src: str, dst: str) -> None:
        """Move a file or directory into place (atomic rename on local disks)."""
        if self.is_local:
            os.replace(self.full(src), self.full(dst))
        else:
            self.fs.mv(self.full(src), self.full(dst), recursive=True)

    def remove(self, rel: str) -> None:
        """Delete a file or a directory tree; missing is fine."""
        path = self.full(rel)
        try:
            if self.fs.isdir(path):
                self.fs.rm(path, recursive=True)
            elif self.fs.exists(path):
                self.fs.rm_file(path)
        except FileNotFoundError:
            pass
