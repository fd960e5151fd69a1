"""Tokenize a document of any length in bounded memory, with the ids one whole call would give.

A fast tokenizer given one 50 MB string peaks near 8 GB of RAM (offsets, pre-token strings and
Python ints for every token), so a single large ``.txt`` file (a Wikipedia dump, a book corpus)
would exhaust the machine. A long document is therefore tokenized in windows: each window keeps
the tokens that *start* inside its own piece, and is tokenized with ``context_chars`` of text on
either side so that the tokens near its edges are the ones the whole document gets.

Tokenizers decide locally (pre-token regexes, per-word BPE or unigram), so a few thousand
characters of context suffice; to be sure, two neighbouring windows must agree on every token
(start and id) within half a context of the cut between them. When they do not (a whitespace run
or a "word" longer than the context), the document is retried with more context, and finally in
one call.
"""

from __future__ import annotations

from typing import Any

import numpy as np

PIECE_CHARS = 1 << 20  # characters a window keeps the tokens of (bounds memory per call)
CONTEXT_CHARS = 1 << 12  # characters tokenized on each side of a piece and dropped
CONTEXT_GROWTH = 16  # the context of each retry, when neighbouring windows disagree


def tokenize_whole(text: str, tokenizer: Any) -> np.ndarray:
    """(n,) int32 ids of ``text`` from one tokenizer call, without special tokens."""
    return np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)


def cut_points(text: str, piece_chars: int) -> list[int]:
    """[0, c1, ..., len(text)]: a cut after a newline near every ``piece_chars`` characters
    (a hard cut where a piece's second half has no newline)."""
    cuts = [0]
    while len(text) - cuts[-1] > piece_chars:
        target = cuts[-1] + piece_chars
        newline = text.rfind("\n", target - piece_chars // 2, target)
        cuts.append(newline + 1 if newline >= 0 else target)
    cuts.append(len(text))
    return cuts


def tokenize_with_offsets(text: str, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """(n,) int32 ids of ``text`` from one call without special tokens, and their (n, 2) int64
    [start, end) characters in ``text``."""
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    return np.asarray(encoded["input_ids"], dtype=np.int32), offsets


def _window(text: str, tokenizer: Any, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens of ``text[lo:hi]``: ((n, 2) int64 [start, end) offsets in ``text``, (n,) int32
    ids)."""
    ids, offsets = tokenize_with_offsets(text[lo:hi], tokenizer)
    return offsets + lo, ids


def _windowed(
    text: str, tokenizer: Any, piece_chars: int, context: int, limit: int | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """The ids of ``text`` and their (n, 2) offsets window by window (stopping once ``limit``
    are known), or ``None`` when two windows disagree at a cut."""
    cuts = cut_points(text, piece_chars)
    kept: list[np.ndarray] = []
    kept_offsets: list[np.ndarray] = []
    count = 0
    previous: tuple[np.ndarray, np.ndarray] | None = None
    for start, end in zip(cuts, cuts[1:], strict=False):
        offsets, ids = _window(
            text, tokenizer, max(0, start - context), min(len(text), end + context)
        )
        starts = offsets[:, 0]
        if previous is not None:  # both windows see [start - context/2, start + context/2)
            near = (start - context // 2, start + context // 2)
            mine = (starts >= near[0]) & (starts < near[1])
            theirs = (previous[0] >= near[0]) & (previous[0] < near[1])
            if not (
                np.array_equal(starts[mine], previous[0][theirs])
                and np.array_equal(ids[mine], previous[1][theirs])
            ):
                return None
        inside = (starts >= start) & (starts < end)
        kept.append(ids[inside])
        kept_offsets.append(offsets[inside])
        count += len(kept[-1])
        if limit is not None and count >= limit:
            break
        previous = (starts, ids)
    return np.concatenate(kept)[:limit], np.concatenate(kept_offsets)[:limit]


def tokenize_long(
    text: str,
    tokenizer: Any,
    *,
    limit: int | None = None,
    piece_chars: int | None = None,
    context_chars: int | None = None,
    offsets: bool = False,
) -> Any:
    """(n,) int32 ids of ``text`` (the first ``limit`` of them, if given), equal to one call's,
    in windows of ``piece_chars`` (default ``PIECE_CHARS``) when the text is longer than that and
    the tokenizer reports offsets (a fast tokenizer). ``offsets``: (ids, their (n, 2) int64
    character offsets in ``text``, None from a slow tokenizer)."""
    piece_chars = piece_chars or PIECE_CHARS
    context_chars = context_chars or CONTEXT_CHARS
    fast = getattr(tokenizer, "is_fast", False)
    if not fast:
        ids = tokenize_whole(text, tokenizer)[:limit]
        return (ids, None) if offsets else ids
    found: tuple[np.ndarray, np.ndarray] | None = None
    context = context_chars
    while found is None and len(text) > piece_chars and context < piece_chars:
        found = _windowed(text, tokenizer, piece_chars, context, limit)
        context *= CONTEXT_GROWTH
    if found is None:
        ids, where = tokenize_with_offsets(text, tokenizer)
        found = ids[:limit], where[:limit]
    return found if offsets else found[0]
