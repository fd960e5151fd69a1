"""`kdcache verify` / `kdcache inspect` through the real entry point, and crash safety."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from kdcache.pipeline.cli import main
from kdcache.storage import create_store, make_manifest, open_store, verify_store
from kdcache.storage._fs import StoreFS


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        main(argv)
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return int(info.value.code or 0), out, err


def build(path: Path, backend: str = "zarr") -> str:
    rng = np.random.default_rng(0)
    manifest = make_manifest(
        backend=backend,
        teacher={"name": "tiny"},
        tokenizer={"sha256": "ab" * 32},
        vocab_size=500,
        top_k=4,
        seq_len=16,
        corpus={"spec": "stdlib"},
        shard_tokens=40,
    )
    with create_store(path, manifest) as writer:
        for split, n in (("train", 6), ("eval", 2)):
            for _ in range(n):
                logits = rng.normal(size=(16, 50)) * 2
                lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
                writer.append(
                    split,
                    rng.integers(0, 500, 16),
                    rng.integers(0, 500, (16, 4)),
                    -np.sort(-lp, axis=1)[:, :4],
                )
    return str(path)


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_verify_ok_then_damaged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], backend: str
) -> None:
    store = build(tmp_path / "s", backend)
    code, out, _ = run(["verify", store], capsys)
    assert code == 0 and out.startswith("OK: ") and "128 tokens" in out and out.count("\n") == 1
    record = open_store(store).shards_of("train")[1]
    fs = StoreFS(store)
    rel = sorted(record.files)[len(record.files) // 2]
    data = bytearray(fs.read(rel))
    data[len(data) // 2] ^= 1
    fs.write_atomic(rel, bytes(data))
    code, out, _ = run(["verify", store], capsys)
    assert code == 1
    assert out.splitlines() == [f"{record.name}: checksum mismatch in {rel}"]


def test_inspect_text_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store = build(tmp_path / "s", "arrow")
    code, out, _ = run(["inspect", store, "--json"], capsys)
    facts = json.loads(out)
    assert code == 0
    assert facts["splits"] == {
        "eval": {"shards": 1, "sequences": 2, "tokens": 32},
        "train": {"shards": 2, "sequences": 6, "tokens": 96},
    }
    assert facts["tokens"] == 128 and facts["backend"] == "arrow" and facts["top_k"] == 4
    assert facts["bytes_per_token"] == pytest.approx(facts["bytes_on_disk"] / 128)
    assert 0 < facts["mean_top1_prob"] < facts["mean_topk_mass"] <= 1.0 + 1e-3
    assert facts["tokenizer_sha256"] == "ab" * 32
    code, out, _ = run(["inspect", store], capsys)
    assert code == 0 and "mean_topk_mass" in out and "split train" in out


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (None, "manifest.json missing"),
        (b"a file", "manifest.json missing"),
        (b"{oops", "not valid JSON"),
        (b'{"format_version": 9}', "format_version"),
    ],
)
@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_cli_errors_are_one_line_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    damage: bytes | None,
    message: str,
) -> None:
    store = build(tmp_path / "s")
    if damage is None:
        store = str(tmp_path / "nowhere")
    elif damage == b"a file":
        store = f"{store}/manifest.json"  # a file given where the store's directory belongs
    else:
        StoreFS(store).write_atomic("manifest.json", damage)
    code, out, err = run([command, store], capsys)
    assert code == 2 and out == ""
    lines = [line for line in err.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in err


def test_path_traversal_record_exits_2_on_inspect(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from kdcache.storage._base import ShardRecord

    store = build(tmp_path / "s")
    record = open_store(store).shards[0]
    evil = ShardRecord(**{**record.__dict__, "path": "../../../etc"})
    StoreFS(store).write_atomic(record.record_path, evil.to_bytes())
    code, _, err = run(["inspect", store], capsys)
    assert code == 2 and "path traversal" in err and err.count("Error:") == 1
    code, out, _ = run(["verify", store], capsys)
    assert code == 1 and out.startswith(f"{record.name}: ") and "path traversal" in out


WRITER = """
import sys, numpy as np
from kdcache.storage import create_store, make_manifest
m = make_manifest(backend=sys.argv[2], teacher={"name": "t"}, tokenizer={}, vocab_size=500,
                  top_k=4, seq_len=64, corpus={}, shard_tokens=2000)
w = create_store(sys.argv[1], m)
rng = np.random.default_rng(0)
print("ready", flush=True)
while True:
    lp = -np.sort(rng.exponential(size=(64, 4)), axis=1)
    w.append("train", rng.integers(0, 500, 64), rng.integers(0, 500, (64, 4)), lp)
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_kill_9_leaves_a_verifiable_store(tmp_path: Path, backend: str) -> None:
    store = tmp_path / "s"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(store), backend],
        stdout=subprocess.PIPE,
        env={**os.environ},
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == b"ready"
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and len(list((store / "shards").glob("*.json"))) < 3:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert verify_store(str(store)) == []
    reader = open_store(str(store))
    assert len(reader.shards) >= 3 and reader.num_tokens == sum(r.num_tokens for r in reader.shards)
    writer = create_store(store, reader.manifest)
    writer.clean_temporaries()
    assert not [p for p in (store / "shards").iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_unknown_storage_protocol_exits_2(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = run([command, "nosuchprotocol://bucket/store"], capsys)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.count("Error:") == 1 and "unknown storage protocol" in err


def test_io_failure_is_one_line_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failing machine (disk full, permissions, network) is not a traceback either."""
    import errno

    from kdcache.pipeline import store_commands

    store = build(tmp_path / "s")

    def full_disk(url: str) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url)

    monkeypatch.setattr(store_commands, "open_store", full_disk)
    code, out, err = run(["inspect", store], capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.count("Error:") == 1 and "No space left on device" in err and store in err
