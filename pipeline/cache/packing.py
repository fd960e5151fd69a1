"""Documents → token ids → teacher inputs with their trained positions → the shard plan.

The plan is a pure function of the corpus, the tokenizer and the settings: shard ``i`` of a split
holds that split's sequences ``[i*n, (i+1)*n)``. Every rank computes the same plan, so which
process computes a shard never changes its content. Examples are made in ``chat`` (conventions,
templates, label masks) and laid into sequences by ``packer`` (``concat`` or ``separate``).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kdcache.pipeline.cache import chat
from kdcache.pipeline.cache.chat import TokenizerConventions, conventions
from kdcache.pipeline.cache.corpus import CorpusStats, Document, is_eval_document, iter_documents
from kdcache.pipeline.cache.long_text import PIECE_CHARS
from kdcache.pipeline.cache.packer import PackedSequence, SequencePacker, pieces
from kdcache.pipeline.cache.packer import pack_sequences as pack_sequences  # re-exported

SPLITS = ("train", "eval")
PACKINGS = ("concat", "separate")
TOKENIZE_BATCH = 256  # at most this many documents per tokenizer call
TOKENIZE_FIRST_CHARS = 1 << 12  # characters in the first call; doubled per call up to:
TOKENIZE_MAX_CHARS = 1 << 20


def needs_loss_mask(kind: str, packing: str, train_on: str) -> bool:
    """The store keeps trained positions (``loss_mask``) unless every position is trained: a text
    corpus (or ``train_on='all'``) packed with ``concat``."""
    return (kind != "text" and train_on == "assistant") or packing == "separate"


@dataclass
class TokenizedDocument:
    split: str  # "train" or "eval"
    index: int  # position among the corpus' non-empty documents
    ids: np.ndarray  # (n,) int32, with the example's BOS and EOS
    source: str
    label_mask: np.ndarray | None = None  # (n,) bool label tokens; None: every token
    token_bytes: np.ndarray | None = None  # (n,) int64 bytes of ``text`` each token spells
    text: bytes | None = None  # the UTF-8 text the tokens spell (None: no offsets)


class _Budget:
    """``max_tokens`` over both splits, counted as the packer will lay the tokens (a BOS put
    before a sequence included), so the cap is exact and the same for any world size."""

    def __init__(self, max_tokens: int | None, seq_len: int, bos_id: int | None, separate: bool):
        self.left = sys.maxsize if max_tokens is None else max_tokens
        self.seq_len, self.bos_id, self.separate = seq_len, bos_id, separate
        self.fill = dict.fromkeys(SPLITS, 0)

    def take(self, split: str, example: chat.Example) -> chat.Example:
        """The example, cut short where the budget ends (then perhaps ending in the BOS that
        starts the next sequence, when that BOS alone is what the budget has left)."""
        ids, mask = example.ids, example.label_mask
        fill = 0 if self.separate else self.fill[split]
        cut, lone_bos, used = len(ids), False, 0
        for start, stop, bos in pieces(ids, fill, self.seq_len, self.bos_id):
            need, left = bos + stop - start, self.left - used
            if need > left:  # the cap falls in this sequence
                lone_bos = bos and left == 1  # room for the BOS that starts it, alone
                cut, used = start + max(left - bos, 0), self.left
                break
            used += need
        lengths, text = example.token_bytes, example.text
        if cut < len(ids) or lone_bos:
            tail = [self.bos_id] if lone_bos else []
            ids = np.concatenate([ids[:cut], np.asarray(tail, np.int32)])
            mask = None if mask is None else np.append(mask[:cut], np.zeros(len(tail), bool))
            if lengths is not None and text is not None:  # a special BOS spells nothing
                text = text[: int(lengths[:cut].sum())]
                lengths = np.append(lengths[:cut], np.zeros(len(tail), np.int64))
        self.left -= used
        self.fill[split] = (fill + used) % self.seq_len
        return chat.Example(ids, mask, lengths, text)


def _skip_reason(
    document: Document, example: chat.Example | None, seq_len: int | None, separate: bool
) -> str | None:
    """The ``CorpusStats`` count an example is skipped under, or None: nothing to train (no
    example), longer than a sequence (a chat or prompt/completion example in ``separate``
    packing) or a prompt (the tokens before the first label) longer than a sequence."""
    if example is None:
        return "skipped_nothing_to_train"
    if document.kind == "text" or seq_len is None:
        return None
    mask = example.label_mask
    if (separate and len(example.ids) > seq_len) or (
        mask is not None and mask.any() and int(np.argmax(mask)) > seq_len
    ):
        return "skipped_too_long"
    return None


def _encode(
    batch: list[Document],
    tokenizer: Any,
    conv: TokenizerConventions,
    train_on: str,
    room: Callable[[], int | None],
) -> Iterator[chat.Example | None]:
    """Each document of ``batch`` as an example (None: nothing to train), in order: short texts
    in one tokenizer call, long ones in windows (the first ``room()`` tokens of them)."""
    short = [d.text for d in batch if d.kind == "text" and len(d.text) <= PIECE_CHARS]
    encoded = iter(chat.encode_texts(short, tokenizer, conv))
    for document in batch:
        if document.kind != "text":
            trainable = train_on == "all" or chat.has_something_to_train(document)
            yield chat.encode_example(document, tokenizer, conv, train_on) if trainable else None
        elif len(document.text) <= PIECE_CHARS:
            yield next(encoded)
        else:  # one call on a long text would take gigabytes
            yield chat.encode_long_text(document.text, tokenizer, conv, room(), PIECE_CHARS)


def tokenize_documents(
    documents: Iterable[Document],
    tokenizer: Any,
    *,
    eval_fraction: float,
    max_tokens: int | None = None,
    train_on: str = "assistant",
    seq_len: int | None = None,
    packing: str = "concat",
    stats: CorpusStats | None = None,
    tokenizer_conventions: TokenizerConventions | None = None,
    eos_id: int | None = None,
) -> Iterator[TokenizedDocument]:
    """Tokenize in order (text batched), apply the BOS/EOS conventions, label chat and
    prompt/completion examples, skip what cannot be trained, assign splits and cap the corpus.

    ``max_tokens`` counts every packed token over both splits (with ``seq_len``, the BOS the
    packer puts before a sequence too); the example crossing the cap is cut short. Batches start
    small (the first shard is ready quickly) and grow; near the cap they shrink, so little text
    is tokenized in vain. Skips and splits are counted in ``stats``. The conventions are read
    off the tokenizer (``conventions(tokenizer, eos_id)``) unless given.
    """
    conv = tokenizer_conventions or conventions(tokenizer, eos_id)
    separate = packing == "separate"
    budget = _Budget(max_tokens, seq_len or sys.maxsize, conv.bos_id, separate)
    stats = CorpusStats() if stats is None else stats
    index = 0  # of the next document
    chars_budget = TOKENIZE_FIRST_CHARS
    batch: list[Document] = []
    chars = 0

    def room() -> int | None:
        return None if max_tokens is None else budget.left

    def flush() -> Iterator[TokenizedDocument]:
        nonlocal index
        examples = _encode(batch, tokenizer, conv, train_on, room)
        for document, example in zip(batch, examples, strict=True):
            index += 1
            reason = _skip_reason(document, example, seq_len, separate)
            if reason is not None:
                setattr(stats, reason, getattr(stats, reason) + 1)
                continue
            if budget.left <= 0:
                return
            assert example is not None
            split = "eval" if is_eval_document(document.text, eval_fraction) else "train"
            example = budget.take(split, example)
            if separate and seq_len is not None and len(example.ids) > seq_len:
                stats.split_examples += 1
            yield TokenizedDocument(
                split,
                index - 1,
                example.ids,
                document.source,
                example.label_mask,
                example.token_bytes,
                example.text,
            )

    for document in documents:
        if budget.left <= 0:
            return
        batch.append(document)
        chars += len(document.text)
        limit = chars_budget if max_tokens is None else min(chars_budget, 16 * budget.left)
        if chars >= limit or len(batch) >= TOKENIZE_BATCH:
            yield from flush()
            batch, chars = [], 0
            chars_budget = min(2 * chars_budget, TOKENIZE_MAX_CHARS)
    if batch:
        yield from flush()


@dataclass
class ShardPlan:
    """One shard to compute: ``sequences`` are the split's sequences ``[first, first + len)``.

    Attributes:
        sequences: (L_i,) int32 each, L_i <= seq_len.
        loss_masks: (L_i,) bool trained positions per sequence; None when every position of
            the run is trained (``needs_loss_mask``).
        token_bytes, texts: per sequence the (L_i,) bytes each token spells and the UTF-8 text
            they spell (``spans.py``); None when the tokenizer gives no offsets.
    """

    split: str
    index: int
    sequences: list[np.ndarray]
    corpus_range: dict[str, Any]
    loss_masks: list[np.ndarray] | None = None
    token_bytes: list[np.ndarray] | None = None
    texts: list[bytes] | None = None

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.sequences)


def plan_shards(
    documents: Iterable[TokenizedDocument],
    *,
    seq_len: int,
    sequences_per_shard: int,
    packing: str = "concat",
    bos_id: int | None = None,
    stats: CorpusStats | None = None,
    masked: bool | None = None,
) -> Iterator[ShardPlan]:
    """Pack each split's documents and group its sequences into shards, in corpus order.

    ``masked`` (default: ``separate`` packing, or documents with label masks) attaches each
    sequence's trained positions; then a sequence without one is dropped and counted.

    Yields:
        each shard as soon as its last sequence is packed; the partly filled ones at the end.
    """
    separate = packing == "separate"
    packers = {s: SequencePacker(seq_len, bos_id=bos_id, separate=separate) for s in SPLITS}
    pending: dict[str, list[PackedSequence]] = {split: [] for split in SPLITS}
    shard_index = dict.fromkeys(SPLITS, 0)
    stats = stats or CorpusStats()

    def make(split: str) -> ShardPlan:
        items = pending[split]
        first = shard_index[split] * sequences_per_shard
        plan = ShardPlan(
            split=split,
            index=shard_index[split],
            sequences=[q.tokens for q in items],
            corpus_range={
                "sequences": [first, first + len(items)],
                "documents": [items[0].first_document, items[-1].last_document],
            },
            loss_masks=[q.positions for q in items] if masked else None,
        )
        if all(q.token_bytes is not None for q in items):
            plan.token_bytes = [q.token_bytes for q in items if q.token_bytes is not None]
            plan.texts = [q.text or b"" for q in items]
        shard_index[split] += 1
        pending[split] = []
        return plan

    def keep(split: str, sequences: list[PackedSequence]) -> Iterator[ShardPlan]:
        for sequence in sequences:
            if masked and not sequence.positions.any():
                stats.untrained_sequences_dropped += 1
                continue
            pending[split].append(sequence)
            if len(pending[split]) == sequences_per_shard:
                yield make(split)

    for document in documents:
        if masked is None:
            masked = separate or document.label_mask is not None
        packed = packers[document.split].add(
            document.ids,
            document.index,
            document.label_mask,
            document.token_bytes,
            document.text,
        )
        yield from keep(document.split, packed)
    for split in SPLITS:
        yield from keep(split, packers[split].finish())
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


def shard_plan(
    s: Any,
    files: list[Path],
    stats: CorpusStats,
    source: Any,
    corpus: dict[str, Any],
    facts: Any,
) -> Iterator[ShardPlan]:
    """Documents → token ids (BOS/EOS as the tokenizer has them) → packed sequences with their
    trained positions → the shard plan (every rank the same).

    Args:
        s: the run's ``CacheSettings``; facts: its ``report.PlanFacts``, counting each shard.
    """
    tokenizer = source.tokenizer
    rules = conventions(tokenizer, source.eos_id)
    plan = plan_shards(
        tokenize_documents(
            iter_documents(files, stats, s.text_field),
            tokenizer,
            eval_fraction=s.eval_fraction,
            max_tokens=s.max_tokens,
            train_on=corpus["train_on"],
            seq_len=s.seq_len,
            packing=corpus["packing"],
            stats=stats,
            tokenizer_conventions=rules,
        ),
        seq_len=s.seq_len,
        sequences_per_shard=max(1, s.shard_tokens // s.seq_len),
        packing=corpus["packing"],
        bos_id=rules.bos_id,
        stats=stats,
        masked=needs_loss_mask(corpus["kind"], corpus["packing"], corpus["train_on"]),
    )
    for shard in plan:
        facts.count(shard)
        yield shard
