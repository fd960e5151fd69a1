"""Chat and prompt/completion corpora: kinds of records, one kind per corpus, bad records, and the
built-in stdlib-chat corpus."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kdcache.pipeline.cache.corpus import (
    CorpusError,
    CorpusStats,
    corpus_fingerprint,
    corpus_kind,
    is_eval_document,
    iter_documents,
    resolve_corpus,
    stdlib_files,
)
from kdcache.pipeline.cache.stdlib_chat import (
    MIN_DOCSTRING_CHARS,
    STDLIB_CHAT,
    StdlibChatFile,
    signature_records,
)

HELLO = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]


def write_jsonl(path: Path, records: list[object]) -> Path:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return path


def read(files: list[Path], stats: CorpusStats | None = None) -> list:
    return list(iter_documents(files, stats or CorpusStats()))


def test_jsonl_records_of_each_kind(tmp_path: Path) -> None:
    chat = write_jsonl(tmp_path / "chat.jsonl", [
        {"messages": [*HELLO, {"role": "user", "content": "Bye", "name": "x"}], "id": 1},
        "not json {",
        {"messages": [{"role": "user", "content": None}]},  # tool calls without content
        {"messages": "not a list"},
        {"messages": []},
        {"messages": [{"role": "system", "content": "  "}]},
    ])  # fmt: skip
    stats = CorpusStats()
    [document] = read([chat], stats)
    assert (document.kind, document.source) == ("chat", f"{chat}:1")
    assert document.record == [*HELLO, {"role": "user", "content": "Bye"}]  # other keys dropped
    assert json.loads(document.text) == document.record  # what the eval split hashes
    assert (stats.unparseable_skipped, stats.empty_skipped, stats.documents) == (3, 2, 1)
    assert stats.kind == "chat" and corpus_kind([chat]) == "chat"

    prompts = write_jsonl(tmp_path / "p.jsonl", [
        {"prompt": "2 + 2 =", "completion": " 4", "extra": 1},
        {"prompt": "no completion"},
        {"prompt": "x", "completion": 3},
    ])  # fmt: skip
    stats = CorpusStats()
    [document] = read([prompts], stats)
    assert (document.kind, document.record) == ("prompt", ("2 + 2 =", " 4"))
    assert stats.unparseable_skipped == 2 and corpus_kind([prompts]) == "prompt"


def test_parquet_records_of_each_kind(tmp_path: Path) -> None:
    pq.write_table(pa.table({"messages": [HELLO, None], "n": [1, 2]}), tmp_path / "c.parquet")
    pq.write_table(
        pa.table({"prompt": ["a", "b"], "completion": ["1", None]}), tmp_path / "p.parquet"
    )
    stats = CorpusStats()
    [chat] = read([tmp_path / "c.parquet"], stats)
    assert (chat.kind, chat.record, chat.source) == ("chat", HELLO, f"{tmp_path / 'c.parquet'}:1")
    assert stats.empty_skipped == 1
    stats = CorpusStats()
    [prompt] = read([tmp_path / "p.parquet"], stats)
    assert prompt.record == ("a", "1") and stats.unparseable_skipped == 1
    assert corpus_kind([tmp_path / "c.parquet"]) == "chat"
    assert corpus_kind([tmp_path / "p.parquet"]) == "prompt"
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "none.parquet")
    with pytest.raises(CorpusError, match="no column 'text' \\(nor messages"):
        corpus_kind([tmp_path / "none.parquet"])


def test_a_corpus_mixing_kinds_is_refused_naming_the_first_conflicting_record(
    tmp_path: Path,
) -> None:
    (tmp_path / "a.txt").write_text("plain text")
    chat = write_jsonl(tmp_path / "b.jsonl", [{"messages": HELLO}])
    with pytest.raises(CorpusError, match=f"{chat}:1 is a chat record but .*a.txt is a text"):
        corpus_kind(resolve_corpus(str(tmp_path)))
    read_so_far: list = []
    with pytest.raises(CorpusError) as error:
        read_so_far.extend(iter_documents(resolve_corpus(str(tmp_path)), CorpusStats()))
    assert f"{chat}:1" in str(error.value) and "\n" not in str(error.value)
    assert [d.kind for d in read_so_far] == ["text"]

    within = write_jsonl(tmp_path / "within.jsonl", [
        {"prompt": "p", "completion": "c"}, {"text": "x"}, {"messages": HELLO},
    ])  # fmt: skip
    assert corpus_kind([within]) == "prompt"  # the first record decides ...
    with pytest.raises(
        CorpusError, match=f"{within}:2 is a text record but {within}:1 is a prompt"
    ):
        read([within])  # ... and reading finds the second kind


def test_an_unknown_role_is_an_error_naming_the_record_and_the_role(tmp_path: Path) -> None:
    bad = write_jsonl(tmp_path / "r.jsonl", [
        {"messages": HELLO}, {"messages": [{"role": "narrator", "content": "Once"}]},
    ])  # fmt: skip
    with pytest.raises(CorpusError) as error:
        read([bad])
    assert f"{bad}:2" in str(error.value) and "'narrator'" in str(error.value)
    assert "\n" not in str(error.value)


def test_signature_records_of_a_source() -> None:
    source = '''
def public(a, *rest, key: int = 1) -> str:
    """Join the things given,
    one after the other."""

async def fetch(url):
    """Fetch the page at url, politely."""

def _private():
    """A private helper with a docstring."""

def undocumented():
    pass

def terse():
    """Short."""

class Thing:
    """A thing."""

    def method(self, x):
        """Do the thing with x, carefully."""

    def _hidden(self):
        """Hidden method with a docstring."""

class _Private:
    def method(self):
        """Method of a private class."""
'''
    records = list(signature_records(source, "pkg.mod"))
    assert records == [
        (2, "# pkg.mod\ndef public(a, *rest, key: int=1) -> str:", "Join the things given,\none after the other."),
        (6, "# pkg.mod\nasync def fetch(url):", "Fetch the page at url, politely."),
        (21, "# pkg.mod.Thing\ndef method(self, x):", "Do the thing with x, carefully."),
    ]  # fmt: skip
    assert all(len(completion) >= MIN_DOCSTRING_CHARS for _, _, completion in records)


def test_stdlib_chat_reads_the_stdlib_as_prompt_completion_records() -> None:
    files = resolve_corpus(STDLIB_CHAT)
    assert all(isinstance(p, StdlibChatFile) for p in files)
    assert [Path(p) for p in files] == stdlib_files()  # the same files, tests excluded
    assert corpus_kind(files) == "prompt"
    json_files = [p for p in files if p.parent.name == "json"]
    stats = CorpusStats()
    documents = read(json_files, stats)
    assert len(documents) > 10 and stats.documents == len(documents)
    assert all(d.kind == "prompt" for d in documents)
    prompt, completion = next(d.record for d in documents if "def dumps(" in d.record[0])
    assert prompt.startswith("# json\ndef dumps(obj, *, skipkeys=False")
    assert prompt.endswith("):") and completion.startswith("Serialize ``obj`` to a JSON formatted")
    decoder = [d for d in documents if d.record[0].startswith("# json.decoder.JSONDecoder\n")]
    assert [d.record[0].split("\n")[1][:10] for d in decoder] == ["def decode", "def raw_de"]
    assert read(json_files) == documents  # deterministic
    assert len({is_eval_document(d.text, 0.5) for d in documents}) == 2


def test_stdlib_chat_has_its_own_fingerprint() -> None:
    chat = corpus_fingerprint(STDLIB_CHAT, resolve_corpus(STDLIB_CHAT))
    assert chat == corpus_fingerprint(STDLIB_CHAT, resolve_corpus(STDLIB_CHAT))
    assert chat != corpus_fingerprint("stdlib", resolve_corpus("stdlib"))
