"""Corpus specs → documents.

A spec is a directory, a file, a glob of ``.txt/.md/.py/.jsonl/.parquet`` files, or ``stdlib``
(the running Python's standard-library sources, tests excluded). Files are read in sorted order
so every run, on every rank, sees the same documents in the same order.
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
STDLIB = "stdlib"
_STDLIB_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"}


class CorpusError(ValueError):
    """A corpus spec that cannot be read (matches nothing, bad file, missing text field)."""


@dataclass
class CorpusStats:
    """What reading a corpus skipped or repaired; reported in the final summary."""

    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0  # documents in which bad bytes were replaced
    unparseable_skipped: int = 0  # jsonl lines that are not JSON objects with the text field
    eval_documents: int = 0
    by_file: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"{self.documents} documents from {self.files} files "
            f"({self.empty_skipped} empty skipped, {self.invalid_utf8_replaced} with invalid "
            f"UTF-8 repaired, {self.unparseable_skipped} unparseable skipped)"
        )


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # "path" or "path:line" / "path:row", for error messages


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``.py`` sources, tests excluded, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not (_STDLIB_SKIP_DIRS & set(p.relative_to(root).parts[:-1]))
        and not p.name.startswith("test_")
    ]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def resolve_corpus(spec: str) -> list[Path]:
    """Expand a corpus spec into a sorted list of files.

    Raises:
        CorpusError: when the spec matches no readable file of a known kind.
    """
    if spec == STDLIB:
        files = stdlib_files()
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        elif path.is_file():
            if path.suffix not in SUFFIXES:
                raise CorpusError(
                    f"corpus file has an unsupported type, {spec}, use one of {', '.join(SUFFIXES)}"
                )
            files = [path]
        else:
            matches = sorted(glob.glob(str(path), recursive=True))
            files = [Path(m) for m in matches if Path(m).is_file() and Path(m).suffix in SUFFIXES]
    if not files:
        raise CorpusError(
            f"corpus matches no files, {spec}, give a directory, file or glob of "
            f"{'/'.join(SUFFIXES)} files, or `stdlib`"
        )
    return files


def corpus_fingerprint(spec: str, files: list[Path]) -> str:
    """sha256 over the file list (names and sizes): changes when files are added, removed or resized."""
    digest = hashlib.sha256()
    if spec == STDLIB:
        digest.update(f"python {sys.version_info[:3]}\n".encode())
        root = Path(sysconfig.get_paths()["stdlib"])
        names = [p.relative_to(root).as_posix() for p in files]
    else:
        names = [p.as_posix() for p in files]
    for name, path in zip(names, files, strict=True):
        digest.update(f"{name}\0{path.stat().st_size}\n".encode())
    return digest.hexdigest()


def _decode(data: bytes, stats: CorpusStats) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        stats.invalid_utf8_replaced += 1
        return data.decode("utf-8", errors="replace")


def _read_jsonl(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    with path.open("rb") as f:
        for line_number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw.decode("utf-8", errors="replace"))
            except json.JSONDecodeError:
                stats.unparseable_skipped += 1
                continue
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                stats.unparseable_skipped += 1
                continue
            if "\ufffd" in text and b"\xef\xbf\xbd" not in raw:
                stats.invalid_utf8_replaced += 1
            yield Document(text, f"{path}:{line_number}")


def _open_parquet(path: Path, text_field: str) -> Any:
    """The file's ``pyarrow.parquet.ParquetFile`` (footer only), checked to hold ``text_field``."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CorpusError(f"cannot read parquet file, {path}, ({e})") from e
    if text_field not in parquet.schema_arrow.names:
        raise CorpusError(
            f"parquet file has no column {text_field!r}, {path}, "
            f"choose one of {parquet.schema_arrow.names} with --text-field"
        )
    return parquet


def check_parquet_columns(files: list[Path], text_field: str) -> None:
    """Every ``.parquet`` file opens and has the text column: checked before anything runs, so a
    bad file late in the corpus does not stop a long run halfway."""
    for path in files:
        if path.suffix == ".parquet":
            _open_parquet(path, text_field)


def _read_parquet(path: Path, text_field: str) -> Iterator[Document]:
    import pyarrow as pa

    parquet = _open_parquet(path, text_field)
    row = 0
    try:
        for batch in parquet.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                row += 1
                yield Document(text if isinstance(text, str) else "", f"{path}:{row}")
    except (OSError, pa.ArrowException) as e:  # a damaged data page
        raise CorpusError(f"cannot read parquet file, {path}, after row {row} ({e})") from e


def iter_documents(
    files: list[Path], stats: CorpusStats, text_field: str = "text"
) -> Iterator[Document]:
    """Yield the non-empty documents of ``files`` in order, counting what was skipped or repaired.

    A ``.txt/.md/.py`` file is one document; a ``.jsonl`` line or ``.parquet`` row is one.
    """
    for path in files:
        stats.files += 1
        if path.suffix == ".jsonl":
            documents: Iterator[Document] = _read_jsonl(path, text_field, stats)
        elif path.suffix == ".parquet":
            documents = _read_parquet(path, text_field)
        else:
            documents = iter([Document(_decode(path.read_bytes(), stats), str(path))])
        for document in documents:
            if not document.text.strip():
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield document


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Deterministic split by content hash: the same document lands in the same split everywhere."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction
