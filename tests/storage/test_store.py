"""Conformance suite of the logit store, run over Zarr and Arrow on local disk and memory://."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zarr

from kdcache.storage import (
    ShardExists,
    StoreCorrupt,
    StoreError,
    StoreIncompatible,
    StoreNotFound,
    StoreUnavailable,
    UnsupportedFormat,
    create_store,
    make_manifest,
    open_store,
    verify_store,
)
from kdcache.storage._base import ShardRecord
from kdcache.storage._fs import StoreFS

pytestmark = pytest.mark.floors

K = 8


def make_sequence(rng: np.random.Generator, length: int, vocab: int, k: int = K) -> tuple[Any, ...]:
    """tokens (L,), topk_ids (L, k) distinct per row, topk_logprobs (L, k) sorted descending."""
    tokens = rng.integers(0, vocab, length)
    ids = np.stack([rng.choice(vocab, k, replace=False) for _ in range(length)])
    logits = rng.normal(size=(length, 64)) * 3
    logprobs = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    logprobs = -np.sort(-logprobs, axis=1)[:, :k]
    return tokens, ids, logprobs


SEQUENCE_FIELDS = ("tokens", "loss_mask", "topk_ids", "topk_logprobs", "topk_tail_logprob",
                   "sampled_distinct", "sampled_ids", "sampled_counts", "sampled_logprobs")  # fmt: skip


def assert_sequences_pick(store: Any) -> None:
    """Decoding chosen sequences of each shard gives exactly those sequences of the whole shard."""
    rng = np.random.default_rng(0)
    for record in store.shards:
        whole = store.read_shard(record)
        s = whole.num_sequences
        half = sorted(rng.choice(s, max(1, s // 2), replace=False).tolist())
        for picked in ([0], [s - 1], list(range(0, s, 2)), half, list(range(s))):
            part = store.read_shard(record, sequences=picked)
            assert part.num_sequences == len(picked), (record.name, picked)
            for i, j in enumerate(picked):
                got, want = part.sequence(i), whole.sequence(j)
                for name in SEQUENCE_FIELDS:
                    a, b = getattr(got, name), getattr(want, name)
                    assert (a is None) == (b is None), name
                    if a is not None:
                        assert a.dtype == b.dtype, name
                        np.testing.assert_array_equal(a, b, err_msg=f"{record.name} {j} {name}")
    for wrong in ([1, 0], [0, 0], [-1], [s], []):
        with pytest.raises(ValueError, match="ascending distinct indices"):
            store.read_shard(record, sequences=wrong)


class StoreSuite:
    """Where a conformance suite's stores go (a fresh local or memory:// URL per store) and the
    manifest they are made with; each backend x filesystem subclass picks ``backend``/``memory``."""

    backend = "zarr"
    memory = False
    facts: dict[str, Any] = {}  # the suite's own manifest facts (its corpus, targets, mask, ...)

    @pytest.fixture(autouse=True)
    def _location(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path

    def new_url(self) -> str:
        name = f"store-{uuid.uuid4().hex[:12]}"
        return f"memory://{name}" if self.memory else str(self.tmp_path / name)

    def manifest(self, **overrides: Any) -> dict[str, Any]:
        facts: dict[str, Any] = {
            "backend": self.backend,
            "teacher": {"name": "tiny", "revision": "abc"},
            "tokenizer": {"sha256": "0" * 64},
            "vocab_size": 1000,
            "top_k": K,
            "seq_len": 32,
            "corpus": {"spec": "stdlib", "eval_fraction": 0.1},
            "shard_tokens": 64,
            "codec": "raw",  # the raw layout (its float invariants); gaps: test_store_codec.py
            **self.facts,
            **overrides,
        }
        return make_manifest(**facts)

    def targets_manifest(self, targets: str, **overrides: Any) -> dict[str, Any]:
        """The manifest of a store of ``targets`` (top-k of K, 32 samples, as the kind has)."""
        sampled = "sampled" in targets
        kind = {
            "targets": targets,
            "top_k": K if "topk" in targets else 0,
            "samples": 32 if sampled else 0,
            "sample_seed": 7 if sampled else None,
        }
        return StoreSuite.manifest(self, **{**kind, **overrides})  # not a subclass override


class StoreTests(StoreSuite):
    """Every backend x filesystem subclass runs all of these."""

    concurrent_shards = 12  # the reader re-reads every shard each round: O(shards²) requests

    def write(self, url: str, sequences: list[tuple[Any, ...]], split: str = "train", **kw: Any):
        writer = create_store(url, self.manifest(**kw))
        with writer:
            for seq in sequences:
                writer.append(split, *seq)
        return writer

    # -- round trip -----------------------------------------------------------------------

    @pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
    @pytest.mark.parametrize("vocab", [1000, 70_000])
    def test_round_trip_ragged(self, dtype: str, vocab: int) -> None:
        rng = np.random.default_rng(0)
        lengths = [1, 7, 32, 1, 3, 32, 20, 1]
        seqs = [make_sequence(rng, n, vocab) for n in lengths]
        url = self.new_url()
        self.write(url, seqs, vocab_size=vocab, logprob_dtype=dtype)
        store = open_store(url)
        assert store.num_tokens == sum(lengths) and store.num_sequences == len(lengths)
        got = list(store.iter_sequences("train"))
        assert [len(s.tokens) for s in got] == lengths
        id_dtype = np.uint16 if vocab <= 65536 else np.uint32
        tol = {"float16": 1e-3, "float32": 1e-7, "bfloat16": 8e-3}[dtype]
        for seq, (tokens, ids, logprobs) in zip(got, seqs, strict=True):
            assert seq.tokens.dtype == np.int32 and seq.topk_ids.dtype == id_dtype
            assert seq.topk_logprobs.dtype == (np.float16 if dtype == "float16" else np.float32)
            np.testing.assert_array_equal(seq.tokens, tokens)
            np.testing.assert_array_equal(seq.topk_ids, ids)
            np.testing.assert_allclose(seq.topk_logprobs, logprobs, rtol=tol, atol=tol)
        assert verify_store(url) == []

    def test_read_shard_arrays_and_offsets(self) -> None:
        rng = np.random.default_rng(1)
        seqs = [make_sequence(rng, n, 1000) for n in (5, 1, 9)]
        url = self.new_url()
        self.write(url, seqs, shard_tokens=1000)
        store = open_store(url)
        (record,) = store.shards
        arrays = store.read_shard(record.name)
        assert arrays.seq_offsets.tolist() == [0, 5, 6, 15]
        assert arrays.topk_ids.shape == (15, K) and arrays.num_sequences == 3
        assert arrays.sequence(1).tokens.tolist() == seqs[1][0].tolist()
        assert record.num_tokens == 15 and record.nbytes == sum(
            f["size"] for f in record.files.values()
        )

    def test_empty_split_and_empty_shard(self) -> None:
        url = self.new_url()
        writer = self.write(url, [make_sequence(np.random.default_rng(2), 4, 1000)])
        store = open_store(url)
        assert list(store.iter_sequences("eval")) == [] and store.splits == ["train"]
        with pytest.raises(ValueError, match="no sequences"):
            writer.open_shard("eval", 0).commit()
        assert open_store(url).shards_of("eval") == []

    def test_plain_zarr_and_arrow_readers_find_the_fields(self) -> None:
        rng = np.random.default_rng(3)
        seqs = [make_sequence(rng, n, 1000) for n in (3, 4)]
        url = self.new_url()
        self.write(url, seqs, shard_tokens=1000)
        store = open_store(url)
        shard_url = f"{url}/{store.shards[0].path}"
        if self.backend == "zarr":
            group = zarr.open_group(shard_url, mode="r")
            ids = group["topk_ids"][:]
            assert group["seq_offsets"][:].tolist() == [0, 3, 7]
            assert group["tokens"].shape == (7,) and group["topk_logprobs"].shape == (7, K)
        else:
            fs = StoreFS(shard_url)
            table = pa.ipc.open_file(pa.BufferReader(fs.read(""))).read_all()
            assert table.column_names == [
                "tokens",
                "topk_ids",
                "topk_logprobs",
                "topk_tail_logprob",
            ]
            assert table.num_rows == 2
            ids = np.stack([np.array(row) for s in table["topk_ids"].to_pylist() for row in s])
        np.testing.assert_array_equal(ids, np.concatenate([s[1] for s in seqs]))

    # -- writing --------------------------------------------------------------------------

    def test_rollover_and_index_continuation(self) -> None:
        rng = np.random.default_rng(4)
        url = self.new_url()
        self.write(url, [make_sequence(rng, 30, 1000) for _ in range(5)], shard_tokens=64)
        records = open_store(url).shards
        assert [r.num_tokens for r in records] == [90, 60]
        writer = self.write(url, [make_sequence(rng, 30, 1000)], shard_tokens=64)
        assert sorted(writer.committed("train")) == ["train-00000", "train-00001", "train-00002"]

    def test_append_validates_input(self) -> None:
        rng = np.random.default_rng(5)
        writer = create_store(self.new_url(), self.manifest())
        tokens, ids, logprobs = make_sequence(rng, 4, 1000)
        shard = writer.open_shard("train", 0)
        with pytest.raises(ValueError, match="shapes"):
            shard.append(tokens, ids[:, :3], logprobs)
        with pytest.raises(ValueError, match="shapes"):
            shard.append(tokens[:0], ids[:0], logprobs[:0])
        with pytest.raises(ValueError, match="outside"):
            shard.append(tokens, ids + 1000, logprobs)
        with pytest.raises(ValueError, match="sorted descending"):
            shard.append(tokens, ids, logprobs[:, ::-1])
        shard.append(tokens.astype(np.int64), ids.astype(np.int32), logprobs.astype(np.float32))
        assert shard.num_tokens == 4 and shard.commit().name == "train-00000"

    def test_shard_exists_and_abort(self) -> None:
        rng = np.random.default_rng(6)
        url = self.new_url()
        writer = create_store(url, self.manifest())
        with writer.open_shard("eval", 3, corpus_range={"docs": [0, 10]}) as shard:
            shard.append(*make_sequence(rng, 5, 1000))
        with pytest.raises(ShardExists):
            writer.open_shard("eval", 3)
        with pytest.raises(RuntimeError), writer.open_shard("eval", 4) as shard:
            shard.append(*make_sequence(rng, 5, 1000))
            raise RuntimeError("teacher crashed")
        store = open_store(url)
        assert [r.name for r in store.shards] == ["eval-00003"]
        assert store.shards[0].corpus_range == {"docs": [0, 10]}

    def test_a_second_writer_committing_the_same_shard_is_refused(self) -> None:
        rng = np.random.default_rng(7)
        url = self.new_url()
        first, second = create_store(url, self.manifest()), create_store(url, self.manifest())
        sequence = make_sequence(rng, 5, 1000)
        mine, theirs = first.open_shard("train", 0), second.open_shard("train", 0)
        mine.append(*sequence)
        theirs.append(*sequence)
        mine.commit()
        with pytest.raises(ShardExists, match="another writer meanwhile, train-00000"):
            theirs.commit()
        assert verify_store(url) == [] and len(open_store(url).shards) == 1

    def test_resume_after_crash_with_half_written_shard(self) -> None:
        rng = np.random.default_rng(7)
        url = self.new_url()
        writer = self.write(url, [make_sequence(rng, 40, 1000) for _ in range(2)])
        fs = StoreFS(url)
        suffix = ".zarr" if self.backend == "zarr" else ".arrow"
        # a crash mid-write: a temporary, and a moved-in data path whose record never came
        fs.write_tree(f"shards/.tmp-{uuid.uuid4().hex}-train-00001{suffix}", {"": b"half"})
        fs.write_tree(f"shards/train-00001{suffix}", {"": b"partial"})
        fs.write_tree(f"shards/.tmp-{uuid.uuid4().hex}-train-00007{suffix}", {"": b"other rank"})
        store = open_store(url)
        assert [r.name for r in store.shards] == ["train-00000"]
        assert verify_store(url) == []
        writer = create_store(url, self.manifest())
        assert list(writer.committed()) == ["train-00000"]
        with writer.open_shard("train", 1) as shard:  # cleans this shard's leftovers only
            shard.append(*make_sequence(rng, 10, 1000))
        left = fs.list_names("shards")
        assert any(n.endswith(f"train-00007{suffix}") for n in left)
        assert not any(n.startswith(".tmp-") and "train-00001" in n for n in left)
        assert writer.clean_temporaries() == 1
        assert [r.name for r in open_store(url).shards] == ["train-00000", "train-00001"]
        assert verify_store(url) == []

    def test_concurrent_reader_sees_only_whole_shards(self) -> None:
        rng = np.random.default_rng(8)
        url = self.new_url()
        writer = create_store(url, self.manifest(shard_tokens=20))
        seqs = [make_sequence(rng, 20, 1000) for _ in range(self.concurrent_shards)]
        done = threading.Event()
        errors: list[BaseException] = []

        def produce() -> None:
            try:
                for seq in seqs:
                    writer.append("train", *seq)
            except BaseException as e:  # surfaced by the assert below
                errors.append(e)
            finally:
                done.set()

        thread = threading.Thread(target=produce)
        reader = open_store(url)
        thread.start()
        rounds = 0
        while True:
            finished = done.is_set()  # after the writer finished, one last full pass
            reader.refresh()
            for record in reader.shards:  # every listed shard must read whole and correct
                np.testing.assert_array_equal(
                    reader.read_shard(record).tokens, seqs[record.index][0]
                )
            seen, rounds = len(reader.shards), rounds + 1
            if finished:
                break
        thread.join()
        assert errors == [] and seen == len(seqs) and rounds > 1

    def test_tokenizer_files_and_finished_flag(self) -> None:
        url = self.new_url()
        files = {"tokenizer.json": b'{"v": 1}', "tokenizer_config.json": b"{}"}
        writer = create_store(url, self.manifest())
        writer.write_tokenizer(files)
        writer.write_tokenizer(files)  # identical: no-op
        with pytest.raises(StoreIncompatible):
            writer.write_tokenizer({"tokenizer.json": b'{"v": 2}'})
        with pytest.raises(ValueError, match="file name"):
            writer.write_tokenizer({"../evil": b""})
        writer.mark_finished({"tokens": 0})
        store = open_store(url)
        assert store.tokenizer_files() == files
        assert store.manifest["finished"] is True and store.manifest["stats"] == {"tokens": 0}

    def test_verify_checks_tokenizer_against_manifest(self) -> None:
        import hashlib

        data = b'{"model": {}}'
        url = self.new_url()
        tokenizer = {"files": {"tokenizer.json": hashlib.sha256(data).hexdigest()}}
        writer = create_store(url, self.manifest(tokenizer=tokenizer))
        assert verify_store(url) == [("tokenizer", "tokenizer/tokenizer.json is missing")]
        writer.write_tokenizer({"tokenizer.json": data})
        assert verify_store(url) == []
        StoreFS(url).write_atomic("tokenizer/tokenizer.json", data + b" ")
        assert verify_store(url)[0][0] == "tokenizer"

    # -- manifests ------------------------------------------------------------------------

    def test_existing_store_with_other_settings_is_refused_listing_differences(self) -> None:
        url = self.new_url()
        create_store(url, self.manifest())
        wanted = self.manifest(top_k=4, logprob_dtype="float32", teacher={"name": "other"})
        with pytest.raises(StoreIncompatible) as info:
            create_store(url, wanted)
        assert info.value.differences == [
            "logprob_dtype: store has 'float16', this run asks 'float32'",
            "teacher.name: store has 'tiny', this run asks 'other'",
            "teacher.revision: store has 'abc', this run does not set it",
            "top_k: store has 8, this run asks 4",
        ]
        assert create_store(url, self.manifest()).manifest["top_k"] == K

    @pytest.mark.parametrize(
        ("content", "error"),
        [
            (b"{not json", StoreCorrupt),
            (b"[1, 2]", StoreCorrupt),
            (b'{"format_version": 8}', UnsupportedFormat),
            (b'{"format_version": true}', UnsupportedFormat),
            (b'{"format_version": 2}', StoreCorrupt),
            (b'{"format_version": 3}', StoreCorrupt),
            (b'{"format_version": 1, "backend": "hdf5"}', UnsupportedFormat),
            (b'{"format_version": 1, "backend": "zarr"}', StoreCorrupt),
        ],
    )
    def test_bad_manifests_are_refused(self, content: bytes, error: type[Exception]) -> None:
        url = self.new_url()
        create_store(url, self.manifest())
        StoreFS(url).write_atomic("manifest.json", content)
        for call in (open_store, verify_store, lambda u: create_store(u, self.manifest())):
            with pytest.raises(error):
                call(url)

    def test_missing_store(self) -> None:
        with pytest.raises(StoreNotFound, match="manifest.json missing"):
            open_store(self.new_url())

    def test_make_manifest_validates(self) -> None:
        with pytest.raises(ValueError, match="top_k"):
            self.manifest(top_k=2000)
        with pytest.raises(ValueError, match="logprob_dtype"):
            self.manifest(logprob_dtype="int8")
        with pytest.raises(UnsupportedFormat):
            self.manifest(backend="hdf5")
        assert self.manifest(vocab_size=65536)["id_dtype"] == "uint16"
        assert self.manifest(vocab_size=65537)["id_dtype"] == "uint32"

    # -- integrity ------------------------------------------------------------------------

    def test_any_flipped_byte_in_any_file_is_caught(self) -> None:
        rng = np.random.default_rng(9)
        url = self.new_url()
        self.write(url, [make_sequence(rng, 9, 1000) for _ in range(3)], shard_tokens=1000)
        fs = StoreFS(url)
        record = open_store(url).shards[0]
        for rel in [*record.files, record.record_path]:
            original = fs.read(rel)
            for position in (0, len(original) // 2, len(original) - 1):
                damaged = bytearray(original)
                damaged[position] ^= 0x10
                fs.write_atomic(rel, bytes(damaged))
                problems = verify_store(url)
                assert [s for s, _ in problems] == [record.name], (rel, position)
            fs.write_atomic(rel, original)
        assert verify_store(url) == []

    def test_missing_file_caught_and_read_fails_cleanly(self) -> None:
        url = self.new_url()
        self.write(url, [make_sequence(np.random.default_rng(10), 9, 1000)])
        fs = StoreFS(url)
        record = open_store(url).shards[0]
        fs.remove(sorted(record.files)[-1])
        assert [s for s, _ in verify_store(url)] == [record.name]
        with pytest.raises(StoreCorrupt) as info:
            open_store(url).read_shard(record)
        assert info.value.shard == record.name

    @pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "shards/../x.zarr"])
    def test_path_traversal_in_record_is_refused(self, path: str) -> None:
        url = self.new_url()
        self.write(url, [make_sequence(np.random.default_rng(11), 9, 1000)])
        fs = StoreFS(url)
        record = open_store(url).shards[0]
        evil = ShardRecord(**{**record.__dict__, "path": path})
        fs.write_atomic(record.record_path, evil.to_bytes())  # self-checksum is valid
        with pytest.raises(StoreCorrupt, match="path traversal") as info:
            open_store(url)
        assert info.value.shard == record.name
        assert [s for s, _ in verify_store(url)] == [record.name]

    def test_reader_invariant_checks_name_the_shard(self) -> None:
        url = self.new_url()
        self.write(url, [make_sequence(np.random.default_rng(12), 9, 1000)])
        fs = StoreFS(url)
        store = open_store(url)
        record = store.shards[0]
        arrays = store.read_shard(record)
        arrays.topk_logprobs = np.ascontiguousarray(arrays.topk_logprobs[:, ::-1])
        # re-encode unsorted rows with valid checksums: only the invariant check can catch it
        from kdcache.storage._base import get_codec, sha256

        blobs = get_codec(self.backend).encode(arrays, "float16", "raw")
        files = {}
        for key, data in blobs.items():
            rel = f"{record.path}/{key}" if key else record.path
            fs.write_atomic(rel, data)
            files[rel] = {"size": len(data), "sha256": sha256(data)}
        nbytes = sum(f["size"] for f in files.values())
        fixed = ShardRecord(**{**record.__dict__, "files": files, "nbytes": nbytes})
        fs.write_atomic(record.record_path, fixed.to_bytes())
        with pytest.raises(StoreCorrupt, match="not sorted descending") as info:
            open_store(url).read_shard(record.name)
        assert info.value.shard == record.name
        assert open_store(url).read_shard(record.name, check=False).num_tokens == 9
        assert "not sorted" in verify_store(url)[0][1]

    def test_unknown_shard_name(self) -> None:
        url = self.new_url()
        self.write(url, [make_sequence(np.random.default_rng(13), 3, 1000)])
        with pytest.raises(StoreError, match="no committed shard"):
            open_store(url).read_shard("train-00099")

    def test_record_json_is_canonical(self) -> None:
        url = self.new_url()
        self.write(url, [make_sequence(np.random.default_rng(14), 3, 1000)])
        record = open_store(url).shards[0]
        body = json.loads(StoreFS(url).read(record.record_path))
        assert body["num_tokens"] == 3 and len(body["record_sha256"]) == 64


class TestZarrLocal(StoreTests):
    backend = "zarr"


class TestArrowLocal(StoreTests):
    backend = "arrow"


class TestZarrMemory(StoreTests):
    backend = "zarr"
    memory = True


class TestArrowMemory(StoreTests):
    backend = "arrow"
    memory = True


def test_torch_tensors_are_accepted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(15)
    tokens, ids, logprobs = make_sequence(rng, 6, 1000)
    manifest = make_manifest(
        backend="zarr",
        teacher={},
        tokenizer={},
        vocab_size=1000,
        top_k=K,
        seq_len=8,
        corpus={},
        shard_tokens=100,
        logprob_dtype="bfloat16",
        codec="raw",  # bit-exact bfloat16 back
    )
    writer = create_store(tmp_path / "s", manifest)
    lp_bf16 = torch.tensor(logprobs, dtype=torch.bfloat16)
    with writer.open_shard("train", 0) as shard:
        shard.append(torch.tensor(tokens), torch.tensor(ids), lp_bf16)
    (seq,) = open_store(tmp_path / "s").iter_sequences()
    np.testing.assert_array_equal(seq.topk_logprobs, lp_bf16.float().numpy())


@pytest.mark.parametrize("backend,module", [("zarr", "zarr"), ("arrow", "pyarrow")])
def test_backend_is_imported_when_the_store_is_opened(
    tmp_path: Path, backend: str, module: str
) -> None:
    """Not at the first commit: that runs in cache-teacher's writer thread, beside the forward,
    and a first import (zarr: ~130 modules) would hold the GIL the forward's thread needs."""
    script = f"""
import sys
from kdcache.storage import create_store, make_manifest
manifest = make_manifest(backend={backend!r}, teacher={{}}, tokenizer={{}}, vocab_size=1000,
                         top_k=8, seq_len=8, corpus={{}}, shard_tokens=100)
assert {module!r} not in sys.modules, "imported before the store was opened"
create_store(sys.argv[1], manifest)
assert {module!r} in sys.modules, "not imported by create_store"
"""
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "s")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr


def test_unreachable_locations_are_store_errors() -> None:
    """An unknown URL protocol, or one whose fsspec package is missing, is a StoreError (one
    clean CLI line) for readers and writers alike, and nothing is written anywhere."""
    import fsspec

    fsspec.register_implementation(
        "kdcachemissing",
        "kdcache_no_such_package.FileSystem",
        errtxt="Install it to reach it",
        clobber=True,
    )
    manifest = make_manifest(
        backend="zarr",
        teacher={"name": "t"},
        tokenizer={"name": "t"},
        vocab_size=100,
        top_k=K,
        seq_len=16,
        corpus={"spec": "c"},
        shard_tokens=64,
    )
    for url, message in (
        ("nosuchprotocol://bucket/store", "unknown storage protocol"),
        ("kdcachemissing://bucket/store", "Install it to reach it"),
    ):
        for call in (open_store, verify_store, lambda u: create_store(u, manifest)):
            with pytest.raises(StoreUnavailable, match=message) as raised:
                call(url)
            assert url in str(raised.value) and "\n" not in str(raised.value)


def test_stored_arrays_that_cannot_be_cut_by_sequence_say_why() -> None:
    from types import SimpleNamespace

    from kdcache.storage._select import layout_problem

    record = SimpleNamespace(num_sequences=2, num_tokens=5, num_trained=None)
    ids = np.zeros((5, 2), np.uint16)
    good = {"seq_offsets": np.array([0, 2, 5]), "tokens": np.arange(5), "topk_ids": ids}
    assert layout_problem(good, record) is None
    bad = [
        ({"seq_offsets": np.array([0, 5])}, "record says 2"),
        ({"seq_offsets": np.array([0, 2, 4])}, "do not span"),
        ({"seq_offsets": np.array([0, 0, 5])}, "empty or offsets decrease"),
        ({"topk_ids": ids[:4]}, "4 rows for 5 trained positions"),
        ({"loss_mask": np.array([1, 0, 2, 1, 1], np.uint8)}, "not one 0/1 per token"),
    ]
    for change, message in bad:
        assert message in layout_problem({**good, **change}, record), message
    masked = {**good, "loss_mask": np.array([1, 0, 1, 1, 0], np.uint8), "topk_ids": ids[:3]}
    assert layout_problem(masked, SimpleNamespace(**{**vars(record), "num_trained": 3})) is None
    assert "record says 4" in layout_problem(
        masked, SimpleNamespace(**{**vars(record), "num_trained": 4})
    )
