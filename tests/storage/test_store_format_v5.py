"""Format version 5: an Arrow gaps store keeps its (T, k) columns as byte planes, rank-major;
version-4 Arrow gaps stores (int16/uint16 fixed-size lists) keep opening; backends are handed
the codec instead of guessing it from dtypes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from test_store_codec import manifest, write
from test_store_targets import make_targets

from kdcache.storage import StoreIncompatible, create_store, open_store, verify_store
from kdcache.storage._base import get_codec
from kdcache.storage._codec import checked_decode_rows, decode_rows, level_problem
from kdcache.storage._stored import DECODE_RANK_MAJOR

PLANE_COLUMNS = ("topk_ids", "topk_logprobs")


def arrow_table(url: str, shard: str = "train-00000") -> pa.Table:
    path = json.loads(Path(f"{url}/shards/{shard}.json").read_text())["path"]  # the record's
    return pa.ipc.open_file(f"{url}/{path}").read_all()


def test_gaps_columns_are_byte_planes_that_the_field_metadata_decodes(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    write(url, manifest("topk", backend="arrow", shard_tokens=1000))  # one shard
    arrays = open_store(url).read_shard("train-00000")
    table = arrow_table(url)
    id_table = np.array(json.loads(table.schema.metadata[b"topk_id_table"])["values"])
    for name in PLANE_COLUMNS:
        field = table.schema.field(name)
        children = field.type.value_type  # struct<b0r0, ..., b0r7, b1r0, ..., b1r7>
        assert pa.types.is_struct(children) and children.num_fields == 2 * 8
        assert [children.field(i).name for i in (0, 7, 8)] == ["b0r0", "b0r7", "b1r0"]
        assert all(children.field(i).type == pa.uint8() for i in range(children.num_fields))
        meta = {key.decode(): value.decode() for key, value in field.metadata.items()}
        assert meta["decode"] == DECODE_RANK_MAJOR[name]
        scope: dict[str, Any] = {"np": np, "c": table[name], "topk_id_table": id_table}
        exec(meta["layout"], scope)  # q: the (k, T) integers, rank-major
        assert scope["q"].dtype == meta["planes_of"] and scope["q"].shape == (8, arrays.num_targets)
        if name == "topk_logprobs":
            scope |= {
                "levels": json.loads(meta["levels"]),
                "logprobs": json.loads(meta["logprobs"]),
            }
        got = eval(meta["decode"], scope)
        np.testing.assert_array_equal(got, getattr(arrays, name).astype(got.dtype))


def test_ids_beyond_uint16_take_four_planes(tmp_path: Path) -> None:
    vocab = 70_000  # uint32 ids: codes up to the shard's distinct ids, 4 bytes each
    url = str(tmp_path / "s")
    rng = np.random.default_rng(5)
    facts = manifest("topk", backend="arrow", vocab_size=vocab, shard_tokens=4000)
    given = []
    with create_store(url, facts) as writer:
        for _ in range(3):
            tokens, targets = make_targets(rng, 700, vocab, "topk", support=300)
            writer.append("train", tokens, **targets)
            given.append(targets["topk_ids"])
    assert arrow_table(url).schema.field("topk_ids").type.value_type.num_fields == 4 * 8
    got = [seq.topk_ids for seq in open_store(url).iter_sequences()]
    np.testing.assert_array_equal(np.concatenate(got), np.concatenate(given))
    assert got[0].dtype == np.uint32 and verify_store(url) == []


@pytest.mark.parametrize("targets", ["topk", "topk+sampled"])
def test_a_version_4_arrow_gaps_store_opens_and_resumes_as_version_4(
    tmp_path: Path, targets: str
) -> None:
    v4, v5 = str(tmp_path / "v4"), str(tmp_path / "v5")
    facts = manifest(targets, backend="arrow", loss_mask=True)
    given = write(v4, {**facts, "format_version": 4})
    write(v5, facts)
    table = arrow_table(v4)
    assert json.loads(table.schema.metadata[b"kdcache"])["format_version"] == 4
    for name in PLANE_COLUMNS:  # the version-4 layout: (T, k) rows as fixed-size lists
        inner = table.schema.field(name).type.value_type
        assert isinstance(inner, pa.FixedSizeListType) and inner.list_size == 8
        assert b"planes_of" not in table.schema.field(name).metadata
    assert verify_store(v4) == [] and open_store(v4).manifest["format_version"] == 4
    old, new = open_store(v4), open_store(v5)
    for a, b, want in zip(old.iter_sequences(), new.iter_sequences(), given, strict=True):
        np.testing.assert_array_equal(a.topk_ids, want["topk_ids"])
        for name in ("topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_logprobs"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    with pytest.raises(StoreIncompatible, match="format_version: store has 4, this run asks 7"):
        create_store(v4, facts)
    assert create_store(v4, {**facts, "format_version": 4}).manifest["format_version"] == 4


def test_backends_are_handed_the_codec(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    write(url, manifest("topk", shard_tokens=1000))
    arrays = open_store(url).read_shard("train-00000")  # decoded: float16 log-probs
    for backend in ("zarr", "arrow"):
        codec = get_codec(backend)
        with pytest.raises(ValueError, match="topk_logprobs of a gaps shard must be int16"):
            codec.encode(arrays, "float16", "gaps")
        with pytest.raises(ValueError, match="unknown codec, zip"):
            codec.encode(arrays, "float16", "zip")
        fields, labels = codec.decode(codec.encode(arrays, "float16", "raw"), "train-00000")
        assert labels["topk_logprobs"] == "float16" and "topk_id_table" not in fields
        np.testing.assert_array_equal(fields["topk_logprobs"], arrays.topk_logprobs)
        np.testing.assert_array_equal(fields["topk_ids"], arrays.topk_ids)


def test_checked_decoding_of_rank_major_rows_finds_what_level_problem_finds() -> None:
    rows = np.array([[3, 1, 0, 2], [0, 0, 5, 1]], np.int16)  # (T, k) first levels and gaps
    cases = [
        (rows, None),
        (np.array([[3, -1, 0, 2]], np.int16), "gap is negative"),
        (np.array([[8000, 900, 6, 0]], np.int16), "exceeds the grid's 8905"),
        (np.array([[0, 20000, 20000, 25536]], np.int16), "exceeds"),  # sums past int16
    ]
    for gaps, problem in cases:
        assert (level_problem(gaps, gaps=True) is None) == (problem is None)
        rank_major = np.ascontiguousarray(gaps.T).T  # as the backends return them
        got, found = checked_decode_rows(rank_major, "float16")
        if problem is None:
            assert found is None
            np.testing.assert_array_equal(got, decode_rows(gaps, "float16"))
        else:
            assert found is not None and problem in found
