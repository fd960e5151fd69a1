"""Zarr v3 backend: one group per shard, arrays ``tokens``, ``topk_ids``, ``topk_logprobs``,
``seq_offsets``.

Readable without kdcache::

    g = zarr.open_group("STORE/shards/train-00000.zarr", mode="r")
    g["topk_logprobs"][:]        # (N, k); if g["topk_logprobs"].attrs["dtype"] == "bfloat16",
                                 # the values are raw bfloat16 bit patterns stored as uint16

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

from ._base import ShardArrays, ShardCodec, bf16_to_float32
from .errors import StoreCorrupt

CHUNK_BYTES = 4 << 20  # ~4 MiB of raw data per chunk of the (N, k) arrays
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


class ZarrCodec(ShardCodec):
    suffix = ".zarr"

    def encode(self, arrays: ShardArrays, logprob_dtype: str) -> dict[str, bytes]:
        files: dict[str, Any] = {}
        group = zarr.create_group(
            MemoryStore(files),
            zarr_format=3,
            attributes={"kdcache": {"format_version": 1, "logprob_dtype": logprob_dtype}},
        )
        n, k = arrays.topk_ids.shape
        rows = max(1, min(n, CHUNK_BYTES // max(1, k * 2)))
        for name, data, chunks in (
            ("tokens", arrays.tokens, (max(1, min(n, CHUNK_BYTES // 4)),)),
            ("topk_ids", arrays.topk_ids, (rows, k)),
            ("topk_logprobs", arrays.topk_logprobs, (rows, k)),
            ("seq_offsets", arrays.seq_offsets, (arrays.seq_offsets.shape[0],)),
        ):
            attributes: dict[str, Any] = {"dtype": logprob_dtype} if name == "topk_logprobs" else {}
            array = group.create_array(
                name,
                shape=data.shape,
                dtype=data.dtype,
                chunks=chunks,
                compressors=[_blosc(data.dtype.itemsize)],
                attributes=attributes,
            )
            array[...] = data
        return {key: buf.to_bytes() for key, buf in files.items()}

    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[ShardArrays, npt.NDArray[Any], str]:
        make = default_buffer_prototype().buffer.from_bytes
        store = MemoryStore({key: make(data) for key, data in files.items()}, read_only=True)
        try:
            group = zarr.open_group(store, mode="r", zarr_format=3)
            got = {
                key: np.asarray(_array(group, key)[...])
                for key in ("tokens", "topk_ids", "topk_logprobs", "seq_offsets")
            }
            attrs = _array(group, "topk_logprobs").attrs
            stored = str(attrs.get("dtype", got["topk_logprobs"].dtype))
        except Exception as e:  # zarr raises many kinds on damaged metadata/chunks
            raise StoreCorrupt(
                f"shard {name} cannot be decoded as zarr, {type(e).__name__}: {e}, "
                "run `kdcache verify`",
                shard=name,
            ) from e
        raw = got["topk_logprobs"]
        logprobs = bf16_to_float32(raw) if stored == "bfloat16" else raw
        arrays = ShardArrays(
            tokens=got["tokens"],
            topk_ids=got["topk_ids"],
            topk_logprobs=logprobs,
            seq_offsets=got["seq_offsets"],
            shard=name,
        )
        return arrays, raw, stored
