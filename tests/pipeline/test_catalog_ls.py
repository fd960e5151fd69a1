"""`kdcache ls ROOT`: the catalog of stores under a directory or an fsspec URL — finished,
unfinished, masked and damaged stores at several depths, the table and the JSON, bad input."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pytest
from conftest import needed, write_synthetic_store
from conftest import run_cli as run

from kdcache.pipeline.catalog import catalog, find_stores
from kdcache.storage import create_store, make_manifest, open_store
from kdcache.storage._fs import StoreFS

pytestmark = pytest.mark.floors

TEACHER = "/models/some/long/path/to/the-teacher-Qwen2.5-0.5B-Instruct"


def masked_store(url: str) -> None:
    """A chat-like store: loss mask, top-4 targets at the trained half of each sequence."""
    rng = np.random.default_rng(1)
    manifest = make_manifest(
        backend="arrow",
        teacher={"name_or_path": TEACHER, "dtype": "bfloat16"},
        tokenizer={"sha256": "c0ffee" + "0" * 58, "size": 90},
        vocab_size=100,
        top_k=4,
        seq_len=16,
        corpus={"spec": "stdlib-chat"},
        shard_tokens=32,
        loss_mask=True,
    )
    with create_store(url, manifest) as writer:
        for _ in range(4):
            mask = np.arange(16) >= 8  # (16,) the reply's positions
            logits = rng.normal(size=(int(mask.sum()), 100))  # (T, V)
            lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            ids = np.argsort(-lp, axis=1)[:, :4]  # (T, 4)
            top = np.take_along_axis(lp, ids, 1)
            rest = np.exp(lp).sum(1) - np.exp(top).sum(1)
            writer.append(
                "train",
                rng.integers(0, 90, 16),
                ids,
                top,
                topk_tail_logprob=np.log(rest),
                loss_mask=mask,
            )


def finish(url: str) -> None:
    create_store(url, open_store(url).manifest).mark_finished({"tokens": 1})


def unfinish(url: str) -> None:
    """As a killed or still running cache-teacher leaves a store: no ``finished`` fact."""
    fs = StoreFS(url)
    manifest = json.loads(fs.read("manifest.json"))
    for fact in ("finished", "stats"):
        manifest.pop(fact, None)
    fs.write_atomic("manifest.json", json.dumps(manifest).encode())


def build_tree(root: str) -> dict[str, str]:
    """Stores at several depths under ``root`` (a path or URL); returns {relative path: kind}."""
    at = {
        "done": f"{root}/done",
        "runs/wip": f"{root}/runs/wip",
        "team/a/chat": f"{root}/team/a/chat",
        "team/broken": f"{root}/team/broken",
        "team/a/b/c/too-deep": f"{root}/team/a/b/c/too-deep",
    }
    write_synthetic_store(at["done"], lengths={"train": [[8, 8]], "eval": [[8]]})
    finish(at["done"])
    write_synthetic_store(
        at["runs/wip"], lengths={"train": [[6, 6, 6]]}, targets="sampled", samples=16
    )
    unfinish(at["runs/wip"])
    masked_store(at["team/a/chat"])
    finish(at["team/a/chat"])
    write_synthetic_store(at["team/a/b/c/too-deep"], lengths={"train": [[4]]})
    fs = StoreFS(root)
    fs.write_atomic("team/broken/manifest.json", b'{"format_version": 3, "backend": "za')
    fs.write_atomic("other/manifest.json", b'{"name": "a web app manifest"}')  # not ours
    fs.write_atomic("notes/readme.txt", b"no store here")
    return at


@pytest.fixture(params=["local", "memory"])
def root(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "local":
        yield str(tmp_path / "stores")
        return
    name = f"catalog-{uuid.uuid4().hex[:8]}"
    yield f"memory://{name}"
    fsspec.filesystem("memory").rm(f"/{name}", recursive=True)  # the memory fs is process-wide


def test_lists_every_store_to_three_levels_with_the_facts(
    root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build_tree(root)
    code, out, err = run(["ls", root, "--json"], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in json.loads(out)}
    # too-deep sits 5 levels down; other/ holds some other tool's manifest.json
    assert sorted(rows) == ["done", "runs/wip", "team/a/chat", "team/broken"]

    done = rows["done"]
    assert done["damaged"] is False and done["problem"] is None
    assert done["teacher"] == "synthetic" and done["targets"] == "topk"
    assert (done["top_k"], done["samples"], done["loss_mask"]) == (8, 0, False)
    assert (done["tokens"], done["sequences"], done["shards"]) == (24, 3, 2)
    assert done["finished"] is True and done["trained_positions"] is None
    assert done["bytes"] == open_store(f"{root}/done").nbytes > 0
    assert done["url"] == f"{root}/done" and done["created_at"].endswith("Z")

    wip = rows["runs/wip"]
    assert wip["finished"] is False and wip["targets"] == "sampled" and wip["samples"] == 16
    assert wip["top_k"] == 0 and wip["tokens"] == 18

    chat = rows["team/a/chat"]
    assert chat["teacher"] == TEACHER and chat["tokenizer_sha256"] == "c0ffee" + "0" * 58
    assert chat["loss_mask"] is True and chat["tokens"] == 64 and chat["trained_positions"] == 32
    assert chat["backend"] == "arrow" and chat["finished"] is True

    broken = rows["team/broken"]
    assert broken["damaged"] is True and "manifest.json" in broken["problem"]
    assert "teacher" not in broken

    code, out, _ = run(["ls", root, "--depth", "5", "--json"], capsys)
    assert "team/a/b/c/too-deep" in {r["path"] for r in json.loads(out)}


def test_the_table_shows_one_aligned_line_per_store(
    root: str, capsys: pytest.CaptureFixture[str]
) -> None:
    build_tree(root)
    code, out, err = run(["ls", root], capsys)
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["path", "teacher", "tokenizer", "targets"]
    assert [line.split()[0] for line in lines[1:]] == [
        "done",
        "runs/wip",
        "team/a/chat",
        "team/broken",
    ]
    by_path = {line.split()[0]: line for line in lines[1:]}
    cells = by_path["team/a/chat"].split()
    # the long teacher path keeps its end; the tokenizer hash is cut to 12 hex digits
    assert cells[1].startswith("...") and cells[1].endswith("the-teacher-Qwen2.5-0.5B-Instruct")
    assert cells[2] == "c0ffee000000" and cells[3:5] == ["topk", "k=4"]
    assert cells[5:7] == ["yes", "64"] and cells[9] == "yes"  # mask, tokens, (bytes), finished
    assert by_path["runs/wip"].split()[3:5] == ["sampled", "n=16"]
    wip = by_path["runs/wip"].split()
    assert wip[5:7] == ["no", "18"] and wip[9] == "no"
    assert by_path["team/broken"].split()[1] == "DAMAGED:"
    assert "manifest is not valid JSON" in by_path["team/broken"]
    # columns line up with the header: left-aligned cells start, numbers end, where it says
    header = [(m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)*", lines[0])]
    assert len(header) == 9
    for line in lines[1:4]:
        cells = [(m.start(), m.end()) for m in re.finditer(r"\S+(?: \S+)*", line)]
        assert [c[0] for c in cells[:5]] == [h[0] for h in header[:5]]
        assert [c[1] for c in cells[5:7]] == [h[1] for h in header[5:7]]  # tokens, bytes
        assert [c[0] for c in cells[7:]] == [h[0] for h in header[7:]]


def test_root_that_is_itself_a_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = write_synthetic_store(str(tmp_path / "s"), lengths={"train": [[5]]})
    code, out, _ = run(["ls", store, "--json"], capsys)
    assert code == 0 and [r["path"] for r in json.loads(out)] == ["."]


def test_a_store_with_a_damaged_commit_record_is_listed_as_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_synthetic_store(str(tmp_path / "good"), lengths={"train": [[5]]})
    bad = write_synthetic_store(str(tmp_path / "bad"), lengths={"train": [[5], [5]]})
    record = open_store(bad).shards[0]
    (Path(bad) / "shards" / f"{record.name}.json").write_text("{not json")
    entries = catalog(str(tmp_path))
    assert [(e.path, e.problem is None) for e in entries] == [("bad", False), ("good", True)]
    assert "kdcache verify" in (entries[0].problem or "") and entries[1].facts["tokens"] == 5
    code, out, _ = run(["ls", str(tmp_path)], capsys)
    assert code == 0 and re.search(r"^bad +DAMAGED: .*kdcache verify", out, re.M)


def test_a_folder_that_cannot_be_listed_is_a_row_and_root_an_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_synthetic_store(str(tmp_path / "ok"), lengths={"train": [[5]]})
    (tmp_path / "locked").mkdir()
    real_ls = fsspec.implementations.local.LocalFileSystem.ls
    locked = {str(tmp_path / "locked")}

    def ls(self: Any, path: str, detail: bool = False, **kw: Any) -> Any:
        if path.rstrip("/") in locked:  # what a folder without read permission does
            raise PermissionError(13, "Permission denied", path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "ls", ls)
    code, out, _ = run(["ls", str(tmp_path), "--json"], capsys)
    rows = {r["path"]: r for r in json.loads(out)}
    assert code == 0 and sorted(rows) == ["locked", "ok"]
    assert rows["locked"]["damaged"] is False
    assert rows["locked"]["problem"].startswith(
        "cannot list the folder (PermissionError: [Errno 13]"
    )
    code, out, _ = run(["ls", str(tmp_path)], capsys)
    assert re.search(r"^locked +UNREADABLE: cannot list the folder", out, re.M)
    locked.add(str(tmp_path))
    code, out, err = run(["ls", str(tmp_path)], capsys)
    assert (
        code == 2
        and out == ""
        and err.startswith(f"Error: cannot list {tmp_path}, PermissionError: [Errno 13]")
    )


def test_shards_folders_are_not_searched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_synthetic_store(str(tmp_path / "s"), lengths={"train": [[4], [4], [4]]})
    listed: list[str] = []
    real_ls = fsspec.implementations.local.LocalFileSystem.ls

    def spy(self: Any, path: str, detail: bool = False, **kw: Any) -> Any:
        listed.append(path)
        return real_ls(self, path, detail=detail, **kw)

    monkeypatch.setattr(fsspec.implementations.local.LocalFileSystem, "ls", spy)
    found, unreadable = find_stores(StoreFS(str(tmp_path)), depth=3)
    assert found == ["s"] and unreadable == []
    assert listed and not [p for p in listed if "/shards" in p or "/tokenizer" in p]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["{root}/nope"], "no such directory, {root}/nope"),
        (["{root}/file.txt"], "not a directory, {root}/file.txt"),
        (["{root}/empty"], "no logit store under {root}/empty (searched 3 levels deep)"),
        (["nosuchproto://bucket/x"], "unknown storage protocol, nosuchproto://bucket/x"),
        (["{root}", "--storage-options", "[1]"], "'--storage-options': not a JSON object"),
        (["{root}", "--storage-options", "{bad"], "'--storage-options': not valid JSON"),
        (["{root}", "--depth", "-1"], "Invalid value for '--depth'"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "empty" / "deeper").mkdir(parents=True)
    argv = [a.replace("{root}", str(tmp_path)) for a in args]
    code, out, err = run(["ls", *argv], capsys)
    assert code == 2 and out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert message.format(root=tmp_path) in err


def test_an_unreachable_object_store_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    """An S3 endpoint nobody listens on: one line naming the URL, exit 2, no traceback."""
    needed("s3fs")
    options = {
        "endpoint_url": "http://127.0.0.1:9",  # discard port: refused at once
        "key": "k",
        "secret": "s",
        "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
    }
    code, out, err = run(
        ["ls", "s3://no-bucket/prefix", "--storage-options", json.dumps(options)], capsys
    )
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith("Error: cannot reach ") and "s3://no-bucket/prefix" in err


def test_the_listed_urls_open_also_under_a_root_with_a_trailing_slash(root: str) -> None:
    build_tree(root)
    entries = catalog(root + "/")
    urls = [e.url for e in entries if e.problem is None]
    assert urls == [f"{root}/done", f"{root}/runs/wip", f"{root}/team/a/chat"]
    assert [open_store(u).num_tokens for u in urls] == [e.facts["tokens"] for e in entries[:3]]


@pytest.fixture(scope="module")
def s3_options() -> Any:
    """A local S3 (moto's server on a free port) and the fsspec options that reach it."""
    needed("s3fs")
    server_module = needed("moto.server")
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log in the test output
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = server_module.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield {"endpoint_url": f"http://127.0.0.1:{port}", "key": "k", "secret": "s"}
    server.stop()


def test_an_s3_prefix_lists_like_a_directory(
    s3_options: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The tree is written locally and uploaded (the catalog only reads), then listed over S3."""
    build_tree(str(tmp_path / "tree"))
    s3 = fsspec.filesystem("s3", **s3_options)
    s3.mkdir("catalog-bucket")
    s3.put(f"{tmp_path / 'tree'}/", "catalog-bucket/team/", recursive=True)
    options = ["--storage-options", json.dumps(s3_options)]
    code, out, err = run(["ls", "s3://catalog-bucket/team", "--json", *options], capsys)
    assert code == 0, err
    rows = {r["path"]: r for r in json.loads(out)}
    assert sorted(rows) == ["done", "runs/wip", "team/a/chat", "team/broken"]
    assert rows["team/a/chat"]["url"] == "s3://catalog-bucket/team/team/a/chat"
    assert (rows["team/a/chat"]["tokens"], rows["runs/wip"]["finished"]) == (64, False)
    assert rows["team/broken"]["damaged"] is True
    local = {r.path: r.facts for r in catalog(str(tmp_path / "tree"))}
    assert {p: r["bytes"] for p, r in rows.items() if not r["damaged"]} == {
        p: f["bytes"] for p, f in local.items() if f
    }
    for root, message in [
        ("s3://catalog-bucket/nope", "no such directory, s3://catalog-bucket/nope"),
        ("s3://catalog-bucket/team/done/manifest.json", "not a directory"),
    ]:
        code, out, err = run(["ls", root, *options], capsys)
        assert code == 2 and out == "" and err.count("\n") == 1 and message in err
