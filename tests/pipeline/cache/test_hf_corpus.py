"""Hugging Face datasets as corpora: saved datasets, repository folders and hf:NAME from a local
hub cache (never the network) read as the same data in .jsonl, end to end and record by record;
fingerprints; bad input as one line, exit 2, nothing written."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from chat_tokenizers import family
from conftest import run_cli, save_tiny_model

from kdcache.pipeline.cache.corpus import CorpusError, CorpusStats, iter_documents, resolve_corpus
from kdcache.pipeline.cache.hf_corpus import DatasetOptions, open_dataset
from kdcache.storage import open_store, verify_store

datasets = pytest.importorskip("datasets")

COMMIT = "0123456789abcdef0123456789abcdef01234567"
TOPICS = ["sorting", "files", "numbers", "strings", "dates", "paths", "sets", "json"]


@pytest.fixture(autouse=True)
def hf_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face home per test: its hub cache is what hf:NAME may read."""
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_DATASETS_CACHE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return tmp_path / "hf-home"


def texts() -> list[str]:
    lines = [f"def f{i}(x):\n    return x * {i} + {i % 7}  # {TOPICS[i % 8]}\n" for i in range(90)]
    return ["".join(lines[i : i + 2 + i % 4]) for i in range(0, 90, 3)] + ["", "   "]


def conversations(n: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"How do I work with {TOPICS[i % 8]}? ({i})"},
                {"role": "assistant", "content": f"Use the standard library: item {i}."},
            ]
        }
        for i in range(n)
    ]


def prompts(n: int) -> list[dict]:
    return [{"prompt": f"def g{i}(a, b):", "completion": f"Add {i} to a and b."} for i in range(n)]


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def parquet_bytes(records: list[dict]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buffer)
    return buffer.getvalue()


def save(path: Path, splits: dict[str, list[dict]] | list[dict]) -> Path:
    """``Dataset.save_to_disk`` of a list of records, ``DatasetDict.save_to_disk`` of splits."""
    if isinstance(splits, list):
        datasets.Dataset.from_list(splits).save_to_disk(str(path))
    else:
        dataset = {k: datasets.Dataset.from_list(v) for k, v in splits.items()}
        datasets.DatasetDict(dataset).save_to_disk(str(path))
    return path


def hub_snapshot(home: Path, repo: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """The layout huggingface_hub keeps: blobs by content hash, a snapshot of symlinks per commit,
    refs/main naming the commit."""
    root = home / "hub" / f"datasets--{repo.replace('/', '--')}"
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (root / "refs").mkdir(exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    return root / "snapshots" / commit


def documents(spec: str | Path, stats: CorpusStats | None = None, **options: str) -> list:
    """(kind, text, record) of every document of a spec, as stage one reads them."""
    entry = open_dataset(str(spec), DatasetOptions(**options))  # type: ignore[arg-type]
    files = [entry] if entry is not None else resolve_corpus(str(spec))
    return [(d.kind, d.text, d.record) for d in iter_documents(files, stats or CorpusStats())]


def as_jsonl(tmp_path: Path, records: list[dict]) -> list:
    """The documents of ``records`` written as a .jsonl file."""
    name = hashlib.sha256(json.dumps(records).encode()).hexdigest()[:12]
    return documents(write_jsonl(tmp_path / f"{name}.jsonl", records))


# --- records: each form reads as the same data in .jsonl -----------------------------------


@pytest.mark.parametrize("kind", ["text", "chat", "prompt"])
def test_a_saved_dataset_reads_as_the_same_records_in_jsonl(kind: str, tmp_path: Path) -> None:
    records = {
        "text": [{"text": t, "id": i} for i, t in enumerate(texts())],
        "chat": conversations(9),
        "prompt": prompts(9),
    }[kind]
    expected = CorpusStats()
    jsonl = documents(write_jsonl(tmp_path / "a.jsonl", records), expected)
    for spec in (save(tmp_path / "ds", records), save(tmp_path / "dd", {"train": records})):
        stats = CorpusStats()
        assert documents(spec, stats) == jsonl and jsonl[0][0] == kind == stats.kind
        assert (stats.documents, stats.empty_skipped) == (
            expected.documents,
            expected.empty_skipped,
        )


def test_columns_are_renamed_by_the_column_options(tmp_path: Path) -> None:
    chat = [{"conversation": r["messages"], "id": i} for i, r in enumerate(conversations(5))]
    qa = [{"q": r["prompt"], "a": r["completion"]} for r in prompts(5)]
    body = [{"body": t, "text": "not this one"} for t in texts()]
    read = documents(save(tmp_path / "c", chat), messages="conversation")
    assert read == as_jsonl(tmp_path, conversations(5))
    read = documents(save(tmp_path / "p", qa), prompt="q", completion="a")
    assert read == as_jsonl(tmp_path, prompts(5))
    read = documents(save(tmp_path / "t", body), text="body")
    assert read == as_jsonl(tmp_path, [{"text": t} for t in texts()])


def test_a_repository_folder_reads_one_split_of_one_config(tmp_path: Path) -> None:
    folder = tmp_path / "repo"
    write_jsonl(folder / "data" / "train-00000-of-00002.jsonl", prompts(4))
    write_jsonl(folder / "data" / "train-00001-of-00002.jsonl", prompts(8)[4:])
    write_jsonl(folder / "data" / "test-00000-of-00001.jsonl", prompts(10)[8:])
    expected = as_jsonl(tmp_path, prompts(10))
    assert documents(f"hf:{folder}") == expected[:8]  # train, its files in order
    assert documents(f"hf:{folder}", split="test") == expected[8:]
    # without hf: and without a dataset card, a directory stays a directory of files
    assert documents(folder) == expected[8:] + expected[:8]

    card = tmp_path / "card"
    write_jsonl(card / "en" / "train.jsonl", conversations(3))
    write_jsonl(card / "fr" / "train.jsonl", [{"text": "bonjour"}, {"text": "salut"}])
    (card / "README.md").write_text(
        "---\nlicense: mit\nconfigs:\n- config_name: en\n  data_files: en/*.jsonl\n"
        "- config_name: fr\n  data_files: fr/*.jsonl\n---\n# A dataset card\n"
    )
    assert [d[1] for d in documents(card, config="fr")] == ["bonjour", "salut"]
    stats = CorpusStats()
    assert documents(card, stats, config="en") == as_jsonl(tmp_path, conversations(3))
    assert stats.kind == "chat" and stats.files == 1


def test_hf_name_is_read_from_the_local_hub_cache(hf_home: Path, tmp_path: Path) -> None:
    files = {
        "README.md": b"---\ndataset_info:\n  dataset_size: 1\n---\n",
        "data/train-00000-of-00001.parquet": parquet_bytes(conversations(6)),
        "data/validation-00000-of-00001.parquet": parquet_bytes(conversations(8)[6:]),
    }
    hub_snapshot(hf_home, "org/chat", files)
    expected = as_jsonl(tmp_path, conversations(8))
    assert documents("hf:org/chat") == expected[:6]
    assert documents("hf:org/chat", split="validation") == expected[6:]
    # another revision of the same repository, named by its commit
    newer = "f" * 40
    hub_snapshot(hf_home, "org/chat", {"data/train.parquet": parquet_bytes(prompts(2))}, newer)
    entry = open_dataset("hf:org/chat", DatasetOptions())
    assert entry is not None and entry.facts["revision"] == newer and entry.kind == "prompt"
    old = open_dataset(f"hf:org/chat@{COMMIT}", DatasetOptions())
    assert old is not None and old.kind == "chat" and old.spec == f"hf:org/chat@{COMMIT}"


def test_nothing_reaches_the_network_even_when_the_libraries_are_online(
    hf_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    hub_snapshot(hf_home, "org/text", {"train.jsonl": b'{"text": "hello"}\n'})
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("no network in this test")

    def lookup(host: object, *args: object, **kwargs: object) -> object:
        attempts.append(host)
        raise socket.gaierror("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", lookup)
    assert documents("hf:org/text") == [("text", "hello", None)]
    with pytest.raises(CorpusError, match="not in the local Hugging Face cache"):
        open_dataset("hf:org/absent", DatasetOptions())
    assert attempts == []
    assert huggingface_hub.constants.HF_HUB_OFFLINE is False  # offline only for the call


def test_rows_are_streamed_not_loaded_whole(tmp_path: Path) -> None:
    """Reading 40k rows (8 MB of text) holds a batch of Python objects at a time: a dataset
    larger than memory reads like a small one (the Arrow data is memory-mapped or streamed)."""
    import tracemalloc

    rows = [{"text": f"{i:07d} " + "x" * 200} for i in range(40_000)]
    folder = tmp_path / "repo" / "data"
    folder.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), folder / "train.parquet", row_group_size=4096)
    for spec in (str(save(tmp_path / "saved", rows)), f"hf:{tmp_path / 'repo'}"):
        entry = open_dataset(spec, DatasetOptions())
        stats = CorpusStats()
        tracemalloc.start()
        try:
            count = sum(1 for _ in iter_documents([entry], stats))
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert count == stats.documents == 40_000
        assert peak < 3_000_000, (spec, peak)  # all rows as Python objects: 18 MB


def test_null_values_are_empty_documents(tmp_path: Path) -> None:
    stats = CorpusStats()
    read = documents(save(tmp_path / "t", [{"text": "a"}, {"text": None}]), stats)
    assert read == [("text", "a", None)] and stats.empty_skipped == 1
    stats = CorpusStats()
    assert len(documents(save(tmp_path / "c", [*conversations(1), {"messages": None}]), stats)) == 1
    assert stats.empty_skipped == 1


def test_two_processes_read_the_same_documents_in_the_same_order(tmp_path: Path) -> None:
    """Every rank of stage one plans the whole corpus from its own read: a dataset of several
    files must give each process the same documents in the same order."""
    folder = tmp_path / "repo"
    for i in range(5):
        chunk = [{"text": f"doc {i}.{j}"} for j in range(7)]
        (folder / "data").mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.Table.from_pylist(chunk), folder / "data" / f"train-{i:05d}-of-5.parquet")
    script = (
        "import hashlib, sys\n"
        "from kdcache.pipeline.cache.corpus import CorpusStats, iter_documents\n"
        "from kdcache.pipeline.cache.hf_corpus import DatasetOptions, open_dataset\n"
        "entry = open_dataset(sys.argv[1], DatasetOptions())\n"
        "texts = [d.text for d in iter_documents([entry], CorpusStats())]\n"
        "print(hashlib.sha256('\\0'.join(texts).encode()).hexdigest(), len(texts))\n"
    )
    here = [text for _, text, _ in documents(f"hf:{folder}")]
    assert here == [f"doc {i}.{j}" for i in range(5) for j in range(7)]
    other = subprocess.run(
        [sys.executable, "-c", script, f"hf:{folder}"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert other == [hashlib.sha256("\0".join(here).encode()).hexdigest(), "35"]


def test_the_fingerprint_is_stable_and_follows_the_data(hf_home: Path, tmp_path: Path) -> None:
    def fingerprint(spec: str, **options: str) -> str:
        entry = open_dataset(spec, DatasetOptions(**options))  # type: ignore[arg-type]
        assert entry is not None
        return entry.fingerprint()

    saved = str(save(tmp_path / "saved", {"train": prompts(4), "test": prompts(2)}))
    assert fingerprint(saved) == fingerprint(saved) != fingerprint(saved, split="test")
    first = fingerprint(saved)
    save(tmp_path / "saved", {"train": prompts(5), "test": prompts(2)})
    assert fingerprint(saved) != first

    data = write_jsonl(tmp_path / "repo" / "train.jsonl", [{"text": "aaaa"}])
    folder = f"hf:{tmp_path / 'repo'}"
    first = fingerprint(folder)
    assert fingerprint(folder) == first
    data.write_text('{"text": "bbbb"}\n')  # same size, new content: the mtime tells
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    assert fingerprint(folder) != first

    hub_snapshot(hf_home, "org/fp", {"train.jsonl": b'{"text": "aaaa"}\n'})
    first = fingerprint("hf:org/fp")
    assert fingerprint("hf:org/fp") == first
    hub_snapshot(hf_home, "org/fp", {"train.jsonl": b'{"text": "bbbb"}\n'}, "e" * 40)
    assert fingerprint("hf:org/fp") != first


# --- cache-teacher end to end --------------------------------------------------------------


def cache_args(
    teacher: Path, corpus: str | Path, out: Path, *extra: str, seq_len: int = 64
) -> list[str]:
    return [
        "cache-teacher", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
        "--top-k", "6", "--seq-len", str(seq_len), "--batch-size", "4",
        "--shard-tokens", str(4 * seq_len), "--eval-fraction", "0.25", *extra,
    ]  # fmt: skip


def assert_same_store(a: Path, b: Path) -> None:
    """The same shards with the same tokens, masks and targets; the same counts."""
    store_a, store_b = open_store(str(a)), open_store(str(b))
    assert [r.name for r in store_a.shards] == [r.name for r in store_b.shards]
    assert {r.split for r in store_a.shards} == {"train", "eval"} and len(store_a.shards) > 2
    for ra, rb in zip(store_a.shards, store_b.shards, strict=True):
        x, y = store_a.read_shard(ra), store_b.read_shard(rb)
        for field in ("tokens", "seq_offsets", "topk_ids", "loss_mask"):
            assert np.array_equal(getattr(x, field), getattr(y, field)), (ra.name, field)
        assert np.allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-3)
    stats_a, stats_b = store_a.manifest["stats"], store_b.manifest["stats"]
    for fact in ("documents", "empty_documents_skipped", "sequences", "tokens_by_split"):
        assert stats_a[fact] == stats_b[fact], fact
    for fact in ("kind", "packing", "train_on", "eval_fraction"):
        assert store_a.manifest["corpus"][fact] == store_b.manifest["corpus"][fact]


def test_cache_teacher_on_a_saved_text_dataset_writes_the_jsonl_store(
    tmp_path: Path, tiny_teacher_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    records = [{"text": t} for t in texts()]
    jsonl = write_jsonl(tmp_path / "t.jsonl", records)
    saved = save(tmp_path / "saved", [{**r, "id": i} for i, r in enumerate(records)])
    for corpus, out in ((jsonl, tmp_path / "a"), (saved, tmp_path / "b")):
        assert run_cli(cache_args(tiny_teacher_dir, corpus, out), capsys)[0] == 0
    assert_same_store(tmp_path / "a", tmp_path / "b")
    corpus = open_store(str(tmp_path / "b")).manifest["corpus"]
    assert corpus["spec"] == str(saved) and corpus["files"] == 1
    assert corpus["dataset"] == {
        "source": "saved",
        "fingerprint": datasets.load_from_disk(str(saved))._fingerprint,
        "split": None,
        "columns": {"text": "text"},
    }
    # the same command resumes the finished store; the same directory with other data does not
    code, out, _ = run_cli(cache_args(tiny_teacher_dir, saved, tmp_path / "b"), capsys)
    assert code == 0 and "already there" in out
    save(tmp_path / "saved", [*records, {"text": "one more document"}])
    code, _, err = run_cli(cache_args(tiny_teacher_dir, saved, tmp_path / "b"), capsys)
    assert code == 2 and "corpus.fingerprint" in err, err


def test_cache_teacher_on_a_cached_hub_chat_dataset_writes_the_jsonl_store(
    hf_home: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    family("qwen").save_pretrained(tmp_path / "tokenizer")
    teacher = save_tiny_model("llama", tmp_path / "tokenizer", tmp_path / "teacher")
    records = conversations(16)
    jsonl = write_jsonl(tmp_path / "c.jsonl", records)
    renamed = [{"conversation": r["messages"]} for r in records]
    hub_snapshot(hf_home, "org/chat", {"data/train-0.parquet": parquet_bytes(renamed)})
    hub = ["--messages-column", "conversation"]
    for corpus, out, extra in ((jsonl, "a", []), ("hf:org/chat", "b", hub)):
        args = cache_args(teacher, corpus, tmp_path / out, *extra, seq_len=256)
        assert run_cli(args, capsys)[0] == 0
    assert_same_store(tmp_path / "a", tmp_path / "b")
    manifest = open_store(str(tmp_path / "b")).manifest
    assert manifest["loss_mask"] is True and manifest["corpus"]["spec"] == "hf:org/chat"
    assert manifest["corpus"]["dataset"] == {
        "source": "hub",
        "repo": "org/chat",
        "revision": COMMIT,
        "config": "default",
        "split": "train",
        "columns": {"messages": "conversation"},
    }


# --- bad input ------------------------------------------------------------------------------


def test_bad_dataset_input_is_one_line_exit_2_and_writes_nothing(
    hf_home: Path,
    tmp_path: Path,
    tiny_teacher_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    saved = save(tmp_path / "saved", {"train": prompts(3), "test": prompts(2)})
    no_train = save(tmp_path / "no-train", {"dev": prompts(3), "test": prompts(2)})
    configs = tmp_path / "configs"
    write_jsonl(configs / "a" / "x.jsonl", prompts(2))
    write_jsonl(configs / "b" / "x.jsonl", prompts(2))
    (configs / "README.md").write_text(
        "---\nconfigs:\n- config_name: a\n  data_files: a/*.jsonl\n"
        "- config_name: b\n  data_files: b/*.jsonl\n---\n"
    )
    neither = tmp_path / "neither"
    neither.mkdir()
    (neither / "weights.bin").write_bytes(b"\0" * 8)
    files = tmp_path / "files"
    write_jsonl(files / "a.jsonl", prompts(2))
    cases = {
        "no column": ([saved, "--text-field", "b"], "no column 'b' (--text-field)", "are prompt, comp"),
        "no split": ([saved, "--dataset-split", "dev"], "no split 'dev'", "splits are train, test"),
        "no split chosen": ([no_train], "several splits and none is 'train'", "dev, test"),
        "no config chosen": ([configs], "dataset has several configs", "a, b"),
        "no config": ([configs, "--dataset-config", "c"], "no config 'c'", "configs are a, b"),
        "not cached": (["hf:org/x"], "org/x is not in the local Hugging Face cache", str(hf_home)),
        "no revision": ([f"hf:org/x@{COMMIT}"], f"org/x revision {COMMIT} is not", "hf download"),
        "neither": ([f"hf:{neither}"], "cannot read the dataset folder", "data files found"),
        "not a name": (["hf:a//b"], "not a dataset directory nor a Hugging Face dataset name"),
        "other corpus": ([files, "--dataset-split", "x"], "--dataset-split applies to", "hf:DIR"),
    }  # fmt: skip
    capsys.readouterr()  # save_to_disk's progress bars
    for name, ((corpus, *extra), *words) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '-')}"
        code, _, err = run_cli(cache_args(tiny_teacher_dir, corpus, out, *extra), capsys)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("Error: "), (name, err)
        assert all(w in lines[0] for w in words), (name, lines[0])
        assert not out.exists(), name

    monkeypatch.setitem(sys.modules, "datasets", None)  # not installed
    code, _, err = run_cli(cache_args(tiny_teacher_dir, saved, tmp_path / "out"), capsys)
    assert code == 2 and err.strip() == (
        "Error: reading a Hugging Face dataset needs the datasets package, "
        "pip install 'kdcache[hf]'"
    )
    assert not (tmp_path / "out").exists()


def test_a_store_from_a_dataset_verifies(tmp_path: Path, tiny_teacher_dir: Path, capsys) -> None:
    folder = tmp_path / "repo"
    write_jsonl(folder / "data" / "train.jsonl", prompts(12))
    out = tmp_path / "store"
    assert run_cli(cache_args(tiny_teacher_dir, f"hf:{folder}", out), capsys)[0] == 0
    assert verify_store(str(out)) == []
    manifest = open_store(str(out)).manifest
    assert manifest["corpus"]["kind"] == "prompt" and manifest["corpus"]["spec"] == f"hf:{folder}"
    assert manifest["stats"]["documents"] == 12
