"""Format version 3: a per-position loss mask, and targets only at the positions a student trains
on — every targets kind on Zarr and Arrow, the byte saving, append errors, damage caught by
verify, plain zarr/pyarrow reads."""

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
from test_store_targets import KINDS, make_targets, rewrite

from kdcache.storage import (
    ShardArrays,
    StoreCorrupt,
    create_store,
    make_manifest,
    open_store,
    verify_store,
)
from kdcache.storage._arrays import offsets_of
from kdcache.storage._base import ShardRecord, get_codec
from kdcache.storage._fs import StoreFS

K = 8
TARGET_NAMES = ("topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct")
ENTRY_NAMES = ("sampled_ids", "sampled_counts", "sampled_logprobs")


def trained_rows(full: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """``append``'s target keywords of every position (L rows) cut to the trained positions."""
    mask = np.asarray(mask, bool)
    out = {name: full[name][mask] for name in TARGET_NAMES if name in full}
    if "sampled_distinct" in full:
        entries = np.repeat(mask, full["sampled_distinct"])  # (M,) which entries stay
        out.update({name: full[name][entries] for name in ENTRY_NAMES})
    return out


def masked_sequence(
    rng: np.random.Generator, length: int, targets: str, fraction: float = 0.3, **kw: Any
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """tokens (L,), a 0/1 mask (L,) with about ``fraction`` ones (at least one), the targets
    of all L positions and those of the trained positions."""
    tokens, full = make_targets(rng, length, 1000, targets, **kw)
    mask = rng.random(length) < fraction
    mask[rng.integers(length)] = True
    return tokens, mask, full, trained_rows(full, mask)


class MaskTests(StoreSuite):
    """Every backend subclass runs all of these."""

    facts = {"corpus": {"spec": "chat"}, "loss_mask": True}

    def manifest(self, targets: str = "topk+sampled", **overrides: Any) -> dict[str, Any]:
        return self.targets_manifest(targets, **overrides)

    def write(
        self, targets: str, lengths: list[int], fraction: float = 0.3, **overrides: Any
    ) -> tuple[str, list[Any]]:
        """A masked store of one sequence per length: (url, [(tokens, mask, full, rows)])."""
        rng = np.random.default_rng(len(lengths))
        seqs = [masked_sequence(rng, n, targets, fraction) for n in lengths]
        url = self.new_url()
        with create_store(url, self.manifest(targets, **overrides)) as writer:
            for tokens, mask, _, rows in seqs:
                writer.append("train", tokens, loss_mask=mask, **rows)
        return url, seqs

    # -- round trip -----------------------------------------------------------------------

    @pytest.mark.parametrize("codec", ["raw", "gaps"])
    @pytest.mark.parametrize("targets", KINDS)
    def test_some_sequences_decode_as_in_the_whole_shard(self, targets: str, codec: str) -> None:
        url, _ = self.write(targets, [20, 1, 32, 9, 14, 3, 25, 7], codec=codec)
        assert len(open_store(url).shards) > 1
        assert_sequences_pick(open_store(url))

    @pytest.mark.parametrize("targets", KINDS)
    def test_round_trip(self, targets: str) -> None:
        lengths = [1, 7, 32, 5, 3, 32, 20, 1, 12]
        url, seqs = self.write(targets, lengths)
        store = open_store(url)
        assert store.has_loss_mask and store.manifest["loss_mask"] is True
        assert len(store.shards) > 1 and store.num_tokens == sum(lengths)
        trained = sum(int(mask.sum()) for _, mask, _, _ in seqs)
        assert store.num_trained == trained == sum(r.num_trained for r in store.shards)
        got = list(store.iter_sequences("train"))
        assert [len(s.tokens) for s in got] == lengths
        for seq, (tokens, mask, full, rows) in zip(got, seqs, strict=True):
            np.testing.assert_array_equal(seq.tokens, tokens)
            assert seq.loss_mask.dtype == np.uint8 and seq.loss_mask.tolist() == mask.tolist()
            positions = seq.trained_positions
            assert (
                positions.dtype == np.int64 and positions.tolist() == np.flatnonzero(mask).tolist()
            )
            if store.has_topk:
                # row r is position positions[r]'s: the teacher's row after tokens[positions[r]]
                np.testing.assert_array_equal(seq.topk_ids, full["topk_ids"][positions])
                np.testing.assert_allclose(
                    seq.topk_logprobs, full["topk_logprobs"][positions], rtol=1e-3, atol=1e-3
                )
                np.testing.assert_array_equal(
                    seq.topk_tail_logprob, full["topk_tail_logprob"][positions].astype(np.float32)
                )
            else:
                assert seq.topk_ids is None and seq.topk_tail_logprob is None
            if store.has_samples:
                for name in ("sampled_distinct", "sampled_ids", "sampled_counts"):
                    np.testing.assert_array_equal(getattr(seq, name), rows[name])
                off = seq.sampled_offsets  # (T_s+1,)
                assert off.shape == (len(positions) + 1,) and off[-1] == len(seq.sampled_ids)
                assert (np.add.reduceat(seq.sampled_counts, off[:-1]) == 32).all()
                for r, t in enumerate(positions):  # entries of row r = those of position t
                    full_off = offsets_of(full["sampled_distinct"])
                    np.testing.assert_array_equal(
                        seq.sampled_ids[off[r] : off[r + 1]],
                        full["sampled_ids"][full_off[t] : full_off[t + 1]],
                    )
            else:
                assert seq.sampled_distinct is None and seq.sampled_offsets is None
        assert verify_store(url) == []

    def test_shard_arrays_cut_targets_by_trained_rows(self) -> None:
        url, seqs = self.write("topk+sampled", [5, 1, 9, 4], shard_tokens=1000)
        store = open_store(url)
        (record,) = store.shards
        arrays = store.read_shard(record)
        masks = [mask for _, mask, _, _ in seqs]
        t = sum(int(m.sum()) for m in masks)
        assert record.num_trained == arrays.num_targets == t
        assert arrays.loss_mask.shape == (19,) and arrays.loss_mask.dtype == np.uint8
        assert arrays.topk_ids.shape == (t, K) and arrays.sampled_distinct.shape == (t,)
        assert arrays.sampled_offsets.shape == (t + 1,)
        assert list(arrays.fields())[:3] == ["tokens", "loss_mask", "topk_ids"]
        positions = arrays.trained_positions
        assert positions.tolist() == np.flatnonzero(np.concatenate(masks)).tolist()
        assert arrays.trained_positions is positions  # cached while loss_mask stays the same
        rows = arrays.target_offsets
        assert rows.tolist() == np.concatenate([[0], np.cumsum([m.sum() for m in masks])]).tolist()
        for i, seq in enumerate(arrays):
            a, b = int(rows[i]), int(rows[i + 1])
            np.testing.assert_array_equal(seq.topk_ids, arrays.topk_ids[a:b])
            off = arrays.sampled_offsets
            np.testing.assert_array_equal(seq.sampled_ids, arrays.sampled_ids[off[a] : off[b]])
            np.testing.assert_array_equal(seq.loss_mask, masks[i])
        last = arrays.sequence(-1)
        assert last.index == 3 and last.topk_ids.shape == (int(masks[3].sum()), K)
        # a replaced mask is seen (the caches are keyed by the arrays they came from)
        arrays.loss_mask = np.ones(19, np.uint8)
        assert arrays.trained_positions.tolist() == list(range(19)) and arrays.num_targets == 19

    def test_many_chunks_and_record_batches(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from kdcache.storage import _arrow, _zarr

        monkeypatch.setattr(_zarr, "CHUNK_BYTES", 64)
        monkeypatch.setattr(_arrow, "BATCH_TOKENS", 8)
        monkeypatch.setattr(_arrow, "BATCH_ENTRIES", 50)
        url, seqs = self.write("topk+sampled", [3, 9, 1, 4, 12, 2, 30, 40], shard_tokens=1000)
        store = open_store(url)
        record = store.shards[0]
        if self.backend == "arrow":
            data = StoreFS(url).read(record.path)
            assert pa.ipc.open_file(pa.BufferReader(data)).num_record_batches > 3
        else:
            assert len([f for f in record.files if "/loss_mask/c/" in f]) > 1
        for seq, (tokens, mask, _, rows) in zip(store.iter_sequences(), seqs, strict=True):
            np.testing.assert_array_equal(seq.tokens, tokens)
            np.testing.assert_array_equal(seq.loss_mask, mask)
            for name, values in rows.items():
                if name.endswith("logprobs") or name.endswith("logprob"):
                    np.testing.assert_allclose(getattr(seq, name), values, rtol=1e-3, atol=1e-3)
                else:
                    np.testing.assert_array_equal(getattr(seq, name), values)
        assert verify_store(url) == []

    def test_a_store_without_a_mask_trains_every_position(self) -> None:
        rng = np.random.default_rng(3)
        tokens, full = make_targets(rng, 6, 1000, "topk")
        url = self.new_url()
        with create_store(url, self.manifest("topk", loss_mask=False)) as writer:
            writer.append("train", tokens, **full)
        store = open_store(url)
        assert not store.has_loss_mask and store.num_trained == 6
        assert "num_trained" not in json.loads(StoreFS(url).read(store.shards[0].record_path))
        arrays = store.read_shard(store.shards[0])
        assert arrays.loss_mask is None and "loss_mask" not in arrays.fields()
        assert arrays.trained_positions.tolist() == list(range(6)) and arrays.num_targets == 6
        assert arrays.target_offsets is arrays.seq_offsets
        (seq,) = arrays
        assert seq.loss_mask is None and seq.trained_positions.tolist() == list(range(6))

    def test_plain_zarr_and_arrow_readers_find_the_mask_and_rows(self) -> None:
        url, seqs = self.write("topk+sampled", [6, 9], shard_tokens=1000)
        store = open_store(url)
        shard_url = f"{url}/{store.shards[0].path}"
        full_ids = np.concatenate([full["topk_ids"] for _, _, full, _ in seqs])  # (N, k)
        if self.backend == "zarr":
            g = zarr.open_group(shard_url, mode="r")
            assert g.attrs["kdcache"]["format_version"] == 7
            m = g["loss_mask"][:].astype(bool)  # the README's lines
            assert g["loss_mask"].dtype == np.uint8 and m.shape == (15,)
            assert g["topk_ids"].shape == (m.sum(), K)
            np.testing.assert_array_equal(g["topk_ids"][:], full_ids[np.flatnonzero(m)])
            starts = g["seq_offsets"][:]
            rows = np.concatenate([[0], np.cumsum(m, dtype=np.int64)])[starts]  # per sequence
            assert rows.tolist() == [0, seqs[0][1].sum(), m.sum()]
            assert g["sampled_distinct"].shape == (m.sum(),)
        else:
            table = pa.ipc.open_file(pa.BufferReader(StoreFS(shard_url).read(""))).read_all()
            assert table.column_names[:3] == ["tokens", "loss_mask", "topk_ids"]
            assert table.schema.field("loss_mask").type == pa.list_(pa.uint8())
            for row, (_, mask, full, _) in enumerate(seqs):
                m = table["loss_mask"][row].values.to_numpy().astype(bool)
                assert m.tolist() == mask.tolist()
                ids = np.stack(table["topk_ids"][row].as_py())  # (T_s, k)
                np.testing.assert_array_equal(ids, full["topk_ids"][np.flatnonzero(m)])
                assert len(table["sampled_distinct"][row]) == m.sum()
                distinct = table["sampled_distinct"][row].values.to_numpy()
                assert len(table["sampled_ids"][row]) == distinct.sum()

    def test_targets_cost_bytes_only_where_a_student_trains(self) -> None:
        rng = np.random.default_rng(4)
        seqs = [masked_sequence(rng, 256, "topk", fraction=0.3) for _ in range(24)]
        urls = {}
        for masked in (False, True):
            urls[masked] = url = self.new_url()
            manifest = self.manifest("topk", loss_mask=masked, shard_tokens=4096)
            with create_store(url, manifest) as writer:
                for tokens, mask, full, rows in seqs:
                    if masked:
                        writer.append("train", tokens, loss_mask=mask, **rows)
                    else:
                        writer.append("train", tokens, **full)

        def target_bytes(url: str) -> int:
            """Bytes of the target fields (Zarr: their directories; Arrow: the whole file)."""
            total = 0
            for record in open_store(url).shards:
                for rel, info in record.files.items():
                    field = rel[len(record.path) + 1 :].split("/")[0]
                    if self.backend == "arrow" or field.startswith("topk"):
                        total += info["size"]
            return total

        fraction = sum(int(m.sum()) for _, m, _, _ in seqs) / (24 * 256)
        assert 0.25 < fraction < 0.35
        saved = target_bytes(urls[True]) / target_bytes(urls[False])
        assert saved < 0.45, saved
        if self.backend == "zarr":  # the mask itself is cheap: well under a byte per token
            store = open_store(urls[True])
            mask_bytes = sum(
                info["size"]
                for record in store.shards
                for rel, info in record.files.items()
                if "/loss_mask/" in rel
            )
            assert mask_bytes / store.num_tokens < 0.5

    # -- writing --------------------------------------------------------------------------

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"loss_mask": None}, "store with a loss mask needs loss_mask"),
            ({"loss_mask": [1, 0, 1]}, r"loss_mask shape must be \(4,\)"),
            ({"loss_mask": [1, 0, 2, 0]}, "loss_mask values must be 0 or 1, found 0..2"),
            ({"loss_mask": [1, 0, -1, 0]}, "loss_mask values must be 0 or 1"),
            ({"loss_mask": [1.0, 0.0, 1.0, 0.0]}, "loss_mask must be bools or 0/1 integers"),
            ({"loss_mask": [0, 0, 0, 0]}, "no trained position stores nothing a student can use"),
            ({"loss_mask": [1, 1, 1, 0]}, r"topk_ids \(T, 8\).* with T = loss_mask.sum\(\) = 3"),
            ({"loss_mask": [1, 0, 0, 0]}, r"topk_ids \(T, 8\)"),
            ({"topk_tail_logprob": [-1.0, -2.0, -3.0]}, r"topk_tail_logprob shape must be \(2,\)"),
            ({"sampled_distinct": [1, 1, 1]}, r"sampled_distinct shape must be \(2,\)"),
        ],
    )
    def test_append_errors_are_clean_and_commit_nothing(
        self, change: dict[str, Any], message: str
    ) -> None:
        rng = np.random.default_rng(5)
        tokens, full = make_targets(rng, 4, 1000, "topk+sampled")
        mask = np.array([1, 0, 1, 0], bool)
        good = {"loss_mask": mask, **trained_rows(full, mask)}
        bad = {k: v for k, v in {**good, **change}.items() if v is not None}
        bad = {k: np.asarray(v) for k, v in bad.items()}
        url = self.new_url()
        with pytest.raises(ValueError, match=message), create_store(url, self.manifest()) as w:
            w.append("train", tokens, **bad)
        assert open_store(url).shards == []
        # a bad sequence between good ones leaves the good ones only
        shard = create_store(url, self.manifest()).open_shard("train", 0)
        shard.append(tokens, **good)
        with pytest.raises(ValueError, match=message):
            shard.append(tokens, **bad)
        shard.append(tokens, **good)
        record = shard.commit()
        assert (record.num_sequences, record.num_tokens, record.num_trained) == (2, 8, 4)
        assert verify_store(url) == []

    def test_a_refused_sequence_leaves_no_empty_rollover_shard(self) -> None:
        rng = np.random.default_rng(9)
        tokens, full = make_targets(rng, 4, 1000, "topk")
        url = self.new_url()
        writer = create_store(url, self.manifest("topk"))
        with pytest.raises(ValueError, match="no trained position"):
            writer.append(
                "train", tokens, loss_mask=np.zeros(4, bool), **trained_rows(full, [0] * 4)
            )
        assert writer.flush() == [] and open_store(url).shards == []
        mask = np.array([0, 1, 1, 0], bool)
        writer.append("train", tokens, loss_mask=mask, **trained_rows(full, mask))
        (record,) = writer.flush()
        assert record.name == "train-00000" and record.num_trained == 2

    def test_a_mask_is_refused_by_a_store_without_one(self) -> None:
        rng = np.random.default_rng(6)
        tokens, full = make_targets(rng, 4, 1000, "topk")
        url = self.new_url()
        writer = create_store(url, self.manifest("topk", loss_mask=False))
        for mask in ([1, 0, 1, 0], [1, 1, 1, 1]):  # all ones too: one clear rule
            with pytest.raises(ValueError, match="loss_mask given, but this store"):
                writer.append("train", tokens, loss_mask=np.array(mask), **full)
        writer.append("train", tokens, **full)
        writer.flush()
        assert open_store(url).num_sequences == 1

    def test_bool_and_integer_masks_are_stored_as_uint8(self) -> None:
        rng = np.random.default_rng(7)
        tokens, full = make_targets(rng, 5, 1000, "sampled")
        url = self.new_url()
        masks = [
            np.array([True, False, True, True, False]),
            np.array([0, 1, 0, 0, 1], np.int64),
            [1, 1, 0, 0, 0],
        ]
        with create_store(url, self.manifest("sampled")) as writer:
            for mask in masks:
                writer.append("train", tokens, loss_mask=mask, **trained_rows(full, mask))
        got = [seq.loss_mask for seq in open_store(url).iter_sequences()]
        assert [m.dtype for m in got] == [np.uint8] * 3
        assert [m.tolist() for m in got] == [np.asarray(m, np.uint8).tolist() for m in masks]

    # -- integrity ------------------------------------------------------------------------

    def damage_zarr(self, url: str, record: ShardRecord, how: str) -> None:
        """Re-encode the shard with a damaged mask (Zarr stores each field on its own)."""
        arrays: ShardArrays = open_store(url).read_shard(record)
        mask = arrays.loss_mask.copy()
        changes: dict[str, Any] = {}
        if how == "value":
            mask[int(np.flatnonzero(mask)[0])] = 2
        elif how == "length":
            mask = mask[:-1]
        elif how == "rows":  # one trained position fewer than target rows; the record agrees
            per_sequence = np.add.reduceat(mask, arrays.seq_offsets[:-1])
            a = int(arrays.seq_offsets[int(np.flatnonzero(per_sequence >= 2)[0])])
            mask[a + int(np.flatnonzero(mask[a:])[0])] = 0  # every sequence stays trained
            changes["num_trained"] = record.num_trained - 1
        elif how == "empty":  # sequence 0 trains nothing; its rows dropped, so rows agree
            b = int(arrays.target_offsets[1])
            mask[: int(arrays.seq_offsets[1])] = 0
            for name in TARGET_NAMES:
                setattr(arrays, name, getattr(arrays, name)[b:])
            m = int(arrays.sampled_offsets[b])
            for name in ENTRY_NAMES:
                setattr(arrays, name, getattr(arrays, name)[m:])
            changes["num_trained"] = int(mask.sum())
        arrays.loss_mask = mask
        rewrite(url, record, get_codec("zarr").encode(arrays, "float16", "raw"), **changes)

    def damage_arrow(self, url: str, record: ShardRecord, how: str) -> None:
        """Rewrite the Arrow file with row 0 changed: its mask (then the row's units disagree),
        or its mask and targets emptied (then they agree, but the row trains nothing)."""
        fs = StoreFS(url)
        table = pa.ipc.open_file(pa.BufferReader(fs.read(record.path))).read_all()
        columns = {name: table[name].to_pylist() for name in table.column_names}
        first = columns["loss_mask"][0].index(1)
        changes: dict[str, Any] = {}
        if how == "length":
            columns["loss_mask"][0].pop()
        elif how == "empty":
            columns["loss_mask"][0] = [0] * len(columns["loss_mask"][0])
            for name in (*TARGET_NAMES, *ENTRY_NAMES):
                columns[name][0] = []
            changes["num_trained"] = sum(map(sum, columns["loss_mask"]))
        else:
            columns["loss_mask"][0][first] = 2 if how == "value" else 0
        damaged = pa.table(
            {
                name: pa.array(rows, type=table.schema.field(name).type)
                for name, rows in columns.items()
            },
            schema=table.schema,
        )
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, damaged.schema) as writer:
            writer.write_table(damaged)
        rewrite(url, record, {"": sink.getvalue().to_pybytes()}, **changes)

    @pytest.mark.parametrize(
        ("how", "message"),
        [
            ("value", "loss_mask values must be 0 or 1"),
            ("length", r"loss_mask shape must be \(\d+,\) like tokens"),
            ("rows", r"(top-k shapes must be|sampled_distinct shape must be) \(\d+"),
            ("record", r"\d+ trained positions, record says \d+"),
            ("empty", "a sequence with no trained position"),
        ],
    )
    def test_verify_catches_a_damaged_mask(self, how: str, message: str) -> None:
        url, _ = self.write("topk+sampled", [6, 9, 5], fraction=0.5, shard_tokens=1000)
        record = open_store(url).shards[0]
        if how == "record":  # the data are sound, the record counts one trained position less
            wrong = ShardRecord(**{**record.__dict__, "num_trained": record.num_trained - 1})
            StoreFS(url).write_atomic(record.record_path, wrong.to_bytes())
        elif self.backend == "zarr":
            self.damage_zarr(url, record, how)
        else:
            self.damage_arrow(url, record, how)
            if how == "length":  # a row's mask and tokens are lists of one length
                message = "loss_mask has other row lengths than its sibling columns"
            elif how != "empty":  # Arrow keeps a row's mask and targets together: they disagree
                message = "a row's target rows disagree with the sum of its loss_mask"
        problems = verify_store(url)
        assert [s for s, _ in problems] == [record.name]
        assert re.search(message, problems[0][1]), problems
        with pytest.raises(StoreCorrupt, match=message) as info:
            open_store(url).read_shard(record.name)
        assert info.value.shard == record.name

    def test_a_record_cannot_count_more_trained_positions_than_tokens(self) -> None:
        url, _ = self.write("topk", [4, 4], shard_tokens=1000)
        record = open_store(url).shards[0]
        bad = ShardRecord(**{**record.__dict__, "num_trained": 9})
        StoreFS(url).write_atomic(record.record_path, bad.to_bytes())
        ((name, problem),) = verify_store(url)
        assert name == record.name and "num_trained is 9 for 8 tokens" in problem

    def test_a_flipped_byte_of_the_mask_is_caught(self) -> None:
        url, _ = self.write("sampled", [9, 9], shard_tokens=1000)
        fs = StoreFS(url)
        record = open_store(url).shards[0]
        rel = next(r for r in sorted(record.files) if self.backend == "arrow" or "/loss_mask/" in r)
        data = bytearray(fs.read(rel))
        data[len(data) // 2] ^= 0x10
        fs.write_atomic(rel, bytes(data))
        assert [s for s, _ in verify_store(url)] == [record.name]


class TestZarrLocal(MaskTests):
    backend = "zarr"


class TestArrowLocal(MaskTests):
    backend = "arrow"


class TestZarrMemory(MaskTests):
    backend = "zarr"
    memory = True


class TestArrowMemory(MaskTests):
    backend = "arrow"
    memory = True


def test_torch_masks_and_targets_are_accepted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    tokens, mask, _, rows = masked_sequence(rng, 7, "topk+sampled", fraction=0.5)
    manifest = make_manifest(
        backend="arrow",
        teacher={},
        tokenizer={},
        vocab_size=1000,
        top_k=K,
        seq_len=8,
        corpus={},
        shard_tokens=100,
        targets="topk+sampled",
        samples=32,
        sample_seed=0,
        loss_mask=True,
    )
    tensors = {name: torch.tensor(values) for name, values in rows.items()}
    with create_store(tmp_path / "s", manifest).open_shard("train", 0) as shard:
        shard.append(torch.tensor(tokens), loss_mask=torch.tensor(mask), **tensors)
    (seq,) = open_store(tmp_path / "s").iter_sequences()
    assert seq.loss_mask.tolist() == mask.astype(np.uint8).tolist()
    np.testing.assert_array_equal(seq.topk_ids, rows["topk_ids"])
