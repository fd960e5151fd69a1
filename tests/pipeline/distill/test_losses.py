"""Chunked distillation losses against plain dense reference implementations (docs §5)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.divergences import log_tail_from_topk, sampled_kd, topk_kd
from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    distillation_loss,
    kd_per_token,
    loss_sums,
    next_token_labels,
    resolve_loss,
    widen_ids,
)

V = 50


def _teacher_topk(batch: int, length: int, k: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Full teacher log-probs (B, L, V), their top-k (ids, log-probs) sorted descending, and the
    exact log tail mass outside the top-k (B, L) (−inf when k = V)."""
    g = torch.Generator().manual_seed(seed)
    full = torch.log_softmax(2.0 * torch.randn(batch, length, V, generator=g), dim=-1)
    logprobs, ids = full.topk(k, dim=-1)  # sorted descending
    tail = torch.logsumexp(full.scatter(-1, ids, float("-inf")), dim=-1)
    return full, ids, logprobs, tail


def _draw(
    logprobs: torch.Tensor, n: int, rows: int, g: torch.Generator
) -> tuple[torch.Tensor, ...]:
    """``rows`` independent sampled rows of n draws from softmax(logprobs) (V,), in the batch
    format: distinct ids ascending, padded to the most distinct ids with id 0 and count 0."""
    vocab = logprobs.shape[0]
    draws = torch.multinomial(logprobs.exp().expand(rows, vocab), n, replacement=True, generator=g)
    counts = torch.zeros(rows, vocab, dtype=torch.int64)
    counts.scatter_add_(1, draws, torch.ones_like(draws))  # (rows, V)
    m = int((counts > 0).sum(1).max())
    order = torch.argsort((counts == 0).long() * vocab + torch.arange(vocab), dim=1)[:, :m]
    c = counts.gather(1, order)  # (rows, m): drawn ids first, ascending, then count-0 padding
    ids = torch.where(c > 0, order, 0)
    return ids, c, torch.where(c > 0, logprobs[ids], 0.0)


def _sampled(b: int, length: int, n: int, seed: int = 3) -> dict[str, torch.Tensor]:
    full, *_ = _teacher_topk(b, length, k=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    rows = [_draw(f, n, 1, g) for f in full.reshape(-1, V)]
    m = max(r[0].shape[1] for r in rows)
    fields = [
        torch.stack([F.pad(r[i][0], (0, m - r[i].shape[1])) for r in rows]).reshape(b, length, m)
        for i in range(3)
    ]
    return dict(zip(("sampled_ids", "sampled_counts", "sampled_logprobs"), fields, strict=True))


def _batch(ids: torch.Tensor, logprobs: torch.Tensor, tail=None, seed: int = 1) -> dict:
    b, length, _ = ids.shape
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, V, (b, length), generator=g)
    labels[:, 0] = IGNORE_INDEX  # Hugging Face labels: unshifted, position 0 is not predicted
    batch = {
        "topk_ids": ids,
        "topk_logprobs": logprobs,
        "labels": labels,
        "attention_mask": torch.ones(b, length, dtype=torch.int64),
    }
    if tail is not None:
        batch["topk_tail_logprob"] = tail
    return batch


def _logits(b: int, length: int, seed: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, V, generator=g, requires_grad=True)


def _targets(ids, logprobs, tail=None) -> dict[str, torch.Tensor]:
    k = ids.shape[-1]
    out = {"topk_ids": ids.reshape(-1, k), "topk_logprobs": logprobs.reshape(-1, k)}
    if tail is not None:
        out["topk_tail_logprob"] = tail.reshape(-1)
    return out


def _ref_kd(logits, ids, logprobs, tail, loss, t):
    """Row by row in float64, written straight from the formulas in docs/architecture.md §5."""
    out = []
    k = ids.shape[-1]
    rows = zip(logits.reshape(-1, V).double(), ids.reshape(-1, k), logprobs.reshape(-1, k).double(),
               tail.reshape(-1).double(), strict=True)  # fmt: skip
    for z, i, lp, tl in rows:
        s_t = torch.log_softmax(z / t, dim=-1)
        if loss == "kl":
            p = torch.softmax(lp / t, dim=-1)
            out.append(t * t * sum(p[j] * (torch.log(p[j]) - s_t[i[j]]) for j in range(k)))
            continue
        outside = torch.ones(V, dtype=torch.bool)
        outside[i] = False
        # the teacher's tail mass spread evenly over its V − k ids, each tempered (docs §5)
        spread = (V - k) * (tl.exp() / (V - k)) ** (1 / t)
        teacher = torch.cat([lp.exp() ** (1 / t), spread.reshape(1)])  # k + 1 buckets of p_T
        pt = teacher / teacher.sum()
        qt = torch.cat([s_t[i].exp(), s_t[outside].exp().sum().reshape(1)])  # s_T lumped
        a, b = (pt, qt) if loss == "ghost" else (qt, pt)
        out.append(t * t * (a * (a.log() - b.log())).sum())
    return torch.stack(out).float()


def test_kl_with_full_vocab_is_the_full_kl_divergence() -> None:
    full, ids, logprobs, _ = _teacher_topk(2, 5, k=V)
    logits = _logits(2, 5)
    ours = kd_per_token(logits.reshape(-1, V), _targets(ids, logprobs), "kl")
    student = torch.log_softmax(logits, dim=-1)
    dense = F.kl_div(student, full, log_target=True, reduction="none").sum(-1).reshape(-1)
    torch.testing.assert_close(ours, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stored_tail", [True, False])
def test_ghost_and_reverse_kl_with_full_vocab_are_the_full_divergences(stored_tail: bool) -> None:
    # k = V: no tail bucket on either side (stored −inf, or the v1 estimate ≈ 0)
    full, ids, logprobs, tail = _teacher_topk(2, 4, k=V)
    assert torch.isneginf(tail).all()
    logits = _logits(2, 4)
    student = torch.log_softmax(logits, dim=-1).reshape(-1, V)
    full = full.reshape(-1, V)
    targets = _targets(ids, logprobs, tail if stored_tail else None)
    forward = (full.exp() * (full - student)).sum(-1)
    reverse = (student.exp() * (student - full)).sum(-1)
    flat = logits.reshape(-1, V)
    torch.testing.assert_close(kd_per_token(flat, targets, "ghost"), forward, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(
        kd_per_token(flat, targets, "reverse-kl"), reverse, atol=1e-5, rtol=1e-4
    )


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_matches_the_reference_at_top_k(loss: str, temperature: float) -> None:
    _, ids, logprobs, tail = _teacher_topk(2, 3, k=7)
    logits = _logits(2, 3)
    ours = kd_per_token(logits.reshape(-1, V), _targets(ids, logprobs, tail), loss, temperature)
    ref = _ref_kd(logits, ids, logprobs, tail, loss, temperature)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-4)
    assert (ours > -1e-6).all()  # divergences are non-negative


def test_without_a_stored_tail_ghost_falls_back_to_one_minus_the_top_k_mass() -> None:
    _, ids, logprobs, tail = _teacher_topk(2, 3, k=7)
    logits = _logits(2, 3).reshape(-1, V)
    estimate = log_tail_from_topk(logprobs.reshape(-1, 7))
    torch.testing.assert_close(estimate, tail.reshape(-1), atol=1e-5, rtol=1e-5)
    for loss in ("ghost", "reverse-kl"):
        v1 = kd_per_token(logits, _targets(ids, logprobs), loss)
        v2 = kd_per_token(logits, _targets(ids, logprobs, estimate), loss)
        torch.testing.assert_close(v1, v2)


def test_reverse_kl_pushes_back_student_mass_outside_the_teachers_ids() -> None:
    # fails on the old reverse-kl, which renormalized the student over the teacher's ids: the
    # logits outside them got exactly zero gradient, whatever mass they held
    _, ids, logprobs, tail = _teacher_topk(1, 4, k=5)
    logits = _logits(1, 4).detach().reshape(-1, V)
    outside = torch.ones_like(logits, dtype=torch.bool).scatter(-1, ids.reshape(-1, 5), False)
    logits = logits.masked_fill(outside, 0.0).add(outside * 1.5).requires_grad_()  # big tail
    kd_per_token(logits, _targets(ids, logprobs, tail), "reverse-kl").sum().backward()
    grad = logits.grad
    assert (grad[outside] > 0).all()  # descent lowers every logit outside the teacher's ids
    # and exactly as much as the k+1-category reverse KL says (float64 autograd reference)
    ref_logits = logits.detach().double().requires_grad_()
    _ref_kd(ref_logits, ids, logprobs, tail, "reverse-kl", 1.0).sum().backward()
    torch.testing.assert_close(grad, ref_logits.grad.float(), atol=1e-6, rtol=1e-4)


def test_ghost_gradient_survives_a_student_tail_of_1e_minus_12() -> None:
    # fails on the old ghost: log(1 − Σ exp(s[ids])) rounds to log(0) in float32 and the clamp
    # cut the gradient, so a student with no tail mass never learned the teacher's
    _, ids, logprobs, tail = _teacher_topk(1, 1, k=3)
    logits = torch.full((1, V), -30.0)  # the 47 outside ids: tail ≈ 47 · e^-30 ≈ 4e-12
    logits[0, ids[0, 0]] = logprobs[0, 0]
    logits.requires_grad_()
    teacher_tail = float(tail.exp())
    assert teacher_tail > 0.01
    loss = kd_per_token(logits, _targets(ids[0], logprobs[0], tail[0]), "ghost")
    loss.sum().backward()
    outside = torch.ones(V, dtype=torch.bool)
    outside[ids[0, 0]] = False
    # at T = 1: Σ_outside ∂KL/∂z = q_tail − p_tail ≈ −p_tail, a pull up to the teacher's tail
    assert float(logits.grad[0, outside].sum()) == pytest.approx(-teacher_tail, rel=1e-4)
    assert math.isfinite(loss.item()) and loss.item() > 0.1


def test_ghost_uses_the_exact_stored_tail_where_float16_rounding_swamps_it() -> None:
    # k = 2000 of V = 2048 ids in float16; the other 48 hold ~4e-8 of the mass. 1 − Σ exp(row)
    # is dominated by the rounding of 2000 log-probs, the stored tail is exact: the teacher as
    # its own student then feels no pull on its tail, which the v1 estimate would give it
    vocab, k = 2048, 2000
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(1, vocab, generator=g)
    logits[0, k:] -= 13.0
    full = torch.log_softmax(logits.double(), -1)
    ids = torch.arange(k)[None]
    row = full[:, :k].half()  # what a float16 store holds
    tail = torch.logsumexp(full[:, k:], -1).float()  # topk_tail_logprob, float32
    true_tail = float(tail.exp())
    v1 = float(log_tail_from_topk(row).exp())
    assert abs(v1 - true_tail) > 3 * true_tail  # the version-1 estimate is wrong here
    student = full.float().requires_grad_()  # the teacher itself
    loss = topk_kd(student, ids, row, "ghost", tail_logprob=tail)
    loss.sum().backward()
    pull = float(student.grad[0, k:].sum())  # = q_tail − p_tail at T = 1
    assert abs(pull) < 0.01 * true_tail
    assert loss.item() < 1e-5  # float16 rounding only


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl", "sampled-kl", "ce"])
def test_chunked_equals_unchunked_in_value_and_gradient(loss: str) -> None:
    _, ids, logprobs, tail = _teacher_topk(3, 7, k=8)
    batch = {**_batch(ids, logprobs, tail), **_sampled(3, 7, n=16)}
    batch["attention_mask"][2, 5:] = 0  # padding
    batch["labels"][2, 5:] = IGNORE_INDEX
    for name in ("sampled_ids", "sampled_counts", "sampled_logprobs"):
        batch[name][2, 5:] = 0  # a padded position has no draws
    a, b = _logits(3, 7), _logits(3, 7)
    with torch.no_grad():
        b.copy_(a)
    whole = distillation_loss(a, batch, loss=loss, temperature=2.0, alpha=0.3, chunk_tokens=10_000)
    chunked = distillation_loss(b, batch, loss=loss, temperature=2.0, alpha=0.3, chunk_tokens=4)
    whole.backward()
    chunked.backward()
    assert torch.isfinite(whole)
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, atol=1e-6, rtol=1e-5)
    assert a.grad[2, 5:].abs().sum() == 0  # padding rows get no gradient at all


def _full_kl_gradient(teacher: torch.Tensor, z: torch.Tensor, t: float) -> torch.Tensor:
    """∂/∂z of T² · KL(softmax(l/T) ‖ softmax(z/T)) over the whole vocabulary, float64."""
    z = z.double().clone().requires_grad_()
    log_p = torch.log_softmax(teacher.double() / t, -1)
    (t * t * (log_p.exp() * (log_p - torch.log_softmax(z / t, -1))).sum()).backward()
    return z.grad


def _mean_sampled_gradient(teacher, z, n, draws, t, g) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error over ``draws`` independent sampled rows of ∂ sampled-kl / ∂z."""
    ids, counts, lps = _draw(teacher, n, draws, g)
    rows = z.repeat(draws, 1).requires_grad_()  # (draws, V): one row per independent draw
    sampled_kd(
        rows, ids, counts.to(torch.uint8 if n < 256 else torch.uint16), lps, t
    ).sum().backward()
    grads = rows.grad.double()
    return grads.mean(0), grads.std(0) / math.sqrt(draws)


def test_sampled_kl_gradient_is_unbiased_for_the_full_kl_at_t1() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, -3.0]), -1)
    z = torch.tensor([0.5, -0.2, 0.3, 0.0, 1.0, -1.0])
    full = _full_kl_gradient(teacher, z, 1.0)
    mean, se = _mean_sampled_gradient(teacher, z, n=8, draws=4000, t=1.0, g=g)
    assert se.max() < 0.005  # tight enough to see a real bias
    assert ((mean - full).abs() <= 4.5 * se + 1e-6).all(), ((mean - full) / se).tolist()


def test_sampled_kl_at_t2_converges_to_the_tempered_full_kl_gradient() -> None:
    # w ∝ counts · p^(1/T − 1), self-normalized: biased by O(1/N). The first-order (delta
    # method) bias b/N, computed exactly from p, explains the mean error within sampling error
    # (4.5 standard errors, plus 2·|b|/N² for the O(1/N²) remainder); at N = 256 it is below 1%
    # of the gradient's scale, and the error is 10× smaller than at N = 8
    t = 2.0
    g = torch.Generator().manual_seed(1)
    teacher = torch.log_softmax(torch.tensor([2.0, 1.0, 0.0, -1.0, -2.0, -3.0]), -1)
    z = torch.tensor([0.5, -0.2, 0.3, 0.0, 1.0, -1.0])
    full = _full_kl_gradient(teacher, z, t)
    p = teacher.double().exp()
    r = p ** (1 / t - 1)
    mu_x, mu_y = p * r, (p * r).sum()
    var_y = (p * r * r).sum() - mu_y**2
    weight_bias = mu_x * var_y / mu_y**3 - (p * r * r - mu_x * mu_y) / mu_y**2  # × 1/N
    errors = {}
    for n in (8, 256):
        mean, se = _mean_sampled_gradient(teacher, z, n=n, draws=4000, t=t, g=g)
        bias = -t * weight_bias / n  # gradient = T · (softmax(z/T) − w)
        assert ((mean - full - bias).abs() <= 4.5 * se + 2 * bias.abs() / n + 1e-6).all()
        errors[n] = float((mean - full).abs().max())
    assert float((t * weight_bias / 256).abs().max()) < 0.01 * float(full.abs().max())
    assert errors[256] < errors[8] / 10  # the bias shrinks with N


def test_sampled_kl_is_zero_for_the_teacher_at_t1_and_ignores_padding() -> None:
    batch = _sampled(2, 3, n=32)
    ids, counts = batch["sampled_ids"].reshape(6, -1), batch["sampled_counts"].reshape(6, -1)
    # a student whose distribution is exactly counts / N: KL(w ‖ s) = 0
    w = counts.double() / counts.sum(-1, keepdim=True)
    logits = torch.full((6, V), -80.0, dtype=torch.float64).scatter(
        -1, ids, torch.where(counts > 0, w.log(), -80.0)
    )
    kd = sampled_kd(logits.float(), ids, counts, batch["sampled_logprobs"].reshape(6, -1))
    assert kd.abs().max() < 1e-5


def test_alpha_mixes_kd_and_ce_averaged_over_their_own_tokens() -> None:
    _, ids, logprobs, tail = _teacher_topk(2, 6, k=5)
    batch = _batch(ids, logprobs, tail)
    batch["attention_mask"][1, 4:] = 0
    batch["labels"][1, 4:] = IGNORE_INDEX
    logits = _logits(2, 6)
    ce = F.cross_entropy(
        logits.reshape(-1, V),
        next_token_labels(batch["labels"]).reshape(-1),
        ignore_index=IGNORE_INDEX,
    )
    kd_rows = _ref_kd(logits, ids, logprobs, tail, "kl", 1.0)
    kd = kd_rows[batch["attention_mask"].reshape(-1).bool()].mean()
    for alpha in (0.0, 0.25, 1.0):
        ours = distillation_loss(logits, batch, loss="kl", alpha=alpha)
        torch.testing.assert_close(ours, alpha * kd + (1 - alpha) * ce, atol=1e-5, rtol=1e-5)
    # ce is the hard-label baseline whatever alpha says
    torch.testing.assert_close(distillation_loss(logits, batch, loss="ce", alpha=0.9), ce)
    sums = loss_sums(logits, batch, loss="kl")
    assert (sums.kd_tokens, sums.ce_tokens) == (6 + 4, 5 + 3)


def test_auto_resolves_from_the_targets_and_missing_targets_are_refused() -> None:
    assert resolve_loss("auto", has_topk=True, has_samples=False) == "ghost"
    assert resolve_loss("auto", has_topk=True, has_samples=True) == "sampled-kl"
    assert resolve_loss("auto", has_topk=False, has_samples=True) == "sampled-kl"
    assert resolve_loss("kl", has_topk=True, has_samples=True) == "kl"
    _, ids, logprobs, tail = _teacher_topk(2, 3, k=4)
    topk = _batch(ids, logprobs, tail)
    sampled = {**{k: v for k, v in topk.items() if not k.startswith("topk")}, **_sampled(2, 3, 8)}
    logits = _logits(2, 3)
    for batch, resolved in ((topk, "ghost"), (sampled, "sampled-kl")):
        auto = loss_sums(logits, batch, loss="auto").kd_sum
        assert torch.equal(auto, loss_sums(logits, batch, loss=resolved).kd_sum)
    with pytest.raises(ValueError, match="needs sampled targets"):
        loss_sums(logits, topk, loss="sampled-kl")
    with pytest.raises(ValueError, match="needs top-k targets"):
        loss_sums(logits, sampled, loss="ghost")
    ce = loss_sums(logits, sampled, loss="ce")  # any store
    assert ce.kd_tokens == 0 and ce.ce_tokens == 2 * 2


def test_unknown_loss_is_refused() -> None:
    _, ids, logprobs, _ = _teacher_topk(1, 2, k=3)
    with pytest.raises(ValueError, match="unknown loss"):
        distillation_loss(_logits(1, 2), _batch(ids, logprobs), loss="mse")


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl", "sampled-kl"])
def test_compact_loader_dtypes_give_the_same_loss(loss: str) -> None:
    # loader batches carry uint16/int32 ids, uint8/uint16 counts and float16 log-probs; the
    # loss widens them itself
    _, ids, logprobs, tail = _teacher_topk(2, 4, 6)
    logprobs = logprobs.half().float()  # values a float16 store can hold
    sampled = _sampled(2, 4, n=20)
    sampled["sampled_logprobs"] = sampled["sampled_logprobs"].half().float()
    logits = _logits(2, 4)
    wide = loss_sums(logits, {**_batch(ids, logprobs, tail), **sampled}, loss=loss, chunk_tokens=3)
    for id_dtype, count_dtype in ((torch.uint16, torch.uint8), (torch.int32, torch.uint16)):
        compact = {
            **_batch(ids.to(id_dtype), logprobs.half(), tail),
            "sampled_ids": sampled["sampled_ids"].to(id_dtype),
            "sampled_counts": sampled["sampled_counts"].to(count_dtype),
            "sampled_logprobs": sampled["sampled_logprobs"].half(),
        }
        got = loss_sums(logits, compact, loss=loss, chunk_tokens=3).kd_sum
        assert torch.equal(got, wide.kd_sum)
    high = torch.tensor([[40_000, 65_535]], dtype=torch.int64)  # above int16's range
    assert widen_ids(high.to(torch.uint16)).tolist() == high.tolist()
    assert widen_ids(high.to(torch.uint16)).dtype == torch.int64
