"""The text a document's tokens spell, and each token's span in it, in UTF-8 bytes.

A token spells the bytes of the document from the end of the token before it to its own end
(the tokenizer's offsets, characters turned into bytes), so text a normalizer skips (WordPiece
drops whitespace) belongs to the token after it and text after the last token to the last one;
special tokens (BOS, EOS, a chat template's control tokens; not the unknown token, which stands
for text) spell no bytes, and their own text is left out. A byte-level BPE token spells exactly its bytes, also when it holds part of a
character, whose offsets are the whole character's (docs/architecture.md §3, "Text").
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import numpy as np


def byte_offsets(text: str) -> np.ndarray:
    """(len(text)+1,) int64: where each character starts in ``text``'s UTF-8 bytes (then the
    length)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)  # (n,)
    widths = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
    out = np.zeros(len(codes) + 1, np.int64)
    np.cumsum(widths, out=out[1:])
    return out


@lru_cache(maxsize=1)
def _byte_level_table() -> dict[int, int]:
    """The byte-level BPE alphabet (GPT-2's printable stand-ins) → the bytes they stand for."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + extra)
            extra += 1
    return {code: b for b, code in zip(printable, codes, strict=True)}


def is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return type(getattr(backend, "decoder", None)).__name__ == "ByteLevel"


def _byte_level_lengths(tokenizer: Any, ids: np.ndarray, real: np.ndarray, text: bytes) -> Any:
    """Each real token's bytes (n,) from its byte-level string, when they spell ``text``
    exactly; else None."""
    tokens = tokenizer.convert_ids_to_tokens([int(i) for i in ids[real]])
    try:
        spelled = "".join(tokens).translate(_byte_level_table()).encode("latin-1")
    except (UnicodeEncodeError, TypeError):
        return None
    if spelled != text:
        return None
    lengths = np.zeros(len(ids), np.int64)
    lengths[real] = [len(t) for t in tokens]
    return lengths


def token_spans(
    text: str, ids: np.ndarray, offsets: np.ndarray, tokenizer: Any
) -> tuple[np.ndarray, bytes]:
    """The bytes each token of ``text`` spells, and the text they spell.

    Args:
        text: what was tokenized.
        ids: (n,) the tokens; offsets: (n, 2) their [start, end) characters in ``text``.
        tokenizer: to tell special tokens (``all_special_ids``) and byte-level BPE apart.

    Returns:
        (n,) int64 byte counts, and the UTF-8 bytes they add up to: ``text`` without the
        special tokens' own text.
    """
    ids = np.asarray(ids)
    n = len(ids)
    data = np.frombuffer(text.encode("utf-8", "surrogatepass"), np.uint8)  # (B,)
    at = byte_offsets(text)
    bounds = at[np.clip(np.asarray(offsets, np.int64).reshape(n, 2), 0, len(text))]  # (n, 2)
    spell_nothing = set(getattr(tokenizer, "all_special_ids", [])) - {
        getattr(tokenizer, "unk_token_id", None)
    }
    special = np.isin(ids, np.asarray(sorted(spell_nothing), np.int64))  # an unknown spells
    kept = np.ones(len(data), bool)  # (B,) bytes a real token spells
    for start, end in bounds[special]:
        kept[start:end] = False
    real = np.flatnonzero(~special)
    lengths = np.zeros(n, np.int64)
    if not len(real):
        return lengths, b""
    ends = np.maximum.accumulate(bounds[real, 1])  # (R,) where each real token ends
    owner = np.searchsorted(ends, np.flatnonzero(kept), side="right")  # (K,) its token
    lengths[real] = np.bincount(np.minimum(owner, len(real) - 1), minlength=len(real))
    spelled = data[kept].tobytes()
    if is_byte_level(tokenizer):
        exact = _byte_level_lengths(tokenizer, ids, ~special, spelled)
        if exact is not None:
            lengths = exact
    return lengths, spelled


def cut_text(token_bytes: np.ndarray, text: bytes, start: int, stop: int) -> bytes:
    """The bytes tokens ``[start, stop)`` spell, of ``text`` spelled by ``token_bytes`` (n,)."""
    a = int(token_bytes[:start].sum())
    return text[a : a + int(token_bytes[start:stop].sum())]
