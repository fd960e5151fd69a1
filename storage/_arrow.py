"""Arrow backend: one IPC file per shard, one row per sequence.

Schema (zstd-compressed buffers; a column exists only when the store has the field)::

    tokens:            list<int32>                                 # (L,) per row
    loss_mask:         list<uint8>                                 # (L,) per row, 0/1
    topk_ids:          list<fixed_size_list<uint16|uint32>[k]>     # (T_s, k) per row
    topk_logprobs:     list<fixed_size_list<float16|float32|uint16>[k]>
    topk_tail_logprob: list<float32>                               # (T_s,) per row
    sampled_distinct:  list<uint8|uint16>                          # (T_s,) per row
    sampled_ids:       list<uint16|uint32>                         # (M_s,) per row
    sampled_counts:    list<uint8|uint16>                          # (M_s,) per row
    sampled_logprobs:  list<float16|float32|uint16>                # (M_s,) per row
    next_token_logprob: list<float16|float32|uint16>               # (L,) per row; v6
    token_bytes:       list<uint8|uint16|uint32>                   # (L,) per row; v6
    text:              list<uint8>                                 # (B_s,) per row; v6

T_s = sum of the row's ``loss_mask`` (its trained positions, in order), or L without a mask.
Log-prob columns carry field metadata {"dtype": "bfloat16"} when the values are raw bfloat16
bits. In a store of codec ``gaps`` (_codec.py) the log-prob columns and the tail are int16
levels and ``topk_ids`` holds codes; their field metadata say how to decode (``codec``,
``levels``, ``logprobs`` as JSON, ``decode``), and the schema metadata ``topk_id_table`` holds
the shard's id table as JSON ``{"dtype": ..., "values": [...]}``: ids = table[codes].

Format version 5 keeps a gaps store's two (T, k) columns as **byte planes, rank-major**
(IPC compresses each buffer on its own and has no byte-shuffle: planes are the shuffle)::

    topk_ids:      list<struct<b0r0: uint8, ..., b0r{k-1}, b1r0, ..., b1r{k-1}>>  # uint16 codes
    topk_logprobs: list<struct<b0r0: uint8, ...>>                                # int16 levels

child ``b{i}r{j}`` is byte i (little-endian) of rank j's value, so each child of a record
batch is one compressed buffer of one byte of one rank (uint32 codes: 4 bytes, b0..b3). Field
metadata ``planes_of`` names the integer dtype and ``layout`` the numpy line that rebuilds the
rank-major (k, T) integers; ``decode`` then is the Zarr backend's rank-major one. Version 4
kept them as ``list<fixed_size_list<int16|uint16|uint32>[k]>`` (read as ever).

Readable without kdcache: ``pyarrow.ipc.open_file(path).read_all()``. The list offsets
of a per-token column are the sequence boundaries (``seq_offsets`` of the Zarr backend); a
row's M_s sampled entries belong to its target rows in order, ``sampled_distinct[r]`` each.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ._arrays import (
    LOGPROB_FIELDS,
    SAMPLE_FIELDS,
    TARGET_FIELDS,
    TEXT_FIELDS,
    ShardArrays,
    offsets_of,
)
from ._base import ShardCodec
from ._codec import transposed
from ._stored import DECODE_RANK_MAJOR, StoredField, stored_shard
from .errors import StoreCorrupt
from .manifest import FORMAT_VERSION

BATCH_TOKENS = 1 << 18  # rows of one record batch hold about this many tokens
BATCH_ENTRIES = 1 << 22  # ... and at most about this many sampled entries (int32 list offsets)
# Arrow IPC has no byte-shuffle, so plain zstd needs a higher level than Zarr's blosc to get
# close in size (level 1 stores ~30% more bytes per token on Zipf-like rows; see bench/store.py)
ZSTD_LEVEL = 6
PLANES_VERSION = 5  # from this format version on, rank-major (T, k) fields are byte planes
# the "layout" metadata of a byte-plane column c (b: bytes per value, k: ranks, dtype: its type)
PLANES = (
    "q = np.moveaxis(np.stack([x.to_numpy() for x in c.combine_chunks().flatten().flatten()])"
    ".reshape(b, k, -1), 0, -1).copy().view(dtype)[..., 0]  # (k, T) rank-major"
)


def _column(flat: npt.NDArray[Any], offsets: npt.NDArray[np.int32], planes: bool) -> pa.Array:
    """A list column of ``flat`` (n,) or (n, k) values, the rows cut at ``offsets``; ``planes``:
    (n, k) integers as a struct of their byte planes, rank by rank (``PLANES``)."""
    if planes:
        n, k = flat.shape
        size = flat.dtype.itemsize
        ranks = transposed(flat).view(np.uint8).reshape(k, n, size)  # (k, n, bytes)
        values: pa.Array = pa.StructArray.from_arrays(
            [pa.array(np.ascontiguousarray(ranks[j, :, i])) for i in range(size) for j in range(k)],
            names=[f"b{i}r{j}" for i in range(size) for j in range(k)],
        )  # (n,) structs of size * k uint8 children, byte i of rank j each
    else:
        values = pa.array(flat.reshape(-1))
        if flat.ndim == 2:
            values = pa.FixedSizeListArray.from_arrays(values, flat.shape[1])
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


def _from_planes(chunks: list[pa.StructArray], dtype: np.dtype[Any]) -> npt.NDArray[Any]:
    """The (k, T) integers of byte-plane struct arrays (one per record batch, T in all)."""
    size = dtype.itemsize
    k = chunks[0].type.num_fields // size
    if k * size != chunks[0].type.num_fields or k == 0:
        raise ValueError(f"a byte-plane column of {dtype} has {chunks[0].type.num_fields} planes")
    out = np.empty((k, sum(len(c) for c in chunks)), dtype)  # (k, T)
    wide = out.view(f"<u{size}")
    a = 0
    for chunk in chunks:
        b = a + len(chunk)
        planes = [p.to_numpy() for p in chunk.flatten()]  # size * k of (t,) uint8
        high = np.empty(b - a, wide.dtype)
        for j in range(k):
            row = wide[j, a:b]
            row[...] = planes[j]
            for i in range(1, size):
                np.left_shift(planes[i * k + j], 8 * i, out=high, dtype=wide.dtype)
                np.bitwise_or(row, high, out=row)
        a = b
    return out


def _unit(name: str) -> str:
    """What one list entry of column ``name`` is: a "token", a "target" row, a "sample" or a
    "byte" of text."""
    if name in TEXT_FIELDS:
        return "byte"
    if name in SAMPLE_FIELDS:
        return "sample"
    return "target" if name in TARGET_FIELDS else "token"


def _cuts(boundaries: npt.NDArray[np.int64], step: int) -> npt.NDArray[np.int64]:
    """Sequence indices where a batch starts so that each holds about ``step`` units."""
    return np.searchsorted(boundaries, np.arange(0, boundaries[-1], step)).astype(np.int64)


class ArrowCodec(ShardCodec):
    suffix = ".arrow"

    def encode(
        self,
        arrays: ShardArrays,
        logprob_dtype: str,
        codec: str,
        format_version: int = FORMAT_VERSION,
    ) -> dict[str, bytes]:
        stored = stored_shard(arrays, logprob_dtype, codec)
        fields = {f.name: f.data for f in stored if not f.per_shard}
        planes = {f.name for f in stored if f.rank_major and format_version >= PLANES_VERSION}
        field_meta = {
            f.name: _metadata(_planes_attributes(f) if f.name in planes else f.attributes)
            for f in stored
            if not f.per_shard
        }
        shard_meta = {
            "kdcache": json.dumps(
                {"format_version": format_version, "logprob_dtype": logprob_dtype}
            )
        }
        for f in stored:
            if f.per_shard:  # one array for the whole file: JSON in the schema metadata
                shard_meta[f.name] = json.dumps(
                    {"dtype": str(f.data.dtype), "values": f.data.tolist()}
                )
        offsets = arrays.seq_offsets  # (S+1,) token boundaries
        rows = arrays.target_offsets  # (S+1,) target-row boundaries (= offsets without a mask)
        sampled = arrays.sampled_offsets
        entries = sampled[rows] if sampled is not None else None  # (S+1,) entry boundaries
        spans = arrays.text_offsets  # (S+1,) text byte boundaries, or None
        cuts = _cuts(offsets, BATCH_TOKENS)
        if entries is not None:
            cuts = np.concatenate([cuts, _cuts(entries, BATCH_ENTRIES)])
        bounds = [*np.unique(cuts).tolist(), len(offsets) - 1]
        sink = pa.BufferOutputStream()
        schema: pa.Schema | None = None
        writer: Any = None
        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
            if s1 <= s0:
                continue
            columns = []
            for name, data in fields.items():
                units = {"token": offsets, "target": rows, "sample": entries, "byte": spans}
                edges = units[_unit(name)]
                assert edges is not None
                a, b = int(edges[s0]), int(edges[s1])
                cut = (edges[s0 : s1 + 1] - a).astype(np.int32)
                columns.append(_column(data[a:b], cut, name in planes))
            if schema is None:
                schema = pa.schema(
                    [
                        pa.field(name, column.type, nullable=False, metadata=field_meta[name])
                        for name, column in zip(fields, columns, strict=True)
                    ],
                    metadata=shard_meta,
                )
                options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", ZSTD_LEVEL))
                writer = pa.ipc.new_file(sink, schema, options=options)
            writer.write_batch(pa.record_batch(columns, schema=schema))
        writer.close()
        return {"": sink.getvalue().to_pybytes()}

    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
        try:
            reader = pa.ipc.open_file(pa.BufferReader(files[""]))
            names = list(reader.schema.names)
            if "tokens" not in names:
                raise ValueError("no tokens column")
            labels = {}
            planes: dict[str, np.dtype[Any]] = {}  # byte-plane columns: their integer dtype
            for key in names:
                meta = reader.schema.field(key).metadata or {}
                if b"codec" in meta:  # encoded by a codec: its name labels the stored numbers
                    labels[key] = meta[b"codec"].decode()
                elif key in LOGPROB_FIELDS:
                    labels[key] = meta.get(b"dtype", b"").decode() or "float16"
                if pa.types.is_struct(reader.schema.field(key).type.value_type):
                    planes[key] = np.dtype(meta[b"planes_of"].decode())
            per_shard = {
                key.decode(): json.loads(value)
                for key, value in (reader.schema.metadata or {}).items()
                if key != b"kdcache"
            }
            parts: dict[str, list[npt.NDArray[Any]]] = {key: [] for key in [*names, "offsets"]}
            plane_parts: dict[str, list[pa.StructArray]] = {key: [] for key in planes}
            start = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                edges: dict[str, npt.NDArray[np.int64]] = {}  # unit -> (rows+1,) offsets
                for key in names:
                    column = batch.column(key)
                    col_offsets = np.asarray(column.offsets, dtype=np.int64)
                    col_offsets = col_offsets - col_offsets[0]
                    unit = _unit(key)
                    if unit not in edges:
                        edges[unit] = col_offsets
                    elif not np.array_equal(edges[unit], col_offsets):
                        raise ValueError(f"{key} has other row lengths than its sibling columns")
                    values = column.flatten()
                    if key in planes:  # rebuilt once every batch is read
                        plane_parts[key].append(values)
                    elif isinstance(values.type, pa.FixedSizeListType):
                        k = values.type.list_size
                        parts[key].append(values.flatten().to_numpy().reshape(-1, k))
                    else:
                        parts[key].append(values.to_numpy())
                _check_units(edges, {key: parts[key][-1] for key in names if key not in planes})
                offsets = edges["token"]
                parts["offsets"].append(offsets[1:] + start if parts["offsets"] else offsets)
                start += int(offsets[-1])
            rank_major = {  # (k, T) -> a (T, k) view, as the Zarr backend returns them
                key: _from_planes(chunks, planes[key]).T
                for key, chunks in plane_parts.items()
                if chunks
            }
        except Exception as e:  # pyarrow raises many kinds on damaged files
            raise StoreCorrupt(
                f"shard {name} cannot be decoded as Arrow IPC, {type(e).__name__}: {e}, "
                "run `kdcache verify`",
                shard=name,
            ) from e
        if not parts["offsets"]:
            raise StoreCorrupt(f"shard {name} holds no record batches", shard=name)

        def joined(chunks: list[npt.NDArray[Any]]) -> npt.NDArray[Any]:
            return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

        fields = {key: joined(parts[key]) for key in names if key not in planes}
        fields |= rank_major
        fields["seq_offsets"] = joined(parts["offsets"])
        try:
            for key, value in per_shard.items():
                fields[key] = np.asarray(value["values"], dtype=value["dtype"])
        except (TypeError, KeyError, ValueError, OverflowError) as e:
            raise StoreCorrupt(
                f"shard {name} has unreadable schema metadata {key!r}, {e}, run `kdcache verify`",
                shard=name,
            ) from e
        return fields, labels


def _planes_attributes(f: StoredField) -> dict[str, Any]:
    """A byte-plane column's attributes: what its planes hold, how to rebuild and decode them."""
    return {
        **f.attributes,
        "planes_of": str(f.data.dtype),
        "layout": PLANES.replace("b, k", f"{f.data.dtype.itemsize}, {f.data.shape[1]}").replace(
            "view(dtype)", f"view('<{f.data.dtype.str[1:]}')"
        ),
        "decode": DECODE_RANK_MAJOR[f.name],
    }


def _metadata(attributes: dict[str, Any]) -> dict[str, str] | None:
    """Field metadata (strings) of a stored field's attributes: non-strings as JSON."""
    if not attributes:
        return None
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in attributes.items()}


def _check_units(
    edges: dict[str, npt.NDArray[np.int64]], batch: dict[str, npt.NDArray[Any]]
) -> None:
    """A record batch's row lengths agree across units: each row's target rows are its trained
    positions (the sum of its ``loss_mask``, else its tokens), its sampled entries its target
    rows' ``sampled_distinct``. ``edges``: unit -> (rows+1,) list offsets of the batch;
    ``batch``: its flat columns. Raises ``ValueError``."""
    if "target" in edges:
        mask = batch.get("loss_mask")
        per_row = edges["token"] if mask is None else offsets_of(mask)[edges["token"]]
        if not np.array_equal(per_row, edges["target"]):
            what = "the sum of its loss_mask" if mask is not None else "its tokens"
            raise ValueError(f"a row's target rows disagree with {what}")
    if "sample" in edges and "sampled_distinct" in batch:
        per_row = offsets_of(batch["sampled_distinct"])[edges["target"]]
        if not np.array_equal(per_row, edges["sample"]):
            raise ValueError("a row's sampled entries disagree with sampled_distinct")
    if "byte" in edges and "token_bytes" in batch:
        per_row = offsets_of(batch["token_bytes"])[edges["token"]]
        if not np.array_equal(per_row, edges["byte"]):
            raise ValueError("a row's text disagrees with its token_bytes")
