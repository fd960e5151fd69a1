"""Long documents tokenized in windows give exactly the ids of one tokenizer call."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kdcache.pipeline.cache import long_text, packing
from kdcache.pipeline.cache.corpus import Document
from kdcache.pipeline.cache.long_text import cut_points, tokenize_long, tokenize_whole

PIECE, CONTEXT = 3000, 256


def sentencepiece_like(texts: list[str]) -> PreTrainedTokenizerFast:
    """Metaspace pre-tokenizer with a prefix space on the first word only (Llama-2 style), NFKC
    and lower-casing: offsets must map through normalization and the prefix."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<unk>", "</s>"])
    tokenizer.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", unk_token="<unk>")


@pytest.fixture(scope="module")
def tokenizers(corpus_texts: list[str], tiny_tokenizer_dir: Path) -> dict[str, object]:
    return {
        "byte-level BPE": AutoTokenizer.from_pretrained(tiny_tokenizer_dir),
        "sentencepiece-like": sentencepiece_like(corpus_texts[:20]),
    }


def sample_text(corpus_texts: list[str], giant_word: bool = False) -> str:
    """Code, prose with accents, CJK and emoji and a whitespace run (all local decisions), or with
    one 'word' far longer than the context straddling a cut, where windows must disagree."""
    parts = [*corpus_texts[:6], "Ｆｕｌｌ-width ÉTÉ café 東京 🙂🙂 naïve\n" * 40]
    text = "\n".join(parts)
    middle = len(text) // 2
    letters = np.random.default_rng(0).choice(list("abcdefghij"), 9000)
    extra = " " * 100 + ("".join(letters) + "\n" if giant_word else "")
    return text[:middle] + extra + text[middle:]


def call_lengths(tokenizer: object, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Records the length of the longest text of every call to ``tokenizer``."""
    lengths: list[int] = []
    real_call = type(tokenizer).__call__

    def counting_call(self: object, texts: str | list[str], **kwargs: object) -> object:
        lengths.append(max(map(len, [texts] if isinstance(texts, str) else texts)))
        return real_call(self, texts, **kwargs)

    monkeypatch.setattr(type(tokenizer), "__call__", counting_call)
    return lengths


@pytest.mark.parametrize("name", ["byte-level BPE", "sentencepiece-like"])
@pytest.mark.parametrize("giant_word", [False, True])
def test_windows_give_the_ids_of_one_call(
    tokenizers: dict[str, object],
    corpus_texts: list[str],
    monkeypatch: pytest.MonkeyPatch,
    name: str,
    giant_word: bool,
) -> None:
    tokenizer = tokenizers[name]
    text = sample_text(corpus_texts, giant_word)
    assert len(cut_points(text, PIECE)) > 5
    whole = tokenize_whole(text, tokenizer)
    lengths = call_lengths(tokenizer, monkeypatch)
    windowed = tokenize_long(text, tokenizer, piece_chars=PIECE, context_chars=CONTEXT)
    assert windowed.dtype == np.int32 and np.array_equal(windowed, whole)
    assert max(lengths) < len(text) or giant_word  # in windows (unless a retry needed it whole)
    for limit in (0, 1, 777, len(whole) + 5):
        head = tokenize_long(text, tokenizer, limit=limit, piece_chars=PIECE, context_chars=CONTEXT)
        assert np.array_equal(head, whole[:limit])


def test_cuts_fall_after_newlines_and_cover_the_text() -> None:
    text = ("a line of text\n" * 1000) + "x" * 10_000
    cuts = cut_points(text, 1000)
    assert cuts[0] == 0 and cuts[-1] == len(text) and cuts == sorted(set(cuts))
    assert all(b - a <= 1000 for a, b in zip(cuts, cuts[1:], strict=False))
    assert all(text[c - 1] == "\n" for c in cuts[1:-1] if c <= 15_000)  # where there are newlines


def test_corpus_documents_longer_than_a_piece_are_windowed(
    tokenizers: dict[str, object], corpus_texts: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = tokenizers["byte-level BPE"]
    text = sample_text(corpus_texts)
    documents = [Document("short one", "a"), Document(text, "b"), Document("short two", "c")]
    expected = [np.append(tokenize_whole(d.text, tokenizer), 0) for d in documents]  # + EOS
    monkeypatch.setattr(packing, "PIECE_CHARS", PIECE)
    monkeypatch.setattr(long_text, "CONTEXT_CHARS", CONTEXT)
    lengths = call_lengths(tokenizer, monkeypatch)
    got = list(packing.tokenize_documents(documents, tokenizer, eval_fraction=0.0, eos_id=0))
    assert [d.ids.tolist() for d in got] == [e.tolist() for e in expected]
    assert max(lengths) < len(text)  # the long text never went to the tokenizer in one piece
    total = sum(len(e) for e in expected)
    capped = list(
        packing.tokenize_documents(
            documents, tokenizer, eval_fraction=0.0, eos_id=0, max_tokens=total - 40
        )
    )
    assert sum(len(d.ids) for d in capped) == total - 40
    assert capped[0].ids.tolist() == expected[0].tolist()  # the long one is cut: its head
    assert capped[1].ids.tolist() == expected[1][: len(capped[1].ids)].tolist()


class PositionTokenizer:
    """One token per character whose id is its position in the string it was given: no two
    windows ever agree, so only the whole-text call is right."""

    is_fast = True

    def __call__(self, text: str, **kwargs: object) -> dict[str, list]:
        ids = [min(i, 50_000) for i in range(len(text))]
        return {"input_ids": ids, "offset_mapping": [(i, i + 1) for i in range(len(text))]}


def test_windows_that_disagree_fall_back_to_one_call() -> None:
    text = "abc\n" * 5000
    tokenizer = PositionTokenizer()
    windowed = tokenize_long(text, tokenizer, piece_chars=PIECE, context_chars=CONTEXT)
    assert np.array_equal(windowed, tokenize_whole(text, tokenizer))
