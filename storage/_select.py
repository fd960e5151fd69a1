"""Some sequences of a shard, picked from its stored arrays before they are decoded.

A reader that needs only part of a shard (one rank of several reads its rows of every batch)
decodes only that part: the stored integer arrays a backend returns are cut to the chosen
sequences — per-token fields by token ranges, the text by byte ranges, target rows by the mask's running sum, sampled
entries by ``sampled_distinct``'s — and the codec then decodes the rows that are left. The
backend's read and decompression stay whole (a shard's chunks hold every sequence).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._arrays import SAMPLE_FIELDS, TARGET_FIELDS, TOKEN_FIELDS, offsets_of
from ._base import ShardRecord

NDArray = npt.NDArray[Any]


def ranges(starts: NDArray, stops: NDArray) -> npt.NDArray[np.int64]:
    """The indices of ``[starts[i], stops[i])`` for every i, concatenated: (sum of lengths,)."""
    lengths = (stops - starts).astype(np.int64)
    begins = np.cumsum(lengths) - lengths  # (n,) where each range starts in the output
    shift: npt.NDArray[np.int64] = np.repeat(starts - begins, lengths).astype(np.int64)
    return np.arange(int(lengths.sum()), dtype=np.int64) + shift


def picked_sequences(sequences: Any, count: int) -> npt.NDArray[np.int64]:
    """``sequences`` as (s,) int64, checked: at least one, distinct, ascending, in ``[0, count)``.

    Raises:
        ValueError: they are not.
    """
    picked = np.asarray(sequences, dtype=np.int64).reshape(-1)
    if not picked.size or picked[0] < 0 or picked[-1] >= count or (np.diff(picked) < 1).any():
        raise ValueError(
            f"sequences must be ascending distinct indices below {count}, at least one"
        )
    return picked


def _rows(values: NDArray, rows: NDArray) -> NDArray:
    """``values[rows]`` along the first axis; a rank-major (T, k) view (the transpose of a
    C-ordered (k, T) array) stays one, so the codec's rank-by-rank decoding still applies."""
    if values.ndim == 2 and not values.flags.c_contiguous and values.T.flags.c_contiguous:
        return np.take(values.T, rows, axis=1).T  # (k, t) C-ordered, gathered row by row
    return values[rows]


def layout_problem(fields: dict[str, NDArray], record: ShardRecord) -> str | None:
    """What keeps the stored arrays from being cut by sequence: offsets or row counts that do
    not match the record or each other; None when they can be."""
    offsets, n = fields["seq_offsets"], fields["tokens"].shape[0]
    if offsets.ndim != 1 or offsets.shape[0] != record.num_sequences + 1:
        return f"{offsets.shape[0] - 1} sequence offsets, record says {record.num_sequences}"
    if offsets[0] != 0 or offsets[-1] != n or n != record.num_tokens:
        return f"seq_offsets do not span the record's {record.num_tokens} tokens"
    if (np.diff(offsets) < 1).any():
        return "a sequence is empty or offsets decrease"
    mask = fields.get("loss_mask")
    if mask is not None and (mask.shape != (n,) or int(mask.max(initial=0)) > 1):
        return "the loss mask is not one 0/1 per token"
    for name in TOKEN_FIELDS:
        if name in fields and fields[name].shape != (n,):
            return f"{name} is not one entry per token"
    if "token_bytes" in fields and fields["text"].shape[0] != int(
        fields["token_bytes"].sum(dtype=np.int64)
    ):
        return "token_bytes do not add up to the text's bytes"
    t = n if mask is None else int(np.count_nonzero(mask))
    if record.num_trained is not None and record.num_trained != t:
        return f"{t} trained positions, record says {record.num_trained}"
    for name in TARGET_FIELDS:
        if name in fields and fields[name].shape[0] != t:
            return f"{name} has {fields[name].shape[0]} rows for {t} trained positions"
    if "sampled_distinct" in fields:
        m = int(fields["sampled_distinct"].sum(dtype=np.int64))
        for name in SAMPLE_FIELDS:
            if fields[name].shape[0] != m:
                return f"{name} has {fields[name].shape[0]} entries, sampled_distinct sums to {m}"
    return None


def select_sequences(fields: dict[str, NDArray], sequences: NDArray) -> dict[str, NDArray]:
    """The stored arrays of sequences ``sequences`` ((s,) ascending, distinct, in range) only,
    ``seq_offsets`` renumbered; ``layout_problem(fields, record)`` must have found nothing."""
    offsets = fields["seq_offsets"].astype(np.int64)  # (S+1,)
    mask = fields.get("loss_mask")
    row_offsets = offsets if mask is None else offsets_of(mask)[offsets]  # (S+1,)
    tokens = ranges(offsets[sequences], offsets[sequences + 1])
    rows = ranges(row_offsets[sequences], row_offsets[sequences + 1])
    out = dict(fields)
    out["seq_offsets"] = offsets_of(offsets[sequences + 1] - offsets[sequences])
    for name in TOKEN_FIELDS:
        if name in fields:
            out[name] = fields[name][tokens]
    if "token_bytes" in fields:  # the text by byte ranges
        spans = offsets_of(fields["token_bytes"])[offsets]  # (S+1,)
        out["text"] = fields["text"][ranges(spans[sequences], spans[sequences + 1])]
    for name in TARGET_FIELDS:
        if name in fields:
            out[name] = _rows(fields[name], rows)
    if "sampled_distinct" in fields:
        entries = offsets_of(fields["sampled_distinct"])  # (T+1,)
        picked = ranges(entries[rows], entries[rows + 1])
        for name in SAMPLE_FIELDS:
            out[name] = fields[name][picked]
    return out
