"""Two tokenizations of one text aligned on shared byte boundaries: the student's tokens and
their byte spans for byte-level BPE, SentencePiece-style and WordPiece-style tokenizers built
here, and chunks both tokenizations spell exactly."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import SentencePieceBPETokenizer
from tokenizers.implementations import BertWordPieceTokenizer
from transformers import PreTrainedTokenizerFast

from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer
from kdcache.pipeline.distill.alignment import NO_CHUNK, align, byte_offsets, retokenize

TEXTS = [
    "def naïve(x):\n    return x  # café — 東京 ✓\n",
    "  leading spaces, trailing\ttabs\t\n\nand ÜNICODE ümlauts",
]


@pytest.fixture(scope="module")
def tokenizers(corpus_texts: list[str]) -> dict[str, PreTrainedTokenizerFast]:
    texts = [t[:3000] for t in corpus_texts[:30]] + TEXTS
    sentencepiece = SentencePieceBPETokenizer()
    sentencepiece.train_from_iterator(texts, vocab_size=400, min_frequency=1)
    wordpiece = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    wordpiece.train_from_iterator(texts, vocab_size=400, min_frequency=1)
    return {
        "byte-bpe": train_bpe_tokenizer(texts, vocab_size=600),
        "sentencepiece": PreTrainedTokenizerFast(tokenizer_object=sentencepiece, unk_token="<unk>"),
        "wordpiece": PreTrainedTokenizerFast(tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]"),
    }  # fmt: skip


def spans(ends: np.ndarray) -> list[tuple[int, int]]:
    starts = np.concatenate([[0], ends[:-1]])
    return list(zip(starts.tolist(), ends.tolist(), strict=True))


def test_byte_offsets_count_utf8_bytes_and_escaped_bytes_once() -> None:
    assert byte_offsets("aé東").tolist() == [0, 1, 3, 6]
    cut = "東".encode()[:2].decode("utf-8", errors="surrogateescape")
    assert byte_offsets(cut).tolist() == [0, 1, 2]


@pytest.mark.parametrize("kind", ["byte-bpe", "sentencepiece", "wordpiece"])
@pytest.mark.parametrize("text", TEXTS)
def test_the_student_tokens_cover_the_text_in_order(tokenizers, kind: str, text: str) -> None:
    data = text.encode()
    got = retokenize(tokenizers[kind], data)
    assert got.ids.shape == got.ends.shape and got.ends[-1] == len(data)
    assert (np.diff(got.ends) >= 0).all()
    if kind == "byte-bpe":  # byte-level tokens spell their span exactly (a character split
        # over two tokens: the first spans it, the second spells nothing)
        tok = tokenizers[kind]
        group: list[str] = []
        for i, (_, end) in enumerate(spans(got.ends)):
            group.append(tok.convert_ids_to_tokens(int(got.ids[i])))
            if i + 1 < len(got.ids) and got.ends[i + 1] == end:
                continue
            first = i - len(group) + 1
            begin = spans(got.ends)[first][0]
            assert tok.convert_tokens_to_string(group).encode() == data[begin:end]
            group = []


@pytest.mark.parametrize("kinds", [("byte-bpe", "sentencepiece"), ("byte-bpe", "wordpiece"),
                                   ("sentencepiece", "wordpiece")])  # fmt: skip
def test_chunks_are_spelled_exactly_by_both_tokenizations(tokenizers, kinds) -> None:
    data = TEXTS[0].encode()
    first, second = (retokenize(tokenizers[k], data) for k in kinds)
    alignment = align(first.ends, second.ends)
    assert alignment.bounds[0] == 0 and alignment.bounds[-1] == len(data)
    assert 1 < alignment.chunks <= min(len(first.ids), len(second.ids))
    for ends, chunk in ((first.ends, alignment.teacher), (second.ends, alignment.student)):
        for c in range(alignment.chunks):
            members = [s for s, k in zip(spans(ends), chunk, strict=True) if k == c]
            assert members, c
            assert (members[0][0], members[-1][1]) == (
                alignment.bounds[c], alignment.bounds[c + 1]
            )  # fmt: skip


def test_a_token_that_spells_nothing_has_no_chunk_and_a_cut_character_keeps_its_bytes(
    tokenizers,
) -> None:
    teacher_ends = np.asarray([0, 3, 3, 6])  # BOS, "abc", EOS, "def"
    student_ends = np.asarray([1, 3, 6])
    alignment = align(teacher_ends, student_ends)
    assert alignment.bounds.tolist() == [0, 3, 6]
    assert alignment.teacher.tolist() == [NO_CHUNK, 0, NO_CHUNK, 1]
    assert alignment.student.tolist() == [0, 0, 1]
    cut = "ab東".encode()[:-1]  # a sequence ending inside a character
    got = retokenize(tokenizers["byte-bpe"], cut)
    assert got.ends[-1] == len(cut)
    with pytest.raises(ValueError, match="does not reproduce the text"):
        align(np.asarray([3, 6]), np.asarray([3, 5]))
