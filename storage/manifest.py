"""The store manifest: store-wide facts, created once, compared on every resume."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from ._codec import CODECS as CODECS  # the codec facts, re-exported for the pipeline
from ._codec import DEFAULT_CODEC as DEFAULT_CODEC
from ._codec import max_abs_error as max_abs_error
from ._codec import max_prob_error as max_prob_error
from ._targets import MAX_SAMPLES as MAX_SAMPLES  # the targets facts, re-exported
from ._targets import SAMPLE_TEMPERATURE, default_sample_temperature, validate_targets
from ._targets import TARGETS as TARGETS
from ._targets import count_dtype_for as count_dtype_for
from ._targets import has_samples as has_samples
from ._targets import has_topk as has_topk
from ._targets import sample_temperature as sample_temperature
from .errors import StoreCorrupt, UnsupportedFormat

FORMAT_VERSION = 7  # what this kdcache writes (7: shard data at keys unique to its write attempt)
READABLE_VERSIONS = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
)  # what it opens (docs/architecture.md §3, "Format versions")
BACKENDS = ("zarr", "arrow")
LOGPROB_DTYPES = ("float16", "float32", "bfloat16")
ID_DTYPES = ("uint16", "uint32")
# version-2 facts and what a version-1 manifest means by them
V2_DEFAULTS: dict[str, Any] = {
    "targets": "topk",
    "samples": 0,
    "sample_seed": None,
    "count_dtype": None,
}
# version-3 facts and what a version-1 or version-2 manifest means by them
V3_DEFAULTS: dict[str, Any] = {"loss_mask": False}
# version-4 facts (the store codec, _codec.py) and what an older manifest means by them
V4_DEFAULTS: dict[str, Any] = {"codec": "raw", "codec_max_abs_error": 0.0}
# version-6 facts (per-position next-token log-probs; the text and each token's span in it)
V6_DEFAULTS: dict[str, Any] = {"next_token_logprob": False, "text": False}
# the facts each format version added, by version
ADDED_FACTS: dict[int, dict[str, Any]] = {
    2: V2_DEFAULTS,
    3: V3_DEFAULTS,
    4: V4_DEFAULTS,
    6: V6_DEFAULTS,
}
# facts that may differ between runs writing the same store
IGNORED_FACTS = frozenset({"created_at", "kdcache_version", "finished", "stats"})
_REQUIRED: dict[str, type | tuple[type, ...]] = {
    "format_version": int,
    "backend": str,
    "teacher": dict,
    "tokenizer": dict,
    "vocab_size": int,
    "targets": str,
    "top_k": int,
    "samples": int,
    "logprob_dtype": str,
    "id_dtype": str,
    "capture_temperature": (int, float),
    "seq_len": int,
    "corpus": dict,
    "shard_tokens": int,
    "loss_mask": bool,
    "codec": str,
    "codec_max_abs_error": (int, float),
    "next_token_logprob": bool,
    "text": bool,
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
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def id_dtype_for(vocab_size: int) -> str:
    """The narrowest unsigned integer type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= 65536 else "uint32"


def later_defaults(version: Any) -> dict[str, Any]:
    """The facts format versions after ``version`` added, with what a manifest of ``version``
    means by them (version 1: the v2 and v3 facts; the current version: none)."""
    if not isinstance(version, int) or isinstance(version, bool):
        return {}
    return {
        key: value
        for added, facts in sorted(ADDED_FACTS.items())
        if added > version
        for key, value in facts.items()
    }


def _tokenizer_size_problem(manifest: dict[str, Any]) -> str | None:
    tokenizer, vocab = manifest.get("tokenizer"), manifest.get("vocab_size")
    if not isinstance(tokenizer, dict) or "size" not in tokenizer:
        return None
    size = tokenizer["size"]
    if not isinstance(size, int) or isinstance(size, bool):
        return f"tokenizer size must be an integer, {size!r}, pass len(tokenizer)"
    if isinstance(vocab, int) and not 1 <= size <= vocab:
        return (
            f"tokenizer size must be in 1..vocab_size ({vocab}), {size}, pass len(tokenizer) "
            "and the teacher's embedding rows as vocab_size"
        )
    return None


def tokenizer_size(manifest: dict[str, Any]) -> int:
    """How many ids the store's tokenizer can produce: ``tokenizer["size"]`` when the manifest
    records it, else ``vocab_size``. It may be below ``vocab_size`` (the teacher's embedding
    rows, e.g. a vocabulary padded to a multiple of 64); ids in ``size..vocab_size-1`` are
    never tokens but may still appear in the teacher's targets.

    Raises:
        ValueError: the recorded size is not an integer in 1..vocab_size.
    """
    problem = _tokenizer_size_problem(manifest)
    if problem is not None:
        raise ValueError(problem)
    size: int = manifest["tokenizer"].get("size", manifest["vocab_size"])
    return size


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
    targets: str = "topk",
    samples: int = 0,
    sample_seed: int | None = None,
    sample_temperature: float = 1.0,
    loss_mask: bool = False,
    codec: str = DEFAULT_CODEC,
    next_token_logprob: bool = False,
    text: bool = False,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Build and validate the manifest of a new store (format version 6).

    Args:
        tokenizer: its fingerprint; ``tokenizer["size"]`` (optional, 1..vocab_size) is the
            number of ids it can produce when that is below ``vocab_size``.
        targets: "topk", "sampled" or "topk+sampled" (docs/architecture.md §3, "Targets").
        top_k: k of the top-k targets; 0 when ``targets`` is "sampled".
        samples: draws N per position (1..65535) for sampled targets; 0 otherwise.
        sample_seed: the seed of the draws; required for sampled targets, else None.
        sample_temperature: T_s > 0: the draws come from ``p^(1/T_s)``, normalized (ignored
            without samples: the manifest's fact is then null).
        loss_mask: True: every sequence carries a per-position ``loss_mask`` and targets are
            stored only at its trained positions (docs/architecture.md §3, "Loss mask").
        codec: how log-probs and top-k ids are stored: "raw" (``logprob_dtype`` floats) or
            "gaps" (levels on a fixed grid, error at most ``codec_max_abs_error``; ``_codec.py``).
        next_token_logprob: every sequence carries the teacher's log-prob of each realized
            next token, (L,) (NaN at the last position; docs/architecture.md §3, "Text").
        text: every sequence carries the UTF-8 text its tokens spell and each token's span.

    Raises:
        ValueError: a value is out of range or of the wrong type.
    """
    manifest: dict[str, Any] = {
        "format_version": FORMAT_VERSION,
        "backend": backend,
        "teacher": dict(teacher),
        "tokenizer": dict(tokenizer),
        "vocab_size": vocab_size,
        "targets": targets,
        "top_k": top_k,
        "samples": samples,
        "sample_seed": sample_seed,
        SAMPLE_TEMPERATURE: sample_temperature if has_samples({"targets": targets}) else None,
        "logprob_dtype": logprob_dtype,
        "id_dtype": id_dtype_for(vocab_size) if isinstance(vocab_size, int) else "uint32",
        "count_dtype": (
            count_dtype_for(samples)
            if isinstance(samples, int) and 0 <= samples <= MAX_SAMPLES
            else "uint16"
        ),
        "capture_temperature": 1.0,
        "seq_len": seq_len,
        "corpus": dict(corpus),
        "shard_tokens": shard_tokens,
        "loss_mask": loss_mask,
        "codec": codec,
        "codec_max_abs_error": max_abs_error(codec) if codec in CODECS else 0.0,
        "next_token_logprob": next_token_logprob,
        "text": text,
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
    """Check types and ranges; return a copy in the current shape (an older version gains the
    facts later versions added, with their defaults: ``later_defaults``).

    An unknown ``format_version`` or backend raises ``UnsupportedFormat``; anything else wrong
    raises ``error``.
    """
    if not isinstance(manifest, dict):
        raise error(f"{where} is not a JSON object, {type(manifest).__name__}, recreate the store")
    version = manifest.get("format_version")
    if version is not None and (
        not isinstance(version, int)
        or isinstance(version, bool)
        or version not in READABLE_VERSIONS
    ):
        raise UnsupportedFormat(
            f"unsupported store format_version, {version!r} in {where}, "
            f"this kdcache reads versions {', '.join(map(str, READABLE_VERSIONS))}: "
            "upgrade kdcache"
        )
    if manifest.get("backend") is not None and manifest["backend"] not in BACKENDS:
        raise UnsupportedFormat(
            f"unknown store backend, {manifest['backend']!r} in {where}, "
            f"expected one of {', '.join(BACKENDS)}: upgrade kdcache or fix the manifest"
        )
    checked: dict[str, Any] = dict(manifest)  # returned; "manifest" names it from here on
    manifest = checked
    # an older version knew less (v1: top-k targets only; v2: no loss mask); a later version's
    # fact in it must say just that
    for key, default in later_defaults(version).items():
        value = manifest.setdefault(key, default)
        if value != default or type(value) is not type(default):
            raise error(
                f"{where} is format_version {version} but sets {key} = {value!r}, "
                "recreate the store"
            )
    for key, kind in _REQUIRED.items():
        if key not in manifest:
            raise error(f"{where} lacks {key!r}, keys are {sorted(manifest)}, recreate the store")
        value = manifest[key]
        if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
            raise error(f"{where} {key} has the wrong type, {value!r}, recreate the store")
    for key in ("vocab_size", "seq_len", "shard_tokens"):
        if manifest[key] < 1:
            raise error(f"{where} {key} must be >= 1, {manifest[key]}, fix the value")
    problem = _tokenizer_size_problem(manifest)
    if problem is not None:
        raise error(f"{where} {problem}")
    validate_targets(manifest, where, error)
    _validate_codec(manifest, where, error)
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
    return checked


def _validate_codec(manifest: dict[str, Any], where: str, error: type[Exception]) -> None:
    """The codec and its error bound (a fact readers can rely on: it must be the codec's)."""
    codec = manifest["codec"]
    if codec not in CODECS:
        raise error(f"{where} codec unknown, {codec!r}, use one of {', '.join(CODECS)}")
    bound = manifest["codec_max_abs_error"]
    if bound != max_abs_error(codec):
        raise error(
            f"{where} codec_max_abs_error of codec {codec} must be {max_abs_error(codec)}, "
            f"{bound!r}, recreate the store"
        )


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
    for manifest, out in ((existing, a), (wanted, b)):
        # compared as read: an older version with the later versions' facts filled in
        manifest = {**later_defaults(manifest.get("format_version")), **manifest}
        manifest.setdefault(SAMPLE_TEMPERATURE, default_sample_temperature(manifest))
        _flatten({k: v for k, v in manifest.items() if k not in IGNORED_FACTS}, "", out)
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
