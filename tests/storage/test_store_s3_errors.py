"""Object-store trouble is one line naming the URL and the fix, exit 2, fast, with nothing
written: an unreachable endpoint, missing credentials, a missing bucket, bad --storage-options,
no store at the URL; and `verify` says when a store is unfinished (moto's S3 on 127.0.0.1)."""

from __future__ import annotations

import errno
import socket
import time
from collections.abc import Iterator

import numpy as np
import pytest
from conftest import run_cli as run
from test_store import make_sequence

from kdcache.storage import (
    BucketNotFound,
    StoreAccessDenied,
    StoreUnavailable,
    StoreUnreachable,
    create_store,
    make_manifest,
)
from kdcache.storage._remote import translate, with_defaults


def one_error_line(code: int, out: str, err: str) -> str:
    """The single ``Error:`` line of a clean exit 2."""
    assert code == 2 and out == "" and "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("Error:")]
    return line


def manifest() -> dict:
    return make_manifest(
        backend="zarr",
        teacher={"name": "t"},
        tokenizer={},
        vocab_size=1000,
        top_k=8,
        seq_len=32,
        corpus={},
        shard_tokens=64,
    )


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A loopback port whose accept queue is full: connection attempts time out (SYNs are
    dropped), as with a firewalled or unrouted endpoint."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(server.getsockname())  # EINPROGRESS: queued, or its SYN dropped
        fillers.append(filler)
    time.sleep(0.1)
    yield int(server.getsockname()[1])
    for s in [*fillers, server]:
        s.close()


def test_an_unreachable_endpoint_fails_in_seconds(
    s3_bucket: str,
    closed_port: int,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{closed_port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # respected (kdcache's default: 3, ~3 s here)
    started = time.monotonic()
    line = one_error_line(*run(["verify", f"{s3_bucket}/store"], capsys))
    assert time.monotonic() - started < 5
    assert "cannot reach the object store" in line and f"{s3_bucket}/store" in line
    assert "AWS_ENDPOINT_URL" in line


def test_s3_defaults_fail_fast_and_yield_to_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):
        monkeypatch.delenv(key, raising=False)
    config = with_defaults("s3://b/s", None)["config_kwargs"]
    assert config == {"connect_timeout": 3, "retries": {"max_attempts": 3, "mode": "standard"}}
    mine = {"config_kwargs": {"connect_timeout": 30}, "endpoint_url": "http://127.0.0.1:1"}
    merged = with_defaults("s3://b/s", mine)
    assert merged["config_kwargs"]["connect_timeout"] == 30 and merged["endpoint_url"]
    assert mine == {"config_kwargs": {"connect_timeout": 30}, "endpoint_url": "http://127.0.0.1:1"}
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    assert "retries" not in with_defaults("s3://b/s", None)["config_kwargs"]
    assert with_defaults("/data/s", {"x": 1}) == {"x": 1}
    assert with_defaults("memory://s", None) == {}


def test_a_silent_endpoint_times_out_as_the_storage_options_say(
    s3_bucket: str, blackhole: int, capsys: pytest.CaptureFixture[str]
) -> None:
    options = (
        '{"endpoint_url": "http://127.0.0.1:%d", "config_kwargs": {"connect_timeout": 0.5, '
        '"retries": {"max_attempts": 1}}}'
    )
    started = time.monotonic()
    argv = ["verify", f"{s3_bucket}/store", "--storage-options", options % blackhole]
    line = one_error_line(*run(argv, capsys))
    assert time.monotonic() - started < 5  # 1 attempt: 2 connections of 0.5 s
    assert "cannot reach the object store" in line and "timeout" in line.lower()


def test_missing_credentials(
    s3_bucket: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    line = one_error_line(*run(["verify", f"{s3_bucket}/store"], capsys))
    assert "no usable credentials" in line and "AWS_ACCESS_KEY_ID" in line
    with pytest.raises(StoreAccessDenied):
        create_store(f"{s3_bucket}/store", manifest())


def test_a_bucket_that_does_not_exist(s3_bucket: str, capsys: pytest.CaptureFixture[str]) -> None:
    url = "s3://kdcache-no-such-bucket/store"
    for command in ("verify", "inspect"):
        line = one_error_line(*run([command, url], capsys))
        assert "the bucket does not exist, 'kdcache-no-such-bucket'" in line and url in line
    with pytest.raises(BucketNotFound, match="aws s3 mb s3://kdcache-no-such-bucket"):
        create_store(url, manifest())


def test_no_store_at_the_url_is_not_an_empty_store(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    line = one_error_line(*run(["verify", f"{s3_bucket}/nothing"], capsys))
    assert "no logit store (manifest.json missing)" in line


@pytest.mark.parametrize(
    ("options", "message"),
    [("{oops", "not valid JSON"), ("[1, 2]", "not a JSON object, got a list")],
)
@pytest.mark.parametrize(
    "argv",
    [
        ["verify", "URL"],
        ["inspect", "URL"],
        ["cache-teacher", "--teacher", "t", "--corpus", "c", "--out", "URL"],
        ["train-student", "--store", "URL", "--out", "unused"],
        ["sweep", "--store", "URL", "--out", "unused"],
        ["compare", "--teacher", "t", "--store", "URL", "--kd", "unused"],
    ],
    ids=lambda argv: argv[0],
)
def test_unparsable_storage_options_on_every_command(
    s3_bucket: str, capsys: pytest.CaptureFixture[str], options: str, message: str, argv: list
) -> None:
    argv = [f"{s3_bucket}/store" if a == "URL" else a for a in argv]
    line = one_error_line(*run([*argv, "--storage-options", options], capsys))
    assert "--storage-options" in line and message in line


@pytest.mark.parametrize("command", ["verify", "inspect"])
def test_storage_options_the_filesystem_does_not_take(
    s3_bucket: str, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    url = f"{s3_bucket}/store"
    create_store(url, manifest())  # a store to open: only the options are wrong
    argv = [command, url, "--storage-options", '{"no_such_option": 1}']
    line = one_error_line(*run(argv, capsys))
    assert "storage options not understood" in line and url in line


def test_verify_says_a_store_is_unfinished_and_what_it_holds(
    s3_bucket: str, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"{s3_bucket}/store"
    writer = create_store(url, manifest())
    code, out, _ = run(["verify", url], capsys)
    assert code == 0 and out.startswith(f"UNFINISHED (no damage found): {url}: 0 shards")
    assert "no shard committed yet" in out
    rng = np.random.default_rng(0)
    for split, n in (("train", 5), ("eval", 2)):
        for _ in range(n):
            writer.append(split, *make_sequence(rng, 30, 1000))
    writer.flush()
    code, out, _ = run(["verify", url], capsys)
    assert code == 0 and out.count("\n") == 1
    assert out.startswith(f"UNFINISHED (no damage found): {url}: 3 shards, 7 sequences")
    assert "(eval 1 shard, 60 tokens; train 2 shards, 150 tokens)" in out
    assert "did not finish, rerun it with the same options" in out
    writer.mark_finished({})
    code, out, _ = run(["verify", url], capsys)
    assert code == 0 and out.startswith(f"OK: {url}: 3 shards")


class ClientError(Exception):
    """Like botocore's: the server's answer kept as ``.response``."""

    def __init__(self, code: str, status: int) -> None:
        super().__init__(f"An error occurred ({code})")
        self.response = {"Error": {"Code": code}, "ResponseMetadata": {"HTTPStatusCode": status}}


def caused_by(error: BaseException, cause: BaseException) -> BaseException:
    error.__cause__ = cause
    return error


@pytest.mark.parametrize(
    ("error", "kind", "message"),
    [
        (PermissionError("Access Denied"), StoreAccessDenied, "access denied"),
        (caused_by(FileNotFoundError("x"), ClientError("NoSuchBucket", 404)), BucketNotFound, ""),
        (ConnectionRefusedError("refused"), StoreUnreachable, "cannot reach"),
        (type("NoCredentialsError", (Exception,), {})(), StoreAccessDenied, "credentials"),
        (
            caused_by(OSError(errno.EINVAL, "bad name"), ClientError("InvalidBucketName", 400)),
            StoreUnavailable,
            "refused the request",
        ),
        (TypeError("f() got an unexpected keyword argument 'x'"), StoreUnavailable, "options"),
    ],
)
def test_library_errors_become_store_errors(
    error: BaseException, kind: type[Exception], message: str
) -> None:
    translated = translate(error, "s3://b/s", writing=False)
    assert type(translated) is kind and message in str(translated) and "s3://b/s" in str(translated)


@pytest.mark.parametrize(
    "error",
    [
        FileNotFoundError("The specified key does not exist."),  # the caller's to interpret
        caused_by(OSError(errno.EIO, "internal"), ClientError("InternalError", 500)),  # exit 1
        ValueError("ours"),
    ],
)
def test_other_errors_pass_unchanged(error: BaseException) -> None:
    assert translate(error, "s3://b/s", writing=False) is None
    if isinstance(error, FileNotFoundError):  # a PUT that finds nothing: the bucket
        assert isinstance(translate(error, "s3://b/s", writing=True), BucketNotFound)
