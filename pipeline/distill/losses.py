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

The logits are the student's over the store's tokenizer ids only (``vocabulary.student_logits``
slices away padded embedding rows), so every softmax here is over those ids.

Memory: the student's float32 [B, L, V] log-softmax is never built for the whole batch. Tokens
are processed in chunks of ``chunk_tokens`` rows, each under activation checkpointing, so only
one chunk's float32 [chunk, V] tensors live at a time, in the forward and in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from kdcache.pipeline.distill.divergences import (
    SAMPLED_LOSSES,
    TOPK_LOSSES,
    sampled_kd,
    topk_kd,
    widen_ids,
)
from kdcache.pipeline.distill.live_teacher import ONLINE_LOSSES, LiveTeacher, full_kd_per_token

LOSSES = ("auto", "kl", "ghost", "reverse-kl", "sampled-kl", "ce")
IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
TOPK_FIELDS = ("topk_ids", "topk_logprobs", "topk_tail_logprob")
SAMPLED_FIELDS = ("sampled_ids", "sampled_counts", "sampled_logprobs")

__all__ = [
    "DEFAULT_CHUNK_TOKENS",
    "IGNORE_INDEX",
    "LOSSES",
    "LossSums",
    "combine",
    "distillation_loss",
    "kd_per_token",
    "loss_sums",
    "resolve_loss",
    "trained_mask",
    "widen_ids",
]


@dataclass
class LossSums:
    """Summed (not averaged) loss terms of one micro-batch and the counts to average them by."""

    kd_sum: torch.Tensor  # () float32, differentiable
    ce_sum: torch.Tensor  # () float32, differentiable
    kd_tokens: int
    ce_tokens: int


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
) -> torch.Tensor:
    """The KD loss of each row against ``targets``, T² included.

    Args:
        logits: (N, V) student logits.
        targets: rows of the batch fields the loss reads: ``topk_ids``/``topk_logprobs`` (N, k)
            and, when the store has it, ``topk_tail_logprob`` (N,); or ``sampled_ids``/
            ``sampled_counts``/``sampled_logprobs`` (N, m); online, ``teacher_hidden`` (N, H).
        loss: one of ``TOPK_LOSSES`` or ``SAMPLED_LOSSES``; online, ``kl`` or ``reverse-kl``.
        teacher: the live teacher whose hidden rows ``targets`` holds (online KD).

    Returns:
        (N,) float32.
    """
    if teacher is not None:
        teacher_t = teacher.logprobs(targets["teacher_hidden"], temperature)  # (N, V)
        return full_kd_per_token(logits, teacher_t, loss, temperature)
    if loss in SAMPLED_LOSSES:
        return sampled_kd(logits, *(targets[name] for name in SAMPLED_FIELDS), temperature)
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
    names: tuple[str, ...],
    *fields: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) of one chunk of n rows: logits (n, V), labels/mask (n,), target rows."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if loss == "ce":
        return ce.new_zeros(()), ce
    targets = dict(zip(names, fields, strict=True))
    kd = kd_per_token(logits, targets, loss, temperature, teacher)  # (n,)
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


def loss_sums(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    teacher: LiveTeacher | None = None,
) -> LossSums:
    """Summed KD and CE terms of a batch, chunk by chunk.

    Args:
        logits: (B, L, V) student logits (over the tokenizer's ids: ``student_logits``).
        batch: loader batch with ``labels`` (B, L), ``loss_mask`` (B, L) and the target
            fields the loss reads (top-k: ``topk_ids``/``topk_logprobs`` (B, L, k), optionally
            ``topk_tail_logprob`` (B, L); sampled: ``sampled_*`` (B, L, m)).
        loss: one of ``LOSSES`` ("auto" resolves from the batch's fields).
        temperature: KD temperature T (CE always uses T = 1).
        chunk_tokens: rows per chunk.
        teacher: the live teacher (online KD); the batch then holds ``teacher_hidden``
            (B, L, H), and the teacher's chunk of log-probs is recomputed in the backward
            rather than kept.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    loss = resolve_loss(
        loss,
        has_topk="topk_ids" in batch,
        has_samples="sampled_ids" in batch,
        online=teacher is not None,
    )
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (B·L, V)
    labels = batch["labels"].reshape(-1)  # (B·L,)
    kd_mask = trained_mask(batch).reshape(-1).to(torch.float32)  # (B·L,)
    targets = _target_rows(batch, loss, online=teacher is not None)  # (B·L, ...) each
    names = tuple(targets)
    kd_sum = flat_logits.new_zeros((), dtype=torch.float32)
    ce_sum = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_logits.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        args = (flat_logits[rows], labels[rows], kd_mask[rows], loss, temperature, teacher, names)
        fields = [targets[name][rows] for name in names]
        if torch.is_grad_enabled() and flat_logits.requires_grad:
            # recompute the chunk's float32 log-softmax in the backward instead of keeping it
            kd, ce = checkpoint(_chunk_sums, *args, *fields, use_reentrant=False)
        else:
            kd, ce = _chunk_sums(*args, *fields)
        kd_sum = kd_sum + kd
        ce_sum = ce_sum + ce
    return LossSums(
        kd_sum=kd_sum,
        ce_sum=ce_sum,
        kd_tokens=int(kd_mask.sum().item()) if loss != "ce" else 0,
        ce_tokens=int((labels != IGNORE_INDEX).sum().item()),
    )


def combine(
    sums: LossSums, *, loss: str, alpha: float, kd_tokens: int, ce_tokens: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``alpha · KD + (1 − alpha) · CE`` with each term averaged over the given token counts.

    The counts are those of the whole optimizer step (all accumulated micro-batches), so that
    gradient accumulation gives the same gradient as one big batch.

    Returns:
        (total, kd, ce) scalars; kd is zero for ``loss="ce"``.
    """
    ce = sums.ce_sum / max(ce_tokens, 1)
    if loss == "ce":
        return ce, sums.kd_sum.detach() * 0.0, ce
    kd = sums.kd_sum / max(kd_tokens, 1)
    return alpha * kd + (1.0 - alpha) * ce, kd, ce


def distillation_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    alpha: float = 0.5,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """The mean training loss of one batch (convenience over ``loss_sums`` + ``combine``)."""
    sums = loss_sums(logits, batch, loss=loss, temperature=temperature, chunk_tokens=chunk_tokens)
    total, _, _ = combine(
        sums, loss=loss, alpha=alpha, kd_tokens=sums.kd_tokens, ce_tokens=sums.ce_tokens
    )
    return total
