"""Chunked distillation losses against plain dense reference implementations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    distillation_loss,
    kd_per_token,
    loss_sums,
    widen_ids,
)

V = 50


def _teacher_topk(batch: int, length: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Full teacher log-probs (B, L, V) and their top-k (ids, log-probs) sorted descending."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(2.0 * torch.randn(batch, length, V, generator=g), dim=-1)
    logprobs, ids = full.topk(k, dim=-1)  # sorted descending
    return full, ids, logprobs


def _batch(ids: torch.Tensor, logprobs: torch.Tensor, seed: int = 1) -> dict[str, torch.Tensor]:
    b, length, _ = ids.shape
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, length), generator=g)
    labels[:, -1] = IGNORE_INDEX
    return {
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "labels": labels,
        "attention_mask": torch.ones(b, length, dtype=torch.int64),
    }


def _logits(b: int, length: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, V, generator=g, requires_grad=True)


def _ref_kd(logits, ids, logprobs, loss, t):
    """Row-by-row reference, written straight from the formulas in docs/architecture.md §5."""
    out = []
    for z, i, lp in zip(
        logits.reshape(-1, V),
        ids.reshape(-1, ids.shape[-1]),
        logprobs.reshape(-1, ids.shape[-1]),
        strict=True,
    ):
        s_t = torch.log_softmax(z / t, dim=-1)
        p = torch.softmax(lp / t, dim=-1)
        if loss == "kl":
            out.append(t * t * sum(p[j] * (torch.log(p[j]) - s_t[i[j]]) for j in range(len(i))))
        elif loss == "reverse-kl":
            q = torch.softmax(s_t[i], dim=-1)
            out.append(
                t * t * sum(q[j] * (torch.log(q[j]) - torch.log(p[j])) for j in range(len(i)))
            )
        else:  # ghost at T: both k+1 categoricals tempered
            s = torch.log_softmax(z, dim=-1)[i]
            teacher = torch.cat([lp.exp(), (1 - lp.exp().sum()).clamp(min=1e-12).reshape(1)])
            student = torch.cat([s.exp(), (1 - s.exp().sum()).clamp(min=1e-12).reshape(1)])
            pt = teacher ** (1 / t) / (teacher ** (1 / t)).sum()
            qt = student ** (1 / t) / (student ** (1 / t)).sum()
            out.append(t * t * (pt * (pt.log() - qt.log())).sum())
    return torch.stack(out)


def test_kl_with_full_vocab_is_the_full_kl_divergence() -> None:
    full, ids, logprobs = _teacher_topk(2, 5, k=V)
    logits = _logits(2, 5)
    ours = kd_per_token(logits.reshape(-1, V), ids.reshape(-1, V), logprobs.reshape(-1, V), "kl")
    student = torch.log_softmax(logits, dim=-1)
    dense = F.kl_div(student, full, log_target=True, reduction="none").sum(-1).reshape(-1)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-5)


def test_ghost_and_reverse_kl_with_full_vocab_are_the_full_divergences() -> None:
    full, ids, logprobs = _teacher_topk(2, 4, k=V)
    logits = _logits(2, 4)
    student = torch.log_softmax(logits, dim=-1).reshape(-1, V)
    full = full.reshape(-1, V)
    flat = (logits.reshape(-1, V), ids.reshape(-1, V), logprobs.reshape(-1, V))
    forward = (full.exp() * (full - student)).sum(-1)
    reverse = (student.exp() * (student - full)).sum(-1)
    torch.testing.assert_close(kd_per_token(*flat, "ghost"), forward, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kd_per_token(*flat, "reverse-kl"), reverse, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_matches_the_reference_at_top_k(loss: str, temperature: float) -> None:
    _, ids, logprobs = _teacher_topk(2, 3, k=7)
    logits = _logits(2, 3)
    ours = kd_per_token(
        logits.reshape(-1, V), ids.reshape(-1, 7), logprobs.reshape(-1, 7), loss, temperature
    )
    ref = _ref_kd(logits, ids, logprobs, loss, temperature)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert (ours > -1e-6).all()  # divergences are non-negative


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl", "ce"])
def test_chunked_equals_unchunked_in_value_and_gradient(loss: str) -> None:
    _, ids, logprobs = _teacher_topk(3, 7, k=8)
    batch = _batch(ids, logprobs)
    batch["attention_mask"][2, 5:] = 0  # padding
    batch["labels"][2, 4:] = IGNORE_INDEX
    a, b = _logits(3, 7), _logits(3, 7)
    with torch.no_grad():
        b.copy_(a)
    whole = distillation_loss(a, batch, loss=loss, temperature=2.0, alpha=0.3, chunk_tokens=10_000)
    chunked = distillation_loss(b, batch, loss=loss, temperature=2.0, alpha=0.3, chunk_tokens=4)
    whole.backward()
    chunked.backward()
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)
    assert a.grad[2, 5:].abs().sum() == 0  # padding rows get no gradient at all


def test_alpha_mixes_kd_and_ce_averaged_over_their_own_tokens() -> None:
    _, ids, logprobs = _teacher_topk(2, 6, k=5)
    batch = _batch(ids, logprobs)
    batch["attention_mask"][1, 4:] = 0
    batch["labels"][1, 3:] = IGNORE_INDEX
    logits = _logits(2, 6)
    ce = F.cross_entropy(
        logits.reshape(-1, V), batch["labels"].reshape(-1), ignore_index=IGNORE_INDEX
    )
    kd_rows = _ref_kd(logits, ids, logprobs, "kl", 1.0)
    kd = kd_rows[batch["attention_mask"].reshape(-1).bool()].mean()
    for alpha in (0.0, 0.25, 1.0):
        ours = distillation_loss(logits, batch, loss="kl", alpha=alpha)
        torch.testing.assert_close(ours, alpha * kd + (1 - alpha) * ce, atol=1e-5, rtol=1e-5)
    # ce is the hard-label baseline whatever alpha says
    torch.testing.assert_close(distillation_loss(logits, batch, loss="ce", alpha=0.9), ce)
    sums = loss_sums(logits, batch, loss="kl")
    assert (sums.kd_tokens, sums.ce_tokens) == (6 + 4, 5 + 3)


def test_ghost_uses_the_tail_mass() -> None:
    # a student matching the teacher on the k ids but not on the tail pays only through the tail
    _, ids, logprobs = _teacher_topk(1, 1, k=3)
    logits = torch.full((1, V), -30.0)
    logits[0, ids[0, 0]] = logprobs[0, 0, 0]
    logits[0, ids[0, 0, 1]] = logprobs[0, 0, 1]
    logits[0, ids[0, 0, 2]] = logprobs[0, 0, 2]
    # the student puts almost all of the rest on nothing: its tail ≈ 0, the teacher's is not
    tail = 1 - logprobs.exp().sum()
    assert tail > 0.01
    ghost = kd_per_token(logits, ids[0], logprobs[0], "ghost")
    assert ghost.item() > 0.1
    assert math.isfinite(ghost.item())


def test_unknown_loss_is_refused() -> None:
    _, ids, logprobs = _teacher_topk(1, 2, k=3)
    with pytest.raises(ValueError, match="unknown loss"):
        distillation_loss(_logits(1, 2), _batch(ids, logprobs), loss="mse")


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl"])
def test_compact_loader_dtypes_give_the_same_loss(loss: str) -> None:
    # loader batches carry uint16/int32 ids and float16 log-probs; the loss widens them itself
    _, ids, logprobs = _teacher_topk(2, 4, 6)
    logprobs = logprobs.half().float()  # values a float16 store can hold
    logits = _logits(2, 4)
    wide = loss_sums(logits, _batch(ids, logprobs), loss=loss, chunk_tokens=3).kd_sum
    for id_dtype in (torch.uint16, torch.int32):
        compact = _batch(ids.to(id_dtype), logprobs.half())
        assert torch.equal(loss_sums(logits, compact, loss=loss, chunk_tokens=3).kd_sum, wide)
    high = torch.tensor([[40_000, 65_535]], dtype=torch.int64)  # above int16's range
    assert widen_ids(high.to(torch.uint16)).tolist() == high.tolist()
    assert widen_ids(high.to(torch.uint16)).dtype == torch.int64
