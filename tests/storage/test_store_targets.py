"""Format version 2: every targets kind (topk, sampled, topk+sampled) round-trips on Zarr and
Arrow, on local disk and memory://; version-1 stores keep opening; bad input and damage are caught."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zarr
from test_store import StoreSuite, assert_sequences_pick

from kdcache.storage import (
    StoreCorrupt,
    StoreError,
    StoreIncompatible,
    create_store,
    make_manifest,
    open_store,
    verify_store,
)
from kdcache.storage._base import ShardRecord, get_codec, sha256
from kdcache.storage._fs import StoreFS

K = 8
KINDS = ("topk", "sampled", "topk+sampled")
# facts versions 2 to 4 added (a version-1 manifest has none of them)
LATER_KEYS = (
    "targets",
    "samples",
    "sample_seed",
    "count_dtype",
    "loss_mask",
    "codec",
    "codec_max_abs_error",
)


def make_targets(
    rng: np.random.Generator,
    length: int,
    vocab: int,
    targets: str,
    *,
    k: int = K,
    samples: int = 32,
    support: int = 64,
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """tokens (L,) and ``append``'s target keywords from a teacher whose mass sits on
    ``support`` random ids per position: exact top-k with its tail, and ``samples`` draws."""
    tokens = rng.integers(0, vocab, length)
    where = np.stack([rng.choice(vocab, support, replace=False) for _ in range(length)])  # (L, s)
    logits = rng.normal(size=(length, support)) * 3
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))  # (L, s), full-vocab log-probs
    out: dict[str, np.ndarray] = {}
    if "topk" in targets.split("+"):
        order = np.argsort(-lp, axis=1)  # (L, s)
        rest = np.take_along_axis(lp, order[:, k:], 1)
        out["topk_ids"] = np.take_along_axis(where, order[:, :k], 1)
        out["topk_logprobs"] = np.take_along_axis(lp, order[:, :k], 1)
        out["topk_tail_logprob"] = np.log(np.exp(rest).sum(1))
    if "sampled" in targets.split("+"):
        order = np.argsort(where, axis=1)  # ascending ids
        ids, lps = np.take_along_axis(where, order, 1), np.take_along_axis(lp, order, 1)
        drawn = rng.multinomial(samples, np.exp(lps) / np.exp(lps).sum(1, keepdims=True))
        rows, cols = np.nonzero(drawn)
        out["sampled_distinct"] = (drawn > 0).sum(1)
        out["sampled_ids"] = ids[rows, cols]
        out["sampled_counts"] = drawn[rows, cols]
        out["sampled_logprobs"] = lps[rows, cols]
    return tokens, out


def rewrite(url: str, record: ShardRecord, blobs: dict[str, bytes], **changes: Any) -> None:
    """Put ``blobs`` (keyed relative to the shard) in place of the shard with valid checksums
    and a record changed by ``changes``: only the invariant checks can tell what is wrong."""
    fs = StoreFS(url)
    files = {}
    for key, data in blobs.items():
        rel = f"{record.path}/{key}" if key else record.path
        fs.write_atomic(rel, data)
        files[rel] = {"size": len(data), "sha256": sha256(data)}
    nbytes = sum(f["size"] for f in files.values())
    fixed = ShardRecord(**{**record.__dict__, "files": files, "nbytes": nbytes, **changes})
    fs.write_atomic(record.record_path, fixed.to_bytes())


def rewrite_shard(url: str, record: ShardRecord, arrays: Any, dtype: str = "float16") -> None:
    """Re-encode ``arrays`` in place of ``record``'s shard with valid checksums."""
    rewrite(url, record, get_codec(record.backend).encode(arrays, dtype, "raw"))


class TargetTests(StoreSuite):
    """Every backend x filesystem subclass runs all of these."""

    def manifest(self, targets: str = "topk+sampled", **overrides: Any) -> dict[str, Any]:
        return self.targets_manifest(targets, **overrides)

    # -- round trip -----------------------------------------------------------------------

    @pytest.mark.parametrize("codec", ["raw", "gaps"])
    @pytest.mark.parametrize("targets", KINDS)
    def test_some_sequences_decode_as_in_the_whole_shard(self, targets: str, codec: str) -> None:
        rng = np.random.default_rng(3)
        seqs = [make_targets(rng, n, 1000, targets) for n in [20, 1, 32, 9, 14, 3, 25, 7]]
        url = self.new_url()
        with create_store(url, self.manifest(targets, codec=codec)) as writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, **arrays)
        assert len(open_store(url).shards) > 1
        assert_sequences_pick(open_store(url))

    @pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
    @pytest.mark.parametrize("vocab", [1000, 70_000])
    @pytest.mark.parametrize("targets", KINDS)
    def test_round_trip(self, targets: str, vocab: int, dtype: str) -> None:
        samples = 32 if vocab == 1000 else 300  # uint8 and uint16 counts
        rng = np.random.default_rng(0)
        lengths = [1, 7, 32, 1, 3, 32, 20, 1]
        seqs = [make_targets(rng, n, vocab, targets, samples=samples) for n in lengths]
        url = self.new_url()
        manifest = self.manifest(
            targets,
            vocab_size=vocab,
            logprob_dtype=dtype,
            samples=samples if "sampled" in targets else 0,
        )
        with create_store(url, manifest) as writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, **arrays)
        store = open_store(url)
        assert (store.targets, store.has_topk, store.has_samples) == (
            targets,
            "topk" in targets,
            "sampled" in targets,
        )
        assert store.samples == (samples if store.has_samples else 0) and len(store.shards) > 1
        id_dtype = np.uint16 if vocab <= 65536 else np.uint32
        count_dtype = np.uint8 if samples <= 255 else np.uint16
        lp_dtype = np.float16 if dtype == "float16" else np.float32
        tol = {"float16": 1e-3, "float32": 1e-7, "bfloat16": 8e-3}[dtype]
        got = list(store.iter_sequences("train"))
        assert [len(s.tokens) for s in got] == lengths
        for seq, (tokens, arrays) in zip(got, seqs, strict=True):
            np.testing.assert_array_equal(seq.tokens, tokens)
            if store.has_topk:
                assert seq.topk_ids.dtype == id_dtype and seq.topk_logprobs.dtype == lp_dtype
                np.testing.assert_array_equal(seq.topk_ids, arrays["topk_ids"])
                np.testing.assert_allclose(
                    seq.topk_logprobs, arrays["topk_logprobs"], rtol=tol, atol=tol
                )
                assert seq.topk_tail_logprob.dtype == np.float32
                np.testing.assert_array_equal(
                    seq.topk_tail_logprob, arrays["topk_tail_logprob"].astype(np.float32)
                )
            else:
                assert seq.topk_ids is None and seq.topk_logprobs is None
                assert seq.topk_tail_logprob is None
            if store.has_samples:
                assert seq.sampled_distinct.dtype == seq.sampled_counts.dtype == count_dtype
                assert seq.sampled_ids.dtype == id_dtype and seq.sampled_logprobs.dtype == lp_dtype
                for name in ("sampled_distinct", "sampled_ids", "sampled_counts"):
                    np.testing.assert_array_equal(getattr(seq, name), arrays[name])
                np.testing.assert_allclose(
                    seq.sampled_logprobs, arrays["sampled_logprobs"], rtol=tol, atol=tol
                )
                off = seq.sampled_offsets
                assert off[0] == 0 and off[-1] == len(seq.sampled_ids) and off.dtype == np.int64
                assert (np.add.reduceat(seq.sampled_counts, off[:-1]) == samples).all()
            else:
                assert seq.sampled_distinct is None and seq.sampled_ids is None
                assert seq.sampled_offsets is None
        assert verify_store(url) == []

    def test_shard_arrays_hold_flat_sampled_entries(self) -> None:
        rng = np.random.default_rng(1)
        seqs = [make_targets(rng, n, 1000, "sampled") for n in (5, 1, 9)]
        url = self.new_url()
        with create_store(url, self.manifest("sampled", shard_tokens=1000)) as writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, **arrays)
        store = open_store(url)
        arrays = store.read_shard(store.shards[0])
        assert arrays.topk_ids is None and arrays.topk_logprobs is None and store.top_k == 0
        off = arrays.sampled_offsets  # (N+1,)
        assert off.shape == (16,) and off[-1] == arrays.sampled_ids.shape[0]
        assert arrays.sampled_offsets is off  # cached while sampled_distinct stays the same
        second = arrays.sequence(1)  # its own entries only
        a, b = int(off[5]), int(off[6])
        np.testing.assert_array_equal(second.sampled_ids, arrays.sampled_ids[a:b])
        np.testing.assert_array_equal(second.sampled_ids, seqs[1][1]["sampled_ids"])
        assert second.sampled_offsets.tolist() == [0, b - a]
        with pytest.raises(StoreError, match="no top-k rows"):
            store.sample_logprobs()

    def test_plain_zarr_and_arrow_readers_find_every_field(self) -> None:
        rng = np.random.default_rng(3)
        seqs = [make_targets(rng, n, 1000, "topk+sampled") for n in (3, 4)]
        url = self.new_url()
        with create_store(url, self.manifest(shard_tokens=1000)) as writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, **arrays)
        store = open_store(url)
        shard_url = f"{url}/{store.shards[0].path}"
        names = ["tokens", "topk_ids", "topk_logprobs", "topk_tail_logprob"]
        names += ["sampled_distinct", "sampled_ids", "sampled_counts", "sampled_logprobs"]
        if self.backend == "zarr":
            group = zarr.open_group(shard_url, mode="r")
            assert sorted(group.array_keys()) == sorted([*names, "seq_offsets"])
            got = {name: group[name][:] for name in names}
            assert group.attrs["kdcache"]["format_version"] == 7
        else:
            table = pa.ipc.open_file(pa.BufferReader(StoreFS(shard_url).read(""))).read_all()
            assert table.column_names == names and table.num_rows == 2
            got = {
                name: np.concatenate(table[name].to_numpy(zero_copy_only=False)) for name in names
            }
            got["topk_ids"] = np.stack(list(got["topk_ids"]))
            # a row's sampled entries: as many as its positions' sampled_distinct add up to
            for row in range(2):
                distinct = table["sampled_distinct"][row].values.to_numpy()
                assert len(table["sampled_ids"][row]) == distinct.sum()
        for name in ("topk_ids", "topk_tail_logprob", "sampled_distinct", "sampled_ids"):
            expected = np.concatenate([arrays[name] for _, arrays in seqs])
            np.testing.assert_array_equal(got[name], expected.astype(got[name].dtype))

    def test_many_chunks_and_record_batches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from kdcache.storage import _arrow, _zarr

        monkeypatch.setattr(_zarr, "CHUNK_BYTES", 64)
        monkeypatch.setattr(_arrow, "BATCH_TOKENS", 8)
        monkeypatch.setattr(_arrow, "BATCH_ENTRIES", 50)
        rng = np.random.default_rng(4)
        seqs = [make_targets(rng, n, 1000, "topk+sampled") for n in (3, 9, 1, 4, 12, 2)]
        url = self.new_url()
        with create_store(url, self.manifest(shard_tokens=1000)) as writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, **arrays)
        store = open_store(url)
        record = store.shards[0]
        if self.backend == "arrow":
            assert (
                pa.ipc.open_file(pa.BufferReader(StoreFS(url).read(record.path))).num_record_batches
                > 2
            )
        else:
            assert len(record.files) > 20
        for seq, (tokens, arrays) in zip(store.iter_sequences(), seqs, strict=True):
            np.testing.assert_array_equal(seq.tokens, tokens)
            np.testing.assert_array_equal(seq.sampled_ids, arrays["sampled_ids"])
            np.testing.assert_array_equal(seq.topk_ids, arrays["topk_ids"])
        assert verify_store(url) == []

    # -- writing --------------------------------------------------------------------------

    def test_tail_is_computed_when_omitted(self) -> None:
        rng = np.random.default_rng(5)
        tokens, arrays = make_targets(rng, 6, 1000, "topk")
        url = self.new_url()
        with create_store(url, self.manifest("topk")) as writer:
            writer.append("train", tokens, arrays["topk_ids"], arrays["topk_logprobs"])
        (seq,) = open_store(url).iter_sequences()
        mass = np.exp(arrays["topk_logprobs"].astype(np.float64)).sum(1)
        np.testing.assert_array_equal(seq.topk_tail_logprob, np.log(1 - mass).astype(np.float32))
        # close to the exact tail, which the caller did not give
        np.testing.assert_allclose(seq.topk_tail_logprob, arrays["topk_tail_logprob"], rtol=1e-4)
        # k = vocab: no mass is outside the top-k
        url = self.new_url()
        with create_store(url, self.manifest("topk", vocab_size=8)) as writer:
            logits = rng.normal(size=(3, 8))
            lp = -np.sort(-(logits - np.log(np.exp(logits).sum(1, keepdims=True))), axis=1)
            writer.append("train", [1, 2, 3], np.argsort(-logits, axis=1), lp)
        (seq,) = open_store(url).iter_sequences()
        assert np.isneginf(seq.topk_tail_logprob).all()

    def test_append_refuses_arrays_the_kind_lacks_and_needs_those_it_has(self) -> None:
        rng = np.random.default_rng(6)
        tokens, both = make_targets(rng, 4, 1000, "topk+sampled")
        topk = {k: v for k, v in both.items() if k.startswith("topk")}
        sampled = {k: v for k, v in both.items() if k.startswith("sampled")}
        cases = [
            ("sampled", topk | sampled, "topk_ids given, but a sampled store"),
            ("sampled", {}, "needs sampled_distinct, sampled_ids, sampled_counts"),
            ("sampled", {k: v for k, v in sampled.items() if k != "sampled_counts"}, "needs"),
            ("topk", both, "sampled_distinct given, but a topk store"),
            ("topk+sampled", topk, "needs sampled_distinct"),
            ("topk+sampled", sampled, "needs topk_ids, topk_logprobs"),
        ]
        for targets, arrays, message in cases:
            shard = create_store(self.new_url(), self.manifest(targets)).open_shard("train", 0)
            with pytest.raises(ValueError, match=message):
                shard.append(tokens, **arrays)
            assert shard.num_sequences == 0

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"sampled_distinct": [0, 3]}, r"sampled_distinct outside 1\.\.4"),
            ({"sampled_distinct": [5, 1]}, r"sampled_distinct outside 1\.\.4"),
            ({"sampled_distinct": [[2, 1]]}, "sampled_distinct shape"),
            ({"sampled_distinct": [2, 2]}, r"sampled_ids shape must be \(4,\)"),
            ({"sampled_ids": [9, 5, 7]}, "not strictly ascending"),
            ({"sampled_ids": [5, 5, 7]}, "not strictly ascending"),
            ({"sampled_ids": [5, 9, 1000]}, r"sampled id outside \[0, 1000\)"),
            ({"sampled_ids": [-1, 9, 7]}, "sampled id outside"),
            ({"sampled_ids": [5.0, 9.0, 7.0]}, "sampled_ids must be integers"),
            ({"sampled_counts": [2, 1, 4]}, "sum to 3, not samples=4"),
            ({"sampled_counts": [4, 0, 4]}, "counts must be >= 1"),
            ({"sampled_counts": [3, 1]}, "sampled_counts shape"),
            ({"sampled_logprobs": [0.1, -1.5, -0.1]}, "positive or NaN"),
            ({"sampled_logprobs": [np.nan, -1.5, -0.1]}, "positive or NaN"),
            ({"sampled_logprobs": [0, -1, 0]}, "sampled_logprobs must be floats"),
        ],
    )
    def test_append_validates_sampled_entries(self, change: dict[str, Any], message: str) -> None:
        good = {
            "sampled_distinct": [2, 1],  # position 0: ids 5, 9; position 1: id 7
            "sampled_ids": [5, 9, 7],
            "sampled_counts": [3, 1, 4],
            "sampled_logprobs": [-0.2, -1.5, -0.1],
        }
        url = self.new_url()
        shard = create_store(url, self.manifest("sampled", samples=4)).open_shard("train", 0)
        with pytest.raises(ValueError, match=message):
            shard.append([1, 2], **{k: np.asarray(v) for k, v in {**good, **change}.items()})
        shard.append(np.array([1, 2]), **{k: np.asarray(v) for k, v in good.items()})
        shard.commit()
        (seq,) = open_store(url).iter_sequences()
        assert seq.sampled_ids.tolist() == [5, 9, 7] and seq.sampled_counts.tolist() == [3, 1, 4]

    @pytest.mark.parametrize(
        ("tail", "message"),
        [
            ([-1.0, 0.5, -2.0], "topk_tail_logprob is positive or NaN"),
            ([-1.0, np.nan, -2.0], "topk_tail_logprob is positive or NaN"),
            ([-1.0, -2.0], "topk_tail_logprob shape"),
            ([-1, -2, -3], "topk_tail_logprob must be floats"),
        ],
    )
    def test_append_validates_the_tail(self, tail: list[Any], message: str) -> None:
        tokens, arrays = make_targets(np.random.default_rng(7), 3, 1000, "topk")
        shard = create_store(self.new_url(), self.manifest("topk")).open_shard("train", 0)
        with pytest.raises(ValueError, match=message):
            shard.append(tokens, **{**arrays, "topk_tail_logprob": np.asarray(tail)})
        shard.append(tokens, **{**arrays, "topk_tail_logprob": np.full(3, -np.inf)})
        assert shard.num_tokens == 3

    # -- manifests ------------------------------------------------------------------------

    def test_make_manifest_validates_the_targets_facts(self) -> None:
        assert self.manifest("sampled", samples=255)["count_dtype"] == "uint8"
        assert self.manifest("sampled", samples=256)["count_dtype"] == "uint16"
        assert self.manifest("sampled", samples=65535)["count_dtype"] == "uint16"
        topk = self.manifest("topk")
        assert (topk["samples"], topk["sample_seed"], topk["count_dtype"]) == (0, None, None)
        assert topk["format_version"] == 7 and topk["loss_mask"] is False
        for overrides, message in [
            ({"targets": "logits"}, "targets unknown"),
            ({"targets": "sampled", "top_k": 8}, "top_k must be 0 for sampled"),
            ({"targets": "topk+sampled", "top_k": 0}, "top_k must be in 1"),
            ({"targets": "sampled", "samples": 0}, "samples must be in 1..65535"),
            ({"targets": "sampled", "samples": 65536}, "samples must be in 1..65535"),
            ({"targets": "sampled", "sample_seed": None}, "sample_seed must be an integer"),
            ({"targets": "topk", "samples": 4}, "must be 0/null/null for topk"),
            ({"targets": "topk", "sample_seed": 3}, "must be 0/null/null for topk"),
        ]:
            targets = overrides.pop("targets")
            with pytest.raises(ValueError, match=message):
                self.manifest(targets, **overrides)

    def test_resume_compares_the_targets_facts(self) -> None:
        url = self.new_url()
        create_store(url, self.manifest())
        wanted = self.manifest(samples=300, sample_seed=8)
        with pytest.raises(StoreIncompatible) as info:
            create_store(url, wanted)
        assert info.value.differences == [
            "count_dtype: store has 'uint8', this run asks 'uint16'",
            "sample_seed: store has 7, this run asks 8",
            "samples: store has 32, this run asks 300",
        ]
        with pytest.raises(StoreIncompatible, match="targets: store has 'topk\\+sampled'"):
            create_store(url, self.manifest("topk"))
        assert create_store(url, self.manifest()).manifest["samples"] == 32

    # -- version 1 ------------------------------------------------------------------------

    def v1_manifest(self, **overrides: Any) -> dict[str, Any]:
        """A version-1 manifest, as version 1 of kdcache wrote it: no v2 or v3 keys at all."""
        manifest = self.manifest("topk", **overrides)
        return {
            **{k: v for k, v in manifest.items() if k not in LATER_KEYS},
            "format_version": 1,
        }

    def test_version_1_store_opens_and_verifies(self) -> None:
        rng = np.random.default_rng(8)
        url = self.new_url()
        seqs = [make_targets(rng, n, 1000, "topk") for n in (5, 20, 1)]
        writer = create_store(url, self.v1_manifest(logprob_dtype="float16"))
        with writer:
            for tokens, arrays in seqs:
                writer.append("train", tokens, arrays["topk_ids"], arrays["topk_logprobs"])
            with pytest.raises(ValueError, match="topk_tail_logprob given, but a topk store"):
                writer.append("train", tokens, **arrays)
        writer.mark_finished({"tokens": 26})
        fs = StoreFS(url)
        raw = json.loads(fs.read("manifest.json"))
        assert raw["format_version"] == 1 and raw["finished"] is True
        assert not set(LATER_KEYS) & set(raw)  # still a genuine version-1 manifest
        store = open_store(url)
        (record,) = store.shards
        if self.backend == "zarr":
            fields = {rel.split("/")[2] for rel in record.files}
            assert fields == {"zarr.json", "tokens", "topk_ids", "topk_logprobs", "seq_offsets"}
            assert json.loads(fs.read(f"{record.path}/zarr.json"))["attributes"]["kdcache"] == {
                "format_version": 1,
                "logprob_dtype": "float16",
            }
        else:
            schema = pa.ipc.open_file(pa.BufferReader(fs.read(record.path))).schema
            assert schema.names == ["tokens", "topk_ids", "topk_logprobs"]
        m = store.manifest
        assert (m["format_version"], m["targets"], m["samples"]) == (1, "topk", 0)
        assert (m["sample_seed"], m["count_dtype"]) == (None, None)
        assert (store.targets, store.samples, store.has_topk, store.has_samples) == (
            "topk",
            0,
            True,
            False,
        )
        for seq, (tokens, arrays) in zip(store.iter_sequences(), seqs, strict=True):
            np.testing.assert_array_equal(seq.tokens, tokens)
            np.testing.assert_array_equal(seq.topk_ids, arrays["topk_ids"])
            stored = seq.topk_logprobs.astype(np.float64)  # float16, as stored
            expected = np.log1p(-np.exp(stored).sum(1)).astype(np.float32)
            assert seq.topk_tail_logprob.dtype == np.float32 and seq.sampled_ids is None
            np.testing.assert_array_equal(seq.topk_tail_logprob, expected)
        assert verify_store(url) == []
        # this kdcache writes version 3: resuming a version-1 store is refused, by that fact only
        with pytest.raises(StoreIncompatible) as info:
            create_store(url, self.manifest("topk", logprob_dtype="float16"))
        assert info.value.differences == ["format_version: store has 1, this run asks 7"]
        assert create_store(url, self.v1_manifest()).manifest["format_version"] == 1

    def test_version_1_manifest_cannot_claim_samples(self) -> None:
        url = self.new_url()
        create_store(url, self.v1_manifest())
        StoreFS(url).write_atomic(
            "manifest.json", json.dumps({**self.v1_manifest(), "targets": "sampled"}).encode()
        )
        with pytest.raises(StoreCorrupt, match="format_version 1 but sets targets"):
            open_store(url)

    # -- integrity ------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("field", "damage", "message"),
        [
            ("sampled_counts", lambda a: a.__setitem__(0, a[0] + 1), "sum to 33, not samples=32"),
            ("sampled_counts", lambda a: a.__setitem__(0, 0), "counts must be >= 1"),
            ("sampled_ids", lambda a: a.__setitem__(1, a[0]), "not strictly ascending"),
            ("sampled_ids", lambda a: a.__setitem__(0, 1500), r"outside \[0, 1000\)"),
            ("sampled_logprobs", lambda a: a.__setitem__(2, 0.5), "log-prob is positive or NaN"),
            ("topk_tail_logprob", lambda a: a.__setitem__(3, np.nan), "tail_logprob is positive"),
        ],
    )
    def test_verify_catches_a_damaged_sampled_field(
        self, field: str, damage: Any, message: str
    ) -> None:
        rng = np.random.default_rng(9)
        url = self.new_url()
        with create_store(url, self.manifest(shard_tokens=1000)) as writer:
            for n in (6, 9):
                tokens, arrays = make_targets(rng, n, 1000, "topk+sampled")
                writer.append("train", tokens, **arrays)
        store = open_store(url)
        record = store.shards[0]
        arrays = store.read_shard(record)
        values = getattr(arrays, field).copy()
        damage(values)
        setattr(arrays, field, values)
        rewrite_shard(url, record, arrays)
        problems = verify_store(url)
        assert [s for s, _ in problems] == [record.name]
        assert re.search(message, problems[0][1])
        with pytest.raises(StoreCorrupt, match=message) as info:
            open_store(url).read_shard(record.name)
        assert info.value.shard == record.name

    def test_a_shard_missing_a_field_of_its_kind_is_corrupt(self) -> None:
        rng = np.random.default_rng(10)
        url = self.new_url()
        tokens, arrays = make_targets(rng, 4, 1000, "topk+sampled")
        with create_store(url, self.manifest(shard_tokens=1000)) as writer:
            writer.append("train", tokens, **arrays)
        store = open_store(url)
        record = store.shards[0]
        arrays = store.read_shard(record)
        arrays.sampled_counts = None
        rewrite_shard(url, record, arrays)
        ((name, problem),) = verify_store(url)
        assert name == record.name
        assert "holds sampled_distinct, sampled_ids, sampled_logprobs, seq_offsets," in problem

    @pytest.mark.parametrize("targets", ["sampled", "topk+sampled"])
    def test_any_flipped_byte_is_caught(self, targets: str) -> None:
        rng = np.random.default_rng(11)
        url = self.new_url()
        with create_store(url, self.manifest(targets, shard_tokens=1000)) as writer:
            for n in (9, 9, 9):
                tokens, arrays = make_targets(rng, n, 1000, targets)
                writer.append("train", tokens, **arrays)
        fs = StoreFS(url)
        record = open_store(url).shards[0]
        for rel in [*record.files, record.record_path]:
            original = fs.read(rel)
            for position in (0, len(original) // 2, len(original) - 1):
                damaged = bytearray(original)
                damaged[position] ^= 0x10
                fs.write_atomic(rel, bytes(damaged))
                assert [s for s, _ in verify_store(url)] == [record.name], (rel, position)
            fs.write_atomic(rel, original)
        assert verify_store(url) == []


class TestZarrLocal(TargetTests):
    backend = "zarr"


class TestArrowLocal(TargetTests):
    backend = "arrow"


class TestZarrMemory(TargetTests):
    backend = "zarr"
    memory = True


class TestArrowMemory(TargetTests):
    backend = "arrow"
    memory = True


def test_torch_tensors_are_accepted_for_sampled_targets(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tokens, arrays = make_targets(np.random.default_rng(12), 6, 1000, "topk+sampled")
    manifest = make_manifest(
        backend="arrow",
        teacher={},
        tokenizer={},
        vocab_size=1000,
        top_k=K,
        seq_len=8,
        corpus={},
        shard_tokens=100,
        logprob_dtype="bfloat16",
        targets="topk+sampled",
        samples=32,
        sample_seed=0,
        codec="raw",  # bit-exact bfloat16 back
    )
    tensors = {name: torch.tensor(values) for name, values in arrays.items()}
    for name in ("topk_logprobs", "sampled_logprobs"):
        tensors[name] = tensors[name].to(torch.bfloat16)
    with create_store(tmp_path / "s", manifest).open_shard("train", 0) as shard:
        shard.append(torch.tensor(tokens), **tensors)
    (seq,) = open_store(tmp_path / "s").iter_sequences()
    for name in ("topk_logprobs", "sampled_logprobs"):
        np.testing.assert_array_equal(getattr(seq, name), tensors[name].float().numpy())
    np.testing.assert_array_equal(seq.sampled_counts, arrays["sampled_counts"])
