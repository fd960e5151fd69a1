"""evaluate() against metrics computed by hand, token by token."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kdcache.pipeline.distill.evaluation import METRICS, evaluate
from kdcache.pipeline.distill.losses import IGNORE_INDEX

V, K = 40, 6


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


def _batches(n: int, seed: int = 0) -> tuple[list[dict], list[torch.Tensor], list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches, logits, teacher_full = [], [], []
    for _ in range(n):
        full = torch.log_softmax(3 * torch.randn(2, 5, V, generator=g), -1)
        lp, ids = full.topk(K, dim=-1)
        labels = torch.randint(0, V, (2, 5), generator=g)
        labels[:, -1] = IGNORE_INDEX
        mask = torch.ones(2, 5, dtype=torch.int64)
        mask[1, 3:] = 0
        labels[1, 2:] = IGNORE_INDEX
        batches.append(
            {
                "input_ids": torch.randint(0, V, (2, 5), generator=g),
                "topk_ids": ids,
                "topk_logprobs": lp.half().float(),
                "labels": labels,
                "attention_mask": mask,
            }
        )
        logits.append(2 * torch.randn(2, 5, V, generator=g))
        teacher_full.append(full)
    return batches, logits, teacher_full


def _by_hand(batches: list[dict], logits: list[torch.Tensor]) -> dict[str, float]:
    ce, n, kl, agree, m = 0.0, 0, 0.0, 0, 0
    conf_correct: list[tuple[float, float]] = []
    for batch, z in zip(batches, logits, strict=True):
        for b in range(2):
            for t in range(5):
                s = torch.log_softmax(z[b, t].double(), -1)
                label = int(batch["labels"][b, t])
                if label != IGNORE_INDEX:
                    ce -= float(s[label])
                    n += 1
                    conf_correct.append((float(s.max().exp()), float(int(s.argmax()) == label)))
                if batch["attention_mask"][b, t]:
                    lp = batch["topk_logprobs"][b, t].double()
                    ids = batch["topk_ids"][b, t]
                    p = torch.softmax(lp, -1)
                    kl += float((p * (p.log() - s[ids])).sum())
                    agree += int(int(s.argmax()) == int(ids[0]))
                    m += 1
    ece = 0.0
    for lo in range(15):
        members = [(c, a) for c, a in conf_correct if min(int(c * 15), 14) == lo]
        if members:
            gap = abs(sum(a for _, a in members) - sum(c for c, _ in members))
            ece += gap / n
    return {
        "cross_entropy": ce / n,
        "perplexity": math.exp(ce / n),
        "kl_to_teacher": kl / m,
        "top1_agreement": agree / m,
        "ece": ece,
        "tokens": float(n),
    }


@pytest.mark.parametrize("chunk_tokens", [3, 1024])
def test_metrics_equal_the_hand_computed_ones(chunk_tokens: int) -> None:
    batches, logits, _ = _batches(3)
    got = evaluate(FixedLogits(logits), batches, chunk_tokens=chunk_tokens)
    want = _by_hand(batches, logits)
    assert set(got) == set(METRICS)
    for name in METRICS:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name


def test_max_batches_bounds_the_work_and_training_mode_is_restored() -> None:
    batches, logits, _ = _batches(3)
    model = FixedLogits(logits)
    model.train()
    got = evaluate(model, iter(batches), max_batches=2)
    assert model.calls == 2 and model.training
    assert got == pytest.approx(_by_hand(batches[:2], logits[:2]))


def test_the_teacher_itself_agrees_fully_and_its_kl_is_the_truncation() -> None:
    batches, _, full = _batches(2)
    got = evaluate(FixedLogits(full), batches)
    assert got["top1_agreement"] == 1.0
    # KL(top-k renormalized ‖ teacher) = −log(top-k mass), averaged over the real positions
    masses = []
    for batch, f in zip(batches, full, strict=True):
        lp, _ = f.topk(K, dim=-1)
        masses.append(-torch.logsumexp(lp, -1)[batch["attention_mask"].bool()])
    assert got["kl_to_teacher"] == pytest.approx(float(torch.cat(masses).mean()), rel=1e-3)


def test_empty_eval_data_is_an_error() -> None:
    with pytest.raises(ValueError, match="no labelled tokens"):
        evaluate(FixedLogits([]), [])
