"""Examples as the teacher sees them, for Llama-3, Gemma and Qwen style tokenizers: BOS/EOS
conventions, chat templates, label masks, and the errors bad records give."""

from __future__ import annotations

import numpy as np
import pytest
from chat_tokenizers import FAMILIES, family, llama, qwen

from kdcache.pipeline.cache import long_text, packing
from kdcache.pipeline.cache.chat import conventions, encode_chat, encode_example
from kdcache.pipeline.cache.corpus import CorpusError, CorpusStats, Document
from kdcache.pipeline.cache.packing import needs_loss_mask, tokenize_documents

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is x?"},
    {"role": "assistant", "content": "It is a name."},
    {"role": "user", "content": "And y?"},
    {"role": "assistant", "content": "Another one."},
]
# each assistant turn as the mask must cover it: content and the template's end of turn (Gemma's
# last turn also gets the EOS appended after it, its template ending turns without EOS)
ASSISTANT_TURNS = {
    "llama": ["It is a name.<|eot_id|>", "Another one.<|eot_id|>"],
    "gemma": ["It is a name.<end_of_turn>\n", "Another one.<end_of_turn>\n<eos>"],
    "qwen": ["It is a name.<|im_end|>\n", "Another one.<|im_end|>\n"],
}
TEXTS = ["def f(x):\n    return x  # café 東京\n", "The user asks.", "x"]


def runs(mask: np.ndarray) -> list[slice]:
    """The maximal runs of True in a (n,) bool mask."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(np.int8), [0]])))
    return [slice(a, b) for a, b in zip(edges[::2], edges[1::2], strict=True)]


def tokenize(documents: list[Document], tokenizer: object, **options: object) -> list:
    return list(tokenize_documents(documents, tokenizer, eval_fraction=0.0, **options))


def test_conventions_are_read_off_the_tokenizer() -> None:
    def ids(tokenizer: object, *tokens: str) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(t) for t in tokens]

    llama3, gemma, chatml = family("llama"), family("gemma"), family("qwen")
    assert conventions(llama3).bos_id == ids(llama3, "<|begin_of_text|>")[0]
    assert conventions(llama3).eos_id == ids(llama3, "<|eot_id|>")[0]
    gemma_conventions = conventions(gemma)
    assert [gemma_conventions.bos_id, gemma_conventions.eos_id] == ids(gemma, "<bos>", "<eos>")
    assert conventions(chatml).bos_id is None and not conventions(chatml).adds_bos
    assert conventions(chatml).eos_id == ids(chatml, "<|im_end|>")[0]
    assert all(conventions(family(f)).adds_bos == (f != "qwen") for f in FAMILIES)
    assert not any(conventions(family(f)).adds_eos for f in FAMILIES)
    assert conventions(chatml, eos_id=7).eos_id == 7


@pytest.mark.parametrize("name", FAMILIES)
def test_text_documents_are_the_tokenizers_own_encoding_plus_one_eos(name: str) -> None:
    tokenizer = family(name)
    bos, eos = tokenizer.bos_token, tokenizer.eos_token
    texts = [*TEXTS, *([f"{bos}starts with the BOS text"] if bos else [])]
    got = tokenize([Document(t, f"t{i}") for i, t in enumerate(texts)], tokenizer)
    for text, document in zip(texts, got, strict=True):
        own = tokenizer(text)["input_ids"]
        ids = document.ids.tolist()
        assert document.label_mask is None  # text: every token is trained
        if text.startswith(str(bos)):  # the tokenizer's BOS and the text's: only one is kept
            assert own[:2] == [tokenizer.bos_token_id] * 2 and ids == [*own[1:], ids[-1]]
        else:
            assert ids == [*own, tokenizer.eos_token_id]
        assert ids.count(tokenizer.eos_token_id) == 1 and tokenizer.decode(ids[-1:]) == eos
        if bos is not None:
            assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id


@pytest.mark.parametrize("name", FAMILIES)
def test_long_texts_in_windows_equal_the_tokenizers_own_encoding(
    name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    tokenizer = family(name)
    text = "\n".join(f"line {i}: def f{i}(x):  return x * {i}  # café" for i in range(600))
    monkeypatch.setattr(packing, "PIECE_CHARS", 2000)
    monkeypatch.setattr(long_text, "CONTEXT_CHARS", 200)
    [document] = tokenize([Document(text, "long")], tokenizer)
    assert document.ids.tolist() == [*tokenizer(text)["input_ids"], tokenizer.eos_token_id]
    [head] = tokenize([Document(text, "long")], tokenizer, max_tokens=777)
    assert head.ids.tolist() == document.ids[:777].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_chat_records_are_the_chat_template_and_the_mask_is_the_assistant_turns(
    name: str,
) -> None:
    tokenizer = family(name)
    [document] = tokenize([Document("{}", "c.jsonl:1", "chat", CONVERSATION)], tokenizer)
    own = tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=False)
    appended = [tokenizer.eos_token_id] if name == "gemma" else []  # <end_of_turn>\n, no EOS
    assert document.ids.tolist() == [*own, *appended]
    if tokenizer.bos_token_id is not None:  # the template's BOS, exactly once
        assert document.ids.tolist().count(tokenizer.bos_token_id) == 1
        assert document.ids[0] == tokenizer.bos_token_id
    mask = document.label_mask
    assert mask.dtype == bool and mask.shape == document.ids.shape
    assert [tokenizer.decode(document.ids[r]) for r in runs(mask)] == ASSISTANT_TURNS[name]
    [everything] = tokenize(
        [Document("{}", "c.jsonl:1", "chat", CONVERSATION)], tokenizer, train_on="all"
    )
    assert everything.label_mask is None and np.array_equal(everything.ids, document.ids)


def test_prompt_completion_records_use_the_template_when_there_is_one() -> None:
    tokenizer = qwen()
    record = ("def join(a, *p):", "Join two or more paths.")
    [document] = tokenize([Document("{}", "p:1", "prompt", record)], tokenizer)
    messages = [{"role": "user", "content": record[0]}, {"role": "assistant", "content": record[1]}]
    assert document.ids.tolist() == tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=False
    )
    masked = [tokenizer.decode(document.ids[r]) for r in runs(document.label_mask)]
    assert masked == ["Join two or more paths.<|im_end|>\n"]


def test_prompt_completion_without_a_template_is_one_text_with_the_completion_masked() -> None:
    tokenizer = llama(eos="<|end_of_text|>", template=False)  # a base model's tokenizer
    eos = tokenizer.eos_token_id
    prompt, completion = "def add(a, b):\n", "    return a + b\n"
    [document] = tokenize([Document("{}", "p:1", "prompt", (prompt, completion))], tokenizer)
    assert document.ids.tolist() == [*tokenizer(prompt + completion)["input_ids"], eos]
    [run] = runs(document.label_mask)
    assert run.stop == len(document.ids)  # the completion, through the EOS
    assert tokenizer.decode(document.ids[run]) == completion + "<|end_of_text|>"
    # the token straddling the join ("de" + "f ...": the token "def") counts as completion
    [straddling] = tokenize([Document("{}", "p:2", "prompt", ("de", "f x(): pass"))], tokenizer)
    assert tokenizer.decode(straddling.ids[1:2]) == "def"
    assert straddling.label_mask.tolist() == [False] + [True] * (len(straddling.ids) - 1)


def test_an_assistant_turn_first_and_tool_turns_where_the_template_has_them() -> None:
    tokenizer = qwen()
    conv = conventions(tokenizer)
    first = [{"role": "assistant", "content": "Hello there."}, {"role": "user", "content": "Hi."}]
    example = encode_chat(first, tokenizer, conv, "c:1", "assistant")
    assert [tokenizer.decode(example.ids[r]) for r in runs(example.label_mask)] == [
        "Hello there.<|im_end|>\n"
    ]
    tool = [
        {"role": "user", "content": "Weather?"},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ]
    example = encode_chat(tool, tokenizer, conv, "c:2", "assistant")
    assert [tokenizer.decode(example.ids[r]) for r in runs(example.label_mask)] == [
        "It is sunny.<|im_end|>\n"
    ]
    with pytest.raises(CorpusError, match=r"no tool role, c:3 has a tool message") as error:
        encode_chat(tool, llama(), conventions(llama()), "c:3", "assistant")
    assert "\n" not in str(error.value)


def _error(document: Document, tokenizer: object, train_on: str = "assistant") -> str:
    with pytest.raises(CorpusError) as error:
        encode_example(document, tokenizer, conventions(tokenizer), train_on)
    message = str(error.value)
    assert "\n" not in message and document.source in message
    return message


def test_bad_records_are_one_line_errors_naming_the_record() -> None:
    base = llama(eos="<|end_of_text|>", template=False)
    message = _error(Document("{}", "chats.jsonl:4", "chat", CONVERSATION), base)
    assert "has no chat template" in message and "use prompt/completion records" in message
    not_alternating = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    message = _error(Document("{}", "g.jsonl:2", "chat", not_alternating), family("gemma"))
    assert message.startswith("the chat template refuses the conversation, g.jsonl:2")
    assert "roles must alternate" in message


def test_a_template_whose_turns_are_not_prefixes_is_refused_unless_all_is_trained() -> None:
    tokenizer = qwen()
    original = tokenizer.chat_template
    # earlier assistant turns shouted, the last one not (the way reasoning templates drop the
    # thinking of earlier turns): a turn renders differently once another follows
    tokenizer.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m['role'] == 'assistant' and not loop.last %}{{ m['content'] | upper }}"
        "{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    try:
        document = Document("{}", "c.jsonl:9", "chat", CONVERSATION)
        assert "does not render turns as prefixes" in _error(document, tokenizer)
        example = encode_example(document, tokenizer, conventions(tokenizer), "all")
        assert example.label_mask is None
    finally:
        tokenizer.chat_template = original


def test_examples_without_anything_to_train_are_counted_skips() -> None:
    tokenizer = qwen()
    documents = [
        Document("{}", "p:1", "prompt", ("Say nothing.", "")),
        Document("{}", "p:2", "prompt", ("Say nothing.", "  \n")),
        Document("{}", "c:1", "chat", [{"role": "user", "content": "No answer."}]),
        Document("{}", "c:2", "chat", CONVERSATION),
    ]
    stats = CorpusStats()
    got = tokenize(documents, tokenizer, stats=stats)
    assert [d.source for d in got] == ["c:2"] and [d.index for d in got] == [3]
    assert stats.skipped_nothing_to_train == 3
    assert "3 skipped with nothing to train" in stats.summary()
    assert len(tokenize(documents, tokenizer, train_on="all")) == 4  # every token is trained


def test_needs_loss_mask() -> None:
    assert not needs_loss_mask("text", "concat", "all")
    assert not needs_loss_mask("chat", "concat", "all")
    assert needs_loss_mask("chat", "concat", "assistant")
    assert needs_loss_mask("prompt", "concat", "assistant")
    assert needs_loss_mask("text", "separate", "all")
    assert needs_loss_mask("prompt", "separate", "all")
