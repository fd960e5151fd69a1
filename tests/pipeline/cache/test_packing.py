"""Tokenize → pack → shard plan: deterministic, exact caps, nothing lost or duplicated."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from kdcache.pipeline.cache.corpus import Document
from kdcache.pipeline.cache.packing import (
    SequencePacker,
    TokenizedDocument,
    pack_sequences,
    plan_shards,
    tokenize_documents,
)

EOS = 99


def test_pack_sequences_joins_with_eos_and_keeps_the_remainder() -> None:
    out = list(pack_sequences([[1, 2, 3], [4], [5, 6, 7, 8, 9]], seq_len=4, eos_id=EOS))
    assert [s.tolist() for s in out] == [[1, 2, 3, EOS], [4, EOS, 5, 6], [7, 8, 9, EOS]]
    out = list(pack_sequences([[1, 2], [3]], seq_len=4, eos_id=EOS))
    assert [s.tolist() for s in out] == [[1, 2, EOS, 3], [EOS]]
    assert all(s.dtype == np.int32 for s in out)
    with pytest.raises(ValueError, match="at least 2"):
        list(pack_sequences([[1]], seq_len=1, eos_id=EOS))


def test_packer_tracks_document_ranges() -> None:
    packer = SequencePacker(3, EOS)
    assert packer.add([1], 0) == []
    done = packer.add([2, 3, 4, 5, 6], 1)  # 1 EOS 2 | 3 4 5 | 6 EOS
    assert [(q.tokens.tolist(), q.first_document, q.last_document) for q in done] == [
        ([1, EOS, 2], 0, 1),
        ([3, 4, 5], 1, 1),
    ]
    [last] = packer.finish()
    assert (last.tokens.tolist(), last.first_document, last.last_document) == ([6, EOS], 1, 1)
    assert packer.finish() == []


def _documents(n: int) -> list[TokenizedDocument]:
    """Random documents that end with EOS, as tokenize_documents makes them."""
    rng = np.random.default_rng(0)
    return [
        TokenizedDocument("eval" if i % 5 == 0 else "train", i, np.append(rng.integers(0, 50, rng.integers(1, 30)), EOS).astype(np.int32), f"d{i}")
        for i in range(n)
    ]  # fmt: skip


def test_plan_covers_every_token_once_per_split() -> None:
    documents = _documents(60)
    plans = list(plan_shards(documents, seq_len=8, sequences_per_shard=3))
    assert all(p.loss_masks is None for p in plans)  # text, concat: every position trained
    for split in ("train", "eval"):
        mine = [p for p in plans if p.split == split]
        assert [p.index for p in mine] == list(range(len(mine)))
        assert all(len(p.sequences) == 3 for p in mine[:-1])
        stream = np.concatenate([s for p in mine for s in p.sequences]).tolist()
        expected = [t for d in documents if d.split == split for t in d.ids]
        assert stream == expected
        starts = [p.corpus_range["sequences"][0] for p in mine]
        assert starts == [3 * i for i in range(len(mine))]
        assert all(s.shape == (8,) for p in mine for s in p.sequences[:-1])


def test_tokenize_documents_caps_tokens_exactly(tiny_tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    documents = [Document(f"def f{i}(x):\n    return x + {i}\n", f"s{i}") for i in range(200)]
    full = list(tokenize_documents(documents, tokenizer, eval_fraction=0.2, eos_id=EOS))
    assert len(full) == 200
    assert {d.split for d in full} == {"train", "eval"}
    assert full[3].ids.dtype == np.int32
    # this tokenizer adds no special tokens: the text's ids, then EOS
    assert full[3].ids.tolist() == [*tokenizer(documents[3].text)["input_ids"], EOS]
    total = sum(len(d.ids) for d in full)
    for cap in (1, 17, total // 2, total, total + 10):
        capped = list(
            tokenize_documents(documents, tokenizer, eval_fraction=0.2, eos_id=EOS, max_tokens=cap)
        )
        assert sum(len(d.ids) for d in capped) == min(cap, total)
        assert [d.ids.tolist() for d in capped[:-1]] == [
            d.ids.tolist() for d in full[: len(capped) - 1]
        ]
