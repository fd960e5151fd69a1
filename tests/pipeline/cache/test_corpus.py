"""Corpus specs → documents: kinds of files, repairs and skips, the eval split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import write_damaged_parquet

from kdcache.pipeline.cache.corpus import (
    CorpusError,
    CorpusStats,
    check_parquet_columns,
    corpus_fingerprint,
    is_eval_document,
    iter_documents,
    resolve_corpus,
    stdlib_files,
)

pytestmark = pytest.mark.floors


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    (tmp_path / "b.txt").write_text("beta text\n")
    (tmp_path / "a.md").write_text("# alpha\n")
    (tmp_path / "empty.py").write_text("   \n")
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 au lait")
    (tmp_path / "ignored.bin").write_bytes(b"\x00\x01")
    sub = tmp_path / "sub"
    sub.mkdir()
    lines = [
        {"text": "one"},
        {"body": "no text field"},
        "not json {",
        {"text": ""},
        {"text": "two"},
    ]
    (sub / "c.jsonl").write_text(
        "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n"
    )
    pq.write_table(pa.table({"text": ["p1", None, "p3"], "n": [1, 2, 3]}), sub / "d.parquet")
    return tmp_path


def test_directory_yields_documents_in_sorted_order_with_counts(corpus_dir: Path) -> None:
    files = resolve_corpus(str(corpus_dir))
    assert [p.relative_to(corpus_dir).as_posix() for p in files] == [
        "a.md", "b.txt", "bad.txt", "empty.py", "sub/c.jsonl", "sub/d.parquet",
    ]  # fmt: skip
    stats = CorpusStats()
    texts = [d.text for d in iter_documents(files, stats)]
    assert texts == ["# alpha\n", "beta text\n", "caf\ufffd au lait", "one", "two", "p1", "p3"]
    assert stats.files == 6
    assert stats.documents == 7
    assert stats.empty_skipped == 3  # empty.py, the "" jsonl record, the null parquet row
    assert stats.unparseable_skipped == 2
    assert stats.invalid_utf8_replaced == 1


def test_text_field_is_configurable(tmp_path: Path) -> None:
    (tmp_path / "x.jsonl").write_text(json.dumps({"body": "hello"}) + "\n")
    stats = CorpusStats()
    assert [d.text for d in iter_documents([tmp_path / "x.jsonl"], stats, "body")] == ["hello"]
    pq.write_table(pa.table({"body": ["row"]}), tmp_path / "y.parquet")
    with pytest.raises(CorpusError, match="no column 'text'"):
        list(iter_documents([tmp_path / "y.parquet"], CorpusStats()))


def test_parquet_files_are_checked_before_reading_and_damage_is_a_corpus_error(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_text("fine")
    pq.write_table(pa.table({"body": ["row"]}), tmp_path / "late.parquet")
    with pytest.raises(CorpusError, match="late.parquet"):  # before any document is read
        check_parquet_columns([tmp_path / "a.txt", tmp_path / "late.parquet"], "text")
    check_parquet_columns([tmp_path / "a.txt", tmp_path / "late.parquet"], "body")

    texts = [f"document {i} " * 20 for i in range(3000)]
    damaged = write_damaged_parquet(tmp_path / "damaged.parquet", texts, rows_per_group=1000)
    check_parquet_columns([damaged], "text")  # the footer is intact
    read = []
    with pytest.raises(CorpusError, match="cannot read parquet file, .*damaged.parquet, after row"):
        read.extend(iter_documents([damaged], CorpusStats()))
    assert 0 < len(read) < 3000


def test_glob_and_single_file_specs(corpus_dir: Path) -> None:
    assert [p.name for p in resolve_corpus(str(corpus_dir / "*.txt"))] == ["b.txt", "bad.txt"]
    assert resolve_corpus(str(corpus_dir / "a.md")) == [corpus_dir / "a.md"]
    with pytest.raises(CorpusError, match="unsupported type"):
        resolve_corpus(str(corpus_dir / "ignored.bin"))
    with pytest.raises(CorpusError, match="matches no files"):
        resolve_corpus(str(corpus_dir / "nothing-*.txt"))


def test_stdlib_excludes_tests_and_is_sorted() -> None:
    files = stdlib_files()
    assert len(files) > 100
    assert not any({"test", "tests", "idle_test"} & set(p.parts[:-1]) for p in files)
    assert not any(p.name.startswith("test_") for p in files)
    assert any(p.parent.name == "json" for p in files)
    assert resolve_corpus("stdlib") == files


def test_fingerprint_changes_with_the_file_list(corpus_dir: Path) -> None:
    files = resolve_corpus(str(corpus_dir))
    before = corpus_fingerprint(str(corpus_dir), files)
    assert before == corpus_fingerprint(str(corpus_dir), files)
    (corpus_dir / "b.txt").write_text("beta text, now longer\n")
    assert corpus_fingerprint(str(corpus_dir), files) != before


def test_eval_split_is_deterministic_and_near_the_fraction() -> None:
    texts = [f"document number {i}" for i in range(4000)]
    chosen = [t for t in texts if is_eval_document(t, 0.1)]
    assert chosen == [t for t in texts if is_eval_document(t, 0.1)]
    assert 300 < len(chosen) < 500
    assert not any(is_eval_document(t, 0.0) for t in texts)
