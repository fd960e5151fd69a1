"""Errors raised by the logit store.

Every error is a ``ValueError`` (so callers that validate input catch it) and a ``StoreError``
(so the CLI can turn any of them into one clean line). Messages follow the house format
``<what>, <the value>, <what to do>``.
"""

from __future__ import annotations


class StoreError(ValueError):
    """Base class of every logit-store error."""


class StoreNotFound(StoreError, FileNotFoundError):
    """No store (no ``manifest.json``) at the given location."""


class StoreUnavailable(StoreError):
    """The store's location cannot be opened: an unknown URL protocol, the fsspec backend for
    it (``s3fs``, ``gcsfs``, ...) is not installed, storage options it does not understand, or
    an object store that refuses (the subclasses below)."""


class StoreUnreachable(StoreUnavailable):
    """The object store's endpoint does not answer (connection refused, connect timeout): a
    wrong ``AWS_ENDPOINT_URL`` / ``endpoint_url``, or the server is down."""


class StoreAccessDenied(StoreUnavailable):
    """No usable credentials for the object store, or they do not grant access."""


class BucketNotFound(StoreUnavailable):
    """The URL's bucket does not exist (not a ``FileNotFoundError``: "no store here" is
    ``StoreNotFound``; a missing bucket is the location itself being wrong)."""


class StoreCorrupt(StoreError):
    """The store or one of its shards is damaged: unparseable JSON, bad checksum, broken invariant.

    Attributes:
        shard: name of the damaged shard, or ``None`` when the damage is store-wide.
    """

    def __init__(self, message: str, shard: str | None = None) -> None:
        super().__init__(message)
        self.shard = shard


class StoreIncompatible(StoreError):
    """The store exists but disagrees with what the caller needs.

    Attributes:
        differences: one human-readable line per differing fact.
    """

    def __init__(self, message: str, differences: list[str] | None = None) -> None:
        super().__init__(message)
        self.differences = list(differences or [])


class UnsupportedFormat(StoreIncompatible):
    """The manifest names a ``format_version`` or backend this kdcache does not know."""


class ShardExists(StoreError, FileExistsError):
    """A shard with this name is already committed; committed shards are immutable."""
