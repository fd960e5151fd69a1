"""The KD divergence of each token row against cached teacher targets (docs/architecture.md §5).

One target for every loss: the teacher's full-vocabulary distribution at temperature T,
``p_T ∝ p^{1/T}``, against the student's ``s_T = log_softmax(z / T)``; each loss is
``T² · D(p_T, s_T)`` for a divergence D restricted to what the store holds. A top-k row holds
log-probs ``l`` (T = 1, sorted descending) at ids K and ``topk_tail_logprob`` = log of the mass
outside K (format v2; v1 rows fall back to ``log(1 − Σ exp(l))``); a sampled row the distinct ids
of N draws from ``p_{T_s}`` (the store's sample temperature), their counts and ``lp`` = log p.

- ``kl``: p_T conditioned on K, ``softmax(l / T)``: ``T² · Σ_K p_T|K (log p_T|K − s_T)``.
- ``ghost``/``reverse-kl``: p_T and s_T lumped into k + 1 buckets, the ids and the rest.
  Teacher: ``exp(l / T)`` at K (exact up to the normalizer) and the tempered tail
  ``Σ_{j∉K} p_j^{1/T}``, which a top-k row does not determine: its mass spread evenly over
  the V − k other ids (``tempered_tail``). Student: ``s_T`` at K and its tempered mass outside
  K, a logsumexp (exact however small). ``T² · KL(teacher ‖ student)`` /
  ``T² · KL(student ‖ teacher)``.
- ``sampled-kl``: weights ``w ∝ counts · exp((1/T − 1/T_s) · lp)``, self-normalized:
  ``counts / N`` at T = T_s, an unbiased estimate of p_T; ``T² · Σ w (log w − s_T[ids])``.

Padding entries of a sampled row have count 0 and contribute nothing. Rows the loss masks out
(padding, and positions a store's loss mask leaves untrained: all-zero target rows) must still
be finite, so no term here is ever ``0 · ∞``.
"""

from __future__ import annotations

import math

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
    """log of softmax(logits)'s mass outside ``ids``: (N, V), (N, k) int64 → (N,) float32
    (``logits / T``: the tempered student's).

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


def tempered_tail(tail_logprob: torch.Tensor, temperature: float, outside: int) -> torch.Tensor:
    """log Σ_{j∉K} p_j^{1/T}, with the tail's mass spread evenly over its ``outside`` ids:
    (N,) → (N,), ``tail / T + (1 − 1/T) · log(outside)``.

    The maximum-entropy completion of a top-k row; exact at T = 1 and for a flat tail, an upper
    bound for T > 1 and a lower bound for T < 1 (docs/architecture.md §5). −inf stays −inf.
    """
    t = float(temperature)
    if t == 1.0:
        return tail_logprob
    spread = (1.0 - 1.0 / t) * math.log(max(outside, 1))
    return torch.where(torch.isneginf(tail_logprob), tail_logprob, tail_logprob / t + spread)


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
        logits: (N, V) student logits, any float dtype (V: every id the teacher's tail covers).
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
    z = logits.float() if t == 1.0 else logits.float() / t  # (N, V): no copy of float32 at T = 1
    log_norm = torch.logsumexp(z, dim=-1)  # (N,)
    student_top = z.gather(-1, ids) - log_norm[:, None]  # (N, k) s_T at the ids
    teacher = topk_logprobs.float() / t  # (N, k) log p^{1/T}: p_T up to its normalizer
    if loss == "kl":
        return (t * t) * _kl(torch.log_softmax(teacher, dim=-1), student_top)
    if loss not in ("ghost", "reverse-kl"):
        raise ValueError(f"unknown top-k loss {loss!r}; choose one of {', '.join(TOPK_LOSSES)}")
    student_tail = student_log_tail(z, ids, log_norm)  # (N,) s_T's mass outside the ids
    tail = log_tail_from_topk(topk_logprobs) if tail_logprob is None else tail_logprob.float()
    tail = tempered_tail(tail, t, z.shape[-1] - ids.shape[-1])  # (N,)
    # ids covering the whole vocabulary leave no tail bucket on either side
    tail = torch.where(torch.isneginf(student_tail), student_tail, tail)
    log_p = torch.log_softmax(torch.cat([teacher, tail[:, None]], -1), dim=-1)  # (N, k+1)
    log_q = torch.cat([student_top, student_tail[:, None]], -1)  # (N, k+1), sums to 1
    if loss == "ghost":
        return (t * t) * _kl(log_p, log_q)
    return (t * t) * _kl(log_q, log_p)


def sampled_weights(
    counts: torch.Tensor,
    logprobs: torch.Tensor,
    temperature: float = 1.0,
    sample_temperature: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Target weights of sampled rows drawn at ``sample_temperature`` T_s, for p at
    ``temperature`` T: (N, m) counts and log-probs → (w, log w), each (N, m).

    ``w ∝ counts · exp((1/T − 1/T_s) · lp)``, self-normalized per row: ``counts / N`` when
    T = T_s. Entries with count 0 (padding) get ``w = 0`` and ``log w = 0``; a row without
    draws is all zeros.
    """
    t, drawn_at = float(temperature), float(sample_temperature)
    drawn = counts > 0  # (N, m)
    log_w = torch.log(counts.float())  # (N, m), −inf at count 0
    if t != drawn_at:
        log_w = log_w + (1.0 / t - 1.0 / drawn_at) * logprobs.float()
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
    *,
    sample_temperature: float = 1.0,
) -> torch.Tensor:
    """The ``sampled-kl`` loss of each token row, T² included.

    At T = T_s its gradient ``T · (softmax(z / T) − counts / N)`` is an unbiased estimate of the
    gradient of ``T² · KL(p_T ‖ s_T)``; at T ≠ T_s the reweighted draws are biased (train-student
    refuses it: ``checks.check_store``).

    Args:
        logits: (N, V) student logits, any float dtype.
        sampled_ids: (N, m) distinct drawn ids (padding: id 0), any integer dtype.
        sampled_counts: (N, m) draws per id (padding: 0), any integer dtype.
        sampled_logprobs: (N, m) the teacher's log-probs at those ids (T = 1).
        temperature: T > 0.
        sample_temperature: T_s, the temperature the draws were made at (the store's
            ``sample_temperature``; 1.0 for stores that do not record it).

    Returns:
        (N,) float32.
    """
    t = float(temperature)
    ids = widen_ids(sampled_ids)  # (N, m)
    counts = widen_ids(sampled_counts)
    w, log_w = sampled_weights(counts, sampled_logprobs, t, sample_temperature)  # (N, m) each
    student = torch.log_softmax(logits.float() / t, dim=-1).gather(-1, ids)  # (N, m)
    return (t * t) * (w * (log_w - student)).sum(-1)


def sampled_kl_to_teacher(
    logits: torch.Tensor,
    sampled_ids: torch.Tensor,
    sampled_counts: torch.Tensor,
    sampled_logprobs: torch.Tensor,
    *,
    sample_temperature: float = 1.0,
) -> torch.Tensor:
    """``Σ w · (lp − s[ids])`` per row, an estimate of KL(teacher ‖ student) at T = 1.

    (N, V) logits and (N, m) sampled fields → (N,) float32; 0 for a row without draws, and 0
    when the student's log-probs at the drawn ids are the teacher's. ``w = counts / N`` for
    draws at T_s = 1 (unbiased); otherwise the draws reweighted to p (``sampled_weights``).
    """
    counts = widen_ids(sampled_counts)  # (N, m)
    w, _ = sampled_weights(counts, sampled_logprobs, 1.0, sample_temperature)  # (N, m)
    student = torch.log_softmax(logits.float(), dim=-1).gather(-1, widen_ids(sampled_ids))
    return (w * (sampled_logprobs.float() - student)).sum(-1)
