"""`kdcache cache-teacher` end to end: exact content, resume, refusals, bad input."""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import write_damaged_parquet
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cli import main
from kdcache.storage import open_store, verify_store
from kdcache.storage._codec import error_bounds

pytestmark = pytest.mark.floors

TOP_K = 8
SEQ_LEN = 32


def run(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def assert_stored(stored: np.ndarray, exact: np.ndarray, codec: str, tol: float = 2e-3) -> None:
    """Stored log-probs equal the teacher's up to float16 rounding and run-to-run noise (``tol``
    absolute and relative, all a raw store adds) plus what the store's codec may move each one
    (its grid segment's bound, storage/_codec.py: 1/2048 near log-prob 0 up to 1/16 below -5)."""
    stored, exact = np.asarray(stored, np.float64), np.asarray(exact, np.float64)
    bound = np.zeros_like(exact)
    for x in (exact, stored):  # a value near a segment's end may round into the next one
        upper = 0.0
        for end, half in error_bounds(codec):
            inside = (x >= end) & (x < upper)
            bound[inside] = np.maximum(bound[inside], half)
            upper = end
    assert (np.abs(stored - exact) <= tol + tol * np.abs(exact) + bound).all()


def cache_args(teacher: Path, corpus: Path, out: Path | str, *extra: str) -> list[str]:
    return [
        "cache-teacher", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
        "--top-k", str(TOP_K), "--seq-len", str(SEQ_LEN), "--batch-size", "3",
        "--shard-tokens", "256", "--eval-fraction", "0.2", "--max-tokens", "2500", *extra,
    ]  # fmt: skip


def store_content(url: Path | str) -> dict[str, tuple[np.ndarray, ...]]:
    store = open_store(str(url))
    content = {}
    for record in store.shards:
        arrays = store.read_shard(record)
        content[record.name] = (
            arrays.tokens,
            arrays.topk_ids,
            arrays.topk_logprobs,
            arrays.seq_offsets,
        )
    return content


def tree(path: Path) -> dict[str, bytes]:
    return {
        p.relative_to(path).as_posix(): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def cached(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("cache") / "store"
    assert run(*cache_args(tiny_teacher_dir, small_corpus_dir, out)) == 0
    return out


def test_store_holds_the_teachers_exact_top_k(cached: Path, tiny_teacher_dir: Path) -> None:
    store = open_store(str(cached))
    assert store.top_k == TOP_K and store.seq_len == SEQ_LEN and store.backend == "zarr"
    assert store.manifest["codec"] == "gaps"  # the default
    assert set(store.splits) == {"train", "eval"}
    assert store.num_tokens == 2500  # --max-tokens is exact
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    checked = 0
    for sequence in store.iter_sequences():
        assert 1 <= len(sequence.tokens) <= SEQ_LEN
        with torch.inference_mode():
            logits = model(
                input_ids=torch.from_numpy(sequence.tokens.astype(np.int64))[None]
            ).logits
        full = torch.log_softmax(logits[0].float(), dim=-1).numpy()  # (L, V)
        reference = -np.sort(-full, axis=-1)[:, :TOP_K]
        stored = sequence.topk_logprobs.astype(np.float32)
        assert_stored(stored, reference, store.manifest["codec"])
        at_ids = np.take_along_axis(full, sequence.topk_ids.astype(np.int64), axis=-1)
        assert_stored(stored, at_ids, store.manifest["codec"])
        checked += 1
        if checked == 12:
            break
    assert checked == 12


def test_tokens_are_the_packed_corpus(
    cached: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    from kdcache.pipeline.cache.corpus import CorpusStats, iter_documents, resolve_corpus
    from kdcache.pipeline.cache.packing import tokenize_documents

    tokenizer = AutoTokenizer.from_pretrained(tiny_teacher_dir)
    eos = tokenizer.eos_token_id
    documents = tokenize_documents(
        iter_documents(resolve_corpus(str(small_corpus_dir)), CorpusStats()),
        tokenizer, eval_fraction=0.2, eos_id=eos, max_tokens=2500,
    )  # fmt: skip
    expected: dict[str, list[int]] = {"train": [], "eval": []}
    for document in documents:
        expected[document.split] += document.ids.tolist()
    store = open_store(str(cached))
    for split, stream in expected.items():
        stored = np.concatenate([s.tokens for s in store.iter_sequences(split)]).tolist()
        assert stored == stream
    records = store.shards_of("train")
    assert [r.index for r in records] == list(range(len(records)))
    assert all(r.num_sequences == 256 // SEQ_LEN for r in records[:-1])
    assert len(records) > 1
    for r in records:
        start = r.index * (256 // SEQ_LEN)
        assert r.corpus_range["sequences"] == [start, start + r.num_sequences]


def test_manifest_records_every_setting(cached: Path, tiny_teacher_dir: Path) -> None:
    manifest = json.loads((cached / "manifest.json").read_text())
    assert manifest["teacher"]["name_or_path"] == str(tiny_teacher_dir)
    assert len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["teacher"]["dtype"] == "float32"
    assert manifest["teacher"]["architecture"] == "LlamaForCausalLM"
    assert manifest["corpus"]["max_tokens"] == 2500 and manifest["corpus"]["eval_fraction"] == 0.2
    assert manifest["top_k"] == TOP_K and manifest["shard_tokens"] == 256
    assert manifest["finished"] is True
    stats = manifest["stats"]
    assert stats["tokens"] == 2500 and stats["empty_documents_skipped"] == 1
    assert stats["invalid_utf8_documents_repaired"] == 1
    stored = open_store(str(cached)).tokenizer_files()
    assert set(stored) == set(manifest["tokenizer"]["files"])
    for name, data in stored.items():  # the teacher's own files, byte for byte
        assert data == (tiny_teacher_dir / name).read_bytes()
    text = "def f(x):\n    return x + 1\n"
    expected = AutoTokenizer.from_pretrained(tiny_teacher_dir)(text)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in stored.items():
            (Path(tmp) / name).write_bytes(data)
        assert AutoTokenizer.from_pretrained(tmp)(text)["input_ids"] == expected
    assert verify_store(str(cached)) == []


def test_rerun_skips_committed_shards_and_changes_nothing(
    cached: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    before = store_content(cached)
    assert run(*cache_args(tiny_teacher_dir, small_corpus_dir, cached)) == 0
    assert "already there" in capsys.readouterr().out
    after = store_content(cached)
    assert before.keys() == after.keys()
    for name in before:
        for a, b in zip(before[name], after[name], strict=True):
            assert np.array_equal(a, b)


@pytest.mark.parametrize(
    ("option", "value", "difference"),
    [
        ("--top-k", "4", "top_k"),
        ("--seq-len", "16", "seq_len"),
        ("--max-tokens", "999", "max_tokens"),
    ],
)
def test_rerun_with_other_settings_is_refused(
    cached: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys, option, value, difference
) -> None:
    before = tree(cached)
    args = cache_args(tiny_teacher_dir, small_corpus_dir, cached)
    args[args.index(option) + 1] = value
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Error: ") and difference in err[0]
    assert tree(cached) == before


def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    for f in tiny_teacher_dir.iterdir():
        if f.name in ("config.json", "model.safetensors", "generation_config.json"):
            (no_tokenizer / f.name).write_bytes(f.read_bytes())
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    for f in tiny_teacher_dir.iterdir():
        if not f.name.endswith(".safetensors"):
            (no_weights / f.name).write_bytes(f.read_bytes())
    empty_corpus = tmp_path / "empty_corpus"
    empty_corpus.mkdir()
    (empty_corpus / "a.txt").write_text("  \n")
    late_bad_parquet = tmp_path / "late_bad_parquet"
    late_bad_parquet.mkdir()
    (late_bad_parquet / "a.txt").write_text("a fine first document")
    pq.write_table(pa.table({"body": ["no text column"]}), late_bad_parquet / "b.parquet")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    out = tmp_path / "out"
    good = cache_args(tiny_teacher_dir, small_corpus_dir, out)

    def replace(option: str, value: str) -> list[str]:
        args = list(good)
        args[args.index(option) + 1] = value
        return args

    cases = {
        "missing teacher": (replace("--teacher", str(tmp_path / "nope")), "teacher does not exist"),
        "no match": (replace("--corpus", str(tmp_path / "*.txt")), "matches no files"),
        "only empty": (replace("--corpus", str(empty_corpus)), "no non-empty documents"),
        "bad parquet after a good file": (
            replace("--corpus", str(late_bad_parquet)),
            "parquet file has no column 'text'",
        ),
        "top-k 0": (replace("--top-k", "0"), "--top-k"),
        "top-k > vocab": (replace("--top-k", "100000"), "vocabulary"),
        "seq-len 1": (replace("--seq-len", "1"), "--seq-len"),
        "format": ([*good, "--format", "hdf5"], "--format"),
        "out is a file": (replace("--out", str(a_file)), "output path is a file"),
        "unknown protocol": (replace("--out", "nosuchprotocol://b/s"), "unknown storage protocol"),
        "no tokenizer": (replace("--teacher", str(no_tokenizer)), "tokenizer"),
        "no weights": (replace("--teacher", str(no_weights)), "no weight files"),
    }
    for name, (args, message) in cases.items():
        assert run(*args) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (name, err)
        assert err[0].startswith("Error: ") and message in err[0], (name, err)
        assert not out.exists(), name


def test_an_fsspec_url_store_holds_the_same_content(
    cached: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    """--out as an object-store URL (memory:// here, s3:// in production): same shards, and a
    rerun resumes from it like from a local directory."""
    url = f"memory://cache-teacher-{uuid.uuid4().hex[:8]}/store"
    args = cache_args(tiny_teacher_dir, small_corpus_dir, url)
    assert run(*args) == 0
    assert verify_store(url) == [] and open_store(url).manifest.get("finished")
    local, remote = store_content(cached), store_content(url)
    assert local.keys() == remote.keys()
    for name in local:
        for a, b in zip(local[name], remote[name], strict=True):
            np.testing.assert_array_equal(a, b)
    assert run(*args) == 0  # every shard is already there


def test_a_corpus_file_damaged_mid_run_is_one_line_and_keeps_the_store_valid(
    tmp_path: Path, tiny_teacher_dir: Path, capsys
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    texts = [f"row {i} of a file that breaks later" for i in range(3000)]
    write_damaged_parquet(corpus / "rows.parquet", texts, rows_per_group=1000)
    out = tmp_path / "store"
    args = cache_args(tiny_teacher_dir, corpus, out, "--max-tokens", "100000")  # the last wins
    assert run(*args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("Error: cannot read parquet file") and "kept" in err[-1], err
    assert "Traceback" not in "\n".join(err)
    assert verify_store(str(out)) == [] and len(open_store(str(out)).shards) > 0


def test_arrow_store_holds_the_same_content(
    cached: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    # another backend is another store: refused into the zarr one
    assert run(*cache_args(tiny_teacher_dir, small_corpus_dir, cached, "--format", "arrow")) == 2
    assert "backend" in capsys.readouterr().err
    out = tmp_path / "arrow"
    assert run(*cache_args(tiny_teacher_dir, small_corpus_dir, out, "--format", "arrow")) == 0
    assert open_store(str(out)).backend == "arrow"
    zarr, arrow = store_content(cached), store_content(out)
    assert zarr.keys() == arrow.keys()
    for name in zarr:
        for a, b in zip(zarr[name], arrow[name], strict=True):
            np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("where", ["probe", "corpus"])
def test_token_ids_beyond_the_models_vocabulary_are_a_clear_error(
    tmp_path: Path, tiny_tokenizer_dir: Path, small_corpus_dir: Path, capsys, where: str
) -> None:
    from conftest import save_tiny_model

    from kdcache.pipeline.cache.settings import PROBE_TEXT

    # the model embeds fewer tokens than its tokenizer produces: caught before the store is
    # created when the probe text shows it, else at the first batch that has such a token
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    probe_max = max(tokenizer(PROBE_TEXT * 4, add_special_tokens=False)["input_ids"][:64])
    vocab = probe_max if where == "probe" else probe_max + 1
    teacher = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "teacher", vocab_size=vocab)
    capsys.readouterr()
    out = tmp_path / "out"
    assert run(*cache_args(teacher, small_corpus_dir, out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("Error: ")
    assert f"outside the model's vocabulary of {vocab}" in err[-1]
    if where == "probe":
        assert len(err) == 1 and not out.exists()
    else:  # the store stays valid: nothing half-written is visible
        assert verify_store(str(out)) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SCHED_IDLE is Linux-only")
def test_no_thread_stays_idle_priority_after_a_run(cached: Path) -> None:
    import os

    from kdcache.pipeline.cache.background import thread_ids

    assert open_store(str(cached)).shards  # zarr's I/O threads exist and were used
    policies = {}
    for tid in thread_ids():
        try:
            policies[tid] = os.sched_getscheduler(tid)
        except OSError:  # ended meanwhile
            continue
    assert os.SCHED_IDLE not in policies.values()


def test_hub_ids_are_read_from_the_cache_when_the_hub_does_not_answer(
    tiny_teacher_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.utils
    from huggingface_hub import constants

    from kdcache.pipeline.teacher import hub_options

    class Session:
        def __init__(self, error: Exception | None) -> None:
            self.error = error

        def head(self, url: str, timeout: float) -> None:
            assert url == constants.ENDPOINT and timeout > 0
            if self.error is not None:
                raise self.error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session(None))
    assert hub_options("org/model") == {}  # reachable: huggingface_hub's own behaviour
    assert hub_options(str(tiny_teacher_dir)) == {}  # a directory never asks the Hub
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session(OSError("no DNS")))
    assert hub_options("org/model") == {"local_files_only": True}
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: Session(AssertionError()))
    assert hub_options("org/model") == {"local_files_only": True}  # no probe when offline
