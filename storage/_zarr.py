"""Zarr v3 backend: one group per shard, one array per field (docs/architecture.md §3) plus
``seq_offsets``.

Readable without kdcache::

    g = zarr.open_group("STORE/shards/train-00000.zarr", mode="r")
    g["topk_logprobs"][:]        # (T, k); if g["topk_logprobs"].attrs["dtype"] == "bfloat16",
                                 # the values are raw bfloat16 bit patterns stored as uint16
    d = g["sampled_distinct"][:] # (T,); target row r owns sampled_ids/counts/logprobs entries
                                 # off[r]:off[r+1] with off = [0, cumsum(d)]
    m = g["loss_mask"][:].astype(bool)  # (N,), only in a store with a loss mask; rows of
                                 # topk_* and sampled_distinct belong to np.flatnonzero(m)
                                 # (T = m.sum()); without a mask T = N, row t is token t's

In a store of codec ``gaps`` (manifest ``codec``, _codec.py) the log-prob fields and the tail
are int16 levels and ``topk_ids`` holds codes; each such array's attributes say how to decode::

    a = g["topk_logprobs"]       # (k, T) int16, rank-major: first levels, then gaps
    lp = np.interp(np.cumsum(a[:], axis=0), a.attrs["levels"], a.attrs["logprobs"],
                   right=-np.inf).T  # (T, k)
    ids = g["topk_id_table"][:][g["topk_ids"][:]].T  # (T, k)

Compression: blosc(zstd) with byte-shuffle, so the high and low bytes of the 16-bit ids and
log-probs are compressed as separate streams (see bench/results/store.md for the effect). A
gaps store keeps its (T, k) arrays rank-major, as (k, T) arrays with bit-shuffle: each rank's
codes and gaps are compressed together, and the levels add up rank by rank.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from ._arrays import LOGPROB_FIELDS, ShardArrays
from ._base import ShardCodec
from ._codec import transposed
from ._stored import DECODE_RANK_MAJOR, StoredField, stored_shard
from .errors import StoreCorrupt
from .manifest import FORMAT_VERSION

CHUNK_BYTES = 4 << 20  # ~4 MiB of raw data per chunk
# blosc clevel 3 with 1 MiB blocks: within ~1% of clevel 5's size at ~2.5x its encode speed
# on Zipf-like k=64 rows (bench/store.py); higher levels cost encode time for little gain
CLEVEL = 3
BLOCK_BYTES = 1 << 20
# the "layout" attribute of a (T, k) field stored transposed, as a (k, T) array (codec gaps)
RANK_MAJOR = "rank-major (k, T): transpose for (T, k)"


def _blosc(itemsize: int, shuffle: Literal["shuffle", "bitshuffle"] = "shuffle") -> BloscCodec:
    return BloscCodec(
        cname="zstd", clevel=CLEVEL, shuffle=shuffle, typesize=itemsize, blocksize=BLOCK_BYTES
    )


def _array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{name} is a group, not an array")
    return node


def _chunks(name: str, data: npt.NDArray[Any], rank_major: bool = False) -> tuple[int, ...]:
    """~CHUNK_BYTES per chunk; (N, k) arrays by whole rows, rank-major (k, N) arrays by whole
    columns; seq_offsets in one chunk."""
    if name == "seq_offsets":
        return (data.shape[0],)
    if rank_major:
        k, n = data.shape
        return (k, max(1, min(n, CHUNK_BYTES // max(1, k * data.dtype.itemsize))))
    if data.ndim == 2:
        n, k = data.shape
        return (max(1, min(n, CHUNK_BYTES // max(1, k * 2))), k)
    return (max(1, min(data.shape[0], CHUNK_BYTES // data.dtype.itemsize)),)


class ZarrCodec(ShardCodec):
    suffix = ".zarr"

    def encode(
        self,
        arrays: ShardArrays,
        logprob_dtype: str,
        codec: str,
        format_version: int = FORMAT_VERSION,
    ) -> dict[str, bytes]:
        files: dict[str, Any] = {}
        group = zarr.create_group(
            MemoryStore(files),
            zarr_format=3,
            attributes={
                "kdcache": {"format_version": format_version, "logprob_dtype": logprob_dtype}
            },
        )
        stored = [
            *stored_shard(arrays, logprob_dtype, codec),
            StoredField("seq_offsets", arrays.seq_offsets),
        ]
        for f in stored:
            data, attributes = f.data, f.attributes
            if f.rank_major:  # (k, T): compressed rank by rank, bit-shuffled (~10% smaller)
                data = transposed(data)
                attributes = {
                    **attributes,
                    "layout": RANK_MAJOR,
                    "decode": DECODE_RANK_MAJOR[f.name],
                }
            array = group.create_array(
                f.name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=_chunks(f.name, data, f.rank_major),
                compressors=[
                    _blosc(data.dtype.itemsize, "bitshuffle" if f.rank_major else "shuffle")
                ],
                attributes=attributes,
            )
            array[...] = data
        return {key: buf.to_bytes() for key, buf in files.items()}

    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[dict[str, npt.NDArray[Any]], dict[str, str]]:
        make = default_buffer_prototype().buffer.from_bytes
        store = MemoryStore({key: make(data) for key, data in files.items()}, read_only=True)
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3)
            fields: dict[str, npt.NDArray[Any]] = {}
            labels: dict[str, str] = {}
            for key in sorted(group.array_keys()):
                array = _array(group, key)
                fields[key] = np.asarray(array[...])
                if array.attrs.get("layout") == RANK_MAJOR:
                    fields[key] = fields[key].T  # a (T, k) view of the (k, T) array
                codec = array.attrs.get("codec")
                if codec is not None:  # encoded by a codec: its name labels the stored numbers
                    labels[key] = str(codec)
                elif key in LOGPROB_FIELDS:
                    labels[key] = str(array.attrs.get("dtype", fields[key].dtype))
        except Exception as e:  # zarr raises many kinds on damaged metadata/chunks
            raise StoreCorrupt(
                f"shard {name} cannot be decoded as zarr, {type(e).__name__}: {e}, "
                "run `kdcache verify`",
                shard=name,
            ) from e
        return fields, labels
