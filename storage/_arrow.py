"""Arrow backend: one IPC file per shard, one row per sequence.

Schema (zstd-compressed buffers)::

    tokens:        list<int32>                              # (L,) per row
    topk_ids:      list<fixed_size_list<uint16|uint32>[k]>  # (L, k) per row
    topk_logprobs: list<fixed_size_list<float16|float32|uint16>[k]>
                   # field metadata {"dtype": "bfloat16"} when the values are raw bfloat16 bits

Readable without kdcache: ``pyarrow.ipc.open_file(path).read_all()``. The list offsets of any
column are the sequence boundaries (``seq_offsets`` of the Zarr backend).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import numpy.typing as npt
import pyarrow as pa

from ._base import ShardArrays, ShardCodec, bf16_to_float32
from .errors import StoreCorrupt

BATCH_TOKENS = 1 << 18  # rows of one record batch hold about this many tokens
# Arrow IPC has no byte-shuffle, so plain zstd needs a higher level than Zarr's blosc to get
# close in size (level 1 stores ~30% more bytes per token on Zipf-like rows; see bench/store.py)
ZSTD_LEVEL = 6


def _column(flat: npt.NDArray[Any], offsets: npt.NDArray[np.int32], k: int | None) -> pa.Array:
    values = pa.array(flat.reshape(-1))
    if k is not None:
        values = pa.FixedSizeListArray.from_arrays(values, k)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), values)


class ArrowCodec(ShardCodec):
    suffix = ".arrow"

    def encode(self, arrays: ShardArrays, logprob_dtype: str) -> dict[str, bytes]:
        k = arrays.topk_ids.shape[1]
        offsets = arrays.seq_offsets
        # batch boundaries: whole sequences, ~BATCH_TOKENS tokens per batch
        cuts = np.unique(np.searchsorted(offsets, np.arange(0, offsets[-1], BATCH_TOKENS)))
        bounds = [*cuts.tolist(), len(offsets) - 1]
        sink = pa.BufferOutputStream()
        schema: pa.Schema | None = None
        writer: Any = None
        for s0, s1 in zip(bounds[:-1], bounds[1:], strict=True):
            if s1 <= s0:
                continue
            a, b = int(offsets[s0]), int(offsets[s1])
            local = (offsets[s0 : s1 + 1] - a).astype(np.int32)
            batch_columns = [
                _column(arrays.tokens[a:b], local, None),
                _column(arrays.topk_ids[a:b], local, k),
                _column(arrays.topk_logprobs[a:b], local, k),
            ]
            if schema is None:
                fields = [
                    pa.field("tokens", batch_columns[0].type, nullable=False),
                    pa.field("topk_ids", batch_columns[1].type, nullable=False),
                    pa.field(
                        "topk_logprobs",
                        batch_columns[2].type,
                        nullable=False,
                        metadata={"dtype": logprob_dtype},
                    ),
                ]
                meta = {
                    "kdcache": json.dumps({"format_version": 1, "logprob_dtype": logprob_dtype})
                }
                schema = pa.schema(fields, metadata=meta)
                options = pa.ipc.IpcWriteOptions(compression=pa.Codec("zstd", ZSTD_LEVEL))
                writer = pa.ipc.new_file(sink, schema, options=options)
            writer.write_batch(pa.record_batch(batch_columns, schema=schema))
        writer.close()
        return {"": sink.getvalue().to_pybytes()}

    def decode(
        self, files: dict[str, bytes], name: str
    ) -> tuple[ShardArrays, npt.NDArray[Any], str]:
        try:
            reader = pa.ipc.open_file(pa.BufferReader(files[""]))
            field = reader.schema.field("topk_logprobs")
            stored = (field.metadata or {}).get(b"dtype", b"").decode() or "float16"
            parts: dict[str, list[npt.NDArray[Any]]] = {
                "tokens": [],
                "topk_ids": [],
                "topk_logprobs": [],
                "offsets": [],
            }
            start = 0
            for i in range(reader.num_record_batches):
                batch = reader.get_batch(i)
                offsets = None
                for key in ("tokens", "topk_ids", "topk_logprobs"):
                    column = batch.column(key)
                    col_offsets = np.asarray(column.offsets, dtype=np.int64)
                    col_offsets = col_offsets - col_offsets[0]
                    if offsets is None:
                        offsets = col_offsets
                    elif not np.array_equal(offsets, col_offsets):
                        raise ValueError(f"{key} has other sequence lengths than tokens")
                    values = column.flatten()
                    if key != "tokens":
                        k = values.type.list_size
                        values = values.flatten()  # FixedSizeList -> flat values
                        parts[key].append(values.to_numpy().reshape(-1, k))
                    else:
                        parts[key].append(values.to_numpy())
                assert offsets is not None
                parts["offsets"].append(offsets[1:] + start if parts["offsets"] else offsets)
                start += int(offsets[-1])
        except Exception as e:  # pyarrow raises many kinds on damaged files
            raise StoreCorrupt(
                f"shard {name} cannot be decoded as Arrow IPC, {type(e).__name__}: {e}, "
                "run `kdcache verify`",
                shard=name,
            ) from e
        if not parts["tokens"]:
            raise StoreCorrupt(f"shard {name} holds no record batches", shard=name)

        def joined(key: str) -> npt.NDArray[Any]:
            chunks = parts[key]
            return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

        raw = joined("topk_logprobs")
        arrays = ShardArrays(
            tokens=joined("tokens"),
            topk_ids=joined("topk_ids"),
            topk_logprobs=bf16_to_float32(raw) if stored == "bfloat16" else raw,
            seq_offsets=joined("offsets"),
            shard=name,
        )
        return arrays, raw, stored
