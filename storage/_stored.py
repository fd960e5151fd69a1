"""Between decoded fields and a shard's files: what each backend writes and how it is read back.

``stored_shard`` turns a ``ShardArrays`` in its stored representation (``_arrays.py``) into the
arrays a backend writes, with their attributes (Zarr array attributes, Arrow field metadata);
``decode_fields`` turns what a backend read back into decoded fields. The codec math lives in
``_codec.py``; the backends know neither codec.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ._arrays import (
    ID_TABLE,
    LOGPROB_FIELDS,
    RAW_LOGPROB_DTYPE,
    NDArray,
    ShardArrays,
    ShardLayout,
    decoded_logprobs,
    stored_logprobs,
)
from ._codec import (
    CODECS,
    GRID_LEVELS,
    GRID_LOGPROBS,
    LEVEL_DTYPE,
    checked_decode_rows,
    code_problem,
    decode_rows,
    dequantize,
    encode_rows,
    level_problem,
    quantize,
    rank_ids,
    unrank_ids,
)
from ._text import TOKEN_BYTES_DTYPES, narrowest_lengths
from .errors import StoreCorrupt

# fields a gaps store keeps as int16 levels (top-k rows: first level and gaps)
LEVEL_FIELDS = ("topk_logprobs", "topk_tail_logprob", "sampled_logprobs")
# how a reader without kdcache decodes a gaps field q (written into its attributes)
DECODE = {
    "topk_logprobs": "np.interp(np.cumsum(q, axis=-1), levels, logprobs, right=-np.inf)",
    "topk_tail_logprob": "np.interp(q, levels, logprobs, right=-np.inf)",
    "sampled_logprobs": "np.interp(q, levels, logprobs, right=-np.inf)",
    "topk_ids": f"{ID_TABLE}[q]",
}
# ... when a backend stores a (T, k) field rank-major, as a (k, T) array
DECODE_RANK_MAJOR = {
    "topk_logprobs": "np.interp(np.cumsum(q, axis=0), levels, logprobs, right=-np.inf).T",
    "topk_ids": f"{ID_TABLE}[q].T",
}


@dataclass(frozen=True)
class StoredField:
    """One array a backend writes.

    ``rank_major``: a (T, k) array that compresses best rank by rank and decodes fastest so
    (Zarr stores it transposed, as a (k, T) array, bit-shuffled; Arrow, from format version 5,
    as byte planes rank by rank; its ``decode`` attribute then is ``DECODE_RANK_MAJOR``'s). ``per_shard``: not one entry per token, target row or sample
    but one array for the shard (Arrow keeps it in the schema metadata).
    """

    name: str
    data: NDArray
    attributes: dict[str, Any] = field(default_factory=dict)
    rank_major: bool = False
    per_shard: bool = False


def _grid(name: str) -> dict[str, Any]:
    return {
        "codec": "gaps",
        "levels": list(GRID_LEVELS),
        "logprobs": list(GRID_LOGPROBS),
        "decode": DECODE[name],
    }


def stored_shard(arrays: ShardArrays, logprob_dtype: str, codec: str) -> list[StoredField]:
    """The arrays a backend writes for ``arrays``, a shard in the stored representation of
    ``codec`` (decoded float log-probs are accepted for a raw shard), in file order."""
    if codec not in CODECS:
        raise ValueError(f"unknown codec, {codec}, use one of {', '.join(CODECS)}")
    out: list[StoredField] = []
    for name, data in arrays.fields().items():
        if name == "token_bytes":
            out.append(StoredField(name, narrowest_lengths(data)))
        elif codec == "raw" or (name in LOGPROB_FIELDS and name not in LEVEL_FIELDS):
            if name in LOGPROB_FIELDS:
                data = stored_logprobs(data, logprob_dtype)
                out.append(StoredField(name, data, {"dtype": logprob_dtype}))
            else:
                out.append(StoredField(name, data))
        elif name in LEVEL_FIELDS:
            if data.dtype != LEVEL_DTYPE:
                raise ValueError(f"{name} of a gaps shard must be {LEVEL_DTYPE}, got {data.dtype}")
            dtype = {"dtype": logprob_dtype} if name in LOGPROB_FIELDS else {}
            attributes = {**dtype, **_grid(name)}
            out.append(StoredField(name, data, attributes, rank_major=data.ndim == 2))
        elif name == "topk_ids":
            codes, table = rank_ids(data, int(data.max(initial=0)) + 1)
            attributes = {"codec": "gaps", "table": ID_TABLE, "decode": DECODE[name]}
            out.append(StoredField(name, codes, attributes, rank_major=True))
            out.append(StoredField(ID_TABLE, table, per_shard=True))
        else:
            out.append(StoredField(name, data))
    return out


def stored_values(name: str, values: NDArray, layout: ShardLayout) -> NDArray:
    """Decoded values of a log-prob field or the tail (floats; raw bfloat16 bits accepted) in
    their stored form: ``logprob_dtype`` (tail: float32), or int16 levels in a gaps store."""
    if name in LOGPROB_FIELDS:
        stored = stored_logprobs(values, layout.logprob_dtype)
    else:
        stored = values.astype(np.float32, copy=False)
    if layout.codec == "raw":
        return stored
    floats = decoded_logprobs(stored, layout.logprob_dtype) if name in LOGPROB_FIELDS else stored
    return encode_rows(floats) if name == "topk_logprobs" else quantize(floats)


def to_stored(arrays: ShardArrays, layout: ShardLayout) -> ShardArrays:
    """A decoded shard (what ``read_shard`` returns) in the stored representation of
    ``layout``'s codec, ready for a backend's ``encode`` (e.g. to re-encode a store)."""
    fields = arrays.fields()
    for name in LEVEL_FIELDS:
        if name in fields:
            fields[name] = stored_values(name, fields[name], layout)
    return ShardArrays.from_fields(fields, arrays.seq_offsets, arrays.shard)


def stored_dtypes(layout: ShardLayout) -> dict[str, str]:
    """What each stored array of ``layout`` must be: "<label>/<numpy dtype>" for arrays the
    backend labels (log-prob fields by their dtype, gaps arrays by "gaps"), else the dtype
    ("|"-separated when a shard may choose among several)."""
    lp = layout.logprob_dtype
    wanted = {
        "tokens": "int32",
        "loss_mask": "uint8",
        "topk_ids": layout.id_dtype,
        "topk_logprobs": f"{lp}/{RAW_LOGPROB_DTYPE[lp]}",
        "topk_tail_logprob": "float32",
        "sampled_distinct": str(layout.count_dtype),
        "sampled_ids": layout.id_dtype,
        "sampled_counts": str(layout.count_dtype),
        "sampled_logprobs": f"{lp}/{RAW_LOGPROB_DTYPE[lp]}",
        "next_token_logprob": f"{lp}/{RAW_LOGPROB_DTYPE[lp]}",  # as is in any codec
        "token_bytes": "|".join(TOKEN_BYTES_DTYPES),  # the shard's narrowest
        "text": "uint8",
    }
    if layout.codec == "gaps":
        wanted.update({name: f"gaps/{LEVEL_DTYPE}" for name in LEVEL_FIELDS})
        wanted.update({"topk_ids": f"gaps/{layout.id_dtype}", ID_TABLE: layout.id_dtype})
    return {name: wanted[name] for name in layout.stored_fields}


def decode_fields(
    fields: dict[str, NDArray], layout: ShardLayout, *, check: bool, shard: str
) -> tuple[dict[str, NDArray], NDArray | None]:
    """Stored arrays (dtypes already checked) -> (decoded fields, the top-k log-probs as stored
    for the sort check: raw floats or bfloat16 bits; a gaps store's decoded floats).

    ``check``: also look for levels and codes out of range (``verify``); without it damaged
    values are clipped into range. Raises ``StoreCorrupt`` naming the shard.
    """
    fields = dict(fields)
    raw_topk = fields.get("topk_logprobs")
    if layout.codec == "raw":
        for name in LOGPROB_FIELDS:
            if name in fields:
                fields[name] = decoded_logprobs(fields[name], layout.logprob_dtype)
        return fields, raw_topk
    out_dtype = "float16" if layout.logprob_dtype == "float16" else "float32"
    if "next_token_logprob" in fields:  # not a level field: stored as raw
        fields["next_token_logprob"] = decoded_logprobs(
            fields["next_token_logprob"], layout.logprob_dtype
        )
    problem = None
    for name in LEVEL_FIELDS:
        if name not in fields:
            continue
        levels = fields[name]
        if name == "topk_logprobs":  # the rows' level check rides along with their decoding
            if check:
                raw_topk, found = checked_decode_rows(levels, out_dtype)
                problem = problem or found
            else:
                raw_topk = decode_rows(levels, out_dtype)
            fields[name] = raw_topk
            continue
        if check:
            problem = problem or level_problem(levels, gaps=False)
        fields[name] = dequantize(levels, "float32" if name not in LOGPROB_FIELDS else out_dtype)
    if "topk_ids" in fields:
        table = fields.pop(ID_TABLE)
        if check:
            problem = problem or code_problem(fields["topk_ids"], table, layout.vocab_size)
        fields["topk_ids"] = unrank_ids(fields["topk_ids"], table)
    if problem is not None:
        raise StoreCorrupt(
            f"shard {shard} is corrupt: {problem}, run `kdcache verify`", shard=shard
        )
    return fields, raw_topk
