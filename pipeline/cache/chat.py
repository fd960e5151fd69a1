"""Examples as the teacher sees them: its tokenizer's BOS/EOS conventions, its chat template, and
the tokens a student learns (the label mask).

Conventions ("nothing added twice"): every example starts the way the tokenizer starts a text (its
BOS, if it adds one, exactly once) and ends with EOS, unless its tokens already end with EOS (a
chat template that closes turns with EOS; whitespace after it, such as ChatML's ``\\n``, does not
count). A chat record is rendered by the tokenizer's own chat template and its string tokenized
without special tokens, so its ids equal ``tokenizer.apply_chat_template(messages)``.

Label mask: the tokens of each assistant turn, found as the characters between the conversation
rendered up to that turn with the generation prompt and rendered through it (the assistant's
content and the template's end-of-turn tokens, not the assistant header), mapped to tokens by the
fast tokenizer's offsets. A prompt/completion record is a user turn and an assistant turn with a
template; without one, the prompt followed by the completion encoded as one text, whose completion
tokens are those ending after the prompt (the token straddling the join counts as completion).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from kdcache.pipeline.cache.corpus import CorpusError, Document
from kdcache.pipeline.cache.long_text import tokenize_long
from kdcache.pipeline.cache.spans import token_spans

PROBE = "Hello world"  # what conventions() encodes with and without special tokens


@dataclass(frozen=True)
class TokenizerConventions:
    """How a tokenizer starts and ends a text, read off the tokenizer itself.

    Attributes:
        bos_id: the token it puts before a text (Llama-3, Gemma); None when it adds none (Qwen).
        eos_id: the token that ends every example.
        adds_bos: ``add_special_tokens=True`` puts ``bos_id`` first.
        adds_eos: ``add_special_tokens=True`` already ends a text with ``eos_id``.
    """

    bos_id: int | None
    eos_id: int
    adds_bos: bool
    adds_eos: bool


@dataclass
class Example:
    """One document or record as token ids with the conventions applied.

    Attributes:
        ids: (n,) int32.
        label_mask: (n,) bool, the tokens a student is trained on; None: every token.
        token_bytes: (n,) int64, the bytes of ``text`` each token spells (``spans.py``);
            None (and ``text`` None) when the tokenizer gives no offsets.
        text: the UTF-8 bytes the tokens spell, ``token_bytes.sum()`` of them.
    """

    ids: np.ndarray
    label_mask: np.ndarray | None
    token_bytes: np.ndarray | None = None
    text: bytes | None = None


def conventions(tokenizer: Any, eos_id: int | None = None) -> TokenizerConventions:
    """Encode a probe text with and without special tokens: what is added before it is the BOS,
    what is added after it tells whether EOS is. ``eos_id`` overrides the tokenizer's EOS (a
    teacher may name it in its config only).

    Raises:
        CorpusError: the tokenizer has no EOS token.
    """
    plain = list(tokenizer(PROBE, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(PROBE, add_special_tokens=True)["input_ids"])
    start = next((i for i in range(len(full)) if full[i : i + len(plain)] == plain), 0)
    prefix, suffix = full[:start], full[start + len(plain) :]
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    if eos is None and suffix:
        eos = suffix[-1]
    if eos is None:
        raise CorpusError(
            "the teacher's tokenizer has no EOS token, examples end with EOS, "
            "set eos_token in its tokenizer_config.json"
        )
    bos = int(prefix[0]) if prefix else None
    return TokenizerConventions(bos, int(eos), bos is not None, bool(suffix) and suffix[-1] == eos)


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def conventional(
    ids: np.ndarray,
    mask: np.ndarray | None,
    conv: TokenizerConventions,
    *,
    ends: bool,
    spans: tuple[np.ndarray, bytes] | None = None,
) -> Example:
    """Apply the conventions to an example's (n,) int32 ids and (n,) bool mask: one BOS first
    (when the tokenizer uses one), an EOS appended unless ``ends`` (it already ends with one).
    The EOS that ends the example is labelled like the token before it. ``spans``: the (n,)
    bytes each token spells and the text (``spans.token_spans``); added tokens spell none."""
    lengths, text = (None, None) if spans is None else spans
    if conv.bos_id is not None:
        while len(ids) >= 2 and ids[0] == ids[1] == conv.bos_id:  # a text starting with BOS
            ids, mask = ids[1:], None if mask is None else mask[1:]
            lengths = None if lengths is None else lengths[1:]  # a special token: no bytes
        if not len(ids) or ids[0] != conv.bos_id:
            ids = np.concatenate([np.asarray([conv.bos_id], np.int32), ids])
            mask = None if mask is None else np.concatenate([[False], mask])
            lengths = None if lengths is None else np.concatenate([[0], lengths])
    if not ends:
        ids = np.concatenate([ids, np.asarray([conv.eos_id], np.int32)])
        mask = None if mask is None else np.concatenate([mask, [False]])
        lengths = None if lengths is None else np.concatenate([lengths, [0]])
    if mask is not None and len(mask) >= 2 and ids[-1] == conv.eos_id:
        mask[-1] = mask[-2]
    token_bytes = None if lengths is None else lengths.astype(np.int64, copy=False)
    return Example(ids.astype(np.int32, copy=False), mask, token_bytes, text)


def encode_texts(texts: list[str], tokenizer: Any, conv: TokenizerConventions) -> list[Example]:
    """Text documents in one tokenizer call, each with the tokenizer's own special tokens."""
    if not texts:
        return []
    fast = bool(getattr(tokenizer, "is_fast", False))
    encoded = tokenizer(texts, add_special_tokens=True, return_offsets_mapping=fast)
    examples = []
    for i, text in enumerate(texts):
        ids = np.asarray(encoded["input_ids"][i], dtype=np.int32)  # (n,)
        spans = None
        if fast:
            offsets = np.asarray(encoded["offset_mapping"][i], np.int64).reshape(-1, 2)
            spans = token_spans(text, ids, offsets, tokenizer)
        ends = bool(len(ids)) and ids[-1] == conv.eos_id
        examples.append(conventional(ids, None, conv, ends=ends, spans=spans))
    return examples


def encode_long_text(
    text: str,
    tokenizer: Any,
    conv: TokenizerConventions,
    limit: int | None = None,
    piece_chars: int | None = None,
) -> Example:
    """A text document of any length (``long_text``: windows of ``piece_chars``, without special
    tokens), with the special tokens the tokenizer adds around a text put back: the ids one call
    would give. With ``limit``, at least the first ``limit`` tokens are right (the tail may be
    missing)."""
    ids, offsets = tokenize_long(
        text, tokenizer, limit=limit, piece_chars=piece_chars, offsets=True
    )  # (n,) int32, (n, 2) int64 or None
    spans = None if offsets is None else token_spans(text, ids, offsets, tokenizer)
    before, after = int(conv.adds_bos), int(conv.adds_eos)
    parts = [[conv.bos_id] if before else [], ids, [conv.eos_id] if after else []]
    ids = np.concatenate([np.asarray(p, dtype=np.int32) for p in parts])
    if spans is not None:
        spans = (
            np.concatenate([np.zeros(before, np.int64), spans[0], np.zeros(after, np.int64)]),
            spans[1],
        )
    ends = bool(len(ids)) and ids[-1] == conv.eos_id
    return conventional(ids, None, conv, ends=ends, spans=spans)


def has_something_to_train(document: Document) -> bool:
    """A chat with assistant content, a prompt/completion with a completion (or a text)."""
    if document.kind == "chat":
        return any(m["role"] == "assistant" and m["content"].strip() for m in document.record)
    if document.kind == "prompt":
        return bool(document.record[1].strip())
    return True


def encode_example(
    document: Document, tokenizer: Any, conv: TokenizerConventions, train_on: str
) -> Example:
    """A chat or prompt/completion record as ids and label mask (None with ``train_on='all'``).

    Raises:
        CorpusError: chat messages without a chat template; a template that refuses the
            conversation or does not render turns as prefixes; a tool turn it does not know.
    """
    if document.kind == "chat":
        if not has_chat_template(tokenizer):
            raise CorpusError(
                f"the teacher's tokenizer has no chat template, {document.source} holds chat "
                "messages, use prompt/completion records or a teacher with a chat template"
            )
        return encode_chat(document.record, tokenizer, conv, document.source, train_on)
    prompt, completion = document.record
    if has_chat_template(tokenizer):
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ]
        return encode_chat(messages, tokenizer, conv, document.source, train_on)
    return encode_prompt_text(prompt, completion, tokenizer, conv, train_on)


def encode_prompt_text(
    prompt: str, completion: str, tokenizer: Any, conv: TokenizerConventions, train_on: str
) -> Example:
    """Prompt and completion as one text (no chat template), the completion's tokens labelled."""
    encoded = tokenizer(prompt + completion, add_special_tokens=True, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)  # (n,)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2)
    mask = None if train_on == "all" else offsets[:, 1] > len(prompt)  # special tokens: (0, 0)
    spans = token_spans(prompt + completion, ids, offsets, tokenizer)
    ends = bool(len(ids)) and ids[-1] == conv.eos_id
    return conventional(ids, mask, conv, ends=ends, spans=spans)


def encode_chat(
    messages: list[dict[str, str]],
    tokenizer: Any,
    conv: TokenizerConventions,
    source: str,
    train_on: str,
) -> Example:
    """Render with the tokenizer's chat template, tokenize without special tokens, and label the
    assistant turns."""
    if any(m["role"] == "tool" for m in messages) and "tool" not in _template(tokenizer):
        raise CorpusError(
            f"the teacher's chat template has no tool role, {source} has a tool message, "
            "leave tool turns out or use a teacher whose template has them"
        )
    full = _render(tokenizer, messages, False, source)
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(encoded["input_ids"], dtype=np.int32)  # (n,)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)  # (n, 2)
    mask = None
    if train_on != "all":
        mask = np.zeros(len(ids), dtype=bool)  # (n,)
        for start, end in assistant_spans(messages, tokenizer, full, source):
            mask |= (offsets[:, 1] > start) & (offsets[:, 0] < end)
    spans = token_spans(full, ids, offsets, tokenizer)
    return conventional(
        ids, mask, conv, ends=_ends_with(full, ids, offsets, conv.eos_id), spans=spans
    )


def assistant_spans(
    messages: list[dict[str, str]], tokenizer: Any, full: str, source: str
) -> list[tuple[int, int]]:
    """[start, end) characters of ``full`` (the rendered conversation) of each assistant turn.

    Raises:
        CorpusError: a partial render is not a prefix of the full one.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:i], True, source)
        through = _render(tokenizer, messages[: i + 1], False, source)
        if not (full.startswith(before) and full.startswith(through)) or len(before) > len(through):
            raise CorpusError(
                f"the chat template does not render turns as prefixes, {source}, so the "
                "assistant's tokens cannot be told apart, use --train-on all"
            )
        spans.append((len(before), len(through)))
    return spans


def _ends_with(text: str, ids: np.ndarray, offsets: np.ndarray, eos_id: int) -> bool:
    """The last token that is not whitespace in ``text`` is ``eos_id``."""
    for i in range(len(ids) - 1, -1, -1):
        start, end = offsets[i]
        if end <= start or text[start:end].strip():
            return bool(ids[i] == eos_id)
    return False


def _template(tokenizer: Any) -> str:
    template = tokenizer.chat_template
    return template if isinstance(template, str) else str(template)


def _render(tokenizer: Any, messages: list[dict[str, str]], generation: bool, source: str) -> str:
    """The chat template's string for ``messages`` (with the generation prompt, if asked).

    Raises:
        CorpusError: the template refuses the conversation (raise_exception, bad roles, ...).
    """
    from jinja2 import TemplateError

    try:
        if messages:
            return str(
                tokenizer.apply_chat_template(
                    messages, tokenize=False, add_generation_prompt=generation
                )
            )
        # an assistant turn first: apply_chat_template refuses an empty conversation
        from transformers.utils.chat_template_utils import render_jinja_template

        rendered, _ = render_jinja_template(
            conversations=[[]],
            chat_template=tokenizer.get_chat_template(),
            add_generation_prompt=generation,
            **tokenizer.special_tokens_map,
        )
        return str(rendered[0])
    except (TemplateError, ValueError, TypeError, KeyError, IndexError) as e:
        reason = " ".join(str(e).split()) or type(e).__name__
        raise CorpusError(
            f"the chat template refuses the conversation, {source}, ({reason})"
        ) from e
