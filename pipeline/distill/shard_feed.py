"""Decoded shards in the order a rank's batches first need them, decoded ahead by threads.

Decoding a shard is C work that mostly releases the GIL (blosc/zstd, numpy lookups and sums), so
a few threads of the training process decode in parallel (codec gaps on 2 cores: 2 threads decode
1.3-1.6x the tokens/s of one, bench/loader.py): every shard is decoded once per pass, the decoded
arrays are used where they are, and nothing crosses a process boundary or /dev/shm. ``ShardFeed`` keeps ``threads + 1``
shards in flight (all threads busy, one decoded shard ready), never more than the split has
shards (a small split would otherwise be decoded epochs ahead), and hands them out in order.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from kdcache.storage import ShardArrays, ShardRecord, Store


class ShardFeed:
    """The shards ``order`` names, decoded, one ``next()`` each.

    Args:
        store: the open store.
        records: the split's shard records.
        order: (index into ``records``, the sequences to decode of it or None for all) in the
            order they will be taken; may be endless, read lazily.
        threads: decoding threads (at least 1; at most one per shard of ``records``).
    """

    def __init__(
        self,
        store: Store,
        records: list[ShardRecord],
        order: Iterator[tuple[int, np.ndarray | None]],
        threads: int,
    ) -> None:
        self.store, self.records, self.order = store, records, order
        self.ahead = min(max(1, threads) + 1, max(1, len(records)))
        threads = min(max(1, threads), self.ahead)
        self.pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.queue: deque[tuple[int, Future[ShardArrays]]] = deque()
        self.done = False  # ``order`` is exhausted

    def _fill(self) -> None:
        while not self.done and len(self.queue) < self.ahead:
            item = next(self.order, None)
            if item is None:
                self.done = True
                break
            shard, picks = item
            read = self.pool.submit(self.store.read_shard, self.records[shard], sequences=picks)
            self.queue.append((shard, read))

    def next(self, expected: int) -> ShardArrays:
        """The next shard of the order, which must be ``expected`` (the reader's own plan).

        Raises:
            StoreError: the shard cannot be read or decoded (from its decoding thread).
        """
        self._fill()
        assert self.queue, f"shard {expected} needed, the decode order has ended"
        shard, future = self.queue.popleft()
        assert shard == expected, f"decode order out of step: shard {shard}, needed {expected}"
        self._fill()  # the freed place goes to the next shard while this one is used
        return future.result()

    def close(self) -> None:
        """Drop the shards not yet taken; a decode already running finishes in the background."""
        self.done = True
        self.queue.clear()
        self.pool.shutdown(wait=False, cancel_futures=True)
