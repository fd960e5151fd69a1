"""The per-position fields of format version 6: the teacher's log-prob of each realized next
token, and the text the tokens spell with each token's span (docs/architecture.md §3, "Text").

A sequence of L tokens has ``next_token_logprob`` (L,) — finite and <= 0, NaN at its last
position, which has no next token in the sequence — and, as stored, ``token_bytes`` (L,) (the
bytes of the text each token spells; special tokens spell none) with ``text`` (B,) uint8, B =
``token_bytes.sum()``. Readers get ``token_ends = cumsum(token_bytes)`` per sequence.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._arrays import ShardArrays
from ._floats import decoded_logprobs, stored_logprobs
from .errors import StoreIncompatible

NDArray = npt.NDArray[Any]
# the dtypes a shard may keep ``token_bytes`` in: the narrowest that holds its longest token
TOKEN_BYTES_DTYPES = ("uint8", "uint16", "uint32")


def narrowest_lengths(lengths: NDArray) -> NDArray:
    """(N,) byte lengths in the narrowest of ``TOKEN_BYTES_DTYPES`` that holds them all."""
    most = int(lengths.max(initial=0))
    dtype = "uint8" if most < 1 << 8 else "uint16" if most < 1 << 16 else "uint32"
    return lengths.astype(dtype, copy=False)


def next_logprob_problem(values: NDArray, seq_offsets: NDArray) -> str | None:
    """``next_token_logprob`` (N,) floats of the sequences ``seq_offsets`` (S+1,) spanning N:
    NaN exactly at each sequence's last position, finite and <= 0 elsewhere."""
    n = int(seq_offsets[-1])
    if values.shape != (n,):
        return f"next_token_logprob shape must be ({n},) like tokens, got {values.shape}"
    if values.dtype.kind != "f":
        return f"next_token_logprob must be floats, got dtype {values.dtype}"
    last = np.zeros(n, bool)
    last[seq_offsets[1:] - 1] = True  # (N,)
    if not np.isnan(values[last]).all():
        return "next_token_logprob is not NaN at a sequence's last position (no next token)"
    inner = values[~last]
    if not (np.isfinite(inner) & (inner <= 0)).all():
        return "a next_token_logprob before a sequence's last position is positive, inf or NaN"
    return None


def text_problem(lengths: NDArray, text: NDArray, n: int) -> str | None:
    """``token_bytes`` (N,) unsigned integers and ``text`` (B,) uint8, B = their sum."""
    if lengths.shape != (n,):
        return f"token_bytes shape must be ({n},) like tokens, got {lengths.shape}"
    if lengths.dtype.kind != "u":
        return f"token_bytes must be unsigned integers, got dtype {lengths.dtype}"
    if text.ndim != 1 or text.dtype != np.uint8:
        return f"text must be (B,) uint8 bytes, got {text.dtype} {text.shape}"
    spelled = int(lengths.sum(dtype=np.int64))
    if spelled != text.shape[0]:
        return f"token ends reach byte {spelled} of a text of {text.shape[0]} bytes"
    return None


def per_position_problem(arrays: ShardArrays) -> str | None:
    """The version-6 fields of a decoded shard, if it has them (``verify``'s checks)."""
    if arrays.next_token_logprob is not None:
        problem = next_logprob_problem(arrays.next_token_logprob, arrays.seq_offsets)
        if problem is not None:
            return problem
    if arrays.token_bytes is None and arrays.text is None:
        return None
    if arrays.token_bytes is None or arrays.text is None:
        return "token_bytes and text go together, one is missing"
    return text_problem(arrays.token_bytes, arrays.text, arrays.num_tokens)


def text_bytes(text: Any) -> npt.NDArray[np.uint8]:
    """A sequence's text (str, bytes or (B,) uint8) as (B,) uint8 UTF-8 bytes."""
    if isinstance(text, str):
        text = text.encode("utf-8")
    if isinstance(text, bytes | bytearray | memoryview):
        return np.frombuffer(bytes(text), np.uint8)
    values = np.asarray(text)
    if values.ndim != 1 or values.dtype != np.uint8:
        raise ValueError(
            f"text must be str, bytes or (B,) uint8, got {values.dtype} {values.shape}"
        )
    return values


def prepare_text_fields(
    fields: tuple[str, ...],
    logprob_dtype: str,
    n: int,
    given: dict[str, Any],
) -> dict[str, NDArray]:
    """One appended sequence's version-6 fields, checked, in their stored form.

    Args:
        fields: the store's fields; what it has is required, what it lacks refused.
        n: L, the sequence's tokens.
        given: ``next_token_logprob`` (L,) floats, NaN at L-1; ``text`` (str, bytes or (B,)
            uint8) and ``token_ends`` (L,) ints, non-decreasing, ending at B; any omitted.

    Raises:
        ValueError: a missing or extra field, a broken rule.
    """
    out: dict[str, NDArray] = {}
    next_token_logprob = given.get("next_token_logprob")
    text, token_ends = given.get("text"), given.get("token_ends")
    wants = {"next_token_logprob": next_token_logprob is not None}
    wants["text"] = text is not None or token_ends is not None
    for name, passed in wants.items():
        if passed != (name in fields):
            raise ValueError(
                f"{name} given, but this store has none, drop it or create the store with "
                f"make_manifest({name}=True)"
                if passed
                else f"this store keeps {name} for every sequence, got none, pass it"
                + (" (text and token_ends)" if name == "text" else "")
            )
    if next_token_logprob is not None:
        values = np.asarray(next_token_logprob)
        if values.dtype.kind != "f":
            raise ValueError(f"next_token_logprob must be floats, got dtype {values.dtype}")
        stored = stored_logprobs(values, logprob_dtype)  # checked as stored: float16 may overflow
        problem = next_logprob_problem(decoded_logprobs(stored, logprob_dtype), np.asarray([0, n]))
        if problem is not None:
            raise ValueError(problem)
        out["next_token_logprob"] = stored
    if wants["text"]:
        if text is None or token_ends is None:
            raise ValueError("text and token_ends go together, pass both")
        data, ends = text_bytes(text), np.asarray(token_ends)
        if ends.shape != (n,) or ends.dtype.kind not in "iu":
            raise ValueError(f"token_ends must be ({n},) integers, got {ends.dtype} {ends.shape}")
        lengths = np.diff(ends.astype(np.int64), prepend=0)  # (L,)
        if n and (lengths.min() < 0 or ends[-1] != data.shape[0]):
            raise ValueError(
                f"token_ends must be non-decreasing from 0 and end at the text's {data.shape[0]} "
                f"bytes, got {ends[:1].tolist()}..{ends[-1:].tolist()}"
            )
        out["token_bytes"] = lengths.astype(np.uint32)
        out["text"] = data
    return out


def require_text(manifest: dict[str, Any], url: str, *, next_token_logprob: bool = False) -> None:
    """Refuse a store whose sequences lack the text and spans (``next_token_logprob``: or the
    next-token log-probs) that a caller needs.

    Raises:
        StoreIncompatible: naming the store and the fix (re-cache it with this kdcache).
    """
    wanted = ["text"] + (["next_token_logprob"] if next_token_logprob else [])
    missing = [name for name in wanted if not manifest.get(name)]
    if missing:
        raise StoreIncompatible(
            f"the store keeps no {' or '.join(missing)} (format_version "
            f"{manifest.get('format_version')}), {url}, its tokens' text cannot be recovered "
            "without it: re-cache it with this kdcache (`kdcache cache-teacher`, format 6, "
            "a fast tokenizer)"
        )
