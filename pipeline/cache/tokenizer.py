"""Train a byte-level BPE tokenizer on the fly (the default teacher and the tests use it), and the
default teacher's chat template, which renders a conversation as Python source."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with ``<s> </s> <unk> <pad>`` specials, as an HF fast tokenizer.

    Byte-level means every input string is encodable (no unknown characters), so any corpus
    can be tokenized with it afterwards.
    """
    tokenizer = Tokenizer(models.BPE(unk_token=SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **SPECIAL_TOKENS)


# The default teacher's chat template. The teacher is a small Llama trained on Python source, so a
# conversation is rendered as Python: system lines as ``# `` comments, a user turn as its text and
# a newline (a signature, say), an assistant turn as the indented docstring that follows it, then
# EOS. Every turn is a prefix of the longer conversations and the generation prompt is the opening
# quotes, so the assistant's tokens are found the usual way (pipeline/cache/chat.py).
PYTHON_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}"
    "{{- '# ' + message['content'].split('\\n') | join('\\n# ') + '\\n' }}"
    "{%- elif message['role'] == 'user' %}"
    "{{- message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{- '    \"\"\"' + message['content'] | indent(4) + '\"\"\"\\n' + eos_token }}"
    "{%- else %}"
    "{{- raise_exception('the Python chat template has no role ' + message['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    '{%- if add_generation_prompt %}{{- \'    """\' }}{%- endif %}'
)
