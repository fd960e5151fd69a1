"""Local stores are durable: a shard's files and directories, the shards directory and the
commit record reach the disk (fsync) in the order that makes a committed name survive a power
cut with all of its content; manifest writes likewise (docs/architecture.md §3)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from test_store import make_sequence

from kdcache.storage import create_store, make_manifest, open_store

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="reads /proc/self/fd")


@pytest.fixture
def events(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """("fsync", path), ("rename", destination) and ("link", destination: a commit record,
    created only if absent) in the order they happen."""
    log: list[tuple[str, str]] = []
    fsync, replace, link = os.fsync, os.replace, os.link

    def logged_fsync(fd: int) -> None:
        fsync(fd)
        log.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def logged_replace(src: str, dst: str) -> None:
        replace(src, dst)
        log.append(("rename", os.fspath(dst)))

    def logged_link(src: str, dst: str) -> None:
        link(src, dst)
        log.append(("link", os.fspath(dst)))

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "link", logged_link)
    monkeypatch.setattr(os, "replace", logged_replace)
    return log


def manifest(backend: str) -> dict:
    return make_manifest(
        backend=backend,
        teacher={"name": "t"},
        tokenizer={},
        vocab_size=1000,
        top_k=8,
        seq_len=32,
        corpus={},
        shard_tokens=1000,
    )


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_shard_is_on_disk_before_its_record_and_the_record_before_commit_returns(
    tmp_path: Path, events: list[tuple[str, str]], backend: str
) -> None:
    root = tmp_path / "new" / "store"
    writer = create_store(root, manifest(backend))
    # the manifest: its file, then the rename, then its directory; the new directories too
    renamed = events.index(("rename", str(root / "manifest.json")))
    assert events[renamed - 1][0] == "fsync" and "manifest.json" in events[renamed - 1][1]
    assert ("fsync", str(root)) in events[renamed + 1 :]
    assert ("fsync", str(tmp_path / "new")) in events[:renamed]  # holds the new "store"
    events.clear()

    rng = np.random.default_rng(0)
    with writer.open_shard("train", 0) as shard:
        for n in (5, 9):
            shard.append(*make_sequence(rng, n, 1000))
    (record,) = open_store(root).shards
    shards = str(root / "shards")
    tree = events.index(("rename", str(root / record.path)))
    committed = events.index(("link", str(root / record.record_path)))
    assert tree < committed and events[-1] == ("fsync", shards)  # the record's entry, last
    synced = {path for kind, path in events[:tree] if kind == "fsync"}
    suffix = os.path.splitext(record.path)[1]
    temporary = next(p for p in synced if p.endswith(f"-{os.path.basename(record.path)}"))
    assert record.path.endswith(suffix) and record.name in record.path
    for rel in record.files:  # every file of the shard, under its temporary name
        inside = rel[len(record.path) :]
        assert temporary + inside in synced, rel
        parent = os.path.dirname(temporary + inside)
        while len(parent) >= len(temporary) and backend == "zarr":  # and each directory
            assert parent in synced, parent
            parent = os.path.dirname(parent)
    assert ("fsync", str(root)) in events[:tree]  # "shards" was created: the root holds it
    # the tree's entry in shards/ is on disk before the record is written; the record's file too
    between = events[tree + 1 : committed]
    assert ("fsync", shards) in between
    assert between[-1][0] == "fsync" and between[-1][1].endswith(f"-{record.name}.json")


def test_mark_finished_is_durable(tmp_path: Path, events: list[tuple[str, str]]) -> None:
    writer = create_store(tmp_path / "s", manifest("zarr"))
    events.clear()
    writer.mark_finished({"tokens": 0})
    kinds = [kind for kind, _ in events]
    assert kinds == ["fsync", "rename", "fsync"]
    assert events[1][1].endswith("manifest.json") and events[2][1] == str(tmp_path / "s")
    assert open_store(tmp_path / "s").manifest["finished"] is True
