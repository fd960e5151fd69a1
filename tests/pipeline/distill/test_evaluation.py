"""evaluate() against metrics computed by hand, token by token."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcache.pipeline.distill.evaluation import METRICS, evaluate
from kdcache.pipeline.distill.losses import IGNORE_INDEX, next_token_labels

V, K, N = 40, 6, 16
TEXT_METRICS = ("bits_per_byte", "bits_per_char", "teacher_bits_per_byte")
TOPK = ("topk_ids", "topk_logprobs", "topk_tail_logprob")
SAMPLED = ("sampled_ids", "sampled_counts", "sampled_logprobs")


class FixedLogits(torch.nn.Module):
    """A "model" returning preset logits for each batch, in order."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = list(logits)
        self.calls = 0

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        out = self.logits[self.calls]
        self.calls += 1
        assert out.shape[:2] == input_ids.shape
        return SimpleNamespace(logits=out)


def _teacher(g: torch.Generator) -> torch.Tensor:
    """(2, 5, V) full teacher log-probs (float64) whose top-k are float16 values and whose tail
    is exactly 1 − their mass: a model with these log-probs has exactly the stored ones."""
    full = torch.log_softmax(3 * torch.randn(2, 5, V, generator=g, dtype=torch.float64), -1)
    top, ids = full.topk(K, dim=-1)
    top = top.half().double()
    outside = full.scatter(-1, ids, float("-inf"))
    tail = torch.log1p(-top.exp().sum(-1, keepdim=True))  # (2, 5, 1)
    full = outside - torch.logsumexp(outside, -1, keepdim=True) + tail
    return full.scatter(-1, ids, top)


def _samples(full: torch.Tensor, g: torch.Generator) -> dict[str, torch.Tensor]:
    """N draws per position from softmax(full), in the batch format (distinct ids, padding 0)."""
    rows = full.reshape(-1, V)
    draws = torch.multinomial(rows.exp(), N, replacement=True, generator=g)
    counts = torch.zeros(rows.shape[0], V, dtype=torch.int64).scatter_add_(
        1, draws, torch.ones_like(draws)
    )
    m = int((counts > 0).sum(1).max())
    order = torch.argsort((counts == 0).long() * V + torch.arange(V), dim=1)[:, :m]
    c = counts.gather(1, order)
    ids = torch.where(c > 0, order, 0)
    lps = torch.where(c > 0, rows.gather(1, ids), 0.0).float()  # a float32 store: exact
    shape = (*full.shape[:2], m)
    return {
        "sampled_ids": ids.to(torch.uint16).reshape(shape),
        "sampled_counts": c.to(torch.uint8).reshape(shape),
        "sampled_logprobs": lps.reshape(shape),
    }


def _batches(n: int, seed: int = 0) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    """Batches of a topk+sampled store, student logits, and the teacher's full log-probs."""
    g = torch.Generator().manual_seed(seed)
    batches, logits, teacher_full = [], [], []
    for _ in range(n):
        full = _teacher(g)
        lp, ids = full.topk(K, dim=-1)
        labels = torch.randint(0, V, (2, 5), generator=g)
        labels[:, -1] = IGNORE_INDEX
        mask = torch.ones(2, 5, dtype=torch.int64)
        mask[1, 3:] = 0
        labels[1, 2:] = IGNORE_INDEX
        batch = {
            "input_ids": torch.randint(0, V, (2, 5), generator=g),
            "topk_ids": ids.to(torch.uint16),
            "topk_logprobs": lp.half(),
            "topk_tail_logprob": torch.logsumexp(full.scatter(-1, ids, float("-inf")), -1).float(),
            # Hugging Face labels: unshifted (``labels`` above is the next token of each position)
            "labels": torch.nn.functional.pad(labels[:, :-1], (1, 0), value=IGNORE_INDEX),
            "attention_mask": mask,
            **_samples(full, g),
        }
        for name in SAMPLED:
            batch[name][1, 3:] = 0  # padding positions carry no draws
        batches.append(batch)
        logits.append(2 * torch.randn(2, 5, V, generator=g))
        teacher_full.append(full.float())
    return batches, logits, teacher_full


def _only(batches: list[dict], drop: tuple[str, ...]) -> list[dict]:
    return [{k: v for k, v in b.items() if k not in drop} for b in batches]


def _by_hand(batches: list[dict], logits: list[torch.Tensor]) -> dict[str, float]:
    ce, n, ghost, sampled, agree, m = 0.0, 0, 0.0, 0.0, 0, 0
    conf_correct: list[tuple[float, float]] = []
    for batch, z in zip(batches, logits, strict=True):
        for b in range(2):
            for t in range(5):
                s = torch.log_softmax(z[b, t].double(), -1)
                label = int(next_token_labels(batch["labels"])[b, t])
                if label != IGNORE_INDEX:
                    ce -= float(s[label])
                    n += 1
                    conf_correct.append((float(s.max().exp()), float(int(s.argmax()) == label)))
                if not batch["attention_mask"][b, t]:
                    continue
                m += 1
                ids = batch["topk_ids"][b, t].long()
                # k + 1 buckets: the top-k ids and the rest, teacher renormalized
                teacher = torch.cat([batch["topk_logprobs"][b, t].double().exp(),
                                     batch["topk_tail_logprob"][b, t].double().exp().reshape(1)])  # fmt: skip
                teacher = teacher / teacher.sum()
                rest = torch.ones(V, dtype=torch.bool)
                rest[ids] = False
                student = torch.cat([s[ids].exp(), s[rest].exp().sum().reshape(1)])
                ghost += float((teacher * (teacher / student).log()).sum())
                agree += int(int(s.argmax()) == int(ids[0]))
                counts = batch["sampled_counts"][b, t].double()
                drawn = batch["sampled_ids"][b, t].long()
                lp = batch["sampled_logprobs"][b, t].double()
                sampled += float((counts / counts.sum() * (lp - s[drawn])).sum())
    ece = 0.0
    for lo in range(15):
        members = [(c, a) for c, a in conf_correct if min(int(c * 15), 14) == lo]
        if members:
            gap = abs(sum(a for _, a in members) - sum(c for c, _ in members))
            ece += gap / n
    return {
        "cross_entropy": ce / n,
        "perplexity": math.exp(ce / n),
        "ghost_kl_to_teacher": ghost / m,
        "sampled_kl_to_teacher": sampled / m,
        "top1_agreement": agree / m,
        "ece": ece,
        "tokens": float(n),
    }


@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_metrics_equal_the_hand_computed_ones(chunk_tokens: int) -> None:
    batches, logits, _ = _batches(3)
    got = evaluate(FixedLogits(logits), batches, chunk_tokens=chunk_tokens)
    want = _by_hand(batches, logits)
    # a topk+sampled store: every metric but the exact KL (no teacher at hand), in table order
    # hand-built batches have no text spans: no bits per byte
    assert list(got) == [m for m in METRICS if m not in ("kl_to_teacher", *TEXT_METRICS)]
    for name in got:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_each_store_kind_reports_the_distances_its_targets_allow() -> None:
    batches, logits, _ = _batches(2)
    want = _by_hand(batches, logits)
    topk = evaluate(FixedLogits(logits), _only(batches, SAMPLED))
    assert set(topk) == set(METRICS) - {"sampled_kl_to_teacher", "kl_to_teacher", *TEXT_METRICS}
    sampled = evaluate(FixedLogits(logits), _only(batches, TOPK))
    assert set(sampled) == set(METRICS) - {
        "ghost_kl_to_teacher",
        "top1_agreement",
        "kl_to_teacher",
        *TEXT_METRICS,
    }
    for got in (topk, sampled):
        for name, value in got.items():
            assert value == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    # a version-1 top-k batch (no stored tail) falls back to 1 − Σ exp(l)
    v1 = evaluate(FixedLogits(logits), _only(batches, ("topk_tail_logprob", *SAMPLED)))
    assert v1["ghost_kl_to_teacher"] == pytest.approx(want["ghost_kl_to_teacher"], rel=1e-2)


def test_max_batches_bounds_the_work_and_training_mode_is_restored() -> None:
    batches, logits, _ = _batches(3)
    model = FixedLogits(logits)
    model.train()
    got = evaluate(model, iter(batches), max_batches=2)
    assert model.calls == 2 and model.training
    assert got == pytest.approx(_by_hand(batches[:2], logits[:2]))


def test_the_teacher_itself_agrees_fully_and_is_at_distance_zero() -> None:
    # a model whose log-probs are exactly the stored ones: float16 top-k, float32 tail and
    # float32 sampled log-probs — both distances vanish up to float32 rounding
    batches, _, full = _batches(2)
    got = evaluate(FixedLogits(full), batches)
    assert got["top1_agreement"] == 1.0
    assert abs(got["ghost_kl_to_teacher"]) < 1e-6
    assert abs(got["sampled_kl_to_teacher"]) < 1e-6
    # the ghost KL never exceeds the full KL (merging categories), checked on a student
    _, logits, _ = _batches(2)
    student = evaluate(FixedLogits(logits), batches)
    full_kl = [
        (f.double().exp() * (f.double() - torch.log_softmax(z.double(), -1))).sum(-1)[
            b["attention_mask"].bool()
        ]
        for b, f, z in zip(batches, full, logits, strict=True)
    ]
    assert 0 < student["ghost_kl_to_teacher"] <= float(torch.cat(full_kl).mean())


def test_empty_eval_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate(FixedLogits([]), [])


@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_summing_their_shares_report_the_single_process_metrics(ranks: int) -> None:
    # rank r evaluates batches r, r + R, … (as eval_batches deals them); its sums, summed over
    # the ranks, give every rank the metrics of all the batches — a rank without a batch too
    batches, logits, _ = _batches(ranks + 1)
    single = evaluate(FixedLogits(logits), batches)
    packs: list[torch.Tensor] = []
    for rank in range(ranks):
        shares = (batches[rank::ranks], logits[rank::ranks])
        evaluate(FixedLogits(shares[1]), shares[0], sum_ranks=lambda t: packs.append(t) or t)
    total = torch.stack(packs).sum(0)
    for rank in range(ranks):
        shares = (batches[rank::ranks], logits[rank::ranks])
        got = evaluate(FixedLogits(shares[1]), shares[0], sum_ranks=lambda t: total)
        assert list(got) == list(single)
        assert got == pytest.approx(single, rel=1e-12)
    nothing = evaluate(FixedLogits([]), [], sum_ranks=lambda t: total)  # a rank with no batch
    assert nothing == pytest.approx(single, rel=1e-12)
