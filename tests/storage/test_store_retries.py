"""Retries of an object store's transient failures (storage/_retry.py): the setting checked,
what counts as transient, bounded attempts with backoff, one line once they are spent, and no
retry of a connection refused before the endpoint ever answered (a wrong endpoint fails fast).
The same on a flaky S3 end to end: tests/pipeline/test_s3_faults_end_to_end.py."""

from __future__ import annotations

import pytest

from kdcache.storage import StoreUnavailable, StoreUnreachable, _retry
from kdcache.storage._retry import call, retries_option, transient


class EndpointConnectionError(Exception):  # botocore's, recognised by class name
    pass


class ClientPayloadError(Exception):  # aiohttp's: a body cut mid-read
    pass


class SlowDown(OSError):
    response = {"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}


@pytest.fixture(autouse=True)
def no_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    waits: list[float] = []
    monkeypatch.setattr(_retry.time, "sleep", waits.append)
    monkeypatch.delenv(_retry.ENV, raising=False)
    return waits


def test_the_setting_comes_from_the_options_then_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert retries_option({}) == _retry.DEFAULT_RETRIES
    options = {"retries": 2, "anon": False}
    assert retries_option(options) == 2 and options == {"anon": False}  # taken out
    monkeypatch.setenv("KDCACHE_RETRIES", "0")
    assert retries_option({}) == 0 and retries_option({"retries": 20}) == 20
    for bad in (21, -1, True, 1.5, "x"):
        with pytest.raises(StoreUnavailable, match=r"retries out of range, .* from 0 to 20"):
            retries_option({"retries": bad})
    monkeypatch.setenv("KDCACHE_RETRIES", "99")
    with pytest.raises(StoreUnavailable, match=r"'99' \(\$KDCACHE_RETRIES\)"):
        retries_option({})


def test_what_is_transient() -> None:
    assert transient(ClientPayloadError("cut"), reached=False)
    assert transient(SlowDown("slow down"), reached=False)
    assert transient(ConnectionResetError(), reached=False)
    assert not transient(EndpointConnectionError("refused"), reached=False)  # wrong endpoint?
    assert transient(EndpointConnectionError("refused"), reached=True)  # it answered before
    assert not transient(FileNotFoundError("no key"), reached=True)
    assert not transient(PermissionError("denied"), reached=True)
    wrapped = StoreUnreachable("cannot reach")
    wrapped.__cause__ = ClientPayloadError("cut")
    assert transient(wrapped, reached=False)


def test_transient_failures_are_retried_with_growing_waits(no_waits: list[float]) -> None:
    failures = [SlowDown("slow"), ClientPayloadError("cut"), ConnectionResetError()]

    def op() -> str:
        if failures:
            raise failures.pop(0)
        return "data"

    assert call(op, endpoint="s3:test-a", url="s3://b/s", retries=3) == "data"
    assert len(no_waits) == 3
    assert all(0 <= w <= _retry.BASE_DELAY * 2**i for i, w in enumerate(no_waits))


def test_spent_retries_are_one_line_naming_the_url_and_the_error(no_waits: list[float]) -> None:
    attempts = []

    def op() -> None:
        attempts.append(1)
        raise ClientPayloadError("Response payload is not completed")

    with pytest.raises(StoreUnreachable) as caught:
        call(op, endpoint="s3:test-b", url="s3://b/store", retries=2)
    line = str(caught.value)
    assert len(attempts) == 3 and "\n" not in line
    assert line.startswith("the object store keeps failing, s3://b/store (ClientPayloadError: ")
    assert "after 2 retries" in line and "KDCACHE_RETRIES" in line


def test_a_refused_connection_is_retried_only_once_the_endpoint_answered(
    no_waits: list[float],
) -> None:
    def refused() -> None:
        raise EndpointConnectionError("Could not connect to the endpoint URL")

    with pytest.raises(EndpointConnectionError):  # never answered: the caller's error, at once
        call(refused, endpoint="s3:test-c", url="s3://b/s", retries=5)
    assert no_waits == []
    assert call(lambda: 1, endpoint="s3:test-c", url="s3://b/s", retries=5) == 1
    with pytest.raises(StoreUnreachable, match="keeps failing"):
        call(refused, endpoint="s3:test-c", url="s3://b/s", retries=5)
    assert len(no_waits) == 5
