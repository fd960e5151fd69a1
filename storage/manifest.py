"""The store manifest: store-wide facts, created once, compared on every resume."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from .errors import StoreCorrupt, UnsupportedFormat

FORMAT_VERSION = 1
BACKENDS = ("zarr", "arrow")
LOGPROB_DTYPES = ("float16", "float32", "bfloat16")
ID_DTYPES = ("uint16", "uint32")
# facts that may differ between runs writing the same store
IGNORED_FACTS = frozenset({"created_at", "kdcache_version", "finished", "stats"})
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "backend": str,
    "teacher": dict,
    "tokenizer": dict,
    "vocab_size": int,
    "top_k": int,
    "logprob_dtype": str,
    "id_dtype": str,
    "capture_temperature": (int, float),
    "seq_len": int,
    "corpus": dict,
    "shard_tokens": int,
}


def kdcache_version() -> str:
    """The installed kdcache version ("unknown" when running from a bare checkout)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kdcache")
    except PackageNotFoundError:
        return "unknown"


def utc_now() -> str:
    """Current UTC time as ISO 8601 with a trailing Z."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def make_manifest(
    *,
    backend: str,
    teacher: dict[str, Any],
    tokenizer: dict[str, Any],
    vocab_size: int,
    top_k: int,
    seq_len: int,
    corpus: dict[str, Any],
    shard_tokens: int,
    logprob_dtype: str = "float16",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate the manifest of a new store.

    Raises:
        ValueError: a value is out of range or of the wrong type.
    """
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "teacher": dict(teacher),
        "tokenizer": dict(tokenizer),
        "vocab_size": vocab_size,
        "top_k": top_k,
        "logprob_dtype": logprob_dtype,
        "id_dtype": id_dtype_for(vocab_size) if isinstance(vocab_size, int) else "uint32",
        "capture_temperature": 1.0,
        "seq_len": seq_len,
        "corpus": dict(corpus),
        "shard_tokens": shard_tokens,
    }
    for key, value in (extra or {}).items():
        if key in manifest:
            raise ValueError(f"manifest extra key clashes with a standard fact, {key!r}, rename it")
        manifest[key] = value
    manifest["kdcache_version"] = kdcache_version()
    manifest["created_at"] = utc_now()
    validate_manifest(manifest, error=ValueError)
    try:
        json.dumps(manifest, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise ValueError(
            f"manifest is not plain JSON, {e}, pass only str/int/float/list/dict"
        ) from e
    return manifest


def validate_manifest(
    manifest: Any, *, where: str = "manifest", error: type[Exception] = StoreCorrupt
) -> dict[str, Any]:
    """Check types and ranges; unknown ``format_version``/backend raise ``UnsupportedFormat``."""
    if not isinstance(manifest, dict):
        raise error(f"{where} is not a JSON object, {type(manifest).__name__}, recreate the store")
    version = manifest.get("format_version")
    if version is not None and version != FORMAT_VERSION:
        raise UnsupportedFormat(
            f"unsupported store format_version, {version!r} in {where}, "
            f"this kdcache reads version {FORMAT_VERSION}: upgrade kdcache"
        )
    if manifest.get("backend") is not None and manifest["backend"] not in BACKENDS:
        raise UnsupportedFormat(
            f"unknown store backend, {manifest['backend']!r} in {where}, "
            f"expected one of {', '.join(BACKENDS)}: upgrade kdcache or fix the manifest"
        )
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise error(f"{where} lacks {key!r}, keys are {sorted(manifest)}, recreate the store")
        value = manifest[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            raise error(f"{where} {key} has the wrong type, {value!r}, recreate the store")
    for key in ("vocab_size", "top_k", "seq_len", "shard_tokens"):
        if manifest[key] < 1:
            raise error(f"{where} {key} must be >= 1, {manifest[key]}, fix the value")
    if manifest["top_k"] > manifest["vocab_size"]:
        raise error(
            f"{where} top_k exceeds vocab_size, {manifest['top_k']} > {manifest['vocab_size']}, "
            "lower top_k"
        )
    if manifest["logprob_dtype"] not in LOGPROB_DTYPES:
        raise error(
            f"{where} logprob_dtype unknown, {manifest['logprob_dtype']!r}, "
            f"use one of {', '.join(LOGPROB_DTYPES)}"
        )
    if manifest["id_dtype"] not in ID_DTYPES or (
        manifest["id_dtype"] == "uint16" and manifest["vocab_size"] > 65536
    ):
        raise error(
            f"{where} id_dtype does not fit the vocabulary, {manifest['id_dtype']!r} for "
            f"vocab {manifest['vocab_size']}, recreate the store"
        )
    return manifest


def parse_manifest(data: bytes, where: str) -> dict[str, Any]:
    """Parse and validate manifest bytes read from ``where``."""
    try:
        manifest = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise StoreCorrupt(
            f"manifest is not valid JSON, {where}: {e}, restore or recreate it"
        ) from e
    return validate_manifest(manifest, where=where)


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict) and value:
        for key, sub in value.items():
            _flatten(sub, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def manifest_differences(existing: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """One line per differing fact (nested keys dotted), ignoring run-specific facts."""
    a: dict[str, Any] = {}
    b: dict[str, Any] = {}
    _flatten({k: v for k, v in existing.items() if k not in IGNORED_FACTS}, "", a)
    _flatten({k: v for k, v in wanted.items() if k not in IGNORED_FACTS}, "", b)
    lines = []
    for key in sorted(set(a) | set(b)):
        if key not in b:
            lines.append(f"{key}: store has {a[key]!r}, this run does not set it")
        elif key not in a:
            lines.append(f"{key}: store does not set it, this run asks {b[key]!r}")
        elif a[key] != b[key]:
            lines.append(f"{key}: store has {a[key]!r}, this run asks {b[key]!r}")
    return lines


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no NaN) used for every JSON file of the store."""
    return (json.dumps(obj, sort_keys=True, indent=1, allow_nan=False) + "\n").encode("utf-8")
