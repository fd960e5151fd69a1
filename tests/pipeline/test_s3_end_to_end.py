"""The product on a real S3 API (moto's server on 127.0.0.1): cache-teacher writes the local
store's content to s3://, survives kill -9 and resumes to the same store; verify, inspect,
train-student, sweep and compare read s3://; bad locations are one line, exit 2."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import create_bucket, s3_environment
from conftest import run_cli as run

from kdcache.pipeline.cli import main
from kdcache.storage import open_store

pytestmark = pytest.mark.slow

# ~6 train shards and an eval split from the tiny teacher; seconds per run
ARGS = ["--top-k", "8", "--seq-len", "32", "--batch-size", "4", "--shard-tokens", "256",
        "--eval-fraction", "0.25", "--max-tokens", "1800"]  # fmt: skip
SWEEP = """
base: tiny
seed: 1
budget: {steps: 2}
batch_size: 4
eval_batches: 1
search:
  hidden_size: [32, 64]
baseline: false
"""


def cache(teacher: Path, corpus: Path, out: str) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--corpus",
        str(corpus),
        "--out",
        out,
        *ARGS,
    ]


@pytest.fixture(scope="module")
def bucket(s3_server: str) -> Iterator[str]:
    """A bucket, and the AWS environment pointed at the server, for this module."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the kill -9 subprocess (OMP_NUM_THREADS=1): bit-equal content
    with pytest.MonkeyPatch.context() as mp:
        for key in [k for k in os.environ if k.startswith("AWS_")]:
            mp.delenv(key)
        for key, value in s3_environment(s3_server).items():
            mp.setenv(key, value)
        yield create_bucket(s3_server)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def stores(
    bucket: str, tiny_teacher_dir: Path, small_corpus_dir: Path, tmp_path_factory
) -> tuple[str, str]:
    """The same cache-teacher run to s3:// and to a local directory."""
    s3, local = f"{bucket}/store", str(tmp_path_factory.mktemp("s3e2e") / "store")
    for out in (s3, local):
        try:
            main(cache(tiny_teacher_dir, small_corpus_dir, out))
        except SystemExit as e:
            assert not e.code
    return s3, local


def keys_under(url: str) -> set[str]:
    """Every object key under ``url``, relative to it."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    root = url.removeprefix("s3://")
    return {key[len(root) + 1 :] for key in fs.find(root)}


def assert_same_content(a: str, b: str) -> None:
    """Same shards, same files byte for byte (by the records' checksums), same arrays."""
    store_a, store_b = open_store(a), open_store(b)
    assert [r.name for r in store_a.shards] == [r.name for r in store_b.shards]
    for ra, rb in zip(store_a.shards, store_b.shards, strict=True):
        assert (ra.content_files(), ra.num_tokens, ra.corpus_range) == (
            rb.content_files(),
            rb.num_tokens,
            rb.corpus_range,
        )
        x, y = store_a.read_shard(ra), store_b.read_shard(rb)
        assert x.tokens.tobytes() == y.tokens.tobytes()
        assert x.topk_logprobs.tobytes() == y.topk_logprobs.tobytes()


def test_cache_teacher_puts_the_local_store_on_s3_and_nothing_else(
    stores: tuple[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    s3, local = stores
    assert_same_content(s3, local)
    store = open_store(s3)
    assert store.manifest["finished"] and {"train", "eval"} <= set(store.splits)
    # the objects at their final keys, the records, manifest and tokenizer: no temporary, no copy
    expected = {"manifest.json", *(f"tokenizer/{n}" for n in store.tokenizer_files())}
    for record in store.shards:
        expected |= {record.record_path, *record.files}
    assert keys_under(s3) == expected
    code, out, err = run(["verify", s3], capsys)
    assert code == 0 and out.startswith(f"OK: {s3}: {len(store.shards)} shards"), err
    code, out, _ = run(["inspect", s3, "--json"], capsys)
    assert code == 0 and '"finished": true' in out and f'"shards": {len(store.shards)}' in out


def test_kill_9_mid_write_then_resume_gives_the_same_store(
    stores: tuple[str, str],
    bucket: str,
    tiny_teacher_dir: Path,
    small_corpus_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import s3fs

    reference, out = stores[0], f"{bucket}/killed"
    argv = [
        sys.executable,
        "-m",
        "kdcache.pipeline",
        *cache(tiny_teacher_dir, small_corpus_dir, out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}  # AWS_* set by `bucket`
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    fs = s3fs.S3FileSystem(skip_instance_cache=True, use_listings_cache=False)
    shards = out.removeprefix("s3://") + "/shards"
    deadline = time.monotonic() + 120
    while not fs.exists(shards) or not [k for k in fs.ls(shards) if k.endswith(".json")]:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    time.sleep(0.2)  # a request the server got whole before the kill completes
    committed = len(open_store(out).shards)
    assert 1 <= committed < len(open_store(reference).shards)

    code, line, _ = run(["verify", out], capsys)
    assert code == 0 and line.startswith(f"UNFINISHED (no damage found): {out}: {committed} shards")
    code, _, err = run(["train-student", "--store", out, "--out", "unused"], capsys)
    assert code == 2 and err.count("Error:") == 1 and "the store is unfinished" in err

    code, stdout, err = run(cache(tiny_teacher_dir, small_corpus_dir, out), capsys)
    assert code == 0, err
    assert f"{committed} already there" in stdout
    assert_same_content(reference, out)
    expected = {"manifest.json", *(f"tokenizer/{n}" for n in open_store(out).tokenizer_files())}
    for record in open_store(out).shards:  # the killed shard's objects were rewritten
        expected |= {record.record_path, *record.files}
    assert keys_under(out) == expected
    code, line, _ = run(["verify", out], capsys)
    assert code == 0 and line.startswith("OK: ")


def test_train_student_sweep_and_compare_read_s3(
    stores: tuple[str, str],
    tiny_teacher_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    s3 = stores[0]
    student = tmp_path / "student"
    # --workers 2: two decoding threads read the s3 store at once, through one filesystem
    code, stdout, err = run(
        ["train-student", "--store", s3, "--out", str(student), "--steps", "3",
         "--batch-size", "4", "--eval-every", "0", "--eval-batches", "2", "--threads", "1",
         "--workers", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "trained" in stdout and (student / "metrics.json").is_file()

    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    sweep = tmp_path / "sweep"
    code, stdout, err = run(
        ["sweep", "--store", s3, "--config", str(config), "--out", str(sweep), "--threads", "1"],
        capsys,
    )
    assert code == 0, err
    assert "sweep done: 2 candidates" in stdout

    code, stdout, err = run(
        ["compare", "--teacher", str(tiny_teacher_dir), "--store", s3, "--kd", str(student),
         "--eval-batches", "2"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    assert stdout.splitlines()[2].startswith("teacher") and "compared 2 models" in stdout


def test_a_missing_bucket_or_bad_options_are_one_line_and_nothing_is_written(
    bucket: str,
    tiny_teacher_dir: Path,
    small_corpus_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    missing = "s3://kdcache-no-such-bucket/store"
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    code, out, err = run(cache(tiny_teacher_dir, small_corpus_dir, missing), capsys)
    assert code == 2 and "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    assert "the bucket does not exist, 'kdcache-no-such-bucket'" in line and missing in line
    for argv in (
        ["train-student", "--store", missing, "--out", "unused"],
        ["sweep", "--store", missing, "--config", str(config), "--out", "unused"],
        # (a saved model as the "student": compare checks its students first)
        [
            "compare",
            "--teacher",
            str(tiny_teacher_dir),
            "--store",
            missing,
            "--kd",
            str(tiny_teacher_dir),
        ],  # fmt: skip
    ):
        code, _, err = run(argv, capsys)
        assert code == 2 and err.count("Error:") == 1, (argv, err)
        assert "the bucket does not exist" in err and "Traceback" not in err
    options = ["--storage-options", '{"no_such_option": 1}']
    for argv in (
        cache(tiny_teacher_dir, small_corpus_dir, f"{bucket}/other"),
        ["train-student", "--store", f"{bucket}/other", "--out", "unused"],
    ):
        code, _, err = run([*argv, *options], capsys)
        assert code == 2 and err.count("Error:") == 1 and "options not understood" in err
