"""The local shard cache of a remote store, on a real S3 API (moto's server on 127.0.0.1): fetched
once and checked, kept under its limit, damaged copies refetched, clear errors."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import write_synthetic_store

from kdcache.storage import StoreCorrupt, open_store
from kdcache.storage._fs import StoreFS
from kdcache.storage.shard_cache import (
    ShardCache,
    ShardCacheConfig,
    ShardCacheError,
    parse_size,
)

# 5 train shards of ~1 KB..2 KB each and one eval shard
LENGTHS = {"train": [[16] * 3] * 5, "eval": [[16] * 2]}


@pytest.fixture
def s3_store(s3_bucket: str) -> str:
    return write_synthetic_store(f"{s3_bucket}/store", lengths=LENGTHS)


@pytest.fixture
def shard_reads(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """Every shard file (not a commit record) read from any store, as "shards/…" paths."""
    seen: list[str] = []
    original = StoreFS.read_many

    def counting(self: StoreFS, rels: list[str]) -> dict[str, bytes]:
        seen.extend(r for r in rels if r.startswith("shards/") and not r.endswith(".json"))
        return original(self, rels)

    monkeypatch.setattr(StoreFS, "read_many", counting)
    yield seen


def entries(cache_dir: Path) -> list[Path]:
    """Complete cache entries (store/shard/record), temporaries excluded."""
    return sorted(p for p in cache_dir.glob("*/*/*") if p.is_dir() and ".tmp-" not in str(p))


def wait_prefetched(cache: ShardCache) -> None:
    for future in list(cache._mine.fetching.values()):
        future.result()


def test_sizes_parse_with_units() -> None:
    assert parse_size("20GB") == 20 * 10**9
    assert parse_size("512 MiB") == 512 * 2**20
    assert parse_size("1.5k") == 1500
    assert parse_size("4096") == 4096
    for bad in ("", "twenty", "5 parsecs", "-1GB"):
        with pytest.raises(ValueError, match="not a size"):
            parse_size(bad)


def test_local_and_memory_stores_are_read_directly(tmp_path: Path) -> None:
    local = write_synthetic_store(str(tmp_path / "s"), lengths=LENGTHS)
    memory = write_synthetic_store("memory://shard-cache-test/s", lengths=LENGTHS)
    for url in (local, memory):
        assert open_store(url, cache=ShardCacheConfig(str(tmp_path / "cache"))).cache is None
    assert not (tmp_path / "cache").exists()


def test_second_read_comes_from_the_cache_with_the_same_arrays(
    s3_store: str, tmp_path: Path, shard_reads: list[str]
) -> None:
    config = ShardCacheConfig(str(tmp_path / "cache"), limit=10**6)
    direct = open_store(s3_store)
    expected = [direct.read_shard(r) for r in direct.shards]
    shard_reads.clear()

    cold = open_store(s3_store, cache=config)
    assert cold.cache is not None
    got = [cold.read_shard(r) for r in cold.shards]
    assert cold.cache.fetches == len(cold.shards) and len(entries(tmp_path / "cache")) == 6
    assert {p.split("/")[1] for p in shard_reads} == {r.path.split("/")[1] for r in cold.shards}
    shard_reads.clear()

    warm = open_store(s3_store, cache=config)  # a new run: the records are listed again
    again = [warm.read_shard(r) for r in warm.shards]
    assert warm.cache is not None and warm.cache.fetches == 0 and shard_reads == []
    for x, y, z in zip(expected, got, again, strict=True):
        assert x.tokens.tobytes() == y.tokens.tobytes() == z.tokens.tobytes()
        assert x.topk_logprobs.tobytes() == y.topk_logprobs.tobytes() == z.topk_logprobs.tobytes()


def test_prefetch_fetches_the_next_shards_in_the_background(s3_store: str, tmp_path: Path) -> None:
    store = open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "c"), limit=10**6))
    assert store.cache is not None
    order = store.shards_of("train")[::-1]
    store.prefetch(order)
    wait_prefetched(store.cache)
    assert {p.parent.name for p in entries(tmp_path / "c")} == {r.name for r in order[:2]}
    store.read_shard(order[0])  # reading one fetches the ones after it (two ahead)
    wait_prefetched(store.cache)
    assert {p.parent.name for p in entries(tmp_path / "c")} == {r.name for r in order[:3]}
    assert store.cache.fetches == 3


def test_an_evaluation_mid_epoch_leaves_the_training_read_ahead_in_place(
    s3_store: str, tmp_path: Path
) -> None:
    store = open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "c"), limit=10**6))
    assert store.cache is not None
    train = store.shards_of("train")
    store.prefetch(train)  # the training loader's epoch plan
    store.read_shard(train[0])
    wait_prefetched(store.cache)
    store.prefetch(store.shards_of("eval"))  # an evaluation's plan, a consumer of its own
    for record in store.shards_of("eval"):
        store.read_shard(record)
    store.read_shard(train[1])  # training goes on: its read-ahead goes on with it
    wait_prefetched(store.cache)
    cached = {p.parent.name for p in entries(tmp_path / "c")}
    assert {r.name for r in train[:4]} <= cached


def test_least_recently_used_shards_are_evicted_under_the_limit(
    s3_store: str, tmp_path: Path
) -> None:
    probe = open_store(s3_store)
    largest = max(r.nbytes for r in probe.shards)
    limit = 2 * largest + largest // 2  # two shards fit, not three
    store = open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "c"), limit=limit))
    records = store.shards_of("train")
    for record in records:
        store.read_shard(record)
        kept = entries(tmp_path / "c")
        assert sum(f.stat().st_size for p in kept for f in p.rglob("*") if f.is_file()) <= limit
        assert record.name in {p.parent.name for p in kept}  # the shard just read stays
    assert {p.parent.name for p in entries(tmp_path / "c")} == {r.name for r in records[-2:]}
    store.read_shard(records[-2])  # touched: now the most recently used
    store.read_shard(records[0])  # evicts records[-1], the least recently used
    assert {p.parent.name for p in entries(tmp_path / "c")} == {
        records[-2].name,
        records[0].name,
    }


def test_a_damaged_cached_file_is_refetched(s3_store: str, tmp_path: Path) -> None:
    config = ShardCacheConfig(str(tmp_path / "c"), limit=10**6)
    store = open_store(s3_store, cache=config)
    assert store.cache is not None
    record = store.shards[0]
    expected = store.read_shard(record)
    files = [f for f in entries(tmp_path / "c")[0].rglob("*") if f.is_file()]
    victim = max(files, key=lambda f: f.stat().st_size)
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, other bytes: only the sha256 tells
    victim.write_bytes(bytes(data))
    again = open_store(s3_store, cache=config)
    assert again.cache is not None
    assert again.read_shard(record).tokens.tobytes() == expected.tokens.tobytes()
    assert again.cache.fetches == 1
    assert victim.read_bytes() != bytes(data)  # the cache holds the good copy again


def test_a_damaged_remote_object_is_store_corrupt_after_one_refetch(
    s3_store: str, tmp_path: Path
) -> None:
    store = open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "c"), limit=10**6))
    assert store.cache is not None
    record = store.shards[1]
    fs = StoreFS(s3_store)
    rel = max(record.files, key=lambda r: record.files[r]["size"])
    data = bytearray(fs.read(rel))
    data[-1] ^= 0xFF
    fs.write_atomic(rel, bytes(data))
    with pytest.raises(StoreCorrupt, match=f"shard {record.name} does not match") as caught:
        store.read_shard(record)
    assert caught.value.shard == record.name and "after a refetch" in str(caught.value)
    assert store.cache.fetches == 2 and entries(tmp_path / "c") == []


def test_an_unwritable_cache_dir_or_a_limit_below_one_shard_is_one_clear_line(
    s3_store: str, tmp_path: Path
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ShardCacheError, match="not writable") as caught:
        open_store(s3_store, cache=ShardCacheConfig(str(blocker / "cache")))
    assert str(blocker / "cache") in str(caught.value) and "\n" not in str(caught.value)
    largest = max(r.nbytes for r in open_store(s3_store).shards)
    with pytest.raises(ShardCacheError, match="smaller than one shard") as caught:
        open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "c"), limit=largest - 1))
    message = str(caught.value)
    assert "--cache-limit" in message and f"{largest:,} bytes" in message and "\n" not in message


def test_two_stores_never_share_entries_and_the_default_dir_follows_xdg(
    s3_bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("KDCACHE_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    a = write_synthetic_store(f"{s3_bucket}/a", lengths={"train": [[16] * 3]})
    b = write_synthetic_store(f"{s3_bucket}/b", lengths={"train": [[16] * 3]})
    for url in (a, b):
        store = open_store(url, cache=ShardCacheConfig())
        assert store.cache is not None and store.cache.limit <= 50 * 10**9
        store.read_shard(store.shards[0])
    root = tmp_path / "xdg" / "kdcache" / "shards"
    assert len(entries(root)) == 2 and len({p.parent.parent for p in entries(root)}) == 2
    assert os.listdir(root) and all(".tmp-" not in str(p) for p in root.rglob("*"))


def test_a_full_cache_disk_is_one_clear_error_and_nothing_is_kept(
    s3_store: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import builtins
    import errno

    from kdcache.storage import shard_cache

    def full_disk(file, mode="r", *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return builtins.open(file, mode, *args, **kwargs)

    monkeypatch.setattr(shard_cache, "open", full_disk, raising=False)
    store = open_store(s3_store, cache=ShardCacheConfig(str(tmp_path / "cache"), limit=10**6))
    with pytest.raises(ShardCacheError, match=r"the shard cache's disk is full, .*--cache-dir"):
        store.read_shard(store.shards[0])
    assert entries(tmp_path / "cache") == []
    assert not [p for p in (tmp_path / "cache").rglob("*") if ".tmp-" in p.name]
