"""Overlap for stage one: a prefetching reader thread and a shard-writing thread.

Both use bounded queues (memory stays bounded when one side is slower) and hand errors back to
the main thread instead of hanging: an exception in a thread is re-raised by the next
``put``/iteration of the main thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import sys
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, TypeVar

import numpy as np
import torch

from kdcache.pipeline.cache.row_targets import RAGGED

T = TypeVar("T")
_POLL = 0.1  # seconds between checks of the other side's health
_DONE = object()


def lower_thread_priority() -> None:
    """Let the calling thread (and threads it starts later) run only on otherwise idle cores.

    The main thread drives the teacher: on a GPU it queues kernels, on a CPU it runs them on every
    core. Tokenizing and compressing must fill the gaps, not preempt it: on a CPU a preempted
    intra-op thread stalls the whole parallel kernel. Linux's SCHED_IDLE policy does that; the
    bounded queues keep it from starving (a full queue blocks the main thread, which frees its
    core). Linux only (elsewhere the call would apply to the whole process); a no-op when not
    permitted.
    """
    if sys.platform != "linux":
        return
    with contextlib.suppress(OSError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


def thread_ids() -> set[int]:
    """The process' threads (Python and native) by kernel id; empty off Linux."""
    if sys.platform != "linux":
        return set()
    return {int(tid) for tid in os.listdir("/proc/self/task")}


def restore_priority_of_threads_since(before: set[int]) -> None:
    """Back to the normal policy for every thread started after ``before = thread_ids()``.

    A background thread's children inherit SCHED_IDLE, among them long-lived ones it happens to
    start first (zarr's I/O loop and its worker pool, pyarrow's native pool). Once stage one is
    done they must not stay idle-only: a later read of a store in the same process would starve
    behind a busy forward.
    """
    for tid in thread_ids() - before:
        with contextlib.suppress(OSError):  # ended meanwhile, or not permitted
            if os.sched_getscheduler(tid) == os.SCHED_IDLE:
                os.sched_setscheduler(tid, os.SCHED_OTHER, os.sched_param(0))


class Prefetcher(Generic[T]):
    """Iterates ``make()`` in a daemon thread, at most ``maxsize`` items ahead of the consumer.

    It starts at once, so the first items are ready when the consumer gets to them (stage one
    tokenizes while the teacher loads). ``close()`` (e.g. via ``contextlib.closing``) stops the
    thread; iterating to the end does too.
    """

    def __init__(self, make: Callable[[], Iterable[T]], maxsize: int = 2) -> None:
        self._threads_before = thread_ids()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(make,), daemon=True)
        self._thread.start()

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, make: Callable[[], Iterable[T]]) -> None:
        lower_thread_priority()
        try:
            for item in make():
                if not self._put(item):
                    return
        except BaseException as e:  # handed to the consumer, re-raised there
            self._error = e
        self._put(_DONE)

    def __iter__(self) -> Iterator[T]:
        try:
            while True:
                item = self._queue.get()
                if item is _DONE:
                    if self._error is not None:
                        raise self._error
                    return
                yield item
        finally:
            self.close()

    def close(self) -> None:
        """Stop producing (the thread ends at its next item); safe to call more than once."""
        self._stop.set()
        restore_priority_of_threads_since(self._threads_before)


def to_host(*tensors: torch.Tensor) -> tuple[Any, ...]:
    """Start device→host copies without waiting for them.

    On CUDA the copies go to pinned buffers with ``non_blocking=True`` and an event marks their
    end; the writer thread waits on that event, so the next forward is queued immediately.

    Returns:
        the host tensors, then the event (``None`` on CPU).
    """
    if tensors[0].device.type != "cuda":
        return (*tensors, None)
    host = []
    # the copies and the event on the tensors' own device: with a teacher split over GPUs, the
    # head (and so the targets) may sit on another GPU than this process' current one
    with torch.cuda.device(tensors[0].device):
        for tensor in tensors:
            buffer = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            buffer.copy_(tensor, non_blocking=True)
            host.append(buffer)
        event = torch.cuda.Event()
        event.record()
    return (*host, event)


def split_sequences(
    arrays: dict[str, np.ndarray], rows_per_sequence: Sequence[int]
) -> Iterator[dict[str, np.ndarray]]:
    """A batch's targets (see ``row_targets.RowTargets``), one sequence at a time, as views.

    Args:
        arrays: per-row fields of R = sum(rows_per_sequence) rows ((R, k) or (R,)), and the
            ragged sampled fields, whose first ``sampled_distinct.sum()`` entries are the rows'
            entries in order.
        rows_per_sequence: (B,) the rows of each sequence (its trained positions), in order.

    Yields:
        the fields of sequence b: (R_b, k) or (R_b,) per-row fields, (M_b,) ragged ones.
    """
    bounds = np.zeros(len(rows_per_sequence) + 1, dtype=np.int64)  # (B+1,)
    np.cumsum(rows_per_sequence, out=bounds[1:])
    offsets = None
    if "sampled_distinct" in arrays:
        offsets = np.zeros(int(bounds[-1]) + 1, dtype=np.int64)  # (R+1,)
        np.cumsum(arrays["sampled_distinct"][: bounds[-1]], out=offsets[1:])
    for start, stop in zip(bounds[:-1], bounds[1:], strict=True):
        sequence = {}
        for name, values in arrays.items():
            if name in RAGGED:
                assert offsets is not None
                sequence[name] = values[offsets[start] : offsets[stop]]
            else:
                sequence[name] = values[start:stop]
        yield sequence


@dataclass
class BatchSequences:
    """The sequences of one teacher batch, as the store keeps them.

    Attributes:
        tokens: each sequence's (L_b,) int32 tokens, without padding.
        indices: each sequence's index in its shard (a batch may take them in any order).
        loss_masks: each sequence's (L_b,) bool trained positions; None: every position.
        token_bytes, texts: each sequence's (L_b,) bytes per token and the text they spell;
            None: the store keeps no text.
    """

    tokens: list[np.ndarray]
    indices: list[int]
    loss_masks: list[np.ndarray] | None = None
    token_bytes: list[np.ndarray] | None = None
    texts: list[bytes] | None = None

    def rows(self) -> list[int]:
        """Target rows of each sequence: its trained positions."""
        if self.loss_masks is None:
            return [len(t) for t in self.tokens]
        return [int(m.sum()) for m in self.loss_masks]


def _sequence_extras(
    batch: BatchSequences, b: int, per_position: np.ndarray | None
) -> dict[str, Any]:
    """Sequence b's per-position fields: its (L_b,) next-token log-probs (from the batch's
    (B, S) ones) and its text with the (L_b,) token ends, as ``ShardWriter.append`` takes them."""
    extras: dict[str, Any] = {}
    n = len(batch.tokens[b])
    if per_position is not None:
        extras["next_token_logprob"] = per_position[b, :n]
    if batch.token_bytes is not None and batch.texts is not None:
        extras["text"] = batch.texts[b]
        extras["token_ends"] = np.cumsum(batch.token_bytes[b], dtype=np.int64)
    return extras


class ShardSink:
    """Appends batches to shards and commits them in a background thread.

    The main thread calls ``open(split, index, corpus_range)``, then ``put(...)`` per batch,
    then ``commit()``; the writer thread does the compression and I/O in the same order, one
    ``shard.append`` per sequence.
    """

    def __init__(self, writer: Any, maxsize: int = 8) -> None:
        self._threads_before = thread_ids()
        self.committed = 0
        self.sampled_entries = 0  # distinct sampled ids written, over ...
        self.sampled_positions = 0  # ... this many positions (read after close)
        self._writer = writer
        self._queue: queue.Queue[Any] = queue.Queue(maxsize)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def open(self, split: str, index: int, corpus_range: dict[str, Any]) -> None:
        self._send(("open", split, index, corpus_range))

    def put(self, batch: BatchSequences, arrays: dict[str, torch.Tensor], event: Any) -> None:
        """One batch: its sequences and their target rows on the host (see
        ``split_sequences``), readable once ``event`` (from ``to_host``; ``None`` on CPU) is done.
        The shard's sequences are appended in index order, whatever order the batches take."""
        self._send(("batch", batch, arrays, event))

    def commit(self) -> None:
        self._send(("commit",))

    def _send(self, message: tuple[Any, ...]) -> None:
        while True:
            if self._error is not None:
                raise self._error
            if not self._thread.is_alive():
                raise RuntimeError("the shard writer thread stopped unexpectedly")
            try:
                self._queue.put(message, timeout=_POLL)
                return
            except queue.Full:
                continue

    def _run(self) -> None:
        lower_thread_priority()
        shard = None
        waiting: dict[int, tuple[np.ndarray, dict[str, np.ndarray], Any]] = {}
        next_index = 0
        try:
            while True:
                message = self._queue.get()
                kind = message[0]
                if kind == "stop":
                    break
                if kind == "open":
                    shard = self._writer.open_shard(message[1], message[2], corpus_range=message[3])
                    waiting, next_index = {}, 0
                elif kind == "batch":
                    _, batch, arrays, event = message
                    if event is not None:
                        event.synchronize()
                    arrays = {name: values.numpy() for name, values in arrays.items()}
                    per_position = arrays.pop("next_token_logprob", None)  # (B*S,)
                    if per_position is not None:
                        per_position = per_position.reshape(len(batch.tokens), -1)  # (B, S)
                    if "sampled_distinct" in arrays:
                        rows = sum(batch.rows())
                        self.sampled_entries += int(arrays["sampled_distinct"][:rows].sum())
                        self.sampled_positions += rows
                    masks = batch.loss_masks or [None] * len(batch.tokens)
                    for b, fields in enumerate(split_sequences(arrays, batch.rows())):
                        fields |= _sequence_extras(batch, b, per_position)
                        waiting[batch.indices[b]] = (batch.tokens[b], fields, masks[b])
                    while next_index in waiting:  # one stored sequence per input, in order
                        tokens, fields, mask = waiting.pop(next_index)
                        shard.append(
                            tokens,
                            fields.pop("topk_ids", None),
                            fields.pop("topk_logprobs", None),
                            **fields,
                            **({} if mask is None else {"loss_mask": mask}),
                        )
                        next_index += 1
                elif kind == "commit":
                    assert not waiting, f"sequences {sorted(waiting)} came after a gap"
                    shard.commit()
                    shard = None
                    self.committed += 1
        except BaseException as e:  # re-raised in the main thread by the next _send / close
            self._error = e
        finally:
            if shard is not None:
                shard.abort()

    def close(self, abort: bool = False) -> None:
        """Finish the queued work (or, with ``abort``, drop it) and re-raise a thread error."""
        if abort:
            while True:
                try:
                    self._queue.get_nowait()
                except queue.Empty:
                    break
        if self._thread.is_alive():
            try:
                self._send(("stop",))
            except BaseException:
                if not abort:
                    raise
        self._thread.join()
        restore_priority_of_threads_since(self._threads_before)
        if self._error is not None and not abort:
            raise self._error

    def __enter__(self) -> ShardSink:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close(abort=exc_type is not None)
