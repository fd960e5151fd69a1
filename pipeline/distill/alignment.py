"""Two tokenizations of one text, aligned on the byte offsets where both have a token boundary.

A store of format 6 gives each sequence's text (UTF-8) and where each teacher token ends in it
(``token_ends``). A student with another tokenizer re-tokenizes that text
(``retokenize``: its ids and their byte ends). ``align`` cuts the text at every offset that
ends a token in both tokenizations: each cut is a *chunk*, spelled by a run of teacher tokens
and by a run of student tokens, so the two models' likelihoods of a chunk are comparable (the
chunk likelihood matching of Approximate Likelihood Matching, Minixhofer et al. 2025).
Tokens that spell nothing (BOS, EOS, chat control tokens) belong to no chunk.

Shapes: a tokenization of L tokens is ``ends`` (L,) int64, non-decreasing, token i spelling
``text[ends[i-1]:ends[i]]`` (``ends[-1]`` = 0 before the first).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import numpy as np

NO_CHUNK = -1  # the chunk of a token that spells nothing
ESCAPED = re.compile("[\udc80-\udcff]")  # bytes ``surrogateescape`` could not decode


@dataclass(frozen=True)
class Retokenized:
    """A text in the student's tokens."""

    ids: np.ndarray  # (L_s,) int64
    ends: np.ndarray  # (L_s,) int64 byte ends in the text
    unknown: int  # tokens that are the student's unknown token


def byte_offsets(text: str) -> np.ndarray:
    """(len(text) + 1,) int64: the UTF-8 byte offset of each character boundary (a surrogate
    escape, U+DC80..U+DCFF, stands for the one byte it escapes)."""
    sizes = np.fromiter(
        (1 if "\udc80" <= c <= "\udcff" else len(c.encode("utf-8")) for c in text), np.int64
    )
    return np.concatenate([[0], np.cumsum(sizes)])


def retokenize(tokenizer: Any, text: bytes) -> Retokenized:
    """The student's tokens of ``text`` (no special tokens added) and where each ends, in bytes.

    A text cut inside a character (a sequence boundary in the middle of a multi-byte
    character) keeps the bytes it has: they are decoded with surrogate escapes, which the
    student's tokenizer sees as unknown characters and which still take their bytes' places.

    Raises:
        ValueError: the tokenizer gives no offsets (a slow tokenizer): use its fast version.
    """
    decoded = text.decode("utf-8", errors="surrogateescape")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"the student's tokenizer ({type(tokenizer).__name__}) gives no character offsets; "
            "save it as a fast tokenizer (tokenizer.json)"
        )
    # the tokenizer takes no lone surrogates: an escaped byte is U+FFFD for it, one character
    # either way, so its character offsets still index ``decoded``
    readable = ESCAPED.sub("\ufffd", decoded)
    encoded = tokenizer(readable, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], np.int64)  # (L_s,)
    offsets = np.asarray(encoded["offset_mapping"], np.int64).reshape(-1, 2)  # (L_s, 2) chars
    at = byte_offsets(decoded)  # (chars + 1,)
    # a token's end: its last character's end; tokens whose offsets overlap (byte fallback
    # pieces of one character) end where the character ends, the later ones then spell nothing;
    # text no token covers (whitespace a tokenizer drops) belongs to the token after it, and
    # the text's tail to the last token
    ends = np.maximum.accumulate(at[offsets[:, 1]]) if ids.size else np.zeros(0, np.int64)
    if ids.size:
        ends[-1] = len(text)
    unk = getattr(tokenizer, "unk_token_id", None)
    unknown = int((ids == unk).sum()) if unk is not None else 0
    return Retokenized(ids=ids, ends=ends, unknown=unknown)


@dataclass(frozen=True)
class Alignment:
    """The chunks of a text two tokenizations share."""

    bounds: np.ndarray  # (C + 1,) int64 byte offsets: chunk c is text[bounds[c]:bounds[c+1]]
    teacher: np.ndarray  # (L_t,) int64 chunk of each teacher token, NO_CHUNK if it spells nothing
    student: np.ndarray  # (L_s,) int64 the same for each student token

    @property
    def chunks(self) -> int:
        return int(self.bounds.shape[0] - 1)


def chunk_of(ends: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """(L,) the chunk each token of a tokenization belongs to (its end's chunk), NO_CHUNK for
    tokens that spell nothing."""
    starts = np.concatenate([[0], ends[:-1]]) if ends.size else ends
    chunk = np.searchsorted(bounds, ends, side="left") - 1  # (L,) bounds[c] < end ≤ bounds[c+1]
    return np.where(ends > starts, chunk, NO_CHUNK)


def align(teacher_ends: np.ndarray, student_ends: np.ndarray) -> Alignment:
    """Cut the text at every byte offset both tokenizations end a token at.

    Raises:
        ValueError: the two tokenizations do not spell the same number of bytes.
    """
    teacher_ends = np.asarray(teacher_ends, np.int64)
    student_ends = np.asarray(student_ends, np.int64)
    t_total = int(teacher_ends[-1]) if teacher_ends.size else 0
    s_total = int(student_ends[-1]) if student_ends.size else 0
    if t_total != s_total and teacher_ends.size and student_ends.size:
        raise ValueError(
            f"the student's tokens spell {s_total} bytes of a {t_total}-byte text: its tokenizer "
            "does not reproduce the text (normalization?)"
        )
    shared = np.intersect1d(teacher_ends, student_ends)  # ascending, unique
    bounds = np.concatenate([[0], shared[shared > 0]]).astype(np.int64)  # (C + 1,)
    return Alignment(
        bounds=bounds,
        teacher=chunk_of(teacher_ends, bounds),
        student=chunk_of(student_ends, bounds),
    )
