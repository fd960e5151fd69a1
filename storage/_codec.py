"""Store codecs: how a store keeps log-probs and top-k ids (docs/architecture.md §3, "Codecs").

A store's manifest names its codec (``codec``, format version 4 on; older stores are ``raw``):

- ``raw``: log-probs as ``logprob_dtype`` floats (bfloat16 as its raw bits), ids as ids — the
  layout of format versions 1 to 3.
- ``gaps``: every log-prob is stored as an int16 *level* on a fixed, non-uniform grid that is
  fine where probability is high and coarser deep in the tail (``SEGMENTS``); ``-inf`` is level
  ``NEG_INF_LEVEL``. A top-k row, sorted descending, is stored as its first level followed by
  the level gaps between neighbours (all >= 0, mostly small); the tail and sampled log-probs as
  levels. Top-k ids are stored as their rank in the shard's id frequency order (code 0 = the
  most frequent id), with the shard's ``topk_id_table`` mapping codes back to ids. Decoding is
  numpy only::

      lp = np.interp(np.cumsum(q, axis=-1), GRID_LEVELS, GRID_LOGPROBS, right=-np.inf)  # top-k
      lp = np.interp(q, GRID_LEVELS, GRID_LOGPROBS, right=-np.inf)  # tail, sampled
      ids = table[codes]

The grid's step doubles every nat from 1/1024 at log-probs near 0 to 1/8 below -5, so the
absolute *probability* error stays below ``max_prob_error("gaps")`` (~0.0014) everywhere while
the log-prob error is at most ``max_abs_error("gaps")`` (1/16). Log-probs below ``FLOOR``
(probability 0 even in float64) are stored as ``FLOOR``. The error is measured against the
log-prob in the store's ``logprob_dtype`` (what a ``raw`` store would hold); every decoded value
is exactly representable in that dtype, so decoding adds no rounding of its own.

This module is plain numpy and imports nothing else of kdcache.
"""

from __future__ import annotations

import math
from functools import cache
from typing import Any

import numpy as np
import numpy.typing as npt

CODECS = ("raw", "gaps")
DEFAULT_CODEC = "gaps"

# the gaps grid, from log-prob 0 downward: (lower end of the segment, step inside it)
SEGMENTS: tuple[tuple[float, float], ...] = (
    (-0.25, 1 / 1024),
    (-0.5, 1 / 512),
    (-1.0, 1 / 256),
    (-2.0, 1 / 128),
    (-3.0, 1 / 64),
    (-4.0, 1 / 32),
    (-5.0, 1 / 16),
    (-1024.0, 1 / 8),
)
FLOOR = SEGMENTS[-1][0]  # finite log-probs below it are stored as FLOOR


def _knots() -> tuple[tuple[int, ...], tuple[float, ...]]:
    levels, logprobs = [0], [0.0]
    for end, step in SEGMENTS:
        count = (logprobs[-1] - end) / step
        assert count == int(count), (end, step)
        levels.append(levels[-1] + int(count))
        logprobs.append(end)
    return tuple(levels), tuple(logprobs)


# knots of the piecewise-linear map level -> log-prob (levels ascending, log-probs descending)
GRID_LEVELS, GRID_LOGPROBS = _knots()
TOP_LEVEL = GRID_LEVELS[-1]  # the level of FLOOR
NEG_INF_LEVEL = TOP_LEVEL + 1  # the level of -inf
LEVEL_DTYPE = np.dtype(np.int16)
_ROWS_PER_BLOCK = 1024  # top-k rows decoded at a time (keeps temporaries in cache)

NDArray = npt.NDArray[Any]


def max_abs_error(codec: str) -> float:
    """The largest |decoded - stored-dtype log-prob| a codec allows for log-probs >= FLOOR
    (and -inf, kept exactly): half the coarsest step; 0 for ``raw``."""
    if codec == "raw":
        return 0.0
    return max(step for _, step in SEGMENTS) / 2


def error_bounds(codec: str) -> list[tuple[float, float]]:
    """[(lowest log-prob, max abs error)] per grid segment, from log-prob 0 down ([] for raw):
    a log-prob x >= lowest of a segment (and below the one before) decodes within the error."""
    if codec == "raw":
        return []
    return [(end, step / 2) for end, step in SEGMENTS]


def max_prob_error(codec: str) -> float:
    """The largest |exp(decoded) - exp(x)| over log-probs x <= 0: the error where probability
    is high is what the grid keeps small."""
    worst, upper = 0.0, 0.0
    for end, half in error_bounds(codec):
        # in [end, upper] the error d <= half; |e^x' - e^x| <= e^min(0, x + d) * (1 - e^-d)
        worst = max(worst, math.exp(min(0.0, upper + half)) * -math.expm1(-half))
        upper = end
    return worst


def quantize(values: NDArray) -> npt.NDArray[np.int16]:
    """Log-probs (any shape, any float dtype, each <= 0 or -inf) -> int16 levels, each the
    nearest grid point (ties to even); below FLOOR -> TOP_LEVEL, -inf -> NEG_INF_LEVEL."""
    if values.dtype == np.float16:  # a table of all 65,536 float16 values: ~8x faster
        return _gather(_float16_levels(), values.view(np.uint16))
    x = np.asarray(values, dtype=np.float64)
    # exact: the slopes are powers of two and the knots integers, so rounding picks the nearest
    y = np.interp(-x, np.negative(GRID_LOGPROBS), GRID_LEVELS)  # magnitude -> level
    levels = np.rint(y).astype(LEVEL_DTYPE)
    levels[np.isneginf(x)] = NEG_INF_LEVEL
    return levels


@cache
def _float16_levels() -> npt.NDArray[np.int16]:
    """The level of every float16 bit pattern (NaN patterns: level 0, never stored)."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    levels = quantize(np.where(np.isnan(values), np.float32(0), values.astype(np.float32)))
    levels.flags.writeable = False
    return levels


@cache
def _lookup(dtype: str) -> NDArray:
    """Every level's log-prob in ``dtype`` (float16 or float32): (NEG_INF_LEVEL + 1,).

    Exact in float32. In float16 the grid points a float16 log-prob can quantize to are exact;
    the others (e.g. -1023.875: float16 steps by 0.5 there) are never stored in a float16 store.
    """
    lut = np.interp(np.arange(NEG_INF_LEVEL + 1), GRID_LEVELS, GRID_LOGPROBS, right=-np.inf)
    lut[0] = -0.0  # a log-prob, never positive: keeps the sign-bit fast path of the sort check
    out = lut.astype(dtype)
    out.flags.writeable = False
    return out


def dequantize(levels: NDArray, dtype: str) -> NDArray:
    """int16 levels (any shape) -> log-probs in ``dtype``; levels outside 0..NEG_INF_LEVEL
    (damage, see ``level_problem``) are clipped into the grid."""
    return _gather(_lookup(dtype), levels)


def gaps_of(levels: NDArray) -> npt.NDArray[np.int16]:
    """Levels of sorted rows (T, k), each non-decreasing -> the first level and the gaps."""
    gaps = np.empty_like(levels, dtype=LEVEL_DTYPE)
    if levels.size:
        gaps[:, :1] = levels[:, :1]
        np.subtract(levels[:, 1:], levels[:, :-1], out=gaps[:, 1:])
    return gaps


def encode_rows(logprobs: NDArray) -> npt.NDArray[np.int16]:
    """Top-k rows (T, k) sorted descending (floats) -> int16 first levels and gaps (T, k)."""
    return gaps_of(quantize(logprobs))


def decode_rows(gaps: NDArray, dtype: str) -> NDArray:
    """int16 first levels and gaps (T, k) -> top-k log-probs (T, k), C-ordered, in ``dtype``.

    ``gaps`` may be a rank-major array's transpose (a view of a C-ordered (k, T) array, as both
    backends return them): then the levels are summed up rank by rank in place, overwriting
    ``gaps``, several times faster than a cumulative sum along each short row. Levels outside
    the grid (damage, see ``checked_decode_rows``) are clipped into it.
    """
    return _decode_rows(gaps, dtype, check=False)[0]


def checked_decode_rows(gaps: NDArray, dtype: str) -> tuple[NDArray, str | None]:
    """``decode_rows`` and ``level_problem(gaps, gaps=True)`` at once: (log-probs, problem).

    For rank-major gaps the check costs two passes over the int16 levels, not a row sum."""
    return _decode_rows(gaps, dtype, check=True)


def _decode_rows(gaps: NDArray, dtype: str, *, check: bool) -> tuple[NDArray, str | None]:
    out = np.empty(gaps.shape, dtype)
    lut = _lookup(dtype)
    block = _ROWS_PER_BLOCK
    rank_major = gaps.T
    if gaps.ndim == 2 and not gaps.flags.c_contiguous and rank_major.flags.c_contiguous:
        problem = None
        if check and gaps.size and int(rank_major.min()) < 0:
            problem = "a log-prob level gap is negative"
        if not rank_major.flags.writeable:
            rank_major = rank_major.copy()
        for j in range(1, rank_major.shape[0]):  # (k, T): rank j's levels from rank j - 1's
            np.add(rank_major[j], rank_major[j - 1], out=rank_major[j])
        # with gaps >= 0, the first level beyond the grid is either > NEG_INF_LEVEL or, past
        # int16's range, negative: so a sum gone wrong shows in the min or the max
        if (
            check
            and problem is None
            and gaps.size
            and (int(rank_major.min()) < 0 or int(rank_major.max()) > NEG_INF_LEVEL)
        ):
            problem = f"a log-prob level exceeds the grid's {NEG_INF_LEVEL}"
        for a in range(0, gaps.shape[0], block):
            np.take(lut, rank_major[:, a : a + block].T, mode="clip", out=out[a : a + block])
        return out, problem
    problem = level_problem(gaps, gaps=True) if check else None
    for a in range(0, gaps.shape[0], block):
        levels = np.cumsum(gaps[a : a + block], axis=1, dtype=LEVEL_DTYPE)
        np.take(lut, levels, mode="clip", out=out[a : a + block])
    return out, problem


def level_problem(levels: NDArray, *, gaps: bool) -> str | None:
    """What is wrong with stored levels (1-D) or first levels and gaps (T, k, ``gaps``): a
    negative value, or a level beyond NEG_INF_LEVEL; None when they are fine."""
    if levels.size == 0:
        return None
    if int(levels.min()) < 0:
        return "a log-prob level gap is negative" if gaps else "a log-prob level is negative"
    top = levels.sum(axis=1, dtype=np.int64) if gaps else levels
    if int(top.max()) > NEG_INF_LEVEL:
        return f"a log-prob level exceeds the grid's {NEG_INF_LEVEL}"
    return None


def rank_ids(ids: NDArray, vocab_size: int) -> tuple[NDArray, NDArray]:
    """Top-k ids (T, k) -> (codes (T, k), table (D,)) in ``ids``' dtype: ``table`` lists the D
    distinct ids by falling frequency (ties: smaller id first) and ``table[codes] == ids``."""
    flat = ids.reshape(-1)
    step = _ROWS_PER_BLOCK * 64
    counts = np.zeros(vocab_size, np.int64)
    for a in range(0, flat.shape[0], step):  # blocks: bincount copies its input to intp
        counts += np.bincount(flat[a : a + step], minlength=vocab_size)[:vocab_size]
    present = np.flatnonzero(counts)
    table = present[np.argsort(-counts[present], kind="stable")].astype(ids.dtype)
    code_of = np.zeros(vocab_size, ids.dtype)
    code_of[table] = np.arange(table.shape[0], dtype=ids.dtype)
    return _gather(code_of, ids), table


def unrank_ids(codes: NDArray, table: NDArray) -> NDArray:
    """``table[codes]``, C-ordered (``codes`` may be a rank-major array's transpose, as both
    backends return them); codes beyond the table (damage, see ``code_problem``) are clipped."""
    if codes.ndim == 2 and not codes.flags.c_contiguous:
        out = np.empty(codes.shape, table.dtype)
        for a in range(0, codes.shape[0], _ROWS_PER_BLOCK):  # strided reads, contiguous writes
            np.take(
                table, codes[a : a + _ROWS_PER_BLOCK], mode="clip", out=out[a : a + _ROWS_PER_BLOCK]
            )
        return out
    return _gather(table, codes)


def code_problem(codes: NDArray, table: NDArray, vocab_size: int) -> str | None:
    """Codes that index nothing in ``table``, or a table that is not distinct in-vocabulary ids."""
    if table.ndim != 1 or table.shape[0] == 0:
        return f"topk_id_table must be a non-empty list of ids, got shape {table.shape}"
    if codes.size and int(codes.max()) >= table.shape[0]:
        return f"a top-k id code is {int(codes.max())}, the id table has {table.shape[0]} ids"
    if int(table.max()) >= vocab_size:
        return f"topk_id_table holds id {int(table.max())}, outside [0, {vocab_size})"
    if np.unique(table).shape[0] != table.shape[0]:
        return "topk_id_table lists an id twice"
    return None


def transposed(values: NDArray) -> NDArray:
    """(n, k) -> a C-ordered (k, n) copy, made in blocks of rows: numpy's own transposing copy
    of a long array misses the cache on every element (~5x slower at k = 64)."""
    out = np.empty(values.shape[::-1], values.dtype)
    step = _ROWS_PER_BLOCK // 4  # (256, k) blocks: source and destination stay in cache
    for a in range(0, values.shape[0], step):
        out[:, a : a + step] = values[a : a + step].T
    return out


def _gather(table: NDArray, index: NDArray) -> NDArray:
    """``table[index]`` (clipped) in blocks, so the index's intp copy stays small."""
    out = np.empty(index.shape, table.dtype)
    flat_in, flat_out = index.reshape(-1), out.reshape(-1)
    step = _ROWS_PER_BLOCK * 64
    for a in range(0, flat_in.shape[0], step):
        np.take(table, flat_in[a : a + step], mode="clip", out=flat_out[a : a + step])
    return out
