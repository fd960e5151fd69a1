"""Format version 3's manifest: the ``loss_mask`` fact (v1/v2 read as False), the tokenizer's
size, version-2 stores written by this kdcache, and `kdcache inspect`/`verify` on masked stores."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from test_store_cli import run
from test_store_loss_mask import masked_sequence
from test_store_targets import make_targets

from kdcache.storage import (
    StoreCorrupt,
    StoreIncompatible,
    create_store,
    make_manifest,
    open_store,
    tokenizer_size,
    verify_store,
)
from kdcache.storage._fs import StoreFS
from kdcache.storage.manifest import (
    FORMAT_VERSION,
    READABLE_VERSIONS,
    V2_DEFAULTS,
    V3_DEFAULTS,
    V4_DEFAULTS,
    later_defaults,
    validate_manifest,
)

BACKENDS = ("zarr", "arrow")


def manifest(backend: str = "zarr", targets: str = "topk", **overrides: Any) -> dict[str, Any]:
    sampled = "sampled" in targets
    facts: dict[str, Any] = {
        "backend": backend,
        "teacher": {"name": "tiny"},
        "tokenizer": {"sha256": "ab" * 32},
        "vocab_size": 1000,
        "top_k": 8 if "topk" in targets else 0,
        "seq_len": 32,
        "corpus": {"spec": "chat"},
        "shard_tokens": 64,
        "targets": targets,
        "samples": 24 if sampled else 0,
        "sample_seed": 3 if sampled else None,
        "codec": "raw",  # the raw layout (its float invariants); gaps: test_store_codec.py
    }
    facts.update(overrides)
    return make_manifest(**facts)


def older(facts: dict[str, Any], version: int) -> dict[str, Any]:
    """``facts`` as a manifest of ``version`` was written: without the later versions' keys."""
    return {
        **{k: v for k, v in facts.items() if k not in later_defaults(version)},
        "format_version": version,
    }


# -- the loss_mask fact --------------------------------------------------------------------


def test_versions_and_defaults() -> None:
    assert (FORMAT_VERSION, READABLE_VERSIONS) == (7, (1, 2, 3, 4, 5, 6, 7))
    v6 = {"next_token_logprob": False, "text": False}
    assert later_defaults(1) == {**V2_DEFAULTS, **V3_DEFAULTS, **V4_DEFAULTS, **v6}
    assert later_defaults(2) == {**V3_DEFAULTS, **V4_DEFAULTS, **v6}
    assert V3_DEFAULTS == {"loss_mask": False}
    assert V4_DEFAULTS == {"codec": "raw", "codec_max_abs_error": 0.0}
    assert later_defaults(3) == {**V4_DEFAULTS, **v6}
    assert later_defaults(4) == later_defaults(5) == v6 and later_defaults(6) == {}
    assert manifest()["loss_mask"] is False and manifest(loss_mask=True)["loss_mask"] is True
    for wrong in ("yes", 1, None):
        with pytest.raises(ValueError, match="loss_mask has the wrong type"):
            manifest(loss_mask=wrong)


@pytest.mark.parametrize("version", [1, 2])
def test_older_manifests_read_without_a_mask(version: int) -> None:
    facts = older(manifest(), version)
    assert "loss_mask" not in facts
    checked = validate_manifest(facts)
    assert checked["loss_mask"] is False and checked["format_version"] == version
    assert validate_manifest({**facts, "loss_mask": False})["loss_mask"] is False
    for claim in (True, 0):  # a version that knew no mask cannot claim one (0 is not false)
        with pytest.raises(StoreCorrupt, match=f"format_version {version} but sets loss_mask"):
            validate_manifest({**facts, "loss_mask": claim})
    with pytest.raises(StoreCorrupt, match="lacks '(targets|loss_mask)'"):  # v3 has no defaults
        validate_manifest({**facts, "format_version": 3})


def test_resume_compares_the_loss_mask() -> None:
    for backend in BACKENDS:
        url = f"memory://v3-resume-{backend}"
        create_store(url, manifest(backend, loss_mask=True))
        with pytest.raises(StoreIncompatible) as info:
            create_store(url, manifest(backend))
        assert info.value.differences == ["loss_mask: store has True, this run asks False"]
        assert create_store(url, manifest(backend, loss_mask=True)).manifest["loss_mask"] is True


# -- the tokenizer's size ------------------------------------------------------------------


def test_tokenizer_size() -> None:
    plain = manifest()
    assert tokenizer_size(plain) == 1000
    padded = manifest(tokenizer={"sha256": "ab" * 32, "size": 997})
    assert tokenizer_size(padded) == 997 and padded["tokenizer"]["size"] == 997
    assert tokenizer_size(manifest(tokenizer={"size": 1000})) == 1000
    assert tokenizer_size(manifest(tokenizer={"size": 1})) == 1
    for size, message in [
        (0, r"tokenizer size must be in 1\.\.vocab_size \(1000\), 0"),
        (-3, "tokenizer size must be in 1..vocab_size"),
        (1001, "tokenizer size must be in 1..vocab_size"),
        ("997", "tokenizer size must be an integer, '997'"),
        (997.0, "tokenizer size must be an integer"),
        (True, "tokenizer size must be an integer"),
    ]:
        with pytest.raises(ValueError, match=message):
            manifest(tokenizer={"size": size})
        with pytest.raises(ValueError, match=message):  # on a manifest built by hand
            tokenizer_size({**plain, "tokenizer": {"size": size}})


def test_a_store_knows_its_tokenizer_size(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    create_store(url, manifest(tokenizer={"sha256": "ab" * 32, "size": 990}))
    store = open_store(url)
    assert store.tokenizer_size == 990 and store.vocab_size == 1000
    with pytest.raises(StoreIncompatible, match="tokenizer.size: store has 990, this run asks 991"):
        create_store(url, manifest(tokenizer={"sha256": "ab" * 32, "size": 991}))
    raw = json.loads(StoreFS(url).read("manifest.json"))
    raw["tokenizer"]["size"] = 1001
    StoreFS(url).write_atomic("manifest.json", json.dumps(raw).encode())
    with pytest.raises(StoreCorrupt, match="tokenizer size must be in 1..vocab_size"):
        open_store(url)


# -- version-2 stores written by this kdcache ----------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("targets", ["topk", "sampled", "topk+sampled"])
def test_version_2_store_written_today_opens_and_reads_as_before(
    tmp_path: Path, backend: str, targets: str
) -> None:
    rng = np.random.default_rng(1)
    seqs = [make_targets(rng, n, 1000, targets, samples=24) for n in (5, 20, 1)]
    url = str(tmp_path / "s")
    v2 = older(manifest(backend, targets), 2)
    with create_store(url, v2) as writer:
        for tokens, arrays in seqs:
            writer.append("train", tokens, **arrays)
        with pytest.raises(ValueError, match=r"loss_mask given, but this store \(format_version 2"):
            writer.append("train", tokens, loss_mask=np.ones(len(tokens)), **arrays)
    writer.mark_finished({"tokens": 26})
    fs = StoreFS(url)
    raw = json.loads(fs.read("manifest.json"))
    assert raw["format_version"] == 2 and "loss_mask" not in raw and raw["finished"] is True
    store = open_store(url)
    assert store.manifest["loss_mask"] is False and not store.has_loss_mask
    assert store.tokenizer_size == store.vocab_size == 1000
    assert store.num_trained == store.num_tokens == 26
    (record,) = store.shards
    assert record.num_trained is None
    assert "num_trained" not in json.loads(fs.read(record.record_path))
    if backend == "zarr":
        attrs = json.loads(fs.read(f"{record.path}/zarr.json"))["attributes"]["kdcache"]
        assert attrs["format_version"] == 2
        assert not [rel for rel in record.files if "/loss_mask/" in rel]
    else:
        schema = pa.ipc.open_file(pa.BufferReader(fs.read(record.path))).schema
        assert "loss_mask" not in schema.names
        assert json.loads(schema.metadata[b"kdcache"])["format_version"] == 2
    for seq, (tokens, arrays) in zip(store.iter_sequences(), seqs, strict=True):
        np.testing.assert_array_equal(seq.tokens, tokens)
        assert seq.loss_mask is None and seq.trained_positions.tolist() == list(range(len(tokens)))
        for name, values in arrays.items():
            if "logprob" not in name:
                np.testing.assert_array_equal(getattr(seq, name), values)
    assert verify_store(url) == []
    # this kdcache writes version 3: a version-2 store resumes with a version-2 manifest only
    with pytest.raises(StoreIncompatible) as info:
        create_store(url, manifest(backend, targets))
    assert info.value.differences == ["format_version: store has 2, this run asks 7"]
    assert create_store(url, v2).manifest["format_version"] == 2


# -- kdcache inspect / verify --------------------------------------------------------------


def build_masked(path: Path, backend: str, targets: str = "topk+sampled", **kw: Any) -> str:
    rng = np.random.default_rng(2)
    facts = manifest(backend, targets, loss_mask=True, shard_tokens=48, **kw)
    with create_store(path, facts) as writer:
        for split, n in (("train", 6), ("eval", 2)):
            for _ in range(n):
                tokens, mask, _, rows = masked_sequence(rng, 16, targets, samples=24)
                writer.append(split, tokens, loss_mask=mask, **rows)
    writer.mark_finished({})  # as cache-teacher leaves a complete store
    return str(path)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inspect_a_masked_store(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    tokenizer = {"sha256": "ab" * 32, "size": 990}
    store = build_masked(tmp_path / "s", backend, tokenizer=tokenizer)
    reader = open_store(store)
    trained = reader.num_trained
    code, out, _ = run(["inspect", store, "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["format_version"] == 7 and facts["loss_mask"] is True
    assert facts["tokens"] == 128 and facts["trained_positions"] == trained
    assert 0 < trained < 128 and facts["trained_fraction"] == pytest.approx(trained / 128)
    assert facts["bytes_per_token"] == pytest.approx(facts["bytes_on_disk"] / 128)
    assert facts["bytes_per_trained_position"] == pytest.approx(facts["bytes_on_disk"] / trained)
    assert facts["tokenizer_size"] == 990 and facts["vocab_size"] == 1000
    # the statistics cover every target row of this small store, and only those
    assert facts["statistics_rows"] == trained
    rows = np.concatenate([s.sampled_distinct for s in reader.iter_sequences()])
    assert facts["sampled_distinct"]["mean"] == pytest.approx(rows.mean())
    by_field = facts["bytes_per_token_by_field"]
    if backend == "zarr":
        assert "loss_mask" in by_field  # (mostly zarr metadata in a store this small)
        assert sum(by_field.values()) == pytest.approx(facts["bytes_per_token"])
    else:
        assert by_field is None
    code, out, _ = run(["inspect", store], capsys)
    lines = dict(line.split(None, 1) for line in out.splitlines() if not line.startswith("split"))
    assert code == 0 and lines["loss_mask"] == "True" and lines["tokenizer_size"] == "990"
    assert lines["trained_positions"] == f"{trained:,}"
    assert lines["bytes_per_trained_position"] == f"{facts['bytes_per_trained_position']:.4g}"
    code, out, _ = run(["verify", store], capsys)
    assert code == 0 and f"128 tokens ({trained:,} trained) verified" in out


def test_inspect_leaves_out_what_a_store_without_a_mask_does_not_have(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_store_cli import build

    store = build(tmp_path / "s")
    code, out, _ = run(["inspect", store, "--json"], capsys)
    facts = json.loads(out)
    assert facts["loss_mask"] is False and facts["tokenizer_size"] == facts["vocab_size"]
    assert facts["trained_positions"] is facts["bytes_per_trained_position"] is None
    code, out, _ = run(["inspect", store], capsys)
    assert "loss_mask                 False\n" in out  # aligned as before
    assert "trained" not in out and "tokenizer_size" not in out
    code, out, _ = run(["verify", store], capsys)
    assert code == 0 and "128 tokens verified" in out


def test_verify_names_a_shard_whose_mask_disagrees_with_its_rows(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from test_store_loss_mask import rewrite

    store = build_masked(tmp_path / "s", "zarr", "topk")
    record = open_store(store).shards_of("train")[1]
    arrays = open_store(store).read_shard(record)
    arrays.loss_mask = np.ones_like(arrays.loss_mask)  # every position, but T rows stored
    from kdcache.storage._base import get_codec

    rewrite(store, record, get_codec("zarr").encode(arrays, "float16", "raw"), num_trained=48)
    code, out, _ = run(["verify", store], capsys)
    assert code == 1 and out.startswith(f"{record.name}: shard {record.name} is corrupt: top-k")
    assert out.count("\n") == 1
