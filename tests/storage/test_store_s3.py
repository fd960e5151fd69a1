"""The store on a real S3 API (moto's server on 127.0.0.1, the ``s3_bucket`` fixture): the
conformance suites of both backends (test_store, test_store_targets, test_store_loss_mask) —
their tests that go through the filesystem — and so the object-store commit protocol."""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_store import StoreTests, make_sequence
from test_store_loss_mask import MaskTests
from test_store_targets import TargetTests

from kdcache.storage import create_store, make_manifest, open_store, verify_store
from kdcache.storage._fs import StoreFS

pytestmark = pytest.mark.floors

# moto answers a request in ~9 ms, so a conformance test costs ~1 s on S3. The suites' tests of
# codecs, invariants and input validation do not depend on the filesystem and run on local disk
# and memory:// (test_store*.py); on S3 run those that list, commit, resume, read through other
# readers or find damage through the filesystem — each with the parameters given here (one case
# of a parametrized round trip: the widest ids and bfloat16 bits).
ON_S3: dict[str, dict[str, Any]] = {
    "test_round_trip_ragged": {"vocab": 70_000, "dtype": "bfloat16"},
    "test_read_shard_arrays_and_offsets": {},
    "test_empty_split_and_empty_shard": {},
    "test_plain_zarr_and_arrow_readers_find_the_fields": {},
    "test_rollover_and_index_continuation": {},
    "test_shard_exists_and_abort": {},
    "test_a_second_writer_committing_the_same_shard_is_refused": {},
    "test_resume_after_crash_with_half_written_shard": {},
    "test_concurrent_reader_sees_only_whole_shards": {},
    "test_tokenizer_files_and_finished_flag": {},
    "test_verify_checks_tokenizer_against_manifest": {},
    "test_existing_store_with_other_settings_is_refused_listing_differences": {},
    "test_bad_manifests_are_refused": {"content": b"{not json"},
    "test_missing_store": {},
    "test_missing_file_caught_and_read_fails_cleanly": {},
    "test_path_traversal_in_record_is_refused": {"path": "../../etc/passwd"},
    # test_store_targets.py (the loss-mask suite's round trip is the same I/O: not on S3)
    "test_round_trip": {"targets": "topk+sampled", "vocab": 70_000, "dtype": "bfloat16"},
    "test_plain_zarr_and_arrow_readers_find_every_field": {},
    "test_resume_compares_the_targets_facts": {},
    "test_version_1_store_opens_and_verifies": {},
    # test_store_loss_mask.py
    "test_plain_zarr_and_arrow_readers_find_the_mask_and_rows": {},
    "test_a_refused_sequence_leaves_no_empty_rollover_shard": {},
}


def _narrowed(test: Callable[..., None], chosen: dict[str, Any]) -> Callable[..., None]:
    """``test`` with its parametrizations cut to the ``chosen`` values (others unchanged)."""

    @functools.wraps(test)  # pytest reads the original signature through __wrapped__
    def narrowed(self: Any, **kwargs: Any) -> None:
        test(self, **kwargs)

    marks = []
    for mark in getattr(test, "pytestmark", []):
        if mark.name == "parametrize":
            names = (
                [n.strip() for n in mark.args[0].split(",")]
                if isinstance(mark.args[0], str)
                else list(mark.args[0])
            )
            values = [
                value
                for value in mark.args[1]
                if all(
                    chosen.get(name, v) == v
                    for name, v in zip(names, value if len(names) > 1 else [value], strict=True)
                )
            ]
            mark = pytest.mark.parametrize(mark.args[0], values, **mark.kwargs).mark
        marks.append(mark)
    narrowed.pytestmark = marks  # type: ignore[attr-defined]
    return narrowed


class OnS3:
    """Puts every store of a suite in this test's bucket; keeps only the ``ON_S3`` tests."""

    concurrent_shards = 6
    not_here: tuple[str, ...] = ()  # ON_S3 tests this suite leaves out (a name shared by suites)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in [n for n in dir(cls) if n.startswith("test_")]:
            # not collected: pytest passes over a test_ attribute that is not callable
            chosen = None if name in cls.not_here else ON_S3.get(name)
            setattr(cls, name, None if chosen is None else _narrowed(getattr(cls, name), chosen))

    @pytest.fixture(autouse=True)
    def _location(self, tmp_path: Path, s3_bucket: str) -> None:
        self.tmp_path = tmp_path
        self.bucket = s3_bucket

    def new_url(self) -> str:
        return f"{self.bucket}/store-{uuid.uuid4().hex[:12]}"


class TestZarrS3(OnS3, StoreTests):
    backend = "zarr"


class TestArrowS3(OnS3, StoreTests):
    backend = "arrow"


class TestTargetsZarrS3(OnS3, TargetTests):
    backend = "zarr"


class TestTargetsArrowS3(OnS3, TargetTests):
    backend = "arrow"


class TestMaskZarrS3(OnS3, MaskTests):
    backend = "zarr"
    not_here = ("test_round_trip",)


class TestMaskArrowS3(OnS3, MaskTests):
    backend = "arrow"
    not_here = ("test_round_trip",)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_a_killed_writers_objects_are_invisible_then_replaced(s3_bucket: str, backend: str) -> None:
    """Objects under a shard path without a record — what kill -9 mid-commit leaves on an
    object store — are no data for readers or verify; the next writer of that shard deletes
    them (a stale key the new shard would not write too), writes its own, then the record."""
    url = f"{s3_bucket}/store"
    manifest = make_manifest(backend=backend, teacher={"name": "t"}, tokenizer={},
                             vocab_size=1000, top_k=8, seq_len=32, corpus={}, shard_tokens=10)  # fmt: skip
    writer = create_store(url, manifest)
    rng = np.random.default_rng(0)
    writer.append("train", *make_sequence(rng, 12, 1000))  # train-00000, committed
    fs = StoreFS(url)
    suffix = ".zarr" if backend == "zarr" else ".arrow"
    half = {"zarr.json": b"{}", "tokens/c/7": b"stale"} if backend == "zarr" else {"": b"half"}
    fs.write_tree(f"shards/train-00001{suffix}", half)
    assert [r.name for r in open_store(url).shards] == ["train-00000"]
    assert verify_store(url) == []

    writer = create_store(url, manifest)  # the rerun
    record = writer.append("train", *make_sequence(rng, 12, 1000))
    assert record is not None and record.name == "train-00001"
    keys = {k for k in fs.walk_files("shards") if "train-00001" in k}
    assert keys == {*record.files, record.record_path}  # the stale chunk is gone
    assert verify_store(url) == [] and len(open_store(url).shards) == 2
