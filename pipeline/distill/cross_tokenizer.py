"""A student with another tokenizer: its batches (the stored text re-tokenized and aligned) and
its loss, chunk likelihood matching (``alm``).

Learned from Approximate Likelihood Matching (Minixhofer et al. 2025): the text is cut where
both tokenizations end a token (``alignment.py``); each *chunk* is spelled by a run of teacher
tokens and a run of student tokens, so both models give it a likelihood — the teacher's the sum
of the stored log-probs of its realized tokens (``next_token_logprob``, format 6), the
student's the sum of its own log-probs of its tokens — and the loss pulls the student's towards
the teacher's, in log space: Huber (δ = 1) of the difference at temperature T,

    KD_c = huber((log p_s(c) − log p_t(c)) / T)

ALM itself compares the pair as two Bernoulli distributions of p = exp(log-likelihood / T) (a
binarised f-divergence); on the default store that gave KD terms of ~1e-4 per chunk at T = 1 (a
chunk's probability is ~e^-6, both Bernoullis say "not this chunk" and the gradient is ~p): no
signal beside the CE. The log-space distance keeps ALM's idea — match the likelihoods of chunks
both tokenizations spell — with a gradient of at most 1/T per chunk, a token's CE scale;
averaged over the chunks both sides predict (not the first: no token of it is predicted; not a
chunk a store's loss mask leaves untrained), mixed with the student's own CE as elsewhere:
``alpha · KD + (1 − alpha) · CE``. It needs only the realized tokens' log-probs, so it works
from top-k and from sampled stores alike. (The Universal Logit Distillation loss and TRL's GOLD
compare whole distributions at aligned positions instead; top-k rows of another vocabulary
would need a vocabulary mapping this loss does without.)

Gradient: the chunk terms are a nonlinear function of sums of per-position log-probs, so the
loss takes two passes over the head, chunk by chunk (``losses.py``'s memory bound holds): the
first, without gradient, finds each chunk's likelihood and d KD / d log-likelihood; the second
is the fused chunk loss of ``Σ w_m · nll_m`` (``w`` those derivatives, constant), whose gradient
is the true one; its value is corrected to the true loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.alignment import NO_CHUNK, align, retokenize
from kdcache.pipeline.distill.batches import collate, token_sizes
from kdcache.pipeline.distill.continuations import EntrySplits
from kdcache.pipeline.distill.exact_matches import matched_draws, vocabulary_map
from kdcache.pipeline.distill.fused_chunks import Head, fused_chunk_loss
from kdcache.pipeline.distill.losses import IGNORE_INDEX, LossTerms, chunk_rows, next_token_labels

CROSS_LOSS = "alm"
# batch fields of a cross-tokenizer batch beyond input_ids, attention_mask, labels
CHUNK_FIELDS = ("chunk_ids", "chunk_teacher_logprob", "chunk_mask")
_MAX_LOGPROB = 0.0  # a chunk's log-likelihood, at most (float16 rounding can exceed it)


@dataclass
class CrossStats:
    """What re-tokenizing the store's text met (reported; past a share of unknown tokens, the
    student is refused)."""

    sequences: int = 0
    student_tokens: int = 0
    unknown_tokens: int = 0
    aligned_tokens: int = 0  # student tokens (after the first) that start where a teacher one does

    @property
    def aligned_share(self) -> float:
        """The share of the student's predicted tokens a teacher token starts with."""
        return self.aligned_tokens / max(self.student_tokens - self.sequences, 1)


class CrossTokenizerCollator:
    """Store sequences (with ``text``, ``token_ends``, ``next_token_logprob``) → a batch in the
    student's tokens (Hugging Face conventions, ``batches.py``) with its chunks:

    ``chunk_ids`` (B, L_s) int64: the chunk of student token m (-1: spells nothing, padding);
    ``chunk_teacher_logprob`` (B, C) float32: the teacher's log-likelihood of chunk c;
    ``chunk_mask`` (B, C) float32: 1 where chunk c is trained (both sides predict it; the store's
    loss mask trains all its teacher tokens); ``token_bytes``/``token_chars`` (B, L_s) int32 of
    the student's tokens (bits per byte). ``labels`` is -100 for tokens of untrained chunks.
    Given the teacher's tokenizer and a store with samples: ``sampled_*`` (B, L_s, m), the
    teacher's draws at aligned positions as draws of student tokens (a one-hot row of the data's
    token where no teacher token starts), and ``loss_mask`` marking the trained positions
    (``exact_matches.py``): the ``sampled-kl`` loss reads them.

    Args:
        tokenizer: the student's (fast) tokenizer.
        teacher_tokenizer: the store's; with it, the teacher's draws at aligned positions.
        pad_id: ``input_ids`` of padding (default: the tokenizer's pad, else 0).
        bos: put the tokenizer's BOS first (when it has one), as its own pretraining did.
    """

    def __init__(
        self,
        tokenizer: Any,
        teacher_tokenizer: Any = None,
        pad_id: int | None = None,
        bos: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        pad = tokenizer.pad_token_id if pad_id is None else pad_id
        self.pad_id = 0 if pad is None else int(pad)
        self.bos = tokenizer.bos_token_id if bos else None
        self.stats = CrossStats()
        # the student token each teacher token begins with (the matched draws)
        self.mapping = (
            None if teacher_tokenizer is None else vocabulary_map(teacher_tokenizer, tokenizer)
        )
        # the draws as continuations inside teacher tokens (byte-level tokenizers on both sides)
        self.splits = (
            None if teacher_tokenizer is None else EntrySplits(teacher_tokenizer, tokenizer)
        )

    def sequence(self, sequence: dict[str, Any]) -> dict[str, np.ndarray]:
        """One store sequence in the student's tokens and its chunks (numpy, unpadded)."""
        for name in ("text", "token_ends", "next_token_logprob"):
            if sequence.get(name) is None:
                raise ValueError(
                    f"a cross-tokenizer student needs the store's {name} (format 6 stores); "
                    "re-cache the store with this kdcache"
                )
        student = retokenize(self.tokenizer, bytes(sequence["text"]))
        ids, ends = student.ids, student.ends
        if self.bos is not None:  # spells nothing, gives the first real token a context
            ids, ends = np.concatenate([[self.bos], ids]), np.concatenate([[0], ends])
        self.stats.sequences += 1
        self.stats.student_tokens += int(ids.size)
        self.stats.unknown_tokens += student.unknown
        teacher_ends = np.asarray(sequence["token_ends"], np.int64)  # (L_t,)
        t_starts = np.concatenate([[0], teacher_ends[:-1]])[1:][
            teacher_ends[1:] > teacher_ends[:-1]
        ]
        s_starts = np.concatenate([[0], ends[:-1]])[1:]  # (L_s − 1,) of tokens 1..
        self.stats.aligned_tokens += int(np.isin(s_starts, t_starts).sum())
        alignment = align(teacher_ends, ends)
        chunks = alignment.chunks
        realized = np.asarray(sequence["next_token_logprob"], np.float64)  # (L_t,) of token t+1
        mask = sequence.get("loss_mask")
        trained = np.ones(teacher_ends.size, bool) if mask is None else mask.astype(bool)
        teacher_ll = np.zeros(chunks)
        ok = np.ones(chunks, bool)
        t_chunk = alignment.teacher  # (L_t,)
        spelled = t_chunk != NO_CHUNK
        predicted = np.flatnonzero(spelled[1:]) + 1  # teacher tokens k ≥ 1 that spell text
        np.add.at(teacher_ll, t_chunk[predicted], realized[predicted - 1])
        ok[t_chunk[predicted][~trained[predicted - 1]]] = False  # an untrained prediction
        if spelled[0]:
            ok[t_chunk[0]] = False  # the teacher predicted no first token
        s_chunk = alignment.student  # (L_s,)
        chunk_trained = ok.copy()
        if s_chunk.size and s_chunk[0] != NO_CHUNK:
            ok[s_chunk[0]] = False  # nor does the student
        has_student = np.zeros(chunks, bool)
        has_student[s_chunk[s_chunk != NO_CHUNK]] = True
        ok &= has_student
        labels = ids.copy()
        labels[0] = IGNORE_INDEX
        untrained = (s_chunk == NO_CHUNK) | ~chunk_trained[np.maximum(s_chunk, 0)]
        labels[untrained] = IGNORE_INDEX
        sizes, characters = token_sizes({"text": sequence["text"], "token_ends": ends})
        draws = None
        if self.mapping is not None and sequence.get("sampled_distinct") is not None:
            draws = matched_draws(
                sequence, ids, ends, self.mapping, labels != IGNORE_INDEX, self.splits
            )
        return {
            "draws": draws,
            "input_ids": ids,
            "labels": labels,
            "chunk_ids": s_chunk,
            "chunk_teacher_logprob": np.minimum(teacher_ll, _MAX_LOGPROB),
            "chunk_mask": ok.astype(np.float32),
            "token_bytes": sizes,
            "token_chars": characters,
        }

    def __call__(self, sequences: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """Pad the re-tokenized sequences into one batch (right padding)."""
        rows = [self.sequence(s) for s in sequences]
        b = len(rows)
        length = max(r["input_ids"].size for r in rows)
        chunks = max(max(r["chunk_mask"].size for r in rows), 1)
        batch = {
            "input_ids": torch.full((b, length), self.pad_id, dtype=torch.int64),
            "attention_mask": torch.zeros(b, length, dtype=torch.int64),
            "labels": torch.full((b, length), IGNORE_INDEX, dtype=torch.int64),
            "chunk_ids": torch.full((b, length), NO_CHUNK, dtype=torch.int64),
            "token_bytes": torch.zeros(b, length, dtype=torch.int32),
            "token_chars": torch.zeros(b, length, dtype=torch.int32),
            "chunk_teacher_logprob": torch.full((b, chunks), _MAX_LOGPROB),
            "chunk_mask": torch.zeros(b, chunks),
        }
        for i, row in enumerate(rows):
            n, c = row["input_ids"].size, row["chunk_mask"].size
            batch["attention_mask"][i, :n] = 1
            for name in ("input_ids", "labels", "chunk_ids", "token_bytes", "token_chars"):
                batch[name][i, :n] = torch.from_numpy(np.asarray(row[name]).astype(np.int64))
            batch["chunk_teacher_logprob"][i, :c] = torch.from_numpy(row["chunk_teacher_logprob"])
            batch["chunk_mask"][i, :c] = torch.from_numpy(row["chunk_mask"])
        batch["loss_mask"] = (batch["chunk_ids"] != NO_CHUNK).long()
        if all(row["draws"] is not None for row in rows):  # the matched draws: sampled_* fields
            drawn = collate([row["draws"] for row in rows], self.pad_id)
            names = ("loss_mask", "sampled_ids", "sampled_counts", "sampled_logprobs")
            batch |= {name: drawn[name] for name in names if name in drawn}
        return batch


def chunk_distance(
    student_ll: torch.Tensor, teacher_ll: torch.Tensor, temperature: float
) -> torch.Tensor:
    """(C,) the distance of the student's chunk log-likelihoods from the teacher's: Huber (δ = 1)
    of their difference at temperature T — quadratic within a nat, linear beyond, so each chunk's
    gradient is at most 1/T, the scale of a token's CE gradient."""
    gap = (student_ll - teacher_ll) / temperature
    return F.huber_loss(gap, torch.zeros_like(gap), reduction="none", delta=1.0)


def cross_batch_loss(
    rows: torch.Tensor,
    batch: dict[str, torch.Tensor],
    head: Head,
    *,
    temperature: float = 1.0,
    alpha: float = 0.5,
    kd_tokens: int | None = None,
    ce_tokens: int | None = None,
    chunk_tokens: int | None = None,
) -> LossTerms:
    """``alpha · KD + (1 − alpha) · CE`` of a cross-tokenizer batch from the student's (B, L, H)
    hidden states and head (see the module docstring). ``kd_tokens``: the trained chunks the KD
    term is averaged over (default: this batch's); ``ce_tokens``: the labelled tokens."""
    b, length = batch["labels"].shape
    chunks = batch["chunk_mask"].shape[1]
    flat = rows.reshape(b * length, -1)  # (N, H)
    labels = next_token_labels(batch["labels"]).reshape(-1)  # (N,) the token each predicts
    predicts = next_token_labels(batch["chunk_ids"], fill=NO_CHUNK)  # (B, L) its chunk
    offset = torch.arange(b, device=predicts.device)[:, None] * chunks
    target = torch.where(predicts >= 0, predicts + offset, -1).reshape(-1)  # (N,) in B·C
    ids = next_token_labels(batch["input_ids"], fill=0).reshape(-1)  # (N,) the next input id
    step = chunk_tokens or chunk_rows(head.columns(flat))

    # pass 1: each chunk's student log-likelihood, the KD terms and their derivatives
    with torch.no_grad():
        nll = torch.cat([
            _nll(head, flat[s : s + step], ids[s : s + step]) for s in range(0, b * length, step)
        ])  # (N,) float32  # fmt: skip
    inside = target >= 0
    student_ll = torch.zeros(b * chunks, dtype=torch.float32, device=rows.device)
    student_ll.index_add_(0, target[inside], -nll[inside])
    mask = batch["chunk_mask"].reshape(-1).float()  # (B·C,)
    with torch.enable_grad():
        leaf = student_ll.detach().requires_grad_()
        teacher_ll = batch["chunk_teacher_logprob"].reshape(-1)
        kd_sum = (chunk_distance(leaf, teacher_ll, temperature) * mask).sum()
        (grad,) = torch.autograd.grad(kd_sum, leaf)  # (B·C,) d KD / d log-likelihood
    weight = torch.zeros_like(nll)
    weight[inside] = -grad[target[inside]]  # d KD / d nll_m

    own_kd, own_ce = int(mask.sum().item()), int((labels != IGNORE_INDEX).sum().item())
    kd_count = max(kd_tokens if kd_tokens is not None else own_kd, 1)
    ce_count = max(ce_tokens if ce_tokens is not None else own_ce, 1)

    def chunk_sums(logits: torch.Tensor, rows_: slice) -> tuple[torch.Tensor, torch.Tensor]:
        log_p = torch.log_softmax(logits.float(), -1)
        row_nll = -log_p.gather(-1, ids[rows_, None])[:, 0]  # (n,)
        ce = F.nll_loss(log_p, labels[rows_], ignore_index=IGNORE_INDEX, reduction="sum")
        return (weight[rows_] * row_nll).sum(), ce

    # pass 2: the surrogate Σ w·nll has the true gradient; its value is corrected below
    total, surrogate, ce_sum = fused_chunk_loss(
        head, flat, head.params, chunk_sums,
        weights=(alpha / kd_count, (1.0 - alpha) / ce_count), chunk_rows=step,
    )  # fmt: skip
    kd_sum = kd_sum.detach()
    total = total + (alpha / kd_count) * (kd_sum - surrogate)
    return LossTerms(
        total=total,
        kd=kd_sum / kd_count,
        ce=ce_sum / ce_count,
        kd_sum=kd_sum,
        ce_sum=ce_sum,
        kd_tokens=own_kd,
        ce_tokens=own_ce,
    )


def _nll(head: Head, rows: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """(n,) −log p(ids) of a chunk of rows in float32, the logits made as the fused loss makes
    them (``fused_chunks.py``), so both passes see the same numbers."""
    logits = head.transform(head.project(rows, *head.params))
    return -torch.log_softmax(logits.float(), -1).gather(-1, ids[:, None])[:, 0]
