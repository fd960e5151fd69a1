"""Tiny tokenizers of three families, trained locally in a fraction of a second (nothing is
downloaded): Llama-3 style (byte-level BPE, BOS added by the post-processor, header/eot chat
template), Gemma style (SentencePiece-like Metaspace BPE, ``<bos>`` added, ``<start_of_turn>``
template with the model role) and Qwen style (byte-level BPE, no BOS, ChatML template).

A helper module rather than a ``conftest.py``: a second ``conftest`` module would shadow the
``from conftest import ...`` of this folder's tests. Each builder is cached for the session.
"""

from __future__ import annotations

import functools
import string
from typing import Any

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from kdcache.pipeline.cache.corpus import stdlib_files

FAMILIES = ("llama", "gemma", "qwen")

# Llama 3's own template: BOS with the first message, every turn trimmed and closed by <|eot_id|>
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}"
    "{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# Gemma 3's template, text only: the system turn folded into the first user turn, roles must
# alternate, the assistant is the model
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

# ChatML as Qwen 2.5 writes it: a default system turn, tool results as user turns
QWEN_TEMPLATE = (
    "{%- if not messages or messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'tool' %}"
    "{{- '<|im_start|>user\n<tool_response>\n' + message['content'] + '\n</tool_response>"
    "<|im_end|>\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)


@functools.cache
def training_lines() -> tuple[str, ...]:
    """A few hundred lines of code and prose, the same on every machine with this Python."""
    lines: list[str] = []
    for path in stdlib_files()[:8]:
        lines += path.read_text(encoding="utf-8", errors="replace").splitlines()
    prose = "The user asks the assistant, and the model answers with care. Café naïve 東京."
    return (*lines[:300], *[prose] * 5)


def _byte_level(specials: list[str], vocab_size: int = 400) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(training_lines(), trainer)
    return tokenizer


def _adds_bos(tokenizer: Tokenizer, bos: str, first: Any = None) -> None:
    """The post-processor puts ``bos`` before every text (``first``: a processor run before)."""
    template = processors.TemplateProcessing(
        single=f"{bos} $A",
        pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tokenizer.token_to_id(bos))],
    )
    tokenizer.post_processor = template if first is None else processors.Sequence([first, template])


@functools.cache
def llama(eos: str = "<|eot_id|>", template: bool = True) -> PreTrainedTokenizerFast:
    """Llama 3 style; ``eos='<|end_of_text|>', template=False`` is the base model's tokenizer."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]  # fmt: skip
    tokenizer = _byte_level(specials)
    _adds_bos(tokenizer, "<|begin_of_text|>", processors.ByteLevel(trim_offsets=False))
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token=eos
    )
    if template:
        wrapped.chat_template = LLAMA3_TEMPLATE
    return wrapped


@functools.cache
def gemma() -> PreTrainedTokenizerFast:
    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tokenizer.decoder = decoders.Metaspace(prepend_scheme="never")
    lines = training_lines()
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        special_tokens=specials,
        initial_alphabet=sorted(set("".join(lines)) | set(string.printable)),
        show_progress=False,
    )
    # lines joined in tens, so that newlines (inside Metaspace words) are learned as well
    tokenizer.train_from_iterator(
        ["\n".join(lines[i : i + 10]) for i in range(0, len(lines), 10)], trainer
    )
    _adds_bos(tokenizer, "<bos>")
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    wrapped.chat_template = GEMMA_TEMPLATE
    return wrapped


@functools.cache
def qwen() -> PreTrainedTokenizerFast:
    tokenizer = _byte_level(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    wrapped.chat_template = QWEN_TEMPLATE
    return wrapped


def family(name: str) -> PreTrainedTokenizerFast:
    return {"llama": llama, "gemma": gemma, "qwen": qwen}[name]()
