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

pytestmark = pytest.mark.floors


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
    writer.mark_finished({})  # as cache-teacher leaves a complete store
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
    # records only: a ".tmp-…" file is a record being written (fsynced, then renamed)
    while time.monotonic() < deadline and len(list((store / "shards").glob("[!.]*.json"))) < 3:
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

    def full_disk(url: str, **_: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), url)

    monkeypatch.setattr(store_commands, "open_store", full_disk)
    code, out, err = run(["inspect", store], capsys)
    assert code == 1 and out == "" and "Traceback" not in err
    assert err.count("Error:") == 1 and "No space left on device" in err and store in err


def build_kind(path: Path, targets: str, backend: str) -> str:
    from conftest import write_synthetic_store

    lengths = {"train": [[16, 16, 16], [16, 16]], "eval": [[16]]}
    return write_synthetic_store(
        str(path), lengths=lengths, targets=targets, backend=backend, samples=24, seed=3
    )


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
@pytest.mark.parametrize("targets", ["topk", "sampled", "topk+sampled"])
def test_inspect_reports_the_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], targets: str, backend: str
) -> None:
    store = build_kind(tmp_path / "s", targets, backend)
    code, out, _ = run(["inspect", store, "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["format_version"] == 7 and facts["targets"] == targets
    sampled, topk = "sampled" in targets, "topk" in targets
    assert facts["samples"] == (24 if sampled else 0) and facts["top_k"] == (8 if topk else 0)
    assert facts["sample_seed"] == (3 if sampled else None)
    assert facts["count_dtype"] == ("uint8" if sampled else None)
    # the store is small: the statistics cover every position, so they can be checked exactly
    sequences = list(open_store(store).iter_sequences())
    assert facts["tokens"] == facts["statistics_rows"] == 96
    if sampled:
        distinct = np.concatenate([s.sampled_distinct for s in sequences]).astype(np.float64)
        p50, p99 = np.percentile(distinct, [50, 99])
        assert facts["sampled_distinct"] == pytest.approx(
            {"mean": distinct.mean(), "p50": p50, "p99": p99}
        )
        assert 1 <= facts["sampled_distinct"]["p50"] <= 24
    else:
        assert facts["sampled_distinct"] is None
    if topk:
        tail = np.exp(np.concatenate([s.topk_tail_logprob for s in sequences]).astype(np.float64))
        p50, p99 = np.percentile(tail, [50, 99])
        assert facts["tail_mass"] == pytest.approx({"mean": tail.mean(), "p50": p50, "p99": p99})
        # the exact tail and the top-k mass add up to 1 (up to float16 rounding of the rows)
        assert facts["tail_mass"]["mean"] + facts["mean_topk_mass"] == pytest.approx(1, abs=2e-3)
    else:
        assert facts["tail_mass"] is None and facts["mean_topk_mass"] is None
    by_field = facts["bytes_per_token_by_field"]
    if backend == "zarr":
        assert sum(by_field.values()) == pytest.approx(facts["bytes_per_token"])
        assert ("sampled_ids" in by_field) == sampled and ("topk_ids" in by_field) == topk
        assert ("topk_tail_logprob" in by_field) == topk
    else:
        assert by_field is None
    code, out, _ = run(["inspect", store], capsys)
    assert code == 0 and f"targets                   {targets}\n" in out
    assert ("sampled_distinct          mean=" in out) == sampled


def test_inspect_version_1_store(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    manifest = make_manifest(
        backend="arrow",
        teacher={"name": "tiny"},
        tokenizer={"sha256": "ab" * 32},
        vocab_size=500,
        top_k=4,
        seq_len=16,
        corpus={"spec": "stdlib"},
        shard_tokens=40,
    )
    later = (
        "targets",
        "samples",
        "sample_seed",
        "count_dtype",
        "loss_mask",
        "codec",
        "codec_max_abs_error",
    )  # v2-v4 facts
    v1 = {**{k: v for k, v in manifest.items() if k not in later}, "format_version": 1}
    rng = np.random.default_rng(0)
    with create_store(tmp_path / "s", v1) as writer:
        lp = -np.sort(rng.exponential(size=(16, 4)), axis=1) - 1
        writer.append("train", rng.integers(0, 500, 16), rng.integers(0, 500, (16, 4)), lp)
    writer.mark_finished({})
    code, out, _ = run(["inspect", str(tmp_path / "s"), "--json"], capsys)
    facts = json.loads(out)
    assert code == 0 and facts["format_version"] == 1 and facts["targets"] == "topk"
    assert facts["samples"] == 0 and facts["tail_mass"] is None and facts["mean_topk_mass"] > 0
    code, out, _ = run(["verify", str(tmp_path / "s")], capsys)
    assert code == 0 and out.startswith("OK: ")


@pytest.mark.parametrize("targets", ["sampled", "topk+sampled"])
def test_verify_every_kind_then_a_damaged_sampled_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], targets: str
) -> None:
    store = build_kind(tmp_path / "s", targets, "zarr")
    code, out, _ = run(["verify", store], capsys)
    assert code == 0 and "96 tokens" in out
    record = open_store(store).shards_of("train")[1]
    rel = next(r for r in sorted(record.files) if "/sampled_counts/c/" in r)
    fs = StoreFS(store)
    data = bytearray(fs.read(rel))
    data[len(data) // 2] ^= 1
    fs.write_atomic(rel, bytes(data))
    code, out, _ = run(["verify", store], capsys)
    assert code == 1 and out.splitlines() == [f"{record.name}: checksum mismatch in {rel}"]
