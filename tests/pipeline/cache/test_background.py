"""The reader and writer threads of stage one: order, bounds, errors and CPU priority."""

from __future__ import annotations

import os
import sys
import threading
import time
from contextlib import closing

import numpy as np
import pytest
import torch

from kdcache.pipeline.cache.background import (
    BatchSequences,
    Prefetcher,
    ShardSink,
    lower_thread_priority,
)


def test_prefetcher_yields_everything_in_order() -> None:
    assert list(Prefetcher(lambda: iter(range(50)), maxsize=3)) == list(range(50))


def test_prefetcher_stays_at_most_maxsize_ahead() -> None:
    produced: list[int] = []

    def make():
        for i in range(100):
            produced.append(i)
            yield i

    items = iter(Prefetcher(make, maxsize=2))
    assert next(items) == 0
    time.sleep(0.3)  # give the thread every chance to run ahead
    # one taken, two queued, one more waiting to be put
    assert len(produced) <= 4


def test_prefetcher_reraises_the_producer_error_in_the_consumer() -> None:
    def make():
        yield 1
        raise ValueError("bad document")

    items = iter(Prefetcher(make))
    assert next(items) == 1
    with pytest.raises(ValueError, match="bad document"):
        next(items)


def test_prefetcher_starts_at_once_and_stops_when_closed() -> None:
    """Stage one starts it before loading the teacher; a failed load must not leave it running."""
    produced: list[int] = []

    def make():
        i = 0
        while True:  # an endless corpus
            produced.append(i)
            yield i
            i += 1

    with closing(Prefetcher(make, maxsize=2)) as items:
        deadline = time.monotonic() + 5
        while len(produced) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(produced) >= 3  # produced before anyone asked
    items._thread.join(timeout=5)
    assert not items._thread.is_alive()


def _policy() -> int:
    return os.sched_getscheduler(threading.get_native_id())


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux-only")
def test_background_threads_run_only_on_idle_cores() -> None:
    seen: list[int] = []

    def make():
        seen.append(_policy())
        yield 0

    list(Prefetcher(make))
    assert seen == [os.SCHED_IDLE]
    assert _policy() == os.SCHED_OTHER  # the main thread is untouched


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux-only")
def test_threads_started_by_a_background_thread_inherit_its_policy() -> None:
    seen: list[int] = []

    def child() -> None:
        seen.append(_policy())

    def parent() -> None:
        lower_thread_priority()
        seen.append(_policy())
        worker = threading.Thread(target=child)  # e.g. zarr's I/O loop, started lazily
        worker.start()
        worker.join()

    thread = threading.Thread(target=parent)
    thread.start()
    thread.join()
    assert seen == [os.SCHED_IDLE] * 2


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread scheduling is Linux-only")
def test_threads_a_background_thread_left_running_get_the_normal_policy_back() -> None:
    started = threading.Event()
    finish = threading.Event()
    tids: list[int] = []

    def long_lived() -> None:  # like zarr's I/O loop: started lazily, lives on
        tids.append(threading.get_native_id())
        started.set()
        finish.wait()

    def make():
        threading.Thread(target=long_lived, daemon=True).start()
        started.wait()
        yield 0

    try:
        items = Prefetcher(make)
        assert list(items) == [0]
        assert os.sched_getscheduler(tids[0]) == os.SCHED_OTHER
    finally:
        finish.set()


class _RecordingWriter:
    """Stands in for a StoreWriter: records what the sink thread did, in order."""

    def __init__(self, fail_on_commit: bool = False) -> None:
        self.events: list[tuple] = []
        self.fields: list[dict] = []  # the keyword arrays of each append
        self.fail_on_commit = fail_on_commit

    def open_shard(self, split, index, corpus_range=None):
        writer = self

        class Shard:
            def append(self, tokens, ids, logprobs, **fields):
                writer.events.append(("append", index, tokens.tolist(), ids.shape, logprobs.dtype))
                writer.fields.append(fields)

            def commit(self):
                if writer.fail_on_commit:
                    raise OSError("disk full")
                writer.events.append(("commit", index))

            def abort(self):
                writer.events.append(("abort", index))

        self.events.append(("open", split, index))
        return Shard()


def _batch(rows: int, seq: int, k: int = 3, first: int = 0):
    tokens = np.arange(rows * seq, dtype=np.int32).reshape(rows, seq)
    arrays = {
        "topk_ids": torch.zeros(rows * seq, k, dtype=torch.int32),
        "topk_logprobs": torch.zeros(rows * seq, k, dtype=torch.float16),
    }
    return BatchSequences(list(tokens), list(range(first, first + rows))), arrays


def test_shard_sink_appends_one_sequence_per_row_and_commits_in_order() -> None:
    writer = _RecordingWriter()
    with ShardSink(writer, maxsize=2) as sink:
        for index in range(3):
            sink.open("train", index, {})
            sink.put(*_batch(2, 4), None)
            sink.commit()
    assert sink.committed == 3
    kinds = [e[0] for e in writer.events]
    assert kinds == ["open", "append", "append", "commit"] * 3
    assert writer.events[1][2] == [0, 1, 2, 3] and writer.events[2][2] == [4, 5, 6, 7]
    assert writer.events[1][3] == (4, 3) and writer.events[1][4] == np.float16


def test_shard_sink_hands_a_writer_error_to_the_main_thread_and_aborts_the_shard() -> None:
    writer = _RecordingWriter(fail_on_commit=True)
    sink = ShardSink(writer, maxsize=1)
    sink.open("train", 0, {})
    sink.put(*_batch(1, 2), None)
    sink.commit()
    with pytest.raises(OSError, match="disk full"):
        for _ in range(100):  # a later put (or close) sees the thread's error
            sink.put(*_batch(1, 2), None)
            time.sleep(0.01)
        sink.close()
    sink.close(abort=True)
    assert writer.events[-1] == ("abort", 0)


def test_shard_sink_splits_ragged_samples_into_sequences() -> None:
    """Sampled entries of B * S rows arrive as one ragged buffer (with unused capacity at the
    end); each sequence gets exactly its own rows' entries."""
    writer = _RecordingWriter()
    distinct = torch.tensor([1, 2, 3, 1, 1, 2], dtype=torch.uint8)  # 2 sequences x 3 positions
    m = int(distinct.sum())
    capacity = 6 * 4 + 1
    batch, arrays = _batch(2, 3)
    arrays |= {
        "topk_tail_logprob": torch.arange(6, dtype=torch.float32),
        "sampled_distinct": distinct,
        "sampled_ids": torch.arange(capacity, dtype=torch.int32),
        "sampled_counts": torch.ones(capacity, dtype=torch.uint8),
        "sampled_logprobs": -torch.arange(capacity, dtype=torch.float16),
    }
    with ShardSink(writer) as sink:
        sink.open("train", 0, {})
        sink.put(batch, arrays, None)
        sink.commit()
    first, second = writer.fields
    assert first["topk_tail_logprob"].tolist() == [0, 1, 2]
    assert first["sampled_distinct"].tolist() == [1, 2, 3]
    assert first["sampled_ids"].tolist() == [0, 1, 2, 3, 4, 5]
    assert second["sampled_ids"].tolist() == list(range(6, m))
    assert second["sampled_logprobs"].tolist() == [-6, -7, -8, -9]
    assert second["sampled_counts"].dtype == np.uint8


def test_shard_sink_appends_in_shard_order_and_passes_the_trained_rows_of_masked_sequences() -> (
    None
):
    """Batches may take a shard's sequences in any order (longest first); the sink appends them
    by index, each with its loss mask and its trained positions' rows only."""
    writer = _RecordingWriter()
    masks = [np.array([1, 0, 1, 1], bool), np.array([0, 1, 0], bool), np.array([1, 1], bool)]
    tokens = [np.arange(4, dtype=np.int32), np.arange(10, 13, dtype=np.int32), np.arange(2)]
    with ShardSink(writer) as sink:
        sink.open("train", 0, {})
        # the batch holds sequences 2 and 0 (3 + 2 trained rows), then one with sequence 1
        rows = torch.tensor([[0.0], [2.0], [3.0], [20.0], [21.0]])
        arrays = {"topk_ids": rows.int(), "topk_logprobs": -rows}
        sink.put(BatchSequences([tokens[0], tokens[2]], [0, 2], [masks[0], masks[2]]), arrays, None)
        arrays = {"topk_ids": torch.tensor([[11]]).int(), "topk_logprobs": torch.tensor([[-11.0]])}
        sink.put(BatchSequences([tokens[1]], [1], [masks[1]]), arrays, None)
        sink.commit()
    appended = [e[2] for e in writer.events if e[0] == "append"]
    assert appended == [t.tolist() for t in tokens]
    assert [f["loss_mask"].tolist() for f in writer.fields] == [m.tolist() for m in masks]
    assert [e[3] for e in writer.events if e[0] == "append"] == [(3, 1), (1, 1), (2, 1)]
    assert writer.events[-1] == ("commit", 0)
