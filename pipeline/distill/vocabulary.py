"""The vocabulary rule: teacher, store and student agree on the tokenizer, not on embedding sizes.

A store's ``tokenizer_size`` (the tokenizer's length) may be smaller than its ``vocab_size`` (the
teacher's embedding rows, often padded: Qwen2.5 has 151,936 or 152,064 rows for 151,665 ids).
A student — preset, config file or HF directory — or an online ``--teacher`` works with a store
when its embedding has a row for every tokenizer id (``>= tokenizer_size``; a live teacher must
also have the store's tokenizer, by hash); a larger embedding is padding, whatever the store's
``vocab_size``. Padded rows never receive probability: ``student_head.StudentHead``, the one
path every loss and metric goes through (train step, evaluation, compare, sweep), computes the
logits of the first ``tokenizer_size`` ids only (``student_logits`` slices a model's whole
logits the same way), so every softmax is over the tokenizer's ids and the padded rows of the
head get no gradient; the live teacher slices its log-softmax the same way
(``LiveTeacher(vocab=...)``). Before a forward, every id of the batch (inputs, labels, target
ids) is checked against the student with one max per field.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.pipeline.errors import UserError

ID_FIELDS = ("input_ids", "labels", "topk_ids", "sampled_ids")  # fields holding token ids


def check_embedding(rows: int, tokenizer_size: int, source: str, who: str = "student") -> None:
    """Refuse a model whose embedding lacks a row for some tokenizer id (one line, both sizes)."""
    if rows < tokenizer_size:
        raise UserError(
            f"the store's tokenizer has {tokenizer_size:,} ids but the {who} embeds {rows:,}, "
            f"{source}: id {rows:,} has no row, use a {who} whose vocab_size is at least "
            f"{tokenizer_size:,}"
            + (" (a preset takes the tokenizer's size)" if who == "student" else "")
        )


def embedding_rows(model: Any) -> int | None:
    """Rows of a model's input embedding (the ids it can read); None when it cannot tell."""
    inner = getattr(model, "module", model)  # unwrap DistributedDataParallel
    try:
        embedding = inner.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    weight = getattr(embedding, "weight", None)
    return None if weight is None else int(weight.shape[0])


def check_batch_ids(batch: dict[str, torch.Tensor], rows: int | None, vocab: int | None) -> None:
    """Every id of ``batch`` (``ID_FIELDS``, int64) must be below the student's embedding
    ``rows`` and the tokenizer size ``vocab`` (either None: unchecked); one device sync.

    Raises:
        UserError: naming the first offending id, its field and both sizes.
    """
    limits = [size for size in (rows, vocab) if size is not None]
    names = [n for n in ID_FIELDS if n in batch and batch[n].numel()]
    if not limits or not names:
        return
    limit = min(limits)
    maxima = torch.stack([batch[n].max().to(torch.int64) for n in names]).tolist()
    for name, top in zip(names, maxima, strict=True):
        if top >= limit:
            sizes = [] if rows is None else [f"the student embeds {rows:,} ids"]
            sizes += [] if vocab is None else [f"the store's tokenizer has {vocab:,}"]
            raise UserError(
                f"a batch holds an id with no row in the student, {name} id {top:,} while "
                f"{' and '.join(sizes)}, check the store (`kdcache verify`) and use a student built on its "
                "tokenizer"
            )


def student_logits(
    model: Any, batch: dict[str, torch.Tensor], vocab: int | None = None
) -> torch.Tensor:
    """The model's logits on ``batch`` over the tokenizer's ``vocab`` ids, its ids checked first.

    Args:
        model: a causal LM (possibly wrapped by Accelerate).
        batch: a device batch with ``input_ids``/``attention_mask`` (B, L) and int64 ids.
        vocab: the store's tokenizer size; None keeps every column.

    Returns:
        (B, L, V') with V' = min(V, vocab): a view of the model's (B, L, V) logits (no copy;
        ``reshape(B·L, V')`` is a view too), so the padded columns take part in no softmax.
    """
    check_batch_ids(batch, embedding_rows(model), vocab)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits if vocab is None or logits.shape[-1] <= vocab else logits[..., :vocab]
