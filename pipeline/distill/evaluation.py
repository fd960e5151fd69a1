"""How good is a causal LM on stored teacher data: the numbers `train-student` and `compare` report.

Every metric is computed from loader batches (``input_ids``, ``labels``, ``loss_mask`` and the
store's targets), so the teacher itself can be evaluated the same way. Which distance to the
teacher is reported depends on the targets the store holds, and each is named for what it is
(docs/architecture.md §5).

Positions: every metric counts the trained positions only (``loss_mask``: every real position
of a store without a loss mask); those with a label are the trained positions that have a next
token (``next_token_labels(labels)``, Hugging Face's labels shifted, is -100 elsewhere). The
model's logits, and the teacher's, are over the store's tokenizer ids only (``vocab``),
computed from the model's final hidden states a chunk of rows at a time (``student_head.py``).

- ``cross_entropy``: mean ``−log s[label]`` in nats over positions with a label (the true next
  token); ``perplexity = exp(cross_entropy)``.
- ``ghost_kl_to_teacher`` (top-k stores): mean over trained positions (``loss_mask``) of the
  KL over k + 1 categories — the teacher's k ids and one bucket for the rest — with the stored
  tail mass (``topk_tail_logprob``; ``1 − Σ exp(l)`` for version-1 stores). The ``ghost`` loss at
  T = 1. Merging categories never increases a KL, so it is a lower bound on the full KL; 0 for
  the teacher itself (up to the rounding of the stored log-probs).
- ``sampled_kl_to_teacher`` (sampled stores): mean over trained positions of
  ``Σ counts/N · (lp − s[ids])``, an unbiased estimate of the full KL(teacher ‖ model); exactly
  0 for a model whose log-probs at the drawn ids are the stored ones.
- ``top1_agreement`` (top-k stores): fraction of trained positions where the model's argmax is
  the teacher's top-1 id (``topk_ids[..., 0]``; rows are sorted descending).
- ``ece``: expected calibration error of the model's top-1 prediction against the true next
  token over the positions with a label, ``Σ_b (n_b / n) · |accuracy_b − confidence_b|`` over
  15 equal-width confidence bins.
- ``bits_per_byte``, ``bits_per_char`` (stores with text spans, format 6): the same summed CE in
  bits over the UTF-8 bytes (characters) of the text the labelled tokens spell — a scale every
  tokenizer shares; ``teacher_bits_per_byte``: the teacher's own, from the stored log-prob of
  each realized next token (``next_token_logprob``), over the same tokens.
- ``tokens``: number of positions with a label (the denominator of ``cross_entropy``): in a
  masked store, the trained positions that have a next token.

- ``kl_to_teacher`` (only with the teacher at hand, ``teacher=``): mean over trained positions
  of the exact full-vocabulary KL(teacher ‖ model) at T = 1, the teacher's log-softmax computed
  per chunk from its hidden states; exactly 0 for the teacher itself.

Several processes: each rank evaluates its share of the batches (``loader.eval_batches`` deals
whole batches, each the one a single process would evaluate) and ``sum_ranks`` sums the running
sums (float64) before the ratios are taken, so every rank reports the single process's metrics
(up to the order of the float64 additions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

import torch

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.divergences import sampled_kl_to_teacher, topk_kd
from kdcache.pipeline.distill.live_teacher import LiveTeacher, exact_kl
from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    SAMPLED_FIELDS,
    TOPK_FIELDS,
    chunk_rows,
    next_token_labels,
    trained_mask,
)
from kdcache.pipeline.distill.student_head import student_head

ECE_BINS = 15
# every metric evaluate() may report, in table order; a store's targets decide which it does
METRICS = (
    "cross_entropy",
    "perplexity",
    "bits_per_byte",
    "bits_per_char",
    "teacher_bits_per_byte",
    "kl_to_teacher",
    "ghost_kl_to_teacher",
    "sampled_kl_to_teacher",
    "top1_agreement",
    "ece",
    "tokens",
)
TEACHER_DISTANCES = ("kl_to_teacher", "ghost_kl_to_teacher", "sampled_kl_to_teacher")


def _sum64(values: torch.Tensor) -> float:
    """Σ values in float64, on the CPU (MPS has no float64): (n,) → a Python float."""
    return float(values.detach().cpu().double().sum())


class _Totals:
    """Running sums over evaluated positions (float64 on the CPU for exact accumulation)."""

    def __init__(self, bins: int) -> None:
        self.ce = 0.0
        self.ce_tokens = 0
        self.ghost: float | None = None  # None: the batches hold no top-k targets
        self.sampled: float | None = None  # None: the batches hold no sampled targets
        self.exact: float | None = None  # None: no teacher at hand
        self.agree = 0
        self.kd_tokens = 0
        # the text the labelled tokens spell: bytes, characters (None: no spans in the store)
        self.text: tuple[float, float] | None = None
        self.teacher_nll: float | None = None  # Σ −stored next_token_logprob over labels
        self.bin_count = torch.zeros(bins, dtype=torch.float64)
        self.bin_confidence = torch.zeros(bins, dtype=torch.float64)
        self.bin_correct = torch.zeros(bins, dtype=torch.float64)

    def add_chunk(
        self,
        logits: torch.Tensor,
        labels: torch.Tensor,
        mask: torch.Tensor,
        targets: dict[str, torch.Tensor],
        sample_temperature: float = 1.0,
    ) -> None:
        """Accumulate one chunk: logits (n, V), labels/mask (n,), target rows (n, ...)."""
        log_s = torch.log_softmax(logits.float(), dim=-1)  # (n, V)
        confidence, prediction = log_s.max(dim=-1)  # (n,), (n,)
        has_label = labels != IGNORE_INDEX  # (n,)
        safe_labels = labels.clamp(min=0)
        nll = -log_s.gather(-1, safe_labels[:, None])[:, 0]  # (n,)
        self.ce += _sum64(nll[has_label])
        self.ce_tokens += int(has_label.sum())
        trained = mask.bool()  # (n,)
        self.kd_tokens += int(trained.sum())
        if "next_token_bytes" in targets:  # what the predicted tokens spell
            text_bytes = _sum64(targets["next_token_bytes"][has_label])
            chars = _sum64(targets["next_token_chars"][has_label])
            before = self.text or (0.0, 0.0)
            self.text = (before[0] + text_bytes, before[1] + chars)
        if "next_token_logprob" in targets:  # the teacher's own, stored at cache time
            stored = -targets["next_token_logprob"][has_label]
            self.teacher_nll = (self.teacher_nll or 0.0) + _sum64(stored)
        if "topk_ids" in targets:
            ids = targets["topk_ids"]  # (n, k) int64
            ghost = topk_kd(
                logits,
                ids,
                targets["topk_logprobs"],
                "ghost",
                1.0,
                tail_logprob=targets.get("topk_tail_logprob"),
            )  # (n,)
            self.ghost = (self.ghost or 0.0) + _sum64(ghost[trained])
            self.agree += int((prediction == ids[:, 0])[trained].sum())
        if "teacher_logprobs" in targets:
            exact = exact_kl(logits, targets["teacher_logprobs"])  # (n,)
            self.exact = (self.exact or 0.0) + _sum64(exact[trained])
        if "sampled_ids" in targets:
            fields = (targets[name] for name in SAMPLED_FIELDS)
            sampled = sampled_kl_to_teacher(logits, *fields, sample_temperature=sample_temperature)
            self.sampled = (self.sampled or 0.0) + _sum64(sampled[trained])
        # calibration of the top-1 prediction against the true next token
        bins = self.bin_count.shape[0]
        conf = confidence[has_label].exp().cpu().double()  # (m,)
        correct = (prediction == labels)[has_label].cpu().double()  # (m,)
        which = (conf * bins).long().clamp(max=bins - 1)  # (m,)
        self.bin_count.index_add_(0, which, torch.ones_like(conf))
        self.bin_confidence.index_add_(0, which, conf)
        self.bin_correct.index_add_(0, which, correct)

    def pack(self) -> torch.Tensor:
        """Every running sum in one (10 + 3·bins,) float64 tensor, to be summed over ranks; a
        distance's flag counts the ranks that measured it (0: none did)."""
        text_bytes, chars = self.text or (None, None)
        optional = [self.ghost, self.sampled, self.exact, text_bytes, chars, self.teacher_nll]
        flags = [float(v is not None) for v in optional]
        scalars = [self.ce, self.ce_tokens, *(v or 0.0 for v in optional), *flags]
        head = torch.tensor([*scalars, self.agree, self.kd_tokens], dtype=torch.float64)
        return torch.cat([head, self.bin_count, self.bin_confidence, self.bin_correct])

    def unpack(self, packed: torch.Tensor) -> None:
        """Take the sums of ``pack`` (e.g. summed over ranks)."""
        values = packed.tolist()
        self.ce, self.ce_tokens = values[0], int(values[1])
        self.ghost, self.sampled, self.exact, text_bytes, chars, self.teacher_nll = (
            value if flag > 0 else None
            for value, flag in zip(values[2:8], values[8:14], strict=True)
        )
        self.text = None if text_bytes is None or chars is None else (text_bytes, chars)
        self.agree, self.kd_tokens = int(values[14]), int(values[15])
        self.bin_count, self.bin_confidence, self.bin_correct = packed[16:].reshape(3, -1).clone()

    def result(self) -> dict[str, float]:
        if self.ce_tokens == 0:
            raise ValueError("no labelled tokens to evaluate (empty eval data)")
        ce = self.ce / self.ce_tokens
        gaps = (self.bin_correct - self.bin_confidence).abs().sum()  # Σ_b n_b |acc_b − conf_b|
        positions = max(self.kd_tokens, 1)
        found = {
            "cross_entropy": ce,
            "perplexity": math.exp(min(ce, 700.0)),
            "ece": float(gaps) / self.ce_tokens,
            "tokens": float(self.ce_tokens),
        }
        if self.text is not None and self.text[0] > 0:  # nats → bits, per byte and character
            found["bits_per_byte"] = self.ce / math.log(2) / self.text[0]
            found["bits_per_char"] = self.ce / math.log(2) / max(self.text[1], 1.0)
            if self.teacher_nll is not None:
                found["teacher_bits_per_byte"] = self.teacher_nll / math.log(2) / self.text[0]
        if self.exact is not None:
            found["kl_to_teacher"] = self.exact / positions
        if self.ghost is not None:
            found["ghost_kl_to_teacher"] = self.ghost / positions
            found["top1_agreement"] = self.agree / positions
        if self.sampled is not None:
            found["sampled_kl_to_teacher"] = self.sampled / positions
        return {name: found[name] for name in METRICS if name in found}


@torch.no_grad()
def evaluate(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    device: torch.device | str | None = None,
    max_batches: int | None = None,
    chunk_tokens: int | None = None,
    teacher: LiveTeacher | None = None,
    vocab: int | None = None,
    sum_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
    sample_temperature: float = 1.0,
) -> dict[str, float]:
    """Evaluate a causal LM on loader batches; see the module docstring for the definitions.

    Args:
        model: an HF causal LM on the store's tokenizer (embedding >= its size).
        batches: loader batches (CPU or device tensors).
        device: where to run; defaults to the model's device.
        max_batches: evaluate at most this many batches.
        chunk_tokens: rows per chunk of logits (bounds memory); default ``losses.chunk_rows``.
        teacher: the teacher itself, on ``device``: adds the exact ``kl_to_teacher``; its
            ``vocab`` must be this one.
        vocab: the store's tokenizer size: the model's logits are sliced to it (None: all).
        sum_ranks: sums a CPU tensor over every process (several processes, each given its
            share of the batches); every rank then returns the metrics of all the batches.
        sample_temperature: the temperature a sampled store's draws were made at: the
            ``sampled_kl_to_teacher`` estimate reweights them to the teacher at T = 1.

    Returns:
        The ``METRICS`` the batches' targets allow, in that order: always ``cross_entropy``,
        ``perplexity``, ``ece``, ``tokens``; ``ghost_kl_to_teacher`` and ``top1_agreement``
        from top-k targets; ``sampled_kl_to_teacher`` from sampled targets; ``kl_to_teacher``
        with ``teacher``.

    Raises:
        ValueError: the batches hold no labelled token.
        UserError: a batch holds an id the model has no row for.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    totals = _Totals(ECE_BINS)
    try:
        for batch in islice(batches, max_batches):
            b = batch_to_device(batch, device)  # compact dtypes cross, ids widened on the device
            head = student_head(model, vocab)
            states = head.rows(model, b)  # (B, L, H), or (B, L, V) logits: whole_logits
            rows = states.shape[0] * states.shape[1]
            flat = states.reshape(rows, -1)  # (B·L, H)
            labels = next_token_labels(b["labels"]).reshape(-1)  # (B·L,) the next tokens
            mask = trained_mask(b).reshape(-1)  # (B·L,)
            targets = {
                name: b[name].reshape(rows, *b[name].shape[2:])  # (B·L,) or (B·L, k|m)
                for name in (*TOPK_FIELDS, *SAMPLED_FIELDS)
                if name in b and "chunk_mask" not in b  # a cross-tokenizer batch's draws are
            }  # merged per student token: their log-probs are not the teacher's, no KL estimate
            targets |= {  # of the token each position predicts: shifted as the labels are
                f"next_{name}": next_token_labels(b[name], fill=0).reshape(-1)
                for name in ("token_bytes", "token_chars")
                if name in b
            }
            if "next_token_logprob" in b:  # (B·L,) the teacher's log-prob of that next token
                targets["next_token_logprob"] = b["next_token_logprob"].reshape(-1)
            hidden = None
            if teacher is not None:  # (B·L, H), or (B·L, V_t) logits in its fallback mode
                hidden = teacher.hidden(b["input_ids"], b["attention_mask"]).reshape(rows, -1)
            step = chunk_tokens or chunk_rows(head.columns(flat))
            for start in range(0, rows, step):
                chunk = slice(start, start + step)
                rows_targets = {name: t[chunk] for name, t in targets.items()}
                if hidden is not None:
                    rows_targets["teacher_logprobs"] = teacher.logprobs(hidden[chunk])  # (n, V)
                logits = head.logits(flat[chunk])  # (n, V), V ≤ vocab
                totals.add_chunk(
                    logits, labels[chunk], mask[chunk], rows_targets, sample_temperature
                )
    finally:
        model.train(was_training)
    if sum_ranks is not None:
        totals.unpack(sum_ranks(totals.pack()))
    return totals.result()


def history_table(history: list[dict[str, float]]) -> str:
    """One row per eval: the step and the metrics the store's targets allow (``METRICS``)."""
    names = [n for n in METRICS if n != "tokens" and n in history[-1]]
    width = max(14, *(len(n) for n in names))
    lines = ["  ".join(f"{n:>{width}}" for n in ["step", *names])]
    for row in history:
        cells = [f"{int(row['step']):>{width}d}"] + [f"{row[n]:>{width}.4f}" for n in names]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def in_words(final: dict[str, float]) -> str:
    """An eval in words: CE, perplexity and every distance to the teacher measured."""
    parts = [f"eval CE {final['cross_entropy']:.4f} (ppl {final['perplexity']:.2f})"]
    if "bits_per_byte" in final:
        parts.append(f"{final['bits_per_byte']:.4f} bits/byte")
    parts += [f"{n.replace('_', ' ')} {final[n]:.4f}" for n in TEACHER_DISTANCES if n in final]
    if "top1_agreement" in final:
        parts.append(f"top-1 {final['top1_agreement']:.3f}")
    return ", ".join(parts)
