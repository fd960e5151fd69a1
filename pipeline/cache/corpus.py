"""Corpus specs → documents: plain text, chat records or prompt/completion records.

A spec is a directory, a file, a glob of ``.txt/.md/.py/.jsonl/.parquet`` files, ``stdlib`` (the
running Python's standard-library sources, tests excluded) or ``stdlib-chat`` (prompt/completion
records made from those sources, see ``stdlib_chat``). Files are read in sorted order so every
run, on every rank, sees the same documents in the same order.

A ``.jsonl`` line or ``.parquet`` row is a chat record when it has ``messages`` (a list of
``{"role", "content"}``), a prompt/completion record when it has string ``prompt`` and
``completion``, and a text record otherwise (the text field, ``text`` by default); a
``.txt/.md/.py`` file is one text document. A corpus holds one kind: the first record decides,
and a record of another kind is a ``CorpusError`` naming its ``file:line``. A Hugging Face dataset
is one entry that reads its own rows (``hf_corpus.DatasetCorpus``, its ``documents``).
"""

from __future__ import annotations

import glob
import hashlib
import json
import sys
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kdcache.pipeline.cache.stdlib_chat import (
    MIN_DOCSTRING_CHARS,
    RECORDS_VERSION,
    STDLIB_CHAT,
    StdlibChatFile,
    stdlib_files,
    stdlib_records,
    stdlib_root,
)

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl", ".parquet")
STDLIB = "stdlib"
BUILTIN_SPECS = (STDLIB, STDLIB_CHAT)
KINDS = ("text", "chat", "prompt")
ROLES = ("system", "user", "assistant", "tool")


class CorpusError(ValueError):
    """A corpus that cannot be read (matches nothing, bad file, missing field, mixed kinds)."""


@dataclass
class CorpusStats:
    """What reading, tokenizing and packing a corpus skipped, split or repaired; reported in the
    final summary."""

    files: int = 0
    documents: int = 0
    empty_skipped: int = 0
    invalid_utf8_replaced: int = 0  # documents in which bad bytes were replaced
    unparseable_skipped: int = 0  # records that are not JSON objects with usable fields
    eval_documents: int = 0
    kind: str | None = None  # the corpus' kind once its first record is read
    split_examples: int = 0  # text documents longer than seq_len cut into pieces (separate)
    skipped_too_long: int = 0  # chat/prompt examples (or prompts) longer than seq_len
    skipped_nothing_to_train: int = 0  # examples without assistant content / with no completion
    untrained_sequences_dropped: int = 0  # packed sequences without one trained position
    by_file: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        extra = [
            f"{n} {what}"
            for n, what in (
                (self.split_examples, "split into pieces"),
                (self.skipped_too_long, "skipped as longer than the sequence length"),
                (self.skipped_nothing_to_train, "skipped with nothing to train"),
                (self.untrained_sequences_dropped, "sequences without a trained position dropped"),
            )
            if n
        ]
        return (
            f"{self.documents} documents from {self.files} files "
            f"({self.empty_skipped} empty skipped, {self.invalid_utf8_replaced} with invalid "
            f"UTF-8 repaired, {self.unparseable_skipped} unparseable skipped"
            + "".join(f", {e}" for e in extra)
            + ")"
        )


@dataclass(frozen=True)
class Document:
    """One document or example of the corpus.

    Attributes:
        text: the text of a text document; for a chat or prompt/completion record, its JSON
            (what the eval split hashes).
        source: ``path`` or ``path:line`` / ``path:row``, for error messages.
        kind: ``text``, ``chat`` or ``prompt``.
        record: the ``[{"role", "content"}, ...]`` messages of a chat record, the
            ``(prompt, completion)`` of a prompt/completion record, ``None`` for text.
    """

    text: str
    source: str
    kind: str = "text"
    record: Any = None


def resolve_corpus(spec: str) -> list[Path]:
    """Expand a corpus spec into a sorted list of files (``StdlibChatFile`` for ``stdlib-chat``).

    Raises:
        CorpusError: when the spec matches no readable file of a known kind.
    """
    if spec == STDLIB:
        files = stdlib_files()
    elif spec == STDLIB_CHAT:
        files = [StdlibChatFile(p) for p in stdlib_files()]
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
            f"{'/'.join(SUFFIXES)} files, `stdlib` or `stdlib-chat`"
        )
    return files


def corpus_fingerprint(spec: str, files: list[Path]) -> str:
    """sha256 over the file list (names and sizes): changes when files are added, removed or
    resized; for the built-in specs, also with the Python version (and the record builder's)."""
    digest = hashlib.sha256()
    if spec in BUILTIN_SPECS:
        digest.update(f"python {sys.version_info[:3]}\n".encode())
        if spec == STDLIB_CHAT:
            digest.update(f"{STDLIB_CHAT} v{RECORDS_VERSION} {MIN_DOCSTRING_CHARS}\n".encode())
        names = [p.relative_to(stdlib_root()).as_posix() for p in files]
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


def _messages(value: Any, source: str) -> list[dict[str, str]] | None:
    """The ``{"role", "content"}`` messages of a chat record (other keys dropped), or ``None``
    when it is not a list of such dicts with string roles and contents.

    Raises:
        CorpusError: a message has a role kdcache does not know.
    """
    if not isinstance(value, list):
        return None
    messages = []
    for message in value:
        if not isinstance(message, dict):
            return None
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            return None
        if role not in ROLES:
            raise CorpusError(
                f"unknown chat role {role!r}, {source}, use {', '.join(ROLES[:-1])} or "
                f"{ROLES[-1]} (when the chat template has it)"
            )
        messages.append({"role": role, "content": content})
    return messages


def record_document(record: Any, text_field: str, source: str) -> Document | None:
    """The document of one ``.jsonl`` / ``.parquet`` record, or ``None`` when it has no usable
    fields: ``messages`` makes a chat record, ``prompt`` + ``completion`` a prompt/completion
    record, the text field a text record."""
    if not isinstance(record, dict):
        return None
    if record.get("messages") is not None:
        messages = _messages(record["messages"], source)
        if messages is None:
            return None
        return Document(_json(messages), source, "chat", messages)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if not isinstance(prompt, str) or not isinstance(completion, str):
            return None
        return Document(_json([prompt, completion]), source, "prompt", (prompt, completion))
    text = record.get(text_field)
    return Document(text, source) if isinstance(text, str) else None


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


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
            document = record_document(record, text_field, f"{path}:{line_number}")
            if document is None:
                stats.unparseable_skipped += 1
                continue
            if "\ufffd" in document.text and b"\xef\xbf\xbd" not in raw:
                stats.invalid_utf8_replaced += 1
            yield document


def parquet_columns(names: list[str], text_field: str) -> list[str] | None:
    """The columns a parquet file's records are read from: ``messages``, ``prompt`` and
    ``completion``, or the text field; ``None`` when it has none of them."""
    if "messages" in names:
        return ["messages"]
    if "prompt" in names and "completion" in names:
        return ["prompt", "completion"]
    return [text_field] if text_field in names else None


def _open_parquet(path: Path, text_field: str) -> tuple[Any, list[str]]:
    """The file's ``pyarrow.parquet.ParquetFile`` (footer only) and the columns to read."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CorpusError(f"cannot read parquet file, {path}, ({e})") from e
    columns = parquet_columns(parquet.schema_arrow.names, text_field)
    if columns is None:
        raise CorpusError(
            f"parquet file has no column {text_field!r} (nor messages, nor prompt and "
            f"completion), {path}, choose one of {parquet.schema_arrow.names} with --text-field"
        )
    return parquet, columns


def check_parquet_columns(files: list[Path], text_field: str) -> None:
    """Every ``.parquet`` file opens and has the columns of some kind of record: checked before
    anything runs, so a bad file late in the corpus does not stop a long run halfway."""
    for path in files:
        if path.suffix == ".parquet":
            _open_parquet(path, text_field)


def _read_parquet(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    import pyarrow as pa

    parquet, columns = _open_parquet(path, text_field)
    row = 0
    try:
        for batch in parquet.iter_batches(columns=columns, batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                if columns == ["messages"] and record["messages"] is None:
                    record = {"messages": []}  # a null row is an empty document
                elif columns == [text_field] and not isinstance(record[text_field], str):
                    record = {text_field: ""}
                document = record_document(record, text_field, f"{path}:{row}")
                if document is None:
                    stats.unparseable_skipped += 1
                    continue
                yield document
    except (OSError, pa.ArrowException) as e:  # a damaged data page
        raise CorpusError(f"cannot read parquet file, {path}, after row {row} ({e})") from e


def _read_stdlib_chat(path: Path, stats: CorpusStats) -> Iterator[Document]:
    """The prompt/completion records of one standard-library source (``stdlib-chat``)."""
    try:
        records = list(stdlib_records(path))
    except (SyntaxError, ValueError):  # a source this Python cannot parse
        stats.unparseable_skipped += 1
        return
    for line, prompt, completion in records:
        yield Document(
            _json([prompt, completion]), f"{path}:{line}", "prompt", (prompt, completion)
        )


def _file_documents(path: Path, text_field: str, stats: CorpusStats) -> Iterator[Document]:
    if hasattr(path, "documents"):  # a dataset, hf_corpus.DatasetCorpus
        return path.documents(stats)
    if isinstance(path, StdlibChatFile):
        return _read_stdlib_chat(path, stats)
    if path.suffix == ".jsonl":
        return _read_jsonl(path, text_field, stats)
    if path.suffix == ".parquet":
        return _read_parquet(path, text_field, stats)
    return iter([Document(_decode(path.read_bytes(), stats), str(path))])


def is_empty(document: Document) -> bool:
    """A text without visible characters, a chat without messages, an empty prompt and
    completion."""
    if document.kind == "chat":
        return not any(m["content"].strip() for m in document.record)
    if document.kind == "prompt":
        return not "".join(document.record).strip()
    return not document.text.strip()


def _check_kind(document: Document, first: Document | None) -> None:
    if first is not None and document.kind != first.kind:
        raise CorpusError(
            f"the corpus mixes kinds of records, {document.source} is a {document.kind} record "
            f"but {first.source} is a {first.kind} record, give one kind (text, chat or "
            "prompt/completion) per corpus"
        )


def iter_documents(
    files: list[Path], stats: CorpusStats, text_field: str = "text"
) -> Iterator[Document]:
    """Yield the non-empty documents of ``files`` in order, counting what was skipped or repaired.

    A ``.txt/.md/.py`` file is one document; a ``.jsonl`` line or ``.parquet`` row is one.

    Raises:
        CorpusError: a record of another kind than the first (named by ``file:line``), an
            unknown chat role, a damaged parquet file.
    """
    first: Document | None = None
    for path in files:
        stats.files += getattr(path, "num_files", 1)
        for document in _file_documents(path, text_field, stats):
            _check_kind(document, first)
            if first is None:
                first, stats.kind = document, document.kind
            if is_empty(document):
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            yield document


def _first_document(path: Path, text_field: str) -> Document | None:
    """The first record of ``path`` (a placeholder for text files and parquet files, whose
    kind their suffix and columns tell without reading a row)."""
    if isinstance(path, StdlibChatFile):
        return Document("", str(path), "prompt")
    if path.suffix == ".parquet":
        columns = _open_parquet(path, text_field)[1]
        kind = {"messages": "chat", "prompt": "prompt"}.get(columns[0], "text")
        return Document("", f"{path}:1", kind)
    if path.suffix != ".jsonl":
        return Document("", str(path))
    with closing(_read_jsonl(path, text_field, CorpusStats())) as records:
        return next(records, None)


def corpus_kind(files: list[Path], text_field: str = "text") -> str:
    """``text``, ``chat`` or ``prompt``: the kind of the corpus' first record. Reads only the first
    record of each file (none of a text or parquet file), so a corpus mixing kinds across files
    is refused here; a mix inside a file is found while reading (``iter_documents``).

    Raises:
        CorpusError: two files start with different kinds of records; a bad parquet file.
    """
    first: Document | None = None
    for path in files:
        document = _first_document(path, text_field)
        if document is not None:
            _check_kind(document, first)
            first = first or document
    return first.kind if first is not None else "text"


def is_eval_document(text: str, eval_fraction: float) -> bool:
    """Deterministic split by content hash: the same document lands in the same split everywhere."""
    if eval_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < eval_fraction
