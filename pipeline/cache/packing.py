"""Documents → token ids → fixed-length teacher inputs → the shard plan.

The plan is a pure function of the corpus, the tokenizer and the settings: shard ``i`` of a split
holds that split's sequences ``[i*n, (i+1)*n)``. Every rank computes the same plan, so which
process computes a shard never changes its content.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.pipeline.cache.corpus import Document, is_eval_document
from kdcache.pipeline.cache.long_text import PIECE_CHARS, tokenize_long

SPLITS = ("train", "eval")
TOKENIZE_BATCH = 256  # at most this many documents per tokenizer call
TOKENIZE_FIRST_CHARS = 1 << 12  # characters in the first call; doubled per call up to:
TOKENIZE_MAX_CHARS = 1 << 20


class SequencePacker:
    """Joins documents with EOS and cuts the stream into ``seq_len`` sequences, incrementally.

    Also remembers which documents each sequence spans (for the shards' corpus ranges).
    """

    def __init__(self, seq_len: int, eos_id: int) -> None:
        if seq_len < 2:
            raise ValueError(f"seq_len must be at least 2, got {seq_len}")
        self.seq_len = seq_len
        self.eos_id = eos_id
        self._buffer = np.empty(0, dtype=np.int32)  # (< seq_len,) tokens of no sequence yet
        self._first_document = -1  # document of the buffer's first token
        self._last_document = -1  # the latest document added

    def add(
        self, ids: Sequence[int] | np.ndarray, document: int = -1
    ) -> list[tuple[np.ndarray, int, int]]:
        """Append one document (+ EOS).

        Returns:
            the completed sequences as (int32 (seq_len,), first document, last document).
        """
        if not len(self._buffer):
            self._first_document = document
        self._last_document = document
        stream = np.concatenate(
            [self._buffer, np.asarray(ids, dtype=np.int32), np.asarray([self.eos_id], np.int32)]
        )
        done = []
        full = len(stream) - len(stream) % self.seq_len
        for start in range(0, full, self.seq_len):
            # a copy: a view would keep a long document's whole stream alive
            done.append(
                (stream[start : start + self.seq_len].copy(), self._first_document, document)
            )
            self._first_document = document  # what is left belongs to this document
        self._buffer = stream[full:].copy()
        return done

    def finish(self) -> tuple[np.ndarray, int, int] | None:
        """The final, shorter sequence (never empty), or ``None``."""
        if not len(self._buffer):
            return None
        tokens = self._buffer
        self._buffer = np.empty(0, dtype=np.int32)
        return tokens, self._first_document, self._last_document


def pack_sequences(
    documents: Iterable[Sequence[int] | np.ndarray], seq_len: int, eos_id: int
) -> Iterator[np.ndarray]:
    """Join documents with EOS and cut the stream into ``seq_len`` sequences.

    Each document is followed by one EOS. Every sequence but the last has exactly ``seq_len``
    tokens; the last holds the remainder (possibly short, never empty).

    Yields:
        int32 arrays of shape (seq_len,) — (r,) for the final remainder.
    """
    packer = SequencePacker(seq_len, eos_id)
    for ids in documents:
        for tokens, _, _ in packer.add(ids):
            yield tokens
    last = packer.finish()
    if last is not None:
        yield last[0]


@dataclass
class TokenizedDocument:
    split: str  # "train" or "eval"
    index: int  # position among the corpus' non-empty documents
    ids: np.ndarray  # (n,) int32, without EOS
    source: str


def tokenize_documents(
    documents: Iterable[Document],
    tokenizer: Any,
    *,
    eval_fraction: float,
    eos_id: int,
    max_tokens: int | None = None,
) -> Iterator[TokenizedDocument]:
    """Tokenize in order (batched, no special tokens), assign splits, and cap the corpus.

    ``max_tokens`` counts every packed token (ids + one EOS per document) over both splits; the
    document crossing the cap is cut short, so the cap is exact and the same for any world size.
    Batches start small (the first shard is ready quickly) and grow; near the cap they shrink,
    so little text is tokenized in vain.
    """
    used = 0
    index = 0
    budget = TOKENIZE_FIRST_CHARS
    batch: list[Document] = []
    chars = 0

    def flush() -> Iterator[TokenizedDocument]:
        nonlocal used, index
        short = [d.text for d in batch if len(d.text) <= PIECE_CHARS]
        encoded = iter(tokenizer(short, add_special_tokens=False)["input_ids"] if short else [])
        for document in batch:
            if len(document.text) <= PIECE_CHARS:
                ids = np.asarray(next(encoded), dtype=np.int32)
            else:  # one call on a long text would take gigabytes
                room = None if max_tokens is None else max(max_tokens - used - 1, 0)
                ids = tokenize_long(document.text, tokenizer, limit=room, piece_chars=PIECE_CHARS)
            if max_tokens is not None:
                room = max_tokens - used
                if room <= 0:
                    return
                ids = ids[: room - 1]
            used += len(ids) + 1
            split = "eval" if is_eval_document(document.text, eval_fraction) else "train"
            yield TokenizedDocument(split, index, ids, document.source)
            index += 1

    for document in documents:
        if max_tokens is not None and used >= max_tokens:
            return
        batch.append(document)
        chars += len(document.text)
        limit = budget if max_tokens is None else min(budget, 16 * (max_tokens - used))
        if chars >= limit or len(batch) >= TOKENIZE_BATCH:
            yield from flush()
            batch, chars = [], 0
            budget = min(2 * budget, TOKENIZE_MAX_CHARS)
    if batch:
        yield from flush()


@dataclass
class ShardPlan:
    """One shard to compute: ``sequences`` are the split's sequences ``[first, first + len)``."""

    split: str
    index: int
    sequences: list[np.ndarray]
    corpus_range: dict[str, Any]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def plan_shards(
    documents: Iterable[TokenizedDocument],
    *,
    seq_len: int,
    eos_id: int,
    sequences_per_shard: int,
) -> Iterator[ShardPlan]:
    """Pack each split's documents and group its sequences into shards, in corpus order.

    Yields:
        each shard as soon as its last sequence is packed; the partly filled ones at the end.
    """
    packers = {split: SequencePacker(seq_len, eos_id) for split in SPLITS}
    pending: dict[str, list[tuple[np.ndarray, int, int]]] = {split: [] for split in SPLITS}
    shard_index = dict.fromkeys(SPLITS, 0)

    def make(split: str) -> ShardPlan:
        items = pending[split]
        first = shard_index[split] * sequences_per_shard
        plan = ShardPlan(
            split=split,
            index=shard_index[split],
            sequences=[tokens for tokens, _, _ in items],
            corpus_range={
                "sequences": [first, first + len(items)],
                "documents": [items[0][1], items[-1][2]],
            },
        )
        shard_index[split] += 1
        pending[split] = []
        return plan

    for document in documents:
        packer = packers[document.split]
        for item in packer.add(document.ids, document.index):
            pending[document.split].append(item)
            if len(pending[document.split]) == sequences_per_shard:
                yield make(document.split)
    for split in SPLITS:
        last = packers[split].finish()
        if last is not None:
            pending[split].append(last)
        if pending[split]:
            yield make(split)


def batches(sequences: list[np.ndarray], batch_size: int) -> list[list[np.ndarray]]:
    """Consecutive sequences of equal length, at most ``batch_size`` each (no padding needed)."""
    groups: list[list[np.ndarray]] = []
    for tokens in sequences:
        if groups and len(groups[-1]) < batch_size and len(groups[-1][0]) == len(tokens):
            groups[-1].append(tokens)
        else:
            groups.append([tokens])
    return groups
