"""Format version 6: next-token log-probs and the text with each token's span, in both backends
and codecs; selected sequences; older stores; verify's checks of the new arrays."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kdcache.storage import (
    StoreCorrupt,
    StoreIncompatible,
    create_store,
    make_manifest,
    open_store,
    require_text,
    verify_store,
)
from kdcache.storage._base import ShardRecord, get_codec, sha256
from kdcache.storage._fs import StoreFS

TEXTS = [b"def f(x):\n", "h\u00e9llo \U0001f600 w\u00f6rld".encode(), b"", b"x" * 300]


def manifest(backend: str, codec: str = "raw", dtype: str = "float16", **facts: bool) -> dict:
    facts = {"next_token_logprob": True, "text": True, **facts}
    return make_manifest(
        backend=backend, teacher={"name": "t"}, tokenizer={"sha256": "0" * 64}, vocab_size=500,
        top_k=4, seq_len=16, corpus={}, shard_tokens=64, codec=codec, logprob_dtype=dtype,
        **facts,
    )  # fmt: skip


def sequences(rng: np.random.Generator) -> list[dict]:
    out = []
    for text in TEXTS:
        n = int(rng.integers(2, 9))
        cuts = np.sort(rng.integers(0, len(text) + 1, n - 1))
        ends = np.append(cuts, len(text))  # (n,) non-decreasing, the last = len(text)
        if len(text) == 300:  # one token spells it all: longer than uint8 holds
            ends[:] = 300
        lp = -rng.random((n, 4)).astype(np.float32) * 5
        nxt = -rng.random(n).astype(np.float32) * 9
        nxt[-1] = np.nan
        out.append(dict(
            tokens=rng.integers(0, 500, n), topk_ids=np.tile(np.arange(4), (n, 1)),
            topk_logprobs=-np.sort(-lp, axis=1), next_token_logprob=nxt, text=text,
            token_ends=ends,
        ))  # fmt: skip
    return out


def write(url: str, m: dict, seqs: list[dict]) -> None:
    writer = create_store(url, m)
    with writer.open_shard("train", 0) as shard:
        for q in seqs:
            shard.append(**q)
    writer.mark_finished({})


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("codec,dtype", [("raw", "float16"), ("gaps", "float16"),
                                         ("raw", "float32"), ("gaps", "bfloat16")])  # fmt: skip
def test_text_spans_and_next_logprobs_round_trip(
    tmp_path: Path, backend: str, codec: str, dtype: str
) -> None:
    seqs = sequences(np.random.default_rng(0))
    url = str(tmp_path / "s")
    write(url, manifest(backend, codec, dtype), seqs)
    assert verify_store(url) == []
    store = open_store(url)
    record = store.shards_of("train")[0]
    for picked in (None, [1, 3]):
        arrays = store.read_shard(record, sequences=picked)
        for i, q in zip(picked or range(len(seqs)), arrays, strict=True):
            given = seqs[i]
            assert q.text is not None and q.token_ends is not None
            assert q.text.tobytes() == given["text"]
            assert q.token_ends.tolist() == given["token_ends"].tolist()
            assert q.next_token_logprob is not None and np.isnan(q.next_token_logprob[-1])
            wanted = given["next_token_logprob"][:-1].astype(dtype if dtype != "bfloat16" else "f4")
            assert np.allclose(q.next_token_logprob[:-1], wanted, rtol=1 / 128)
    expected = {"float16": "float16", "float32": "float32", "bfloat16": "float32"}[dtype]
    whole = store.read_shard(record)
    assert str(whole.next_token_logprob.dtype) == expected
    assert whole.token_bytes.dtype == np.uint16  # a 300-byte token: the shard's narrowest


def test_stores_without_the_facts_give_none(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    m = manifest("zarr", next_token_logprob=False, text=False)
    seqs = [{k: v for k, v in q.items() if k in ("tokens", "topk_ids", "topk_logprobs")}
            for q in sequences(np.random.default_rng(1))]  # fmt: skip
    write(url, m, seqs)
    q = next(open_store(url).iter_sequences())
    assert q.next_token_logprob is None and q.text is None and q.token_ends is None
    writer = create_store(str(tmp_path / "t"), m)
    with pytest.raises(ValueError, match="text given, but this store has none"):
        writer.open_shard("train", 0).append(**sequences(np.random.default_rng(1))[0] | {
            "next_token_logprob": None})  # fmt: skip


def test_a_version_5_store_opens_with_none_fields(tmp_path: Path) -> None:
    url = str(tmp_path / "v5")
    m = manifest("arrow", next_token_logprob=False, text=False)
    m["format_version"] = 5
    del m["next_token_logprob"], m["text"]
    seqs = [{k: v for k, v in q.items() if k in ("tokens", "topk_ids", "topk_logprobs")}
            for q in sequences(np.random.default_rng(2))]  # fmt: skip
    write(url, m, seqs)
    store = open_store(url)
    assert store.manifest["format_version"] == 5 and store.manifest["text"] is False
    assert verify_store(url) == []
    q = next(store.iter_sequences())
    assert q.next_token_logprob is None and q.text is None and q.token_ends is None


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_the_writer_refuses_bad_spans_and_logprobs(tmp_path: Path, backend: str) -> None:
    writer = create_store(str(tmp_path / "s"), manifest(backend))
    shard = writer.open_shard("train", 0)
    good = sequences(np.random.default_rng(3))[1]
    bad_ends = good["token_ends"].copy()
    bad_ends[-1] += 1
    with pytest.raises(ValueError, match="end at the text's"):
        shard.append(**good | {"token_ends": bad_ends})
    not_nan = good["next_token_logprob"].copy()
    not_nan[-1] = -1.0
    with pytest.raises(ValueError, match="not NaN at a sequence's last position"):
        shard.append(**good | {"next_token_logprob": not_nan})
    with pytest.raises(ValueError, match="pass it"):
        shard.append(**{k: v for k, v in good.items() if k != "next_token_logprob"})


def test_verify_catches_corrupted_token_ends(tmp_path: Path) -> None:
    backend = "zarr"  # an Arrow row's text is cut by its token_bytes: the reader checks each row
    url = str(tmp_path / "s")
    write(url, manifest(backend), sequences(np.random.default_rng(4)))
    fs, store = StoreFS(url), open_store(url)
    record = store.shards[0]
    arrays = store.read_shard(record)
    arrays.token_bytes = arrays.token_bytes.copy()
    arrays.token_bytes[0] += 3  # ends past the text: re-encoded with valid checksums
    arrays.text = arrays.text[: arrays.text.shape[0]]
    broken = np.isnan(arrays.next_token_logprob)
    blobs = get_codec(backend).encode(arrays, "float16", "raw")
    files = {}
    for key, data in blobs.items():
        rel = f"{record.path}/{key}" if key else record.path
        fs.write_atomic(rel, data)
        files[rel] = {"size": len(data), "sha256": sha256(data)}
    fixed = ShardRecord(**{**record.__dict__, "files": files,
                           "nbytes": sum(f["size"] for f in files.values())})  # fmt: skip
    fs.write_atomic(record.record_path, fixed.to_bytes())
    problems = verify_store(url)
    assert problems and record.name in problems[0][0] or "text" in str(problems)
    assert any("byte" in p or "text" in p for _, p in problems), problems
    with pytest.raises(StoreCorrupt):
        open_store(url).read_shard(record.name)
    assert broken.sum() == len(TEXTS)


def test_require_text_names_the_store_and_the_fix(tmp_path: Path) -> None:
    url = str(tmp_path / "s")
    write(url, manifest("zarr", text=False), [
        {k: v for k, v in q.items() if k not in ("text", "token_ends")}
        for q in sequences(np.random.default_rng(5))
    ])  # fmt: skip
    store = open_store(url)
    require_text({"text": True, "next_token_logprob": True}, url, next_token_logprob=True)
    with pytest.raises(StoreIncompatible, match=r"keeps no text .*re-cache it with this kdcache"):
        require_text(store.manifest, store.url)
