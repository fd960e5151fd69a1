"""Packing with the conventions: BOS at every concat sequence start, separate sequences that never
mix examples, trained positions (the label mask shifted by one), exact caps."""

from __future__ import annotations

import numpy as np
import pytest
from chat_tokenizers import family

from kdcache.pipeline.cache.chat import conventions
from kdcache.pipeline.cache.corpus import CorpusStats, Document
from kdcache.pipeline.cache.packing import (
    SPLITS,
    SequencePacker,
    TokenizedDocument,
    plan_shards,
    tokenize_documents,
)

QUESTIONS = ["What is x?", "Why?", "Name three colours of the rainbow, please.", "And y?"]
ANSWERS = ["It is a name.", "Because.", "Red, green and blue.", "Another one, like x."]


def chats(n: int) -> list[Document]:
    """Chat records of one to three turns, with and without a system turn."""
    documents = []
    for i in range(n):
        messages = [{"role": "system", "content": "Be brief."}] if i % 3 == 0 else []
        for turn in range(1 + i % 3):
            messages.append({"role": "user", "content": QUESTIONS[(i + turn) % 4]})
            messages.append({"role": "assistant", "content": ANSWERS[(i * turn) % 4]})
        documents.append(Document(f"chat {i}", f"c.jsonl:{i + 1}", "chat", messages))
    return documents


def texts(n: int) -> list[Document]:
    return [
        Document(f"def f{i}(x):\n    return x + {i}  # " + "ab " * i, f"t{i}") for i in range(n)
    ]


def tokenized(documents: list[Document], name: str, **options: object) -> list[TokenizedDocument]:
    return list(tokenize_documents(documents, family(name), eval_fraction=0.25, **options))


def plan(documents: list[TokenizedDocument], name: str, seq_len: int, **options: object) -> list:
    bos = conventions(family(name)).bos_id
    return list(
        plan_shards(documents, seq_len=seq_len, sequences_per_shard=3, bos_id=bos, **options)
    )


def reference_positions(
    sequences: list[np.ndarray], stream: np.ndarray, labels: np.ndarray, bos: int | None
) -> list[np.ndarray]:
    """Token by token: which positions of ``sequences`` (a concat packing of ``stream``, with a
    BOS put before sequences that do not start with one) predict a label token of the stream."""
    p, expected = 0, []
    for sequence in sequences:
        inserted = bos is not None and sequence[0] == bos and stream[p] != bos
        flags = np.zeros(len(sequence), bool)
        q = p - inserted  # stream index of position 0 (-1 for an inserted BOS)
        for t in range(len(sequence)):
            nxt = q + t + 1  # the stream index of the token this position predicts
            flags[t] = nxt < len(stream) and labels[nxt]
        expected.append(flags)
        p = q + len(sequence)
    assert p == len(stream)
    return expected


def pack(documents: list[TokenizedDocument], split: str, seq_len: int, bos: int | None) -> list:
    """Every sequence the packer makes of ``split`` (plan_shards drops untrained ones)."""
    packer = SequencePacker(seq_len, bos_id=bos)
    mine = [d for d in documents if d.split == split]
    return [q for d in mine for q in packer.add(d.ids, d.index, d.label_mask)] + packer.finish()


@pytest.mark.parametrize("name", ["llama", "gemma", "qwen"])
@pytest.mark.parametrize("kind", ["text", "chat"])
def test_concat_starts_every_sequence_with_one_bos_and_flags_the_shifted_labels(
    name: str, kind: str
) -> None:
    bos, seq_len = conventions(family(name)).bos_id, 16 if kind == "text" else 64
    documents = tokenized(texts(40) if kind == "text" else chats(40), name, seq_len=seq_len)
    plans = plan(documents, name, seq_len=seq_len)
    assert (plans[0].loss_masks is None) == (kind == "text")
    for split in SPLITS:
        packed = pack(documents, split, seq_len, bos)
        tokens = [q.tokens for q in packed]
        assert all(len(t) == seq_len for t in tokens[:-1]) and 0 < len(tokens[-1]) <= seq_len
        stream = np.concatenate([d.ids for d in documents if d.split == split])
        if bos is None:
            assert np.array_equal(np.concatenate(tokens), stream)
        else:  # one BOS first, never two; the rest is the stream
            assert all(t[0] == bos and (len(t) == 1 or t[1] != bos) for t in tokens)
            assert np.array_equal(
                np.concatenate([t[t != bos] for t in tokens]), stream[stream != bos]
            )
        labels = np.concatenate([np.ones(len(d.ids), bool) if d.label_mask is None else d.label_mask for d in documents if d.split == split])  # fmt: skip
        expected = reference_positions(tokens, stream, labels, bos)
        assert all(np.array_equal(q.positions, e) for q, e in zip(packed, expected, strict=True))
        # the plan: the packer's sequences with a trained position, and those flags
        mine = [p for p in plans if p.split == split]
        kept = [q for q in packed if kind == "text" or q.positions.any()]
        assert [s.tolist() for p in mine for s in p.sequences] == [q.tokens.tolist() for q in kept]
        if kind == "chat":
            masks = [m.tolist() for p in mine for m in p.loss_masks]
            assert masks == [q.positions.tolist() for q in kept]


@pytest.mark.parametrize("name", ["llama", "qwen"])
def test_separate_never_mixes_examples_and_skips_or_splits_long_ones(name: str) -> None:
    tokenizer = family(name)
    bos, seq_len = conventions(tokenizer).bos_id, 160
    long_chat = chats(1)[0].record + [
        {"role": "user", "content": "Tell me more. " * 60},
        {"role": "assistant", "content": "No."},
    ]
    long_text = Document("print('hello')\n" * 100, "long.txt")
    documents = [
        *chats(6),
        Document("", "c.jsonl:99", "chat", long_chat),
        *texts(3),
        long_text,
    ]
    stats = CorpusStats()
    examples = tokenized(documents, name, seq_len=seq_len, packing="separate", stats=stats)
    assert stats.skipped_too_long == 1 and stats.split_examples == 1
    assert "1 split into pieces" in stats.summary()
    assert [d.source for d in examples] == [d.source for d in documents if d.source != "c.jsonl:99"]
    plans = plan(examples, name, seq_len=seq_len, packing="separate", stats=stats)
    by_split = {s: [q for p in plans if p.split == s for q in zip(p.sequences, p.loss_masks, strict=True)] for s in SPLITS}  # fmt: skip
    for split, packed in by_split.items():
        pieces = iter(packed)
        for example in (d for d in examples if d.split == split):
            if len(example.ids) <= seq_len:  # exactly one sequence, the example's own
                tokens, mask = next(pieces)
                assert np.array_equal(tokens, example.ids)
                labels = (
                    np.ones(len(tokens), bool) if example.label_mask is None else example.label_mask
                )
                assert np.array_equal(mask, np.append(labels[1:], False))  # shifted by one
                continue
            cut = [
                next(pieces) for _ in range(-(-len(example.ids) // (seq_len - (bos is not None))))
            ]
            assert all(len(t) <= seq_len for t, _ in cut) and len(cut) > 1
            if bos is not None:
                assert all(t[0] == bos and t[1] != bos for t, _ in cut)
            rejoined = np.concatenate(
                [cut[0][0], *[t[1 if bos is not None else 0 :] for t, _ in cut[1:]]]
            )
            assert np.array_equal(rejoined, example.ids)
            # a piece's last position predicts the next piece's first token: trained
            assert all(m[-1] for _, m in cut[:-1]) and not cut[-1][1][-1]
        assert next(pieces, None) is None


def test_sequences_without_a_trained_position_are_dropped_and_counted() -> None:
    ids = np.arange(10, dtype=np.int32)
    prompt_heavy = np.zeros(10, bool)
    prompt_heavy[-2:] = True  # only the last two tokens are labels
    documents = [TokenizedDocument("train", 0, ids, "c:1", prompt_heavy)]
    stats = CorpusStats()
    plans = list(plan_shards(documents, seq_len=4, sequences_per_shard=8, stats=stats))
    # 0 1 2 3 | 4 5 6 7 | 8 9: only the positions before tokens 8 and 9 are trained
    [shard] = plans
    assert [s.tolist() for s in shard.sequences] == [[4, 5, 6, 7], [8, 9]]
    assert [m.tolist() for m in shard.loss_masks] == [[False, False, False, True], [True, False]]
    assert stats.untrained_sequences_dropped == 1
    assert shard.corpus_range == {"sequences": [0, 2], "documents": [0, 0]}


@pytest.mark.parametrize("name", ["llama", "gemma", "qwen"])
@pytest.mark.parametrize(("kind", "packing"), [("text", "concat"), ("chat", "concat"), ("chat", "separate"), ("text", "separate")])  # fmt: skip
def test_max_tokens_counts_every_packed_token_exactly(name: str, kind: str, packing: str) -> None:
    seq_len = 12 if kind == "text" else 64
    documents = texts(12) if kind == "text" else chats(12)
    bos = conventions(family(name)).bos_id

    def packed(cap: int | None) -> int:
        examples = tokenized(documents, name, max_tokens=cap, seq_len=seq_len, packing=packing)
        assert all(d.label_mask is None or d.label_mask.dtype == bool for d in examples)
        packers = {s: SequencePacker(seq_len, bos_id=bos, separate=packing == "separate") for s in SPLITS}  # fmt: skip
        sequences = [
            q for d in examples for q in packers[d.split].add(d.ids, d.index, d.label_mask)
        ]
        sequences += [q for p in packers.values() for q in p.finish()]
        assert all(0 < len(q.tokens) <= seq_len for q in sequences)
        return sum(len(q.tokens) for q in sequences)

    total = packed(None)
    assert total > 100
    for cap in [*range(1, 40), *range(40, total, 7), total - 1, total, total + 10]:
        assert packed(cap) == min(cap, total), cap


def test_a_prompt_longer_than_a_sequence_is_a_counted_skip_in_concat_packing() -> None:
    long_prompt = [
        {"role": "user", "content": "Tell me more. " * 40},
        {"role": "assistant", "content": "No."},
    ]
    documents = [*chats(2), Document("", "c.jsonl:9", "chat", long_prompt)]
    stats = CorpusStats()
    kept = tokenized(documents, "qwen", seq_len=64, stats=stats)
    assert [d.source for d in kept] == ["c.jsonl:1", "c.jsonl:2"]
    assert stats.skipped_too_long == 1
    assert len(tokenized(documents, "qwen", seq_len=64, train_on="all")) == 3  # no prompt then
