"""Distillation losses against a cached top-k teacher, computed in token chunks.

Notation per token: the teacher row ``l`` holds k log-probs (full-vocabulary log-softmax at
temperature 1, sorted descending) at ids ``ids``; the student's logits ``z`` cover the whole
vocabulary and ``s_T = log_softmax(z / T)``.

- ``kl``: ``p = softmax(l / T)`` over the k ids; ``T² · Σ_i p_i (log p_i − s_T[ids_i])``. This is
  KL(p ‖ student_T) with p the teacher's top-k renormalized, so with k = vocab and T = 1 it is the
  full forward KL divergence.
- ``ghost``: k + 1 categories — the k ids plus one "ghost" bucket for the tail. At T = 1 the
  teacher is ``[exp(l), 1 − Σ exp(l)]`` and the student ``[exp(s[ids]), 1 − Σ exp(s[ids])]``;
  loss = KL(teacher ‖ student) over those k + 1 categories. At T ≠ 1 the tempered tail mass of the
  full vocabulary is unknown, so both (k + 1)-category distributions are tempered as categoricals
  (``softmax(log q / T)``) — exact at T = 1, the ghost-token approximation otherwise. ``· T²``.
- ``reverse-kl``: ``q = softmax(s_T[ids])`` (the student renormalized over the teacher's ids);
  ``T² · Σ q (log q − log p)`` — KL(student ‖ teacher) on the teacher's support.
- ``ce``: hard next-token labels only (the no-teacher baseline); alpha is ignored.

``total = alpha · KD + (1 − alpha) · CE``; KD is averaged over the real tokens
(``attention_mask``: the last row of a sequence still carries a teacher distribution), CE over
the tokens with a label (``labels != -100``).

Memory: the student's float32 [B, L, V] log-softmax is never built for the whole batch. Tokens
are processed in chunks of ``chunk_tokens`` rows, each under activation checkpointing, so only
one chunk's float32 [chunk, V] lives at a time, in the forward and in the backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

LOSSES = ("kl", "ghost", "reverse-kl", "ce")
IGNORE_INDEX = -100
DEFAULT_CHUNK_TOKENS = 1024
_TINY = 1e-12


@dataclass
class LossSums:
    """Summed (not averaged) loss terms of one micro-batch and the counts to average them by."""

    kd_sum: torch.Tensor  # () float32, differentiable
    ce_sum: torch.Tensor  # () float32, differentiable
    kd_tokens: int
    ce_tokens: int


def widen_ids(ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Teacher ids of any integer dtype as int64 on ``device`` (default: where they are).

    Loader batches carry uint16 (or int32) ids, and ``gather`` needs int64. uint16 has few
    kernels on some backends, so it travels as its int16 bit pattern and is widened with a mask.
    """
    device = ids.device if device is None else device
    if ids.dtype == torch.uint16:
        bits = ids.view(torch.int16).to(device, non_blocking=True)
        return bits.to(torch.int64).bitwise_and_(0xFFFF)
    return ids.to(device, non_blocking=True).to(torch.int64)


def _log_tail(logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 − Σ exp(logprobs)) over the last axis, clamped: (N, k) → (N,)."""
    mass = torch.logsumexp(logprobs, dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(mass)).clamp(min=_TINY))


def kd_per_token(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss: str,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The KD loss of each token row, including the T² factor.

    Args:
        logits: (N, V) student logits, any float dtype.
        topk_ids: (N, k) teacher ids, int64 or a loader's compact dtype (widened here).
        topk_logprobs: (N, k) teacher log-probs at temperature 1.
        loss: "kl", "ghost" or "reverse-kl".
        temperature: T > 0.

    Returns:
        (N,) float32.
    """
    t = float(temperature)
    topk_ids = widen_ids(topk_ids)  # (N, k) int64; a no-op for int64 ids
    teacher = topk_logprobs.float()  # (N, k)
    if loss == "ghost":
        student = torch.log_softmax(logits.float(), dim=-1)  # (N, V) at T = 1
        student_top = student.gather(-1, topk_ids)  # (N, k)
        # k + 1 categories: the ids plus the tail bucket
        teacher_cat = torch.cat([teacher, _log_tail(teacher)[:, None]], dim=-1)  # (N, k+1)
        student_cat = torch.cat([student_top, _log_tail(student_top)[:, None]], dim=-1)
        log_p = torch.log_softmax(teacher_cat / t, dim=-1)  # (N, k+1)
        log_q = torch.log_softmax(student_cat / t, dim=-1)
        return (t * t) * (log_p.exp() * (log_p - log_q)).sum(-1)
    student_t = torch.log_softmax(logits.float() / t, dim=-1)  # (N, V)
    student_top = student_t.gather(-1, topk_ids)  # (N, k)
    log_p = torch.log_softmax(teacher / t, dim=-1)  # (N, k) teacher renormalized over its ids
    if loss == "kl":
        return (t * t) * (log_p.exp() * (log_p - student_top)).sum(-1)
    if loss == "reverse-kl":
        log_q = torch.log_softmax(student_top, dim=-1)  # (N, k) student renormalized
        return (t * t) * (log_q.exp() * (log_q - log_p)).sum(-1)
    raise ValueError(f"unknown KD loss {loss!r}; choose one of {', '.join(LOSSES[:3])}")


def _chunk_sums(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    labels: torch.Tensor,
    kd_mask: torch.Tensor,
    loss: str,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(KD sum, CE sum) of one chunk of rows: logits (n, V), ids/logprobs (n, k), labels/mask (n,)."""
    ce = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    if loss == "ce":
        return ce.new_zeros(()), ce
    kd = kd_per_token(logits, topk_ids, topk_logprobs, loss, temperature)  # (n,)
    return (kd * kd_mask).sum(), ce


def loss_sums(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> LossSums:
    """Summed KD and CE terms of a batch, chunk by chunk.

    Args:
        logits: (B, L, V) student logits.
        batch: loader batch with ``topk_ids`` (B, L, k), ``topk_logprobs`` (B, L, k),
            ``labels`` (B, L) and ``attention_mask`` (B, L).
        loss: one of ``LOSSES``.
        temperature: KD temperature T (CE always uses T = 1).
        chunk_tokens: rows per chunk.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; choose one of {', '.join(LOSSES)}")
    vocab = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab)  # (B·L, V)
    labels = batch["labels"].reshape(-1)  # (B·L,)
    kd_mask = batch["attention_mask"].reshape(-1).to(torch.float32)  # (B·L,)
    k = batch["topk_ids"].shape[-1]
    ids = batch["topk_ids"].reshape(-1, k)  # (B·L, k)
    logprobs = batch["topk_logprobs"].reshape(-1, k)  # (B·L, k)
    kd_sum = flat_logits.new_zeros((), dtype=torch.float32)
    ce_sum = flat_logits.new_zeros((), dtype=torch.float32)
    for start in range(0, flat_logits.shape[0], chunk_tokens):
        rows = slice(start, start + chunk_tokens)
        args = (flat_logits[rows], ids[rows], logprobs[rows], labels[rows], kd_mask[rows])
        if torch.is_grad_enabled() and flat_logits.requires_grad:
            # recompute the chunk's float32 log-softmax in the backward instead of keeping it
            kd, ce = checkpoint(_chunk_sums, *args, loss, temperature, use_reentrant=False)
        else:
            kd, ce = _chunk_sums(*args, loss, temperature)
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
