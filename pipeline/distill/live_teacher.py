"""The teacher itself, run beside a student: the online reference and the exact KL to the teacher.

Offline distillation is measured against this (docs/architecture.md §5): ``train-student
--teacher`` distills from the teacher's full-vocabulary distribution computed live for every
batch, and wherever the teacher is at hand the eval reports the exact ``kl_to_teacher``.

Vocabulary (``vocabulary.py``): the teacher must have the store's tokenizer (by hash) and embed
at least its ``tokenizer_size`` ids; its log-softmax is over the tokenizer's ids only
(``vocab``), whatever padding its embedding has, so it lines up with the student's logits.

Memory: the teacher's decoder body runs once per batch and keeps only its final hidden states
(B, L, H); its vocab-wide float32 log-softmax is computed per chunk of token rows, beside the
student's chunk, and never for the whole batch.
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.pipeline.distill.vocabulary import check_embedding
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.logit_head import logit_head, split_verdict

ONLINE_LOSSES = ("kl", "reverse-kl", "ce")


class LiveTeacher:
    """A causal LM in eval mode whose log-probs are computed a chunk of tokens at a time.

    ``hidden`` runs the decoder body on a batch; ``logprobs`` turns a chunk of those rows into
    the full-vocabulary log-softmax. When the model cannot be split into body and head, or the
    split disagrees with its own forward (``self_check``), ``hidden`` returns the model's logits
    and ``logprobs`` only normalizes them.

    Args:
        model: the teacher, in eval mode.
        name: how messages name it.
        vocab: the store's tokenizer size: log-probs cover ids below it only (the rows of a
            padded embedding beyond it get no probability); None: every row of the head.
    """

    def __init__(self, model: Any, name: str = "teacher", vocab: int | None = None) -> None:
        self.model = model
        self.name = name
        self.head = logit_head(model)
        self.use_model_forward = False
        self.vocab = vocab

    @property
    def vocab_size(self) -> int:
        """Rows of the teacher's head (its embedding, padding included)."""
        return int(self.head.lm_head.weight.shape[0])

    def _columns(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits → (..., V') over the tokenizer's ids (a view)."""
        return logits if self.vocab is None else logits[..., : self.vocab]

    @torch.no_grad()
    def hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, L) → final hidden states (B, L, H), or logits (B, L, V) in the fallback mode."""
        if self.use_model_forward:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        return self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        ).last_hidden_state

    @torch.no_grad()
    def logprobs(self, rows: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
        """(C, H) hidden rows (or (C, V) logits in the fallback) → (C, V') float32
        log_softmax(logits / T), V' = min(V, ``vocab``)."""
        logits = rows if self.use_model_forward else self.head(rows)  # (C, V)
        logits = self._columns(logits).float()  # (C, V')
        if temperature != 1.0:
            logits = logits / temperature
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def self_check(self, input_ids: torch.Tensor) -> str | None:
        """Compare the chunked head with the model's own forward on (1, P) ids; fall back if needed."""
        logits = self._columns(self.model(input_ids=input_ids).logits[0]).float()  # (P, V')
        reference = torch.log_softmax(logits, dim=-1)
        mask = torch.ones_like(input_ids)

        def largest_error() -> float:
            mine = self.logprobs(self.hidden(input_ids, mask)[0])  # (P, V)
            return float((mine - reference).abs().max())

        note = split_verdict(
            self.model, self.head, logits, largest_error, probe_ids=input_ids, vocab=self.vocab
        )
        self.use_model_forward = note is not None
        return note


def full_kd_per_token(
    student_logits: torch.Tensor, teacher_logprobs_t: torch.Tensor, loss: str, temperature: float
) -> torch.Tensor:
    """The full-vocabulary KD loss of each row, T² included.

    Args:
        student_logits: (N, V) student logits.
        teacher_logprobs_t: (N, V) teacher log-probs at temperature T.
        loss: "kl" (KL(teacher ‖ student)) or "reverse-kl" (KL(student ‖ teacher)).
        temperature: T.

    Returns:
        (N,) float32.
    """
    t = float(temperature)
    student_t = torch.log_softmax(student_logits.float() / t, dim=-1)  # (N, V)
    if loss == "kl":
        p, log_p, log_q = teacher_logprobs_t.exp(), teacher_logprobs_t, student_t
    elif loss == "reverse-kl":
        p, log_p, log_q = student_t.exp(), student_t, teacher_logprobs_t
    else:
        raise ValueError(f"unknown online loss {loss!r}; choose kl or reverse-kl")
    # p · (log p − log q) with 0 · log 0 = 0 where p underflows
    return (t * t) * torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p)).sum(-1)


def exact_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher ‖ student) over the full vocabulary at T = 1: (N, V), (N, V) → (N,)."""
    return full_kd_per_token(student_logits, teacher_logprobs, "kl", 1.0)


def load_live_teacher(
    teacher: str, store: Any, device: torch.device, dtype_name: str
) -> LiveTeacher:
    """Load ``teacher`` for online use with ``store``'s data: its tokenizer must be the store's
    and its embedding at least the tokenizer's size (larger, padded, is fine).

    Raises:
        UserError: the teacher cannot be loaded, tokenizes differently from the store, or embeds
            fewer ids than the store's tokenizer has.
    """
    from kdcache.pipeline.teacher import (
        load_model,
        open_teacher,
        resolve_dtype,
        tokenizer_files,
        tokenizer_fingerprint,
    )

    source = open_teacher(teacher)
    ours = tokenizer_fingerprint(tokenizer_files(source)).get("sha256")
    theirs = (store.manifest.get("tokenizer") or {}).get("sha256")
    if ours != theirs:
        raise UserError(
            f"the teacher's tokenizer differs from the store's, {teacher} has {ours} and "
            f"{store.url} has {theirs}, pass the teacher (or one with its tokenizer) the store "
            "was cached from"
        )
    vocab = store.tokenizer_size
    check_embedding(source.vocab_size, vocab, teacher, who="teacher")
    model = load_model(source, resolve_dtype(dtype_name, source.config, device), device,
                       trust_remote_code=False)  # fmt: skip
    return LiveTeacher(model, name=teacher, vocab=vocab)
