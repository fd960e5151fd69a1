"""How good is a causal LM on stored teacher data: the numbers `train-student` and `compare` report.

Every metric is computed from loader batches (``input_ids``, ``labels``, ``attention_mask``,
``topk_ids``, ``topk_logprobs``), so the teacher itself can be evaluated the same way:

- ``cross_entropy``: mean ``−log s[label]`` in nats over positions with a label (the true next
  token; ``labels != -100``); ``perplexity = exp(cross_entropy)``.
- ``kl_to_teacher``: mean over real positions (``attention_mask``) of KL(p ‖ s) where
  ``p = softmax(l)`` is the teacher's stored top-k renormalized over its k ids and ``s`` the
  model's full-vocabulary distribution: ``Σ_i p_i (log p_i − log s[ids_i])``. It is the ``kl``
  training loss at T = 1 and a true divergence (≥ 0, 0 iff the model puts exactly p on the ids).
  For the teacher itself it equals ``−log Σ exp(l)``: the top-k truncation, not zero.
- ``top1_agreement``: fraction of real positions where the model's argmax is the teacher's
  top-1 id (``topk_ids[..., 0]``; rows are sorted descending).
- ``ece``: expected calibration error of the model's top-1 prediction against the true next
  token, ``Σ_b (n_b / n) · |accuracy_b − confidence_b|`` over 15 equal-width confidence bins.
- ``tokens``: number of positions with a label (the denominator of ``cross_entropy``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.losses import DEFAULT_CHUNK_TOKENS, IGNORE_INDEX, kd_per_token

ECE_BINS = 15
METRICS = ("cross_entropy", "perplexity", "kl_to_teacher", "top1_agreement", "ece", "tokens")


class _Totals:
    """Running sums over evaluated positions (float64 on the CPU for exact accumulation)."""

    def __init__(self, bins: int) -> None:
        self.ce = 0.0
        self.ce_tokens = 0
        self.kl = 0.0
        self.agree = 0
        self.kd_tokens = 0
        self.bin_count = torch.zeros(bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(bins, dtype=torch.float64)

    def add_chunk(
        self,
        logits: torch.Tensor,
        ids: torch.Tensor,
        logprobs: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
    ) -> None:
        """Accumulate one chunk: logits (n, V), ids/logprobs (n, k), labels/mask (n,)."""
        log_s = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        confidence, prediction = log_s.max(dim=-1)  # (n,), (n,)
        has_label = labels != IGNORE_INDEX  # (n,)
        safe_labels = labels.clamp(min=0)
        nll = -log_s.gather(-1, safe_labels[:, None])[:, 0]  # (n,)
        self.ce += float(nll[has_label].double().sum())
        self.ce_tokens += int(has_label.sum())
        real = mask.bool()
        kl = kd_per_token(logits, ids, logprobs, "kl", 1.0)  # (n,)
        self.kl += float(kl[real].double().sum())
        self.agree += int((prediction == ids[:, 0])[real].sum())
        self.kd_tokens += int(real.sum())
        # calibration of the top-1 prediction against the true next token
        bins = self.bin_count.shape[0]
        conf = confidence[has_label].exp().double().cpu()  # (m,)
        correct = (prediction == labels)[has_label].double().cpu()  # (m,)
        which = (conf * bins).long().clamp(max=bins - 1)  # (m,)
        self.bin_count.index_add_(0, which, torch.ones_like(conf))
        self.bin_confidence.index_add_(0, which, conf)
        self.bin_correct.index_add_(0, which, correct)

    def result(self) -> dict[str, float]:
        if self.ce_tokens == 0:
            raise ValueError("no labelled tokens to evaluate (empty eval data)")
        ce = self.ce / self.ce_tokens
        gaps = (self.bin_correct - self.bin_confidence).abs().sum()  # Σ_b n_b |acc_b − conf_b|
        return {
            "cross_entropy": ce,
            "perplexity": math.exp(min(ce, 700.0)),
            "kl_to_teacher": self.kl / max(self.kd_tokens, 1),
            "top1_agreement": self.agree / max(self.kd_tokens, 1),
            "ece": float(gaps) / self.ce_tokens,
            "tokens": float(self.ce_tokens),
        }


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> dict[str, float]:
    """Evaluate a causal LM on loader batches; see the module docstring for the definitions.

    Args:
        model: an HF causal LM whose vocabulary is the store's.
        batches: loader batches (CPU or device tensors).
        device: where to run; defaults to the model's device.
        max_batches: evaluate at most this many batches.
        chunk_tokens: rows per float32 log-softmax chunk (bounds memory).

    Returns:
        {"cross_entropy", "perplexity", "kl_to_teacher", "top1_agreement", "ece", "tokens"}.

    Raises:
        ValueError: the batches hold no labelled token.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = _Totals(ECE_BINS)
    try:
        for batch in islice(batches, max_batches):
            b = batch_to_device(batch, device)  # compact dtypes cross, ids widened on the device
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            vocab = logits.shape[-1]
            k = b["topk_ids"].shape[-1]
            flat = (
                logits.reshape(-1, vocab),  # (B·L, V)
                b["topk_ids"].reshape(-1, k),  # (B·L, k)
                b["topk_logprobs"].reshape(-1, k),  # (B·L, k)
                b["labels"].reshape(-1),  # (B·L,)
                b["attention_mask"].reshape(-1),  # (B·L,)
            )
            for start in range(0, flat[0].shape[0], chunk_tokens):
                totals.add_chunk(*(t[start : start + chunk_tokens] for t in flat))
    finally:
        model.train(was_training)
    return totals.result()
