"""Training from s3:// through the local shard cache (moto's S3 server on 127.0.0.1): the same
batches as from a local copy, cold and warm, with DataLoader workers sharing the cache; a warm
run needs no shard object at all; --cache-dir / --cache-limit mistakes are one line, exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli as run
from conftest import write_synthetic_store

from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.storage import open_store
from kdcache.storage._fs import StoreFS
from kdcache.storage.shard_cache import ShardCacheConfig

pytestmark = pytest.mark.slow

LENGTHS = {"train": [[24] * 6, [24] * 5, [24] * 6, [24] * 4], "eval": [[24] * 4, [24] * 3]}


@pytest.fixture
def stores(s3_bucket: str, tmp_path: Path, tiny_tokenizer_dir: Path) -> tuple[str, str]:
    """The same synthetic store on S3 and on local disk."""
    return tuple(  # type: ignore[return-value]
        write_synthetic_store(url, lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir)
        for url in (f"{s3_bucket}/store", str(tmp_path / "local"))
    )


def batches(store: object, workers: int) -> list[dict[str, torch.Tensor]]:
    dataset = DistillDataset(store, batch_size=4, seed=3, buffer_size=8, infinite=False)  # type: ignore[arg-type]
    return [
        {k: v.clone() for k, v in b.items()} for b in TeacherLoader(dataset, num_workers=workers)
    ]


def assert_same(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b) > 0
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def drop_shard_objects(url: str) -> None:
    """Delete every shard object of the S3 store, keeping manifest and commit records."""
    fs = StoreFS(url)
    for record in open_store(url).shards:
        for rel in record.files:
            fs.remove(rel)


@pytest.mark.parametrize("workers", [0, 2])
def test_cold_then_warm_loader_gives_the_local_batches(
    stores: tuple[str, str], tmp_path: Path, workers: int
) -> None:
    s3, local = stores
    expected = batches(open_store(local), workers)
    config = ShardCacheConfig(str(tmp_path / "cache"), limit=10**6)
    cold = open_store(s3, cache=config)
    assert_same(batches(cold, workers), expected)
    shards = open_store(s3).shards_of("train")
    cached = sorted(p.parent.name for p in (tmp_path / "cache").glob("*/*/*") if p.is_dir())
    assert cached == sorted(r.name for r in shards)  # each shard once, whoever fetched it
    assert not list((tmp_path / "cache").rglob(".tmp-*"))
    drop_shard_objects(s3)  # a warm run reads no shard object: none is left to read
    warm = open_store(s3, cache=config)
    assert_same(batches(warm, workers), expected)
    assert warm.cache is not None and warm.cache.fetches == 0


def test_train_student_warm_run_needs_no_shard_object(
    stores: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s3 = stores[0]
    cache = ["--cache-dir", str(tmp_path / "cache"), "--cache-limit", "1MB"]
    argv = ["train-student", "--store", s3, "--steps", "3", "--batch-size", "4",
            "--eval-every", "0", "--eval-batches", "1", "--threads", "1", "--workers", "1", *cache]  # fmt: skip
    code, _, err = run([*argv, "--out", str(tmp_path / "cold")], capsys)
    assert code == 0, err
    drop_shard_objects(s3)
    code, _, err = run([*argv, "--out", str(tmp_path / "warm")], capsys)
    assert code == 0, err
    cold, warm = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("cold", "warm"))
    assert (
        cold["final"] == warm["final"] and cold["train"]["last_loss"] == warm["train"]["last_loss"]
    )
    run_json = json.loads((tmp_path / "warm" / "run.json").read_text())
    assert "shard_cache" not in run_json["settings"]


def test_cache_option_mistakes_are_one_line_exit_2(
    stores: tuple[str, str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s3 = stores[0]
    blocker = tmp_path / "file"
    blocker.write_text("")
    largest = max(r.nbytes for r in open_store(s3).shards)
    for extra, expected in (
        (["--cache-dir", str(blocker)], f"not writable, {blocker}"),
        (["--cache-dir", str(tmp_path / "c"), "--cache-limit", "1KB"], f"{largest:,} bytes"),
        (["--cache-limit", "lots"], "not a size, 'lots'"),
    ):
        for command in (["train-student", "--out", str(tmp_path / "o")], ["sweep", "--out", "x"]):
            code, out, err = run([*command, "--store", s3, *extra], capsys)
            assert code == 2 and err.count("Error") == 1 and expected in err, (extra, err)
            assert "Traceback" not in err
