"""Pack tokenized documents into fixed-length teacher inputs."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np


def pack_sequences(
    documents: Iterable[list[int]], seq_len: int, eos_id: int
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut the stream into ``seq_len`` sequences.

    Each document is followed by one EOS. Every sequence but the last has exactly ``seq_len``
    tokens; the last holds the remainder (possibly short, never empty).

    Yields:
        int32 arrays of shape (seq_len,) — (r,) for the final remainder.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    buffer: list[int] = []
    for ids in documents:
        buffer.extend(ids)
        buffer.append(eos_id)
        while len(buffer) >= seq_len:
            yield np.asarray(buffer[:seq_len], dtype=np.int32)
            del buffer[:seq_len]
    if buffer:
        yield np.asarray(buffer, dtype=np.int32)
