"""Store codecs (format version 4): the gaps codec's error bound (random and extreme rows, every
float16 and bfloat16 value), round trips of every targets kind on both backends with and without a
loss mask, older stores reading as before, damage caught by verify, ``inspect``, cache-teacher
``--codec``, and the numpy lines a reader without kdcache uses (docs: the README's store section).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
import zarr
from test_store_targets import make_targets, rewrite
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from kdcache.storage import (
    StoreCorrupt,
    StoreIncompatible,
    create_store,
    make_manifest,
    open_store,
    verify_store,
)
from kdcache.storage._arrays import bf16_to_float32, float32_to_bf16
from kdcache.storage._arrow import _column as arrow_column
from kdcache.storage._arrow import _from_planes as from_planes
from kdcache.storage._codec import (
    FLOOR,
    GRID_LEVELS,
    GRID_LOGPROBS,
    NEG_INF_LEVEL,
    SEGMENTS,
    code_problem,
    decode_rows,
    dequantize,
    encode_rows,
    error_bounds,
    level_problem,
    max_abs_error,
    max_prob_error,
    quantize,
    rank_ids,
    unrank_ids,
)
from kdcache.storage._fs import StoreFS
from kdcache.storage.manifest import later_defaults, manifest_differences, validate_manifest

K = 8
VOCAB = 1000
KINDS = ("topk", "sampled", "topk+sampled")


def bound(x: np.ndarray) -> np.ndarray:
    """The gaps codec's largest error at each log-prob of ``x`` (float64, >= FLOOR, finite)."""
    out = np.zeros_like(x)
    upper = 0.0
    for end, half in error_bounds("gaps"):
        out[(x >= end) & (x < upper)] = half
        upper = end
    return out


def manifest(targets: str = "topk+sampled", **overrides: Any) -> dict[str, Any]:
    topk, sampled = "topk" in targets.split("+"), "sampled" in targets.split("+")
    facts: dict[str, Any] = {
        "backend": "zarr",
        "teacher": {"name": "tiny"},
        "tokenizer": {"sha256": "ab" * 32},
        "vocab_size": VOCAB,
        "top_k": K if topk else 0,
        "seq_len": 64,
        "corpus": {"spec": "synthetic"},
        "shard_tokens": 40,
        "targets": targets,
        "samples": 32 if sampled else 0,
        "sample_seed": 0 if sampled else None,
        "codec": "gaps",
    }
    return make_manifest(**{**facts, **overrides})


def as_stored_dtype(values: np.ndarray, dtype: str) -> np.ndarray:
    """Log-probs rounded as a raw store of ``dtype`` keeps them, as float64."""
    if dtype == "bfloat16":
        return bf16_to_float32(float32_to_bf16(values.astype(np.float32))).astype(np.float64)
    return values.astype(dtype).astype(np.float64)


# -- the grid -------------------------------------------------------------------------------


def test_grid_and_its_bounds() -> None:
    assert GRID_LOGPROBS[0] == 0.0 and GRID_LOGPROBS[-1] == FLOOR == -1024.0
    assert all(b > a for a, b in zip(GRID_LEVELS, GRID_LEVELS[1:], strict=False))
    assert all(b < a for a, b in zip(GRID_LOGPROBS, GRID_LOGPROBS[1:], strict=False))
    assert NEG_INF_LEVEL == GRID_LEVELS[-1] + 1 < 2**15
    steps = [step for _, step in SEGMENTS]
    assert steps == sorted(steps) and all(np.log2(s) == int(np.log2(s)) for s in steps)
    assert max_abs_error("gaps") == 1 / 16 and max_abs_error("raw") == 0.0
    assert error_bounds("gaps")[0] == (-0.25, 1 / 2048) and error_bounds("raw") == []
    # where probability is high the error is small: never more than 0.0015 in probability
    assert 0.001 < max_prob_error("gaps") < 0.0015 and max_prob_error("raw") == 0.0
    x = -np.linspace(0, 30, 300_001)
    worst = (np.exp(np.minimum(x + bound(x), 0)) - np.exp(x)).max()  # the error upward at x
    assert 0.99 * max_prob_error("gaps") < worst <= max_prob_error("gaps")


def test_random_log_probs_decode_within_the_bound() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            -np.exp(rng.uniform(np.log(1e-9), np.log(1100.0), 200_000)),  # every scale
            -rng.uniform(0, 12, 200_000),
            np.negative(GRID_LOGPROBS),  # knots
            np.array(GRID_LOGPROBS[:-1]) - np.array([s for _, s in SEGMENTS]) / 2,  # mid-steps
            [0.0, -0.0, -1e-30, -5e-324],
        ]
    )
    x = -np.abs(x)
    got = dequantize(quantize(x), "float32").astype(np.float64)
    inside = x >= FLOOR
    assert (np.abs(got - x)[inside] <= bound(x[inside])).all()
    assert (got[~inside] == FLOOR).all()  # below the floor: stored as the floor (p = 0 anyway)
    assert np.signbit(got).all()  # never positive: log-prob 0 decodes as -0.0
    assert np.abs(got - x)[inside].max() == max_abs_error("gaps")  # the bound is reached


def test_every_float16_and_bfloat16_value() -> None:
    bits = np.arange(0x8000, 0x10000, dtype=np.uint32)  # the sign bit set: every value <= 0
    f16 = bits.astype(np.uint16).view(np.float16)
    f16 = f16[~np.isnan(f16)]
    bf = bf16_to_float32(bits.astype(np.uint16))
    bf = bf[~np.isnan(bf)]
    # float16 quantizes through a table of every value: the same levels as the float64 path
    np.testing.assert_array_equal(quantize(f16), quantize(f16.astype(np.float64)))
    for values, decoded in ((f16, "float16"), (bf, "float32")):
        x = values.astype(np.float64)
        q = quantize(values)
        got = dequantize(q, decoded).astype(np.float64)
        # decoding is exact in the store's dtype: the float16 table agrees with float32's
        np.testing.assert_array_equal(got, dequantize(q, "float32").astype(np.float64))
        inside = np.isfinite(x) & (x >= FLOOR)
        assert (np.abs(got[inside] - x[inside]) <= bound(x[inside])).all()
        assert (np.isneginf(got) == np.isneginf(x)).all()
        assert (got[np.isfinite(x) & (x < FLOOR)] == FLOOR).all()


@pytest.mark.parametrize("k", [1, 2, 8, 64])
def test_extreme_rows(k: int) -> None:
    rng = np.random.default_rng(k)
    rows = [
        np.zeros(k),  # probability 1 (k = 1) or ties at the top
        np.full(k, -3.0),  # ties
        -np.sort(rng.exponential(8, k)),  # sorted descending
        np.concatenate([[-0.01], np.full(k - 1, -np.inf)]),  # k = vocab: masked ids at the end
        np.full(k, -np.inf),
        -np.sort(-np.linspace(-5e4, -1e-4, k)),  # very negative (float16's -65504 lies lower)
        np.concatenate([[-1e-6], -np.sort(-rng.normal(-20, 8, k - 1).clip(max=-1e-3))]),
    ]
    lp = np.stack([r[:k] for r in rows]).astype(np.float32)  # (7, k) sorted descending
    gaps = encode_rows(lp)
    assert gaps.dtype == np.int16 and (gaps >= 0).all() and level_problem(gaps, gaps=True) is None
    for dtype in ("float16", "float32"):
        stored = lp.astype(dtype)
        got = decode_rows(encode_rows(stored), dtype)
        assert got.dtype == dtype and got.flags.c_contiguous
        x, y = stored.astype(np.float64), got.astype(np.float64)
        assert (np.isneginf(x) == np.isneginf(y)).all()
        fin = np.isfinite(x) & (x >= FLOOR)
        assert (np.abs(x[fin] - y[fin]) <= bound(x[fin])).all()
        assert (y[:, 1:] <= y[:, :-1]).all()  # still descending
        # the rank-major path (a (k, T) array's transpose, as Zarr stores it) decodes the same
        rank_major = np.ascontiguousarray(encode_rows(stored).T).T
        np.testing.assert_array_equal(decode_rows(rank_major, dtype), got)


def test_level_and_code_damage_is_named() -> None:
    gaps = encode_rows(np.array([[-0.5, -1.0, -40.0]], np.float32))
    assert level_problem(gaps, gaps=True) is None
    bad = gaps.copy()
    bad[0, 1] = -1
    assert "negative" in str(level_problem(bad, gaps=True))
    bad[0, 1] = 32000  # the row's level sum passes the grid (an int16 wrap would hide it)
    bad[0, 2] = 32000
    assert "exceeds" in str(level_problem(bad, gaps=True))
    assert "exceeds" in str(level_problem(np.array([NEG_INF_LEVEL + 1], np.int16), gaps=False))
    table = np.array([5, 3, 9], np.uint16)
    codes = np.array([[0, 2], [1, 0]], np.uint16)
    assert code_problem(codes, table, 10) is None
    assert "id code is 3" in str(code_problem(codes + 1, table, 10))
    assert "outside" in str(code_problem(codes, table, 9))
    assert "twice" in str(code_problem(codes, np.array([5, 3, 5], np.uint16), 10))
    assert "non-empty" in str(code_problem(codes, table[:0], 10))


def test_ids_by_frequency_round_trip() -> None:
    rng = np.random.default_rng(1)
    ids = (VOCAB * rng.random((500, K)) ** 3).astype(np.uint16)
    codes, table = rank_ids(ids, VOCAB)
    assert codes.dtype == table.dtype == np.uint16 and len(table) == len(np.unique(ids))
    counts = np.bincount(ids.ravel(), minlength=VOCAB)[table]
    assert (np.diff(counts) <= 0).all()  # most frequent first
    ties = np.diff(counts) == 0
    assert (np.diff(table.astype(np.int64))[ties] > 0).all()  # ties: smaller id first
    np.testing.assert_array_equal(unrank_ids(codes, table), ids)
    rank_major = np.ascontiguousarray(codes.T).T
    out = unrank_ids(rank_major, table)
    np.testing.assert_array_equal(out, ids)
    assert out.flags.c_contiguous


# -- stores ---------------------------------------------------------------------------------


def write(url: str, facts: dict[str, Any], seed: int = 0) -> list[dict[str, Any]]:
    """Five sequences of random targets (extreme rows included, a loss mask if the store has
    one) into a new store; returns what was appended."""
    rng = np.random.default_rng(seed)
    targets, masked = facts.get("targets", "topk"), facts.get("loss_mask", False)
    given = []
    with create_store(url, facts) as writer:
        for i, length in enumerate((17, 1, 30, 9, 25)):
            mask = rng.random(length) < 0.6 if masked else None
            if mask is not None:
                mask[rng.integers(length)] = True
            rows = int(mask.sum()) if mask is not None else length
            tokens = rng.integers(0, VOCAB, length)
            _, arrays = make_targets(rng, rows, VOCAB, targets)
            if i == 2 and "topk" in targets:  # k = vocab-like rows: -inf at the end, no tail
                arrays["topk_logprobs"][0, -3:] = -np.inf
                arrays["topk_tail_logprob"][0] = -np.inf
                arrays["topk_logprobs"][1] = [-1e-7] + [-3.0] * (K - 2) + [-9000.0]
            if facts["format_version"] == 1:  # version 1 stored no tail
                del arrays["topk_tail_logprob"]
            writer.append("train", tokens, **arrays, loss_mask=mask)
            given.append({"tokens": tokens, "loss_mask": mask, **arrays})
    return given


@pytest.mark.parametrize("dtype", ["float16", "float32", "bfloat16"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("targets", KINDS)
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_round_trip_within_the_bound(
    tmp_path: Path, backend: str, targets: str, masked: bool, dtype: str
) -> None:
    url = str(tmp_path / "s")
    facts = manifest(targets, backend=backend, loss_mask=masked, logprob_dtype=dtype)
    given = write(url, facts)
    assert verify_store(url) == []
    store = open_store(url)
    m = store.manifest
    assert (m["format_version"], m["codec"], m["codec_max_abs_error"]) == (7, "gaps", 1 / 16)
    sequences = list(store.iter_sequences())
    assert len(sequences) == len(given) and len(store.shards) > 1
    decoded = "float16" if dtype == "float16" else "float32"
    for seq, want in zip(sequences, given, strict=True):
        for name in ("tokens", "topk_ids", "sampled_distinct", "sampled_ids", "sampled_counts"):
            if name in want:
                np.testing.assert_array_equal(getattr(seq, name), want[name])
        if masked:
            np.testing.assert_array_equal(seq.loss_mask, want["loss_mask"])
        for name in ("topk_logprobs", "sampled_logprobs", "topk_tail_logprob"):
            if name not in want:
                assert getattr(seq, name) is None
                continue
            got = getattr(seq, name)
            assert got.dtype == (decoded if name != "topk_tail_logprob" else "float32")
            x = as_stored_dtype(want[name], dtype if name != "topk_tail_logprob" else "float32")
            y = got.astype(np.float64)
            assert (np.isneginf(x) == np.isneginf(y)).all(), name
            fin = np.isfinite(x) & (x >= FLOOR)
            assert (np.abs(x[fin] - y[fin]) <= bound(x[fin])).all(), name
            assert (y[np.isfinite(x) & (x < FLOOR)] == FLOOR).all()


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_raw_codec_stores_what_version_3_stored(tmp_path: Path, backend: str) -> None:
    url = str(tmp_path / "s")
    given = write(url, manifest(backend=backend, codec="raw"))
    store = open_store(url)
    assert (store.manifest["codec"], store.manifest["codec_max_abs_error"]) == ("raw", 0.0)
    for seq, want in zip(store.iter_sequences(), given, strict=True):
        np.testing.assert_array_equal(seq.topk_logprobs, want["topk_logprobs"].astype(np.float16))
        np.testing.assert_array_equal(
            seq.topk_tail_logprob, want["topk_tail_logprob"].astype(np.float32)
        )
    shard = f"{url}/{store.shards[0].path}"
    if backend == "zarr":
        group = zarr.open_group(shard, mode="r")
        assert "topk_id_table" not in group and group["topk_logprobs"].dtype == np.float16
        assert group["topk_ids"].shape == (store.shards[0].num_tokens, K)  # (T, k) as ever
    else:
        table = pa.ipc.open_file(shard).read_all()
        assert set(table.schema.metadata) == {b"kdcache"}
        assert table.schema.field("topk_logprobs").type.value_type.value_type == pa.float16()


@pytest.mark.parametrize("version", [1, 2, 3])
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_older_stores_read_identically_and_resume_only_as_they_are(
    tmp_path: Path, backend: str, version: int
) -> None:
    targets = "topk" if version == 1 else "topk+sampled"
    current = manifest(targets, backend=backend, codec="raw")
    older = {k: v for k, v in current.items() if k not in later_defaults(version)}
    older["format_version"] = version
    url = str(tmp_path / "s")
    given = write(url, older)
    assert "codec" not in json.loads(Path(url, "manifest.json").read_text())
    store = open_store(url)
    assert (store.manifest["codec"], store.manifest["codec_max_abs_error"]) == ("raw", 0.0)
    for seq, want in zip(store.iter_sequences(), given, strict=True):
        np.testing.assert_array_equal(seq.topk_ids, want["topk_ids"])
        np.testing.assert_array_equal(seq.topk_logprobs, want["topk_logprobs"].astype(np.float16))
        if version > 1:
            np.testing.assert_array_equal(
                seq.sampled_logprobs, want["sampled_logprobs"].astype(np.float16)
            )
    assert verify_store(url) == []
    with pytest.raises(StoreIncompatible) as info:  # kdcache writes version 5 only
        create_store(url, current)
    assert info.value.differences == [f"format_version: store has {version}, this run asks 7"]
    with pytest.raises(StoreIncompatible) as info:
        create_store(url, manifest(targets, backend=backend))
    assert [d.split(":")[0] for d in info.value.differences] == [
        "codec", "codec_max_abs_error", "format_version",
    ]  # fmt: skip
    assert create_store(url, older).manifest["format_version"] == version  # its own settings
    with pytest.raises(StoreCorrupt, match=f"format_version {version} but sets codec"):
        validate_manifest({**older, "codec": "gaps"})


def test_the_codec_is_a_compared_fact_and_must_be_known(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    write(url, manifest())
    assert create_store(url, manifest()).manifest["codec"] == "gaps"  # same settings: resumes
    with pytest.raises(StoreIncompatible) as info:
        create_store(url, manifest(codec="raw"))
    assert info.value.differences == [
        "codec: store has 'gaps', this run asks 'raw'",
        "codec_max_abs_error: store has 0.0625, this run asks 0.0",
    ]
    assert manifest_differences(manifest(), manifest()) == []
    with pytest.raises(ValueError, match="codec unknown, 'zip'"):
        manifest(codec="zip")
    with pytest.raises(StoreCorrupt, match="codec_max_abs_error of codec gaps must be 0.0625"):
        validate_manifest({**manifest(), "codec_max_abs_error": 0.01})
    with pytest.raises(StoreCorrupt, match="codec has the wrong type"):
        validate_manifest({**manifest(), "codec": 1})


# -- damage ---------------------------------------------------------------------------------


def damage(url: str, name: str, change: Any, where: str = "array") -> None:
    """Change stored array ``name`` of the first shard in place (``change(values)`` edits the
    numpy array), keeping every checksum valid: only the decode checks can tell."""
    store = open_store(url)
    record = store.shards[0]
    fs = StoreFS(url)
    files = {rel: fs.read(rel) for rel in record.files}
    if record.backend == "zarr":
        make = default_buffer_prototype().buffer.from_bytes
        cut = len(record.path) + 1
        buffers = {rel[cut:]: make(data) for rel, data in files.items()}
        group = zarr.open_group(MemoryStore(buffers), mode="r+", zarr_format=3)
        array = group[name]
        values = np.asarray(array[...])
        change(values)
        array[...] = values
        blobs = {key: buf.to_bytes() for key, buf in buffers.items()}
    else:
        table = pa.ipc.open_file(pa.BufferReader(files[record.path])).read_all()
        meta = dict(table.schema.metadata)
        if where == "metadata":
            value = json.loads(meta[name.encode()])
            values = np.asarray(value["values"])
            change(values)
            meta[name.encode()] = json.dumps({**value, "values": values.tolist()}).encode()
        else:
            i = table.schema.get_field_index(name)
            table = table.set_column(i, table.schema.field(name), damaged(table, name, change))
        table = table.replace_schema_metadata(meta)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema) as out:
            out.write_table(table)
        blobs = {"": sink.getvalue().to_pybytes()}
    rewrite(url, record, blobs)


def damaged(table: pa.Table, name: str, change: Any) -> pa.Array:
    """Arrow column ``name`` of ``table`` after ``change`` edits its values as numpy."""
    column = table[name].combine_chunks()
    inner = column.flatten()
    if pa.types.is_struct(inner.type):  # format 5: byte planes of a (k, T) array
        dtype = np.dtype(table.schema.field(name).metadata[b"planes_of"].decode())
        values = from_planes([inner], dtype)  # (k, T), the Zarr backend's memory order
        change(values)
        return arrow_column(np.ascontiguousarray(values.T), column.offsets.to_numpy(), planes=True)
    flat = inner.flatten() if isinstance(inner, pa.FixedSizeListArray) else inner
    values = flat.to_numpy().copy()
    change(values)
    rebuilt = pa.array(values, flat.type)
    if isinstance(inner, pa.FixedSizeListArray):
        rebuilt = pa.FixedSizeListArray.from_arrays(rebuilt, inner.type.list_size)
    return pa.ListArray.from_arrays(column.offsets, rebuilt)


def set_at(index: int, value: int) -> Any:
    """Set the ``index``-th stored value (in the array's memory order) to ``value``."""

    def change(values: np.ndarray) -> None:
        values.reshape(-1)[index] = value

    return change


def repeat_first(values: np.ndarray) -> None:
    values[1] = values[0]


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize(
    ("name", "change", "where", "problem"),
    [
        ("topk_logprobs", set_at(1, -1), "array", "a log-prob level gap is negative"),
        ("topk_logprobs", set_at(2, 20000), "array", "exceeds the grid's 8905"),
        ("topk_tail_logprob", set_at(0, NEG_INF_LEVEL + 1), "array", "level exceeds"),
        ("sampled_logprobs", set_at(0, -5), "array", "a log-prob level is negative"),
        ("topk_ids", set_at(0, 9999), "array", "a top-k id code is 9999"),
        ("topk_id_table", set_at(0, VOCAB), "metadata", "outside [0, 1000)"),
        ("topk_id_table", repeat_first, "metadata", "lists an id twice"),
    ],
)
def test_verify_and_read_catch_damaged_codes(
    tmp_path: Path, backend: str, name: str, change: Any, where: str, problem: str
) -> None:
    url = str(tmp_path / "s")
    write(url, manifest(backend=backend))
    damage(url, name, change, where)
    problems = verify_store(url)
    assert len(problems) == 1 and problem in problems[0][1], problems
    store = open_store(url)
    with pytest.raises(StoreCorrupt, match="is corrupt"):
        store.read_shard(store.shards[0])
    store.read_shard(store.shards[0], check=False)  # unchecked: clipped, no crash


# -- inspect, cache-teacher, plain readers --------------------------------------------------


def test_inspect_states_the_codec_and_its_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_store_cli import run

    url = str(tmp_path / "s")
    write(url, manifest(loss_mask=True))
    code, out, _ = run(["inspect", url, "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["codec"] == "gaps" and facts["codec_max_abs_error"] == 1 / 16
    assert facts["codec_max_prob_error"] == pytest.approx(max_prob_error("gaps"))
    code, out, _ = run(["inspect", url], capsys)
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()}
    assert lines["codec"] == "gaps" and lines["codec_max_abs_error"] == "0.0625"
    assert lines["codec_max_prob_error"] == f"{max_prob_error('gaps'):.4g}"
    raw = str(tmp_path / "raw")
    write(raw, manifest(codec="raw"))
    code, out, _ = run(["inspect", raw, "--json"], capsys)
    assert json.loads(out)["codec"] == "raw" and json.loads(out)["codec_max_abs_error"] == 0


def test_cache_teacher_codec_option(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from kdcache.pipeline.cli import main

    def run(*args: str) -> int:
        try:
            main(list(args))
        except SystemExit as e:
            return int(e.code or 0)
        return 0

    out = tmp_path / "store"
    common = ["cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus",
              str(small_corpus_dir), "--top-k", "8", "--seq-len", "32", "--batch-size", "3",
              "--shard-tokens", "256", "--max-tokens", "800", "--targets", "topk+sampled"]  # fmt: skip
    assert run(*common, "--out", str(tmp_path / "bad"), "--codec", "zip") == 2
    assert run(*common, "--out", str(out), "--codec", "gaps") == 0
    store = open_store(str(out))
    assert store.manifest["codec"] == "gaps" and verify_store(str(out)) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for i, seq in enumerate(store.iter_sequences()):
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(seq.tokens.astype(np.int64))[None]).logits
        full = torch.log_softmax(logits[0].float(), dim=-1).numpy().astype(np.float64)
        at_ids = np.take_along_axis(full, seq.topk_ids.astype(np.int64), axis=-1)
        # the codec's bound, plus float16 rounding and the teacher's run-to-run noise
        assert np.abs(seq.topk_logprobs.astype(np.float64) - at_ids).max() <= 1 / 16 + 0.01
        if i == 3:
            break
    assert run(*common, "--out", str(out)) == 0  # resumes: gaps is the default
    assert run(*common, "--out", str(out), "--codec", "raw") == 2  # raw asked of a gaps store


# What the README's store section shows (the lines below are run as written).
README_ZARR = """
# a gaps store (manifest "codec": "gaps"): int16 levels, top-k ids as ranks in the shard's table
m = json.load(open(f"{store}/manifest.json"))  # m["codec"]: "raw" or "gaps"
shard = json.load(open(f"{store}/shards/train-00000.json"))["path"]
g = zarr.open_group(f"{store}/{shard}", mode="r")
a = g["topk_logprobs"]  # codec gaps: int16 (k, T), each row's first level, then the gaps
levels, grid = a.attrs["levels"], a.attrs["logprobs"]  # the grid's knots
logprobs = np.interp(np.cumsum(a[:], axis=0), levels, grid, right=-np.inf).T  # (T, k)
ids = g["topk_id_table"][:][g["topk_ids"][:]].T  # (T, k): codes are ranks in the id table
tail = np.interp(g["topk_tail_logprob"][:], levels, grid, right=-np.inf)  # (T,), no cumsum
"""
README_ARROW = """
m = json.load(open(f"{store}/manifest.json"))  # m["codec"]: "raw" or "gaps"
k = m["top_k"]
shard = json.load(open(f"{store}/shards/train-00000.json"))["path"]
table = pyarrow.ipc.open_file(f"{store}/{shard}").read_all()  # shard: the record's .arrow
meta = table.schema.field("topk_logprobs").metadata  # codec gaps: levels, logprobs (JSON)
levels, grid = json.loads(meta[b"levels"]), json.loads(meta[b"logprobs"])
def planes(column):  # (2k, T) uint8: the low bytes of ranks 0..k-1, then their high bytes
    return np.stack([x.to_numpy() for x in table[column].combine_chunks().flatten().flatten()])
b, c = planes("topk_logprobs"), planes("topk_ids")
q = (b[k:].astype(np.uint16) << 8 | b[:k]).view(np.int16)  # (k, T) levels: first level, gaps
logprobs = np.interp(np.cumsum(q, axis=0), levels, grid, right=-np.inf).T  # (T, k)
id_table = np.array(json.loads(table.schema.metadata[b"topk_id_table"])["values"])
ids = id_table[c[k:].astype(np.uint16) << 8 | c[:k]].T  # (T, k)
"""


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_the_readme_numpy_lines_decode_a_gaps_store(tmp_path: Path, backend: str) -> None:
    import pyarrow.ipc

    url = str(tmp_path / f"s-{uuid.uuid4().hex[:6]}")
    write(url, manifest("topk", backend=backend, shard_tokens=1000, loss_mask=True))  # 1 shard
    arrays = open_store(url).read_shard("train-00000")
    scope: dict[str, Any] = {"np": np, "json": json, "zarr": zarr, "pyarrow": pyarrow, "store": url}
    lines = (README_ZARR if backend == "zarr" else README_ARROW).strip().splitlines()
    readme = (
        (Path(__file__).resolve().parents[2] / "docs" / "reference" / "store-format.md")
        .read_text()
        .splitlines()
    )
    assert [line for line in lines if line not in readme] == []  # the README shows them
    exec(README_ZARR if backend == "zarr" else README_ARROW, scope)
    np.testing.assert_array_equal(scope["ids"], arrays.topk_ids)
    np.testing.assert_array_equal(scope["logprobs"], arrays.topk_logprobs.astype(np.float64))
    if backend == "zarr":
        np.testing.assert_array_equal(scope["tail"], arrays.topk_tail_logprob.astype(np.float64))
