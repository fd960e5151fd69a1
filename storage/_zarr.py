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

Compression: blosc(zstd) with byte-shuffle, so the high and low bytes of the 16-bit ids and
log-probs are compressed as separate streams (see bench/results/store.md for the effect).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt
import zarr
from zarr.codecs import BloscCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.storage import MemoryStore

from ._arrays import LOGPROB_FIELDS, ShardArrays, stored_logprobs
from ._base import ShardCodec
from .errors import StoreCorrupt
from .manifest import FORMAT_VERSION

CHUNK_BYTES = 4 << 20  # ~4 MiB of raw data per chunk
# blosc clevel 3 with 1 MiB blocks: within ~1% of clevel 5's size at ~2.5x its encode speed
# on Zipf-like k=64 rows (bench/store.py); higher levels cost encode time for little gain
CLEVEL = 3
BLOCK_BYTES = 1 << 20


def _blosc(itemsize: int) -> BloscCodec:
    return BloscCodec(
        cname="zstd", clevel=CLEVEL, shuffle="shuffle", typesize=itemsize, blocksize=BLOCK_BYTES
    )


def _array(group: zarr.Group, name: str) -> zarr.Array[Any]:
    node = group[name]
    if not isinstance(node, zarr.Array):
        raise ValueError(f"{name} is a group, not an array")
    return node


def _chunks(name: str, data: npt.NDArray[Any]) -> tuple[int, ...]:
    """~CHUNK_BYTES per chunk; (N, k) arrays by whole rows; seq_offsets in one chunk."""
    if name == "seq_offsets":
        return (data.shape[0],)
    if data.ndim == 2:
        n, k = data.shape
        return (max(1, min(n, CHUNK_BYTES // max(1, k * 2))), k)
    return (max(1, min(data.shape[0], CHUNK_BYTES // data.dtype.itemsize)),)


class ZarrCodec(ShardCodec):
    suffix = ".zarr"

    def encode(
        self, arrays: ShardArrays, logprob_dtype: str, format_version: int = FORMAT_VERSION
    ) -> dict[str, bytes]:
        files: dict[str, Any] = {}
        group = zarr.create_group(
            MemoryStore(files),
            zarr_format=3,
            attributes={
                "kdcache": {"format_version": format_version, "logprob_dtype": logprob_dtype}
            },
        )
        for name, data in [*arrays.fields().items(), ("seq_offsets", arrays.seq_offsets)]:
            attributes: dict[str, Any] = {}
            if name in LOGPROB_FIELDS:
                data = stored_logprobs(data, logprob_dtype)
                attributes = {"dtype": logprob_dtype}
            array = group.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=_chunks(name, data),
                compressors=[_blosc(data.dtype.itemsize)],
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
                if key in LOGPROB_FIELDS:
                    labels[key] = str(array.attrs.get("dtype", fields[key].dtype))
        except Exception as e:  # zarr raises many kinds on damaged metadata/chunks
            raise StoreCorrupt(
                f"shard {name} cannot be decoded as zarr, {type(e).__name__}: {e}, "
                "run `kdcache verify`",
                shard=name,
            ) from e
        return fields, labels
