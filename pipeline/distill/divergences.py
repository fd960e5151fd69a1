"""The KD divergence of each token row against cached teacher targets (docs/architecture.md §5).

Notation per row: student logits ``z`` (V,), ``s_T = log_softmax(z / T)``. A top-k row holds the
teacher's k log-probs ``l`` (full-vocabulary log-softmax at T = 1, sorted descending) at ids
``ids``, and ``topk_tail_logprob`` = log of the teacher's mass outside them (format v2; v1 rows
fall back to ``log(1 − Σ exp(l))``). A sampled row holds the distinct ids of N draws from the
teacher, their counts (summing to N) and the teacher's log-probs ``lp`` at those ids.

- ``kl``: ``p = softmax(l / T)`` over the k ids; ``T² · Σ p (log p − s_T[ids])``.
- ``ghost``: k + 1 categories, the ids plus a tail bucket. Teacher ``[l, tail]``; student
  ``[s[ids], log of its mass outside the ids]``, the latter a logsumexp over the other logits
  (exact for a tail of 1e-30, where ``log(1 − Σ exp)`` rounds to log 0). Both tempered as
  categoricals (``log_softmax(x / T)``); ``T² · KL(teacher ‖ student)``.
- ``reverse-kl``: the same k + 1 categories, ``T² · KL(student ‖ teacher)``: the student's mass
  outside the teacher's ids is pushed back through the tail bucket.
- ``sampled-kl``: weights ``w ∝ counts · exp((1/T − 1) · lp)`` over the drawn ids,
  self-normalized per row (``counts / N`` at T = 1, an unbiased estimate of the teacher);
  ``T² · Σ w (log w − s_T[ids])``. At T = 1 its gradient ``softmax(z) − counts / N`` is an
  unbiased estimate of the full forward KL's gradient; at T ≠ 1 the self-normalized weights
  estimate the tempered teacher ``p^{1/T}`` with a bias of order 1/N.

Padding entries of a sampled row have count 0 and contribute nothing. Rows the loss masks out
(padding, and positions a store's loss mask leaves untrained: all-zero target rows) must still
be finite, so no term here is ever ``0 · ∞``.
"""

from __future__ import annotations

import torch

TOPK_LOSSES = ("kl", "ghost", "reverse-kl")
SAMPLED_LOSSES = ("sampled-kl",)
_TINY = 1e-12  # the floor of a version-1 tail estimate, 1 − Σ exp(l)


def widen_ids(ids: torch.Tensor, device: torch.device | str | None = None) -> torch.Tensor:
    """Ids (or counts) of any integer dtype as int64 on ``device`` (default: where they are).

    Loader batches carry uint16 (or int32) ids and uint8/uint16 counts, and ``gather`` needs
    int64. uint16 has few kernels on some backends, so it travels as its int16 bit pattern and
    is widened with a mask.
    """
    device = ids.device if device is None else device
    if ids.dtype == torch.uint16:
        bits = ids.view(torch.int16).to(device, non_blocking=True)
        return bits.to(torch.int64).bitwise_and_(0xFFFF)
    return ids.to(device, non_blocking=True).to(torch.int64)


def log_tail_from_topk(logprobs: torch.Tensor) -> torch.Tensor:
    """The version-1 tail estimate ``log(1 − Σ exp(l))``, clamped: (N, k) → (N,).

    Inexact for large k in float16 (the rounding of k log-probs swamps a small tail); version-2
    stores keep the exact ``topk_tail_logprob`` instead.
    """
    mass = torch.logsumexp(logprobs.float(), dim=-1).clamp(max=0.0)
    return torch.log((-torch.expm1(mass)).clamp(min=_TINY))


def student_log_tail(
    logits: torch.Tensor, ids: torch.Tensor, log_norm: torch.Tensor | None = None
) -> torch.Tensor:
    """log of the student's mass outside ``ids`` at T = 1: (N, V), (N, k) int64 → (N,) float32.

    A logsumexp over the logits with ``ids`` scattered to −inf, minus the logsumexp over all
    (``log_norm`` (N,), when already at hand): exact however small the tail; −inf when ``ids``
    cover the whole vocabulary.
    """
    z = logits.float()
    outside = z.scatter(-1, ids, float("-inf"))  # (N, V) copy
    log_norm = torch.logsumexp(z, dim=-1) if log_norm is None else log_norm
    return torch.logsumexp(outside, dim=-1) - log_norm


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """Σ a (log a − log b) over the last axis, with 0 · log 0 = 0 (and no NaN in the gradient)."""
    present = log_a > float("-inf")
    diff = torch.where(present, log_a - log_b, torch.zeros_like(log_a))
    return (log_a.exp() * diff).sum(-1)


def topk_kd(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logprobs: torch.Tensor,
    loss: str,
    temperature: float = 1.0,
    tail_logprob: torch.Tensor | None = None,
) -> torch.Tensor:
    """The top-k KD loss of each token row, T² included.

    Args:
        logits: (N, V) student logits, any float dtype.
        topk_ids: (N, k) teacher ids, int64 or a loader's compact dtype (widened here).
        topk_logprobs: (N, k) teacher log-probs at temperature 1.
        loss: "kl", "ghost" or "reverse-kl".
        temperature: T > 0.
        tail_logprob: (N,) the stored ``topk_tail_logprob``; None falls back to
            ``log(1 − Σ exp(l))`` (version-1 stores). Unused by "kl".

    Returns:
        (N,) float32.
    """
    t = float(temperature)
    ids = widen_ids(topk_ids)  # (N, k) int64; a no-op for int64 ids
    teacher = topk_logprobs.float()  # (N, k)
    if loss == "kl":
        student_top = torch.log_softmax(logits.float() / t, dim=-1).gather(-1, ids)  # (N, k)
        log_p = torch.log_softmax(teacher / t, dim=-1)  # (N, k) teacher renormalized over its ids
        return (t * t) * _kl(log_p, student_top)
    if loss not in ("ghost", "reverse-kl"):
        raise ValueError(f"unknown top-k loss {loss!r}; choose one of {', '.join(TOPK_LOSSES)}")
    z = logits.float()
    log_norm = torch.logsumexp(z, dim=-1)  # (N,)
    student_top = z.gather(-1, ids) - log_norm[:, None]  # (N, k) at T = 1
    student_tail = student_log_tail(z, ids, log_norm)  # (N,)
    tail = log_tail_from_topk(teacher) if tail_logprob is None else tail_logprob.float()  # (N,)
    # ids covering the whole vocabulary leave no tail bucket on either side
    tail = torch.where(torch.isneginf(student_tail), student_tail, tail)
    log_p = torch.log_softmax(torch.cat([teacher, tail[:, None]], -1) / t, dim=-1)  # (N, k+1)
    log_q = torch.log_softmax(torch.cat([student_top, student_tail[:, None]], -1) / t, dim=-1)
    if loss == "ghost":
        return (t * t) * _kl(log_p, log_q)
    return (t * t) * _kl(log_q, log_p)


def sampled_weights(
    counts: torch.Tensor, logprobs: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-normalized target weights of sampled rows: (N, m) counts and log-probs → (w, log w).

    ``w ∝ counts · exp((1/T − 1) · lp)`` per row, ``counts / N`` at T = 1. Entries with count 0
    (padding) get ``w = 0`` and ``log w = 0``; a row without draws is all zeros.
    """
    t = float(temperature)
    drawn = counts > 0  # (N, m)
    log_w = torch.log(counts.float())  # (N, m), −inf at count 0
    if t != 1.0:
        log_w = log_w + (1.0 / t - 1.0) * logprobs.float()
    log_w = torch.where(drawn, log_w, float("-inf"))
    norm = torch.logsumexp(log_w, dim=-1, keepdim=True)  # (N, 1), −inf for a row without draws
    norm = torch.where(torch.isfinite(norm), norm, torch.zeros_like(norm))
    log_w = torch.where(drawn, log_w - norm, torch.zeros_like(log_w))
    return torch.where(drawn, log_w.exp(), torch.zeros_like(log_w)), log_w


def sampled_kd(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_counts: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """The ``sampled-kl`` loss of each token row, T² included.

    Args:
        logits: (N, V) student logits, any float dtype.
        sampled_ids: (N, m) distinct drawn ids (padding: id 0), any integer dtype.
        sampled_counts: (N, m) draws per id (padding: 0), any integer dtype.
        sampled_logprobs: (N, m) the teacher's log-probs at those ids (T = 1).
        temperature: T > 0.

    Returns:
        (N,) float32.
    """
    t = float(temperature)
    ids = widen_ids(sampled_ids)  # (N, m)
    w, log_w = sampled_weights(widen_ids(sampled_counts), sampled_logprobs, t)  # (N, m) each
    student = torch.log_softmax(logits.float() / t, dim=-1).gather(-1, ids)  # (N, m)
    return (t * t) * (w * (log_w - student)).sum(-1)


def sampled_kl_to_teacher(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_counts: torch.Tensor,
    sampled_logprobs: torch.Tensor,
) -> torch.Tensor:
    """``Σ counts/N · (lp − s[ids])`` per row: an unbiased estimate of KL(teacher ‖ student).

    (N, V) logits and (N, m) sampled fields → (N,) float32; 0 for a row without draws, and 0
    when the student's log-probs at the drawn ids are the teacher's.
    """
    counts = widen_ids(sampled_counts).float()  # (N, m)
    n = counts.sum(-1, keepdim=True).clamp(min=1.0)  # (N, 1)
    student = torch.log_softmax(logits.float(), dim=-1).gather(-1, widen_ids(sampled_ids))
    return (counts / n * (sampled_logprobs.float() - student)).sum(-1)
