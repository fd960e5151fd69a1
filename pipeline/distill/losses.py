"""Distillation losses against cached teacher targets, computed in token chunks.

The per-row divergences (``kl``, ``ghost``, ``reverse-kl`` on top-k targets, ``sampled-kl`` on
sampled targets) are defined in ``divergences.py`` and docs/architecture.md §5. Besides them:

- ``ce``: hard next-token labels only (the no-teacher baseline), for any store; alpha is ignored.
- ``auto``: the best loss for the targets at hand — ``sampled-kl`` when there are samples, else
  ``ghost`` (``resolve_loss``; train-student and the sweep resolve it from the store); ``kl``
  when the teacher itself is at hand.

Online (``teacher`` given, the batch holding its final hidden states ``teacher_hidden``
(B, L, H)): ``kl`` and ``reverse-kl`` are the full-vocabulary divergences against the teacher's
log-softmax, computed per chunk beside the student's (``live_teacher.full_kd_per_token``).

``total = alpha · KD + (1 − alpha) · CE``; KD is averaged over the trained positions
(``loss_mask``: every real position of a store without a loss mask, the last row of a sequence
included, since it still carries a teacher distribution), CE over the positions with a label
(``labels != -100``: trained positions that have a next token). A batch without ``loss_mask``
(one built by hand) trains every real position (``attention_mask``).

Memory: the loss is computed from the student's final hidden states (B, L, H) and its head
(``student_head.py``): a chunk of token rows at a time is turned into logits over the store's
tokenizer ids, its loss and gradient taken at once (``fused_chunks.py``), so no [B, L, V]
tensor exists in the forward or the backward; ``chunk_rows`` sizes a chunk by the vocabulary.
Users who have only a model's logits pass them with no head (``distillation_loss``): the same
chunks, one [B, L, V] gradient buffer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.divergences import (
    SAMPLED_LOSSES,
    TOPK_LOSSES,
    sampled_kd,
    topk_kd,
    widen_ids,
)
from kdcache.pipeline.distill.fused_chunks import Head, IdentityHead, fused_chunk_loss
from kdcache.pipeline.distill.live_teacher import ONLINE_LOSSES, LiveTeacher, full_kd_per_token

LOSSES = ("auto", "kl", "ghost", "reverse-kl", "sampled-kl", "ce")
IGNORE_INDEX = -100
CHUNK_BYTES = 128 * 1024 * 1024  # one float32 [rows, V] tensor of a chunk
MIN_CHUNK_ROWS, MAX_CHUNK_ROWS = 64, 8192
TOPK_FIELDS = ("topk_ids", "topk_logprobs", "topk_tail_logprob")
SAMPLED_FIELDS = ("sampled_ids", "sampled_counts", "sampled_logprobs")

__all__ = [
    "CHUNK_BYTES",
    "IGNORE_INDEX",
    "LOSSES",
    "LossTerms",
    "batch_loss",
    "next_token_labels",
    "chunk_rows",
    "distillation_loss",
    "kd_per_token",
    "loss_sums",
    "resolve_loss",
    "trained_mask",
    "widen_ids",
]


@dataclass
class LossTerms:
    """The loss of one micro-batch: the differentiable total and its detached parts."""

    total: torch.Tensor  # () float32: alpha · kd + (1 − alpha) · ce, the one to backpropagate
    kd: torch.Tensor  # () float32, detached: KD sum / its token count
    ce: torch.Tensor  # () float32, detached: CE sum / its token count
    kd_sum: torch.Tensor  # () float32, detached
    ce_sum: torch.Tensor  # () float32, detached
    kd_tokens: int  # this batch's trained positions (0 for loss="ce")
    ce_tokens: int  # this batch's positions with a label


def next_token_labels(labels: torch.Tensor, fill: int = IGNORE_INDEX) -> torch.Tensor:
    """(B, L) the token each position predicts, from Hugging Face ``labels`` (B, L) (unshifted):
    ``labels`` moved one place left, ``fill`` (-100) at the last position — the shift a causal
    LM's own loss makes (also of any per-token field, e.g. its text bytes, with ``fill=0``)."""
    return F.pad(labels[:, 1:], (0, 1), value=fill)


def trained_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, L) the positions whose KD terms and metrics count: ``loss_mask``, or for a batch
    without one (built by hand) every real position, ``attention_mask``."""
    return batch["loss_mask"] if "loss_mask" in batch else batch["attention_mask"]


def resolve_loss(loss: str, *, has_topk: bool, has_samples: bool, online: bool = False) -> str:
    """``loss`` with ``auto`` replaced by the loss for these targets; others unchanged."""
    if loss != "auto":
        return loss
    if online:
        return "kl"
    return "sampled-kl" if has_samples else "ghost"


def kd_per_token(
    logits: torch.Tensor,
    targets: dict[str, torch.Tensor],
    loss: str,
    temperature: float = 1.0,
    teacher: LiveTeacher | None = None,
    sample_temperature: float = 1.0,
) -> torch.Tensor:
    """The KD loss of each row against ``targets``, T² included.

    Args:
        logits: (N, V) student logits.
        targets: rows of the batch fields the loss reads: ``topk_ids``/``topk_logprobs`` (N, k)
            and, when the store has it, ``topk_tail_logprob`` (N,); or ``sampled_ids``/
            ``sampled_counts``/``sampled_logprobs`` (N, m); online, ``teacher_hidden`` (N, H).
        loss: one of ``TOPK_LOSSES`` or ``SAMPLED_LOSSES``; online, ``kl`` or ``reverse-kl``.
        teacher: the live teacher whose hidden rows ``targets`` holds (online KD).
        sample_temperature: the temperature the store's draws were made at (sampled targets).

    Returns:
        (N,) float32.
    """
    if teacher is not None:
        teacher_t = teacher.logprobs(targets["teacher_hidden"], temperature)  # (N, V)
        return full_kd_per_token(logits, teacher_t, loss, temperature)
    if loss in SAMPLED_LOSSES:
        fields = (targets[name] for name in SAMPLED_FIELDS)
        return sampled_kd(logits, *fields, temperature, sample_temperature=sample_temperature)
    return topk_kd(
        logits,
        targets["topk_ids"],
        targets["topk_logprobs"],
        loss,
        temperature,
        tail_logprob=targets.get("topk_tail_logprob"),
    )


def _chunk_sums(
    logits: torch.Tensor,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    loss: str,
    temperature: float,
    teacher: LiveTeacher | None,
    targets: dict[str, torch.Tensor],
    sample_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) of one chunk of n rows: logits (n, V), labels/mask (n,), target rows."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if loss == "ce":
        return ce.new_zeros(()), ce
    kd = kd_per_token(logits, targets, loss, temperature, teacher, sample_temperature)  # (n,)
    return (kd * kd_mask).sum(), ce


def _target_rows(
    batch: dict[str, torch.Tensor], loss: str, online: bool = False
) -> dict[str, torch.Tensor]:
    """The batch fields ``loss`` reads, flattened to one row per token: (B·L, ...)."""
    if loss == "ce":
        return {}
    if online:
        if loss not in ONLINE_LOSSES or "teacher_hidden" not in batch:
            raise ValueError(f"online loss {loss} needs kl or reverse-kl and teacher_hidden")
        hidden = batch["teacher_hidden"]  # (B, L, H)
        return {"teacher_hidden": hidden.reshape(-1, hidden.shape[-1])}  # (B·L, H)
    needed = SAMPLED_FIELDS if loss in SAMPLED_LOSSES else TOPK_FIELDS[:2]
    missing = [name for name in needed if name not in batch]
    if missing:
        kind = "sampled" if loss in SAMPLED_LOSSES else "top-k"
        raise ValueError(f"loss {loss} needs {kind} targets, the batch has no {missing[0]}")
    names = [*needed, *(["topk_tail_logprob"] if loss in TOPK_LOSSES[1:] else [])]
    b, length = batch["labels"].shape
    return {
        name: batch[name].reshape(b * length, *batch[name].shape[2:])
        for name in names
        if name in batch
    }


def chunk_rows(vocab: int, budget_bytes: int = CHUNK_BYTES) -> int:
    """Token rows per chunk: one float32 [rows, vocab] tensor within ``budget_bytes``."""
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, budget_bytes // (4 * max(vocab, 1))))


def batch_loss(
    rows: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    head: Head | None = None,
    loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    kd_tokens: int | None = None,
    ce_tokens: int | None = None,
    chunk_tokens: int | None = None,
    teacher: LiveTeacher | None = None,
    sample_temperature: float = 1.0,
) -> LossTerms:
    """``alpha · KD + (1 − alpha) · CE`` of a batch, a chunk of token rows at a time.

    Args:
        rows: (B, L, H) the student's final hidden states as its ``head`` takes them
            (``StudentHead.rows``), or (B, L, V) logits when ``head`` is None.
        batch: loader batch with ``labels`` (B, L), ``loss_mask`` (B, L) and the target
            fields the loss reads (top-k: ``topk_ids``/``topk_logprobs`` (B, L, k), optionally
            ``topk_tail_logprob`` (B, L); sampled: ``sampled_*`` (B, L, m)).
        head: the student's head (``student_head``); None: ``rows`` are logits.
        loss: one of ``LOSSES`` ("auto" resolves from the batch's fields).
        temperature: KD temperature T (CE always uses T = 1).
        kd_tokens, ce_tokens: what each term is averaged by, e.g. the counts of a whole
            optimizer step over every rank (gradient accumulation, data parallel); default: this
            batch's trained positions and labelled positions.
        chunk_tokens: rows per chunk; default: a float32 [rows, V] chunk of ``CHUNK_BYTES``.
        teacher: the live teacher (online KD); the batch then holds ``teacher_hidden``
            (B, L, H_t), turned into the teacher's log-probs one chunk at a time.
        sample_temperature: the temperature a sampled store's draws were made at
            (``kdcache.storage.sample_temperature``); ``sampled-kl`` trains at it.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    if temperature <= 0:
        raise ValueError(f"the temperature must be positive, got {temperature}")
    loss = resolve_loss(
        loss,
        has_topk="topk_ids" in batch,
        has_samples="sampled_ids" in batch,
        online=teacher is not None,
    )
    head = IdentityHead() if head is None else head
    flat = rows.reshape(-1, rows.shape[-1])  # (B·L, H) or (B·L, V)
    labels = next_token_labels(batch["labels"]).reshape(-1)  # (B·L,) the token each predicts
    kd_mask = trained_mask(batch).reshape(-1).to(torch.float32)  # (B·L,)
    targets = _target_rows(batch, loss, online=teacher is not None)  # (B·L, ...) each
    own_kd = int(kd_mask.sum().item()) if loss != "ce" else 0
    own_ce = int((labels != IGNORE_INDEX).sum().item())
    kd_count = own_kd if kd_tokens is None else kd_tokens
    ce_count = own_ce if ce_tokens is None else ce_tokens
    if loss == "ce":
        weights = (0.0, 1.0 / max(ce_count, 1))
    else:
        weights = (alpha / max(kd_count, 1), (1.0 - alpha) / max(ce_count, 1))

    def chunk_sums(logits: torch.Tensor, chunk: slice) -> tuple[torch.Tensor, torch.Tensor]:
        rows_targets = {name: t[chunk] for name, t in targets.items()}
        return _chunk_sums(
            logits, labels[chunk], kd_mask[chunk], loss, temperature, teacher, rows_targets,
            sample_temperature,
        )  # fmt: skip

    total, kd_sum, ce_sum = fused_chunk_loss(
        head,
        flat,
        head.params,
        chunk_sums,
        weights=weights,
        chunk_rows=chunk_tokens or chunk_rows(head.columns(flat)),
    )
    return LossTerms(
        total=total,
        kd=kd_sum / max(kd_count, 1),
        ce=ce_sum / max(ce_count, 1),
        kd_sum=kd_sum,
        ce_sum=ce_sum,
        kd_tokens=own_kd,
        ce_tokens=own_ce,
    )


def loss_sums(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    chunk_tokens: int | None = None,
    teacher: LiveTeacher | None = None,
) -> LossTerms:
    """The summed KD and CE terms of a batch's (B, L, V) ``logits`` (``kd_sum``, ``ce_sum``;
    not differentiable) and this batch's token counts."""
    with torch.no_grad():
        return batch_loss(
            logits, batch, loss=loss, temperature=temperature, chunk_tokens=chunk_tokens,
            teacher=teacher,
        )  # fmt: skip


def distillation_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """The mean training loss of one batch from its (B, L, V) ``logits``, for users who have
    only a model's logits (``batch_loss`` from hidden states never builds them)."""
    return batch_loss(
        logits, batch, loss=loss, temperature=temperature, alpha=alpha, chunk_tokens=chunk_tokens
    ).total
