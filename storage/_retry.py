"""Retries of an object store's transient failures, with backoff, once its endpoint has answered.

Two layers, each where the other does not reach. botocore's own retries (``MAX_ATTEMPTS`` in
``_remote.py``, "standard" mode) stay short, so a wrong endpoint fails in seconds when a store
is opened. Above them ``call`` retries a whole store operation (a GET whose body was cut
mid-read, a PUT whose answer was lost, a 503 SlowDown that outlasted botocore's attempts) up to
``retries`` times with exponential backoff (full jitter). A connection that cannot even be
made is retried only once the endpoint has answered in this process: before that it is the
wrong-endpoint case, and fails at once.

The number of retries: the storage option ``retries`` (``--storage-options '{"retries": 10}'``),
else ``$KDCACHE_RETRIES``, else ``DEFAULT_RETRIES``; a whole number from 0 to ``MAX_RETRIES``.
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from ._remote import response_of
from .errors import StoreError, StoreUnavailable, StoreUnreachable

T = TypeVar("T")

ENV = "KDCACHE_RETRIES"
DEFAULT_RETRIES = 6  # after the first attempt: worst case ~16 s of backoff (BASE_DELAY doubled)
MAX_RETRIES = 20
BASE_DELAY = 0.25  # seconds: the first retry waits up to this, each later one up to twice more
MAX_DELAY = 8.0  # seconds: the cap of one wait

# the endpoint could not be connected to at all: transient only once it has answered
_CONNECT = {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError"}
# the exchange broke after a connection was made: a reset, a lost answer, a cut body, a timeout
_BROKEN = {
    "ConnectionError",  # botocore's family (ConnectionClosedError, ReadTimeoutError, ...)
    "HTTPClientError",
    "ClientPayloadError",  # aiohttp: a body shorter than its Content-Length
    "ServerDisconnectedError",
    "ClientOSError",
    "IncompleteRead",
    "ResponseParserError",
    "ConnectionResetError",
    "BrokenPipeError",
    "FSTimeoutError",
    "TimeoutError",
}
# answers that say "later": S3's throttling and server-side errors
_LATER_CODES = {"SlowDown", "InternalError", "ServiceUnavailable", "RequestTimeout", "Throttling"}

_reached: set[str] = set()  # endpoints that answered in this process
_lock = threading.Lock()


def retries_option(options: dict[str, Any]) -> int:
    """Remove kdcache's ``retries`` from storage ``options`` and return it checked (the
    environment's or the default when absent). Raises ``StoreUnavailable`` out of range."""
    value: Any = options.pop("retries", None)
    source = "the storage option retries"
    if value is None and os.environ.get(ENV, "").strip():
        value, source = os.environ[ENV].strip(), f"${ENV}"
    if value is None:
        return DEFAULT_RETRIES
    try:
        number = int(value) if not isinstance(value, (bool, float)) else None
    except ValueError:
        number = None
    if number is None or not 0 <= number <= MAX_RETRIES:
        raise StoreUnavailable(
            f"retries out of range, {value!r} ({source}), give a whole number of retries "
            f"from 0 to {MAX_RETRIES} (default {DEFAULT_RETRIES})"
        )
    return number


def transient(error: BaseException, *, reached: bool) -> bool:
    """Whether ``error`` may pass when the operation is tried again: a broken exchange, an
    answer 5xx / SlowDown, or (once the endpoint ``reached``) a refused connection."""
    seen: BaseException | None = error
    while seen is not None:
        names = {kind.__name__ for kind in type(seen).__mro__}
        if isinstance(seen, (FileNotFoundError, PermissionError)):
            return False
        if names & _CONNECT:
            return reached
        if names & _BROKEN:
            return True
        seen = seen.__cause__ or seen.__context__
    answer = response_of(error)
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    code = answer.get("Error", {}).get("Code")
    return code in _LATER_CODES or (isinstance(status, int) and status >= 500)


def call(op: Callable[[], T], *, endpoint: str, url: str, retries: int) -> T:
    """``op()``, tried again after a transient failure up to ``retries`` times with backoff;
    the last failure, once they are spent, as one ``StoreUnreachable`` naming ``url``.

    ``endpoint`` (the object store's address) counts as reached once any answer came back,
    an error answer included: from then on a refused connection is transient too.
    """
    for attempt in range(retries + 1):
        try:
            result = op()
        except Exception as e:
            answered = bool(response_of(e)) or isinstance(e, FileNotFoundError)
            with _lock:
                if answered:
                    _reached.add(endpoint)
                reached = endpoint in _reached
            if not transient(e, reached=reached):
                raise
            if attempt == retries:
                raise spent(e, url, retries) from e
            time.sleep(random.uniform(0, min(MAX_DELAY, BASE_DELAY * 2**attempt)))
        else:
            with _lock:
                _reached.add(endpoint)
            return result
    raise AssertionError("unreachable")


def spent(error: BaseException, url: str, retries: int) -> StoreError:
    """The one line for a transient failure that outlasted ``retries`` retries."""
    cause: BaseException = error
    if isinstance(error, StoreError) and error.__cause__ is not None:
        cause = error.__cause__  # the library's own error, not our translation of it
    text = " ".join(str(cause).split()) or type(cause).__name__
    tries = f"after {retries} retr{'y' if retries == 1 else 'ies'}" if retries else "(no retries)"
    return StoreUnreachable(
        f"the object store keeps failing, {url} ({type(cause).__name__}: {text}) {tries}, "
        f"check AWS_ENDPOINT_URL and that the server is up, or allow more retries "
        f"(--storage-options '{{\"retries\": {MAX_RETRIES}}}' or {ENV}, at most {MAX_RETRIES})"
    )
