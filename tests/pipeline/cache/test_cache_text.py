"""Stage one keeps the text and each token's span (byte-level BPE, SentencePiece-style and
WordPiece tokenizers; packed, split and chat data) and the teacher's next-token log-probs."""

from __future__ import annotations

import unicodedata
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_tokenizers import family
from conftest import save_tiny_model
from tokenizers import BertWordPieceTokenizer
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

from kdcache.pipeline.cache.chat import conventions, encode_example, encode_long_text
from kdcache.pipeline.cache.corpus import Document
from kdcache.pipeline.cache.packing import plan_shards, tokenize_documents
from kdcache.pipeline.cache.spans import token_spans
from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer
from kdcache.pipeline.cli import main
from kdcache.storage import open_store, verify_store

DOCS = [
    "def f(x):\n    return x  # h\u00e9llo w\u00f6rld \U0001f600 \u65e5\u672c\u8a9e\n" * 3,
    "  Spaced   OUT\ttabs\n\n" * 5,
    "class A:\n    pass\n" * 4,
]


def run(*args: str) -> None:
    try:
        main(list(args))
    except SystemExit as e:
        assert e.code in (0, None)


def wordpiece() -> PreTrainedTokenizerFast:
    """BERT-like: lowercasing, accents stripped, whitespace dropped — no round trip from ids."""
    trained = BertWordPieceTokenizer(lowercase=True, strip_accents=True)
    trained.train_from_iterator(DOCS * 20, vocab_size=200, show_progress=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=trained._tokenizer, unk_token="[UNK]", eos_token="[SEP]",
        bos_token="[CLS]", pad_token="[PAD]",
    )  # fmt: skip


def tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "byte-level": train_bpe_tokenizer(DOCS * 20, 400),
        "sentencepiece": family("gemma"),
        "wordpiece": wordpiece(),
    }


def texts_of_plan(tokenizer: PreTrainedTokenizerFast, docs: list[Document], **kw) -> list:
    plan = plan_shards(
        tokenize_documents(docs, tokenizer, eval_fraction=0.0, seq_len=kw["seq_len"],
                           packing=kw.get("packing", "concat")),
        seq_len=kw["seq_len"], sequences_per_shard=4, packing=kw.get("packing", "concat"),
        bos_id=conventions(tokenizer).bos_id,
    )  # fmt: skip
    out = []
    for shard in plan:
        assert shard.texts is not None and shard.token_bytes is not None
        for tokens, text, lengths in zip(
            shard.sequences, shard.texts, shard.token_bytes, strict=True
        ):
            assert len(lengths) == len(tokens) and int(lengths.sum()) == len(text)
            out.append((tokens, text, lengths))
    return out


@pytest.mark.parametrize("name", ["byte-level", "sentencepiece", "wordpiece"])
def test_packed_and_split_text_is_the_documents_text(name: str) -> None:
    tokenizer = tokenizers()[name]
    docs = [Document(text=d, source=f"d{i}") for i, d in enumerate(DOCS)]
    for packing in ("concat", "separate"):
        pieces = texts_of_plan(tokenizer, docs, seq_len=12, packing=packing)
        assert len(pieces) > len(DOCS)  # documents cut across sequences
        joined = b"".join(text for _, text, _ in pieces)
        assert joined == "".join(DOCS).encode()  # byte-exact, whitespace and case kept
        specials = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}
        for tokens, text, lengths in pieces:
            ends = np.cumsum(lengths)
            for i, token in enumerate(tokens):
                span = text[(ends[i - 1] if i else 0) : ends[i]]
                if int(token) in specials:
                    assert span == b""
                elif name == "byte-level":  # exactly the token's bytes, even half a character
                    raw = tokenizer.convert_ids_to_tokens(int(token))
                    assert span == tokenizer.convert_tokens_to_string([raw]).encode() or len(
                        span
                    ) == len(raw)
                elif name == "wordpiece" and token != tokenizer.unk_token_id:
                    piece = tokenizer.convert_ids_to_tokens(int(token)).removeprefix("##")
                    plain = unicodedata.normalize("NFD", span.decode(errors="replace"))
                    plain = "".join(c for c in plain if not unicodedata.combining(c))
                    assert plain.strip().lower().endswith(piece)


def test_a_long_text_in_windows_keeps_its_spans() -> None:
    tokenizer = tokenizers()["byte-level"]
    text = "".join(DOCS) * 8
    conv = conventions(tokenizer)
    whole = encode_long_text(text, tokenizer, conv)
    windows = encode_long_text(text, tokenizer, conv, piece_chars=200)
    assert windows.text == whole.text == text.encode()
    assert np.array_equal(windows.token_bytes, whole.token_bytes)
    assert np.array_equal(windows.ids, whole.ids)


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_chat_text_leaves_the_control_tokens_out(name: str) -> None:
    tokenizer = family(name)
    messages = [
        {"role": "user", "content": "How do I sort a list? \u00e9"},
        {"role": "assistant", "content": "Use sorted(items)."},
    ]
    example = encode_example(Document(text="", source="c", kind="chat", record=messages),
                             tokenizer, conventions(tokenizer), "assistant")  # fmt: skip
    rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    for special in tokenizer.all_special_tokens:
        rendered = rendered.replace(special, "")
    assert example.text == rendered.encode()
    assert example.token_bytes is not None
    specials = np.isin(example.ids, tokenizer.all_special_ids)
    assert specials.any() and (example.token_bytes[specials] == 0).all()


def test_wordpiece_offsets_keep_the_original_text() -> None:
    tokenizer = wordpiece()
    text = "  Caf\u00e9 CR\u00c8ME  br\u00fbl\u00e9e "
    enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"])
    lengths, spelled = token_spans(text, ids, np.asarray(enc["offset_mapping"]), tokenizer)
    assert spelled == text.encode() and int(lengths.sum()) == len(spelled)
    assert tokenizer.decode(ids, skip_special_tokens=True).encode() != spelled  # why it is kept


@pytest.fixture(scope="module")
def byte_level_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("text-teacher")
    train_bpe_tokenizer(DOCS * 20, 400).save_pretrained(tmp / "tokenizer")
    return save_tiny_model("llama", tmp / "tokenizer", tmp / "teacher")


@pytest.mark.parametrize("backend,packing", [("zarr", "concat"), ("arrow", "separate")])
def test_cache_teacher_stores_text_and_exact_next_token_logprobs(
    tmp_path: Path, byte_level_teacher: Path, backend: str, packing: str
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(DOCS):
        (corpus / f"d{i}.txt").write_text(doc, encoding="utf-8")
    out = str(tmp_path / "store")
    run("cache-teacher", "--teacher", str(byte_level_teacher), "--corpus", str(corpus),
        "--out", out, "--top-k", "4", "--seq-len", "16", "--eval-fraction", "0",
        "--shard-tokens", "64", "--format", backend, "--packing", packing)  # fmt: skip
    store = open_store(out)
    assert store.manifest["format_version"] == 7 and store.manifest["text"] is True
    assert verify_store(out) == []
    sequences = list(store.iter_sequences("train"))
    assert b"".join(q.text.tobytes() for q in sequences) == "".join(DOCS).encode()
    model = AutoModelForCausalLM.from_pretrained(byte_level_teacher).float().eval()
    for q in sequences[:6]:
        tokens = torch.tensor(q.tokens, dtype=torch.long)
        with torch.no_grad():
            lp = torch.log_softmax(model(tokens[None]).logits[0].float(), -1)  # (L, V)
        want = lp[torch.arange(len(tokens) - 1), tokens[1:]].numpy()
        got = q.next_token_logprob.astype(np.float32)
        assert np.isnan(got[-1]) and got.shape == (len(tokens),)
        assert np.allclose(got[:-1], want, rtol=2**-10, atol=1e-4)  # float16 rounding
        if q.loss_mask is not None:  # masked store: every position still has its log-prob
            assert np.isfinite(got[:-1]).all()
