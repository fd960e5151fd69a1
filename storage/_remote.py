"""Object stores (s3://, gs://, ...): options that fail fast, and their libraries' errors as
``StoreError``s.

Endpoint and credentials come from the usual environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, ...; botocore reads
``AWS_ENDPOINT_URL`` itself) or from storage options (``--storage-options`` on the command line),
which win. The libraries (botocore, aiohttp, s3fs) are optional and never imported here: their
exceptions are recognised by class name.
"""

from __future__ import annotations

import os
from typing import Any

from fsspec.core import split_protocol

from .errors import (
    BucketNotFound,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
    StoreUnreachable,
)

S3_PROTOCOLS = ("s3", "s3a")
# An unreachable endpoint should fail in seconds, not minutes (botocore's defaults: 60 s connect
# timeout, s3fs: 5 s; legacy retries: 5 attempts). A blackholed endpoint costs about
# MAX_ATTEMPTS x 2 x CONNECT_TIMEOUT (aiohttp tries the connection twice per attempt), measured
# ~17 s; a refused connection ~4 s. Either can be raised through --storage-options
# '{"config_kwargs": {"connect_timeout": 10, "retries": {"max_attempts": 10}}}', and the
# AWS_MAX_ATTEMPTS / AWS_RETRY_MODE environment variables are respected when set. Once the
# endpoint has answered, whole operations are retried above botocore (_retry.py: the storage
# option "retries" or KDCACHE_RETRIES, default 6), so a transient fault mid-run is not fatal.
CONNECT_TIMEOUT = 3  # seconds per connection attempt
MAX_ATTEMPTS = 3  # attempts per request, the first included (botocore "standard" retry mode)

_CREDENTIALS = {
    "NoCredentialsError",
    "PartialCredentialsError",
    "CredentialRetrievalError",
    "ProfileNotFound",
    "DefaultCredentialsError",  # google-auth (gcsfs)
}
_UNREACHABLE = {
    "ConnectionError",  # botocore's and the builtin: refused, reset, endpoint, proxy, SSL
    "HTTPClientError",  # botocore: read timeouts, closed connections
    "ClientConnectorError",  # aiohttp
    "ServerDisconnectedError",  # aiohttp
    "FSTimeoutError",  # fsspec's sync wrapper
    "TimeoutError",
}


def protocol_of(url: str) -> str:
    """The URL's protocol ("file" for a plain path)."""
    return split_protocol(url)[0] or "file"


def with_defaults(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """``options`` plus what kdcache needs on this protocol (the caller's values win).

    s3: a short connect timeout and few retries (see ``CONNECT_TIMEOUT``), and a filesystem of
    its own (``skip_instance_cache``): fsspec's shared instance would keep the credentials and
    endpoint of the environment it first saw.
    """
    merged = dict(options or {})
    if protocol_of(url) in S3_PROTOCOLS:
        config = dict(merged.get("config_kwargs") or {})
        config.setdefault("connect_timeout", CONNECT_TIMEOUT)
        if not {"AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"} & set(os.environ):
            config.setdefault("retries", {"max_attempts": MAX_ATTEMPTS, "mode": "standard"})
        merged["config_kwargs"] = config
        merged.setdefault("skip_instance_cache", True)
    return merged


def bucket_of(url: str) -> str:
    """The bucket (first path element) of an object-store URL."""
    return url.split("://", 1)[-1].split("/", 1)[0]


def response_of(error: BaseException) -> dict[str, Any]:
    """The server's answer behind an exception s3fs translated (botocore's ``ClientError``
    ``.response``, kept as its cause), else {}."""
    seen: BaseException | None = error
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return response
        seen = seen.__cause__ or seen.__context__
    return {}


def precondition_failed(error: BaseException) -> bool:
    """Whether ``error`` is the server's answer 412 Precondition Failed (a conditional write
    that found the key there already), read from the answer itself, never from a message (a key
    such as ``shards/train-00412.json`` must not read as one)."""
    response = response_of(error)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    return bool(response.get("Error", {}).get("Code") == "PreconditionFailed" or status == 412)


def _no_such_bucket(error: BaseException) -> bool:
    """A ``FileNotFoundError`` made of a NoSuchBucket answer (a HEAD request's answer carries
    no code, so the message is checked too)."""
    if response_of(error).get("Error", {}).get("Code") == "NoSuchBucket":
        return True
    text = str(error).lower()
    return "bucket" in text and ("not exist" in text or "nosuchbucket" in text)


def translate(error: BaseException, url: str, *, writing: bool) -> StoreError | None:
    """The ``StoreError`` an object store's exception means, naming ``url`` and the fix; None
    when it is not an object-store problem (then the caller re-raises it as it is).

    ``writing``: the failed operation wrote (a PUT answers "not found" only for a missing bucket).
    """
    if isinstance(error, StoreError):
        return None
    names = {kind.__name__ for kind in type(error).__mro__}
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, FileNotFoundError):
        if writing or _no_such_bucket(error):
            bucket = bucket_of(url)
            how = f" (e.g. `aws s3 mb s3://{bucket}`)" if protocol_of(url) in S3_PROTOCOLS else ""
            return BucketNotFound(
                f"the bucket does not exist, {bucket!r} of {url}, create it{how} or fix the URL"
            )
        return None  # a missing key: the caller knows what that means
    if names & _CREDENTIALS:
        return StoreAccessDenied(
            f"no usable credentials for the object store, {url} ({text}), set "
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or pass "
            '--storage-options \'{"key": "...", "secret": "..."}\''
        )
    if isinstance(error, PermissionError):
        return StoreAccessDenied(
            f"access denied by the object store, {url} ({text}), check the credentials "
            "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) and the bucket's permissions"
        )
    if names & _UNREACHABLE:
        return StoreUnreachable(
            f"cannot reach the object store, {url} ({type(error).__name__}: {text}), check "
            "AWS_ENDPOINT_URL (or endpoint_url in --storage-options) and that the server is up"
        )
    status = response_of(error).get("ResponseMetadata", {}).get("HTTPStatusCode")
    if isinstance(status, int) and 400 <= status < 500:  # 5xx: the server's trouble (OSError)
        return StoreUnavailable(
            f"the object store refused the request, {url} ({type(error).__name__}: {text}), "
            "check the URL (bucket and key names) and --storage-options"
        )
    if isinstance(error, TypeError) and "unexpected keyword argument" in text:
        return StoreUnavailable(
            f"storage options not understood, {url} ({text}), fix --storage-options"
        )
    if "BotoCoreError" in names:
        return StoreUnavailable(
            f"object store error, {url} ({type(error).__name__}: {text}), check the URL, the "
            "AWS_* environment and --storage-options"
        )
    return None
