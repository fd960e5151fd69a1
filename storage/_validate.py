"""The rules a sequence (on append) and a shard (on read and verify) must keep.

Each ``*_problem`` function returns a description of the first broken rule, or None; the writer
turns it into a ``ValueError``, the reader into a ``StoreCorrupt`` naming the shard.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

from ._arrays import (
    TOKEN_FIELDS,
    NDArray,
    ShardArrays,
    ShardLayout,
    offsets_of,
    stored_logprobs,
    tail_from_topk,
)
from ._base import ShardRecord
from ._stored import LEVEL_FIELDS, stored_values
from ._text import per_position_problem, prepare_text_fields
from .errors import StoreCorrupt


def sortable_bits(values: NDArray) -> NDArray:
    """Map float bit patterns to unsigned ints with the same order (the IEEE total-order trick).

    ``values``: any shape, float16/float32 or raw bfloat16 (uint16). Lets the "sorted
    descending" check run on integers, which numpy compares far faster than float16.
    """
    if values.dtype.itemsize == 2:
        raw16 = values.view(np.uint16)
        return np.where(raw16 >= 0x8000, ~raw16, raw16 | np.uint16(0x8000))
    raw32 = values.view(np.uint32)
    return np.where(raw32 >= 0x80000000, ~raw32, raw32 | np.uint32(0x80000000))


def rows_sorted_descending(raw: NDArray) -> bool:
    """True when every row of ``raw`` (N, k) — float16/32 or raw bfloat16 bits — is descending.

    Fast path: for negative floats the signed-integer view grows as the value falls, so a row
    whose integer view is non-decreasing and ends negative is all negative and sorted — the
    usual case for log-probs, settled in one integer pass. Anything else (zeros, positive
    values, NaN) is decided by comparing exact total-order keys.
    """
    if raw.shape[0] == 0 or raw.shape[1] < 2:
        return True
    signed: npt.NDArray[np.signedinteger[Any]] = raw.view(
        np.int16 if raw.dtype.itemsize == 2 else np.int32
    )  # (N, k)
    if (signed[:, -1] < 0).all() and not (signed[:, 1:] < signed[:, :-1]).any():
        return True
    keys = sortable_bits(raw)
    return not bool((keys[:, 1:] > keys[:, :-1]).any())


def _id_problem(label: str, ids: NDArray, vocab: int) -> str | None:
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab:
        return f"{label} outside [0, {vocab}), found {lo}..{hi}"
    return None


def mask_problem(n: int, mask: NDArray, seq_offsets: NDArray | None = None) -> str | None:
    """loss_mask: (N,) of 0/1 (bool or integers) with at least one 1 per sequence
    (``seq_offsets`` (S+1,), valid and spanning N; None: the N tokens are one sequence)."""
    if mask.shape != (n,):
        return f"loss_mask shape must be ({n},) like tokens, got {mask.shape}"
    if mask.dtype.kind not in "biu":
        return f"loss_mask must be bools or 0/1 integers, got dtype {mask.dtype}"
    if n and mask.dtype.kind != "b" and (int(mask.min()) < 0 or int(mask.max()) > 1):
        return f"loss_mask values must be 0 or 1, found {int(mask.min())}..{int(mask.max())}"
    starts = np.zeros(1, np.int64) if seq_offsets is None else seq_offsets[:-1]
    trained = np.add.reduceat(mask, starts, dtype=np.int64) if n else np.zeros(1, np.int64)
    if (trained < 1).any():
        return (
            "a sequence with no trained position stores nothing a student can use, its "
            "loss_mask is all 0"
        )
    return None


def topk_problem(
    n: int, k: int, ids: NDArray, raw: NDArray, logprobs: NDArray, vocab: int, values: bool = True
) -> str | None:
    """Top-k rows: ids (T, k) in the vocabulary; log-probs (T, k) descending, <= 0, not NaN.

    ``raw`` is ``logprobs`` as stored (bfloat16 as uint16 bits), for the integer sort check.
    ``values=False``: shapes only (a codec's decoding already guarantees the rest).
    """
    if ids.shape != (n, k) or raw.shape != (n, k) or logprobs.shape != (n, k):
        return (
            f"top-k shapes must be ({n}, {k}) for {n} target rows at k={k}, got topk_ids "
            f"{ids.shape}, topk_logprobs {logprobs.shape}"
        )
    if n == 0 or not values:
        return None
    problem = _id_problem("top-k id", ids, vocab)
    if problem is not None:
        return problem
    if not rows_sorted_descending(raw):
        return "top-k log-probs are not sorted descending"
    # sorted rows put a positive NaN first and a negative NaN last
    if not (logprobs[:, 0] <= 0).all() or np.isnan(logprobs[:, -1]).any():
        return "a top-k log-prob is positive or NaN"
    return None


def tail_problem(n: int, tail: NDArray, values: bool = True) -> str | None:
    """topk_tail_logprob: (T,) floats, each <= 0 or -inf (never NaN); ``values=False``: the
    shape only."""
    if tail.shape != (n,):
        return f"topk_tail_logprob shape must be ({n},), got {tail.shape}"
    if values and not (tail <= 0).all():  # False for NaN too
        return "a topk_tail_logprob is positive or NaN"
    return None


def sampled_problem(
    n: int,
    distinct: NDArray,
    ids: NDArray,
    counts: NDArray,
    logprobs: NDArray,
    *,
    samples: int,
    vocab: int,
) -> str | None:
    """Sampled entries of T target rows: distinct (T,) >= 1; ids, counts, logprobs (M,) with
    M = sum(distinct); ids in the vocabulary and strictly ascending within a row; counts
    >= 1 summing to ``samples`` per row; log-probs <= 0, not NaN."""
    if distinct.shape != (n,):
        return f"sampled_distinct shape must be ({n},), got {distinct.shape}"
    if n == 0:
        return None
    most = min(samples, vocab)
    if int(distinct.min()) < 1 or int(distinct.max()) > most:
        return (
            f"sampled_distinct outside 1..{most}, found {int(distinct.min())}.."
            f"{int(distinct.max())}"
        )
    off = offsets_of(distinct)  # (T+1,)
    m = int(off[-1])
    for label, values in (("ids", ids), ("counts", counts), ("logprobs", logprobs)):
        if values.shape != (m,):
            return f"sampled_{label} shape must be ({m},) = sum of sampled_distinct, got {values.shape}"
    problem = _id_problem("sampled id", ids, vocab)
    if problem is not None:
        return problem
    rising = ids[1:] > ids[:-1]  # (M-1,); compared as stored, no widening copy
    rising[off[1:-1] - 1] = True  # a position's first id may be below the last one's
    if not rising.all():
        return "sampled ids are not strictly ascending within a position"
    if int(counts.min()) < 1:
        return f"a sampled count is {int(counts.min())}, counts must be >= 1"
    sums = np.add.reduceat(counts, off[:-1], dtype=np.int64)  # (T,)
    if (sums != samples).any():
        bad = int(sums[sums != samples][0])
        return f"sampled counts of a position sum to {bad}, not samples={samples}"
    if not (logprobs <= 0).all():  # False for NaN too
        return "a sampled log-prob is positive or NaN"
    return None


def _integers(label: str, values: NDArray) -> NDArray:
    if values.dtype.kind not in "iu":
        raise ValueError(f"{label} must be integers, got dtype {values.dtype}")
    return values


def _floats(label: str, values: NDArray) -> NDArray:
    if values.dtype.kind != "f":
        raise ValueError(f"{label} must be floats, got dtype {values.dtype}")
    return values


def prepare_sequence(
    layout: ShardLayout,
    tokens: NDArray,
    given: dict[str, NDArray],
    where: str,
    loss_mask: NDArray | None = None,
    per_position: dict[str, Any] | None = None,
) -> dict[str, NDArray]:
    """Check one appended sequence and return its fields in their stored form (dtypes; in a
    ``gaps`` store the log-prob fields and the tail as the codec's int16 levels).

    ``tokens`` (L,); ``loss_mask`` (L,) 0/1, required exactly when the store has a loss mask;
    ``given`` holds the target arrays the caller passed (by ``append``'s keyword names), with
    T rows: T = ``loss_mask.sum()`` (>= 1), or L without a mask. Arrays the store's kind needs
    are required (except ``topk_tail_logprob``, computed from the top-k log-probs when
    absent); others are refused. ``per_position``: ``next_token_logprob``, ``text`` and
    ``token_ends`` as ``append`` takes them (``_text.prepare_text_fields``).

    Raises:
        ValueError: a missing or extra array, wrong shapes or dtypes, a broken rule.
    """
    for name in given:
        if name not in layout.fields:
            raise ValueError(
                f"{name} given, but a {layout.targets} store (format_version "
                f"{layout.format_version}) has no such field, drop it or create the store with "
                "other targets"
            )
    if (loss_mask is None) == layout.loss_mask:
        raise ValueError(
            "a store with a loss mask needs loss_mask (L,) for every sequence, got none, pass it"
            if layout.loss_mask
            else f"loss_mask given, but this store (format_version {layout.format_version}) "
            "has no loss mask, drop it or create the store with make_manifest(loss_mask=True)"
        )
    wanted = [n for n in layout.fields if n not in (*TOKEN_FIELDS, "text")]
    missing = [n for n in wanted if n not in given and n != "topk_tail_logprob"]
    if missing:
        raise ValueError(
            f"a {layout.targets} store needs {', '.join(missing)} for every sequence, "
            f"got {', '.join(given) or 'no targets'}, pass them"
        )
    n = tokens.shape[0] if tokens.ndim == 1 else -1
    if n < 1:
        raise ValueError(f"sequence shapes must be tokens (L,) with L >= 1, got {tokens.shape}")
    _integers("tokens", tokens)
    out = {"tokens": tokens.astype(np.int32)}
    rows, label = n, "L"
    if loss_mask is not None:
        problem = mask_problem(n, loss_mask)
        if problem is not None:
            raise ValueError(f"{problem} ({where})")
        out["loss_mask"] = loss_mask.astype(np.uint8)
        rows, label = int(out["loss_mask"].sum(dtype=np.int64)), "T"
    problem = _id_problem("token", tokens, layout.vocab_size)
    if "topk_ids" in layout.fields:
        problem = problem or _prepare_topk(layout, rows, label, given, out)
    if "sampled_distinct" in layout.fields:
        problem = problem or _prepare_sampled(layout, rows, given, out)
    if problem is not None:
        raise ValueError(f"{problem} ({where})")
    try:
        out |= prepare_text_fields(layout.fields, layout.logprob_dtype, n, per_position or {})
    except ValueError as e:
        raise ValueError(f"{e} ({where})") from e
    if layout.codec != "raw":  # checked as numbers, stored as the codec's levels
        for name in LEVEL_FIELDS:
            if name in out:
                out[name] = stored_values(name, out[name], layout)
    return out


def _prepare_topk(
    layout: ShardLayout, n: int, label: str, given: dict[str, NDArray], out: dict[str, NDArray]
) -> str | None:
    k, vocab = layout.top_k, layout.vocab_size
    ids, lps = given["topk_ids"], given["topk_logprobs"]
    if ids.shape != (n, k) or lps.shape != (n, k):
        rows = f" with T = loss_mask.sum() = {n}" if label == "T" else ""
        raise ValueError(
            f"sequence shapes must be tokens (L,), topk_ids ({label}, {k}), topk_logprobs "
            f"({label}, {k}){rows}, got ({out['tokens'].shape[0]},), {ids.shape}, {lps.shape}"
        )
    _integers("top-k ids", ids)
    raw = stored_logprobs(_floats("top-k log-probs", lps), layout.logprob_dtype)
    problem = topk_problem(n, k, ids, raw, lps, vocab)
    if problem is not None:
        return problem
    out["topk_ids"] = ids.astype(layout.id_dtype)
    out["topk_logprobs"] = raw
    if "topk_tail_logprob" in layout.fields:
        tail = given.get("topk_tail_logprob")
        if tail is None:
            out["topk_tail_logprob"] = tail_from_topk(lps, complete=k == vocab)
        else:
            problem = tail_problem(n, _floats("topk_tail_logprob", tail))
            out["topk_tail_logprob"] = tail.astype(np.float32)
    return problem


def _prepare_sampled(
    layout: ShardLayout, n: int, given: dict[str, NDArray], out: dict[str, NDArray]
) -> str | None:
    distinct = _integers("sampled_distinct", given["sampled_distinct"])
    ids = _integers("sampled_ids", given["sampled_ids"])
    counts = _integers("sampled_counts", given["sampled_counts"])
    lps = _floats("sampled_logprobs", given["sampled_logprobs"])
    problem = sampled_problem(
        n, distinct, ids, counts, lps, samples=layout.samples, vocab=layout.vocab_size
    )
    assert layout.count_dtype is not None  # a sampled store has one (validate_manifest)
    out["sampled_distinct"] = distinct.astype(layout.count_dtype)
    out["sampled_ids"] = ids.astype(layout.id_dtype)
    out["sampled_counts"] = counts.astype(layout.count_dtype)
    out["sampled_logprobs"] = stored_logprobs(lps, layout.logprob_dtype)
    return problem


def check_invariants(
    arrays: ShardArrays,
    *,
    layout: ShardLayout,
    raw_topk_logprobs: NDArray | None,
    record: ShardRecord | None = None,
    decoded_by_codec: bool = False,
) -> None:
    """Whole-shard checks: shapes, offsets, id ranges, the loss mask (0/1, >= 1 trained position
    per sequence, T = its sum target rows), sorted rows, sampled entries' rules.

    ``raw_topk_logprobs`` is the top-k array as stored (bfloat16 still as uint16; in a gaps store
    the decoded floats) so the sort check needs no conversion. ``decoded_by_codec``: the top-k
    rows and tails come from a codec whose checked levels and id codes guarantee their values
    (in the vocabulary, sorted, <= 0): only their shapes are checked. Raises ``StoreCorrupt``
    naming the shard.
    """
    name = arrays.shard
    n = arrays.tokens.shape[0] if arrays.tokens.ndim == 1 else -1
    problem = _layout_problem(arrays, n, layout, record)
    t = n
    if problem is None and arrays.loss_mask is not None:
        problem = mask_problem(n, arrays.loss_mask, arrays.seq_offsets)
        t = arrays.num_targets if problem is None else n
        if problem is None and record is not None and record.num_trained != t:
            problem = f"{t} trained positions, record says {record.num_trained}"
    if problem is None and arrays.topk_ids is not None:
        assert arrays.topk_logprobs is not None and raw_topk_logprobs is not None
        problem = topk_problem(
            t,
            layout.top_k,
            arrays.topk_ids,
            raw_topk_logprobs,
            arrays.topk_logprobs,
            layout.vocab_size,
            values=not decoded_by_codec,
        )
    if problem is None and arrays.topk_tail_logprob is not None:
        problem = tail_problem(t, arrays.topk_tail_logprob, values=not decoded_by_codec)
    if problem is None and arrays.sampled_distinct is not None:
        assert arrays.sampled_ids is not None and arrays.sampled_counts is not None
        assert arrays.sampled_logprobs is not None
        problem = sampled_problem(
            t,
            arrays.sampled_distinct,
            arrays.sampled_ids,
            arrays.sampled_counts,
            arrays.sampled_logprobs,
            samples=layout.samples,
            vocab=layout.vocab_size,
        )
    if problem is None:
        problem = per_position_problem(arrays)
    if problem is not None:
        raise StoreCorrupt(f"shard {name} is corrupt: {problem}, run `kdcache verify`", shard=name)


def _layout_problem(
    arrays: ShardArrays, n: int, layout: ShardLayout, record: ShardRecord | None
) -> str | None:
    """Sequence offsets, the record's counts, token ids and the mask's presence."""
    offsets = arrays.seq_offsets
    if offsets.ndim != 1 or offsets.shape[0] < 2 or offsets[0] != 0 or offsets[-1] != n:
        return f"seq_offsets do not span the {n} tokens"
    if (np.diff(offsets) < 1).any():
        return "a sequence is empty or offsets decrease"
    if record is not None and (record.num_tokens, record.num_sequences) != (
        n,
        arrays.num_sequences,
    ):
        return (
            f"{n} tokens/{arrays.num_sequences} sequences, "
            f"record says {record.num_tokens}/{record.num_sequences}"
        )
    if (arrays.loss_mask is not None) != layout.loss_mask:
        where = "missing, the manifest has" if layout.loss_mask else "present, the manifest has no"
        return f"loss_mask {where} loss_mask"
    if record is not None and arrays.loss_mask is None and record.num_trained is not None:
        return f"record counts {record.num_trained} trained positions in a store without a mask"
    return _id_problem("token", arrays.tokens, layout.vocab_size)
