"""The teacher's stored draws where a cross-tokenizer student can read them: at aligned
positions, each drawn teacher token counted for the student token it begins with.

A student position predicts "the token starting at byte b"; where a teacher token starts at the
same byte b, the teacher's stored distribution at its position predicts the text from b on over
the teacher's vocabulary. A drawn teacher token spells a piece of that text, and the student
would begin that piece with one of its own tokens: the same vocabulary entry when it holds it
(TRL's GOLD compares such exact matches directly), else the first token of the entry as the
student's own tokenizer model splits it (byte-level BPEs share their alphabet, so a teacher's
entry is a string the student's BPE can split). So each draw becomes a draw of a student token,
draws of one student token are merged (counts summed, log-probs log-summed), and the ordinary
``sampled-kl`` loss applies at the student's position: the teacher's distribution over the
student's next token, up to tokenization bias (the student splits the whole continuation, not
the teacher's token alone). Draws with no student token (a tokenizer family whose entries the
student's model cannot split) are dropped and the log-probs shifted by log P(kept), estimated by
the share of the draws kept.

A student position no teacher token starts at (inside a teacher token, or where the student's
token crosses a teacher boundary) has no teacher distribution; its target is the data's own next
token, a one-hot teacher (one draw of it, log-prob 0), so there the KD term is the plain
cross-entropy. The loss then mixes ``alpha · KD + (1 − alpha) · CE`` at every trained position
and the positions without a teacher keep their full CE weight: averaging KD over the aligned
positions alone gave the rest only ``1 − alpha`` of their CE (a byte-level student, whose
positions are two-thirds inside teacher tokens, then trained worse than its CE-only twin).
"""

from __future__ import annotations

from typing import Any

import numpy as np


def vocabulary_map(teacher: Any, student: Any) -> np.ndarray:
    """(V_t,) int64: the student token each teacher token begins with (-1: none; special tokens
    map only to the same entry)."""
    theirs = teacher.get_vocab()
    ours = student.get_vocab()
    specials = set(getattr(teacher, "all_special_tokens", []))
    model = getattr(getattr(student, "backend_tokenizer", None), "model", None)
    mapped = np.full(max(theirs.values(), default=-1) + 1, -1, dtype=np.int64)
    for token, teacher_id in theirs.items():
        if token in ours:
            mapped[teacher_id] = ours[token]
        elif model is not None and token not in specials:
            try:
                pieces = model.tokenize(token)
            except Exception:  # an entry this model cannot split: no student token
                continue
            if pieces:
                mapped[teacher_id] = pieces[0].id
    return mapped


def starts_of(ends: np.ndarray) -> np.ndarray:
    """(L,) the byte each token starts at (``ends`` shifted right)."""
    return np.concatenate([[0], ends[:-1]]) if ends.size else ends


def _student_draws(
    ids: np.ndarray, counts: np.ndarray, logprobs: np.ndarray, mapping: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """One position's teacher draws as draws of student tokens: (ids ascending, counts,
    log-probs) merged per student token, or None when no draw maps."""
    wide = ids.astype(np.int64)
    student = np.where(wide < mapping.size, mapping[np.minimum(wide, mapping.size - 1)], -1)
    kept = student >= 0
    if not kept.any():
        return None
    unique, inverse = np.unique(student[kept], return_inverse=True)  # (u,), (n,)
    merged = np.zeros(unique.size)
    np.add.at(merged, inverse, counts[kept].astype(np.float64))
    lp = logprobs[kept].astype(np.float64)
    top = np.full(unique.size, -np.inf)
    np.maximum.at(top, inverse, lp)
    total = np.zeros(unique.size)
    np.add.at(total, inverse, np.exp(lp - top[inverse]))
    share = merged.sum() / max(float(counts.astype(np.float64).sum()), 1.0)
    return unique, merged, top + np.log(total) - np.log(share)


def matched_draws(
    sequence: dict[str, Any],
    student_ids: np.ndarray,
    student_ends: np.ndarray,
    mapping: np.ndarray,
    labelled: np.ndarray | None = None,
) -> dict[str, np.ndarray]:
    """A student-token sequence for ``batches.collate``: ``tokens`` (L_s,), ``loss_mask`` (L_s,)
    marking the student positions with draws, and their rows ``sampled_distinct`` (T,),
    ``sampled_ids``/``sampled_counts``/``sampled_logprobs`` (M,) in the store's dtypes.

    Position m − 1 of the student (predicting its token m) is aligned with position k − 1 of the
    teacher when tokens m and k spell text starting at the same byte. ``labelled`` (L_s,) bool
    marks the student tokens that are trained (default: all but the first); one of them with no
    aligned teacher draws gets a one-hot row of itself.
    """
    teacher_ends = np.asarray(sequence["token_ends"], np.int64)
    t_starts = starts_of(teacher_ends)
    by_start: dict[int, int] = {}
    for k in np.flatnonzero(teacher_ends > t_starts).tolist():
        if k >= 1:
            by_start.setdefault(int(t_starts[k]), k)
    mask = sequence.get("loss_mask")
    trained = np.ones(teacher_ends.size, bool) if mask is None else mask.astype(bool)
    row_of = np.cumsum(trained) - 1  # (L_t,) target row of each trained teacher position
    distinct = np.asarray(sequence["sampled_distinct"], np.int64)  # (T,)
    offsets = np.concatenate([[0], np.cumsum(distinct)])  # (T + 1,)
    ids, counts = np.asarray(sequence["sampled_ids"]), np.asarray(sequence["sampled_counts"])
    logprobs = np.asarray(sequence["sampled_logprobs"])
    s_starts = starts_of(student_ends)
    loss_mask = np.zeros(student_ids.size, np.uint8)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    if labelled is None:
        labelled = np.arange(student_ids.size) > 0
    for m in range(1, student_ids.size):
        k = by_start.get(int(s_starts[m])) if student_ends[m] > s_starts[m] else None
        draws = None
        if k is not None and trained[k - 1]:
            a, b = offsets[row_of[k - 1]], offsets[row_of[k - 1] + 1]
            draws = _student_draws(ids[a:b], counts[a:b], logprobs[a:b], mapping)
        if draws is None and labelled[m]:  # no teacher here: the data's token, one-hot
            draws = (student_ids[m : m + 1].astype(np.int64), np.ones(1), np.zeros(1))
        if draws is not None:
            loss_mask[m - 1] = 1
            rows.append(draws)
    merged_ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
    id_dtype = np.uint16 if merged_ids.max(initial=0) < 1 << 16 else np.uint32
    most = max((float(r[1].max()) for r in rows), default=0.0)  # merged draws of one token
    count_dtype = counts.dtype if most <= np.iinfo(counts.dtype).max else np.uint16
    return {
        "tokens": student_ids.astype(np.int32),
        "loss_mask": loss_mask,
        "sampled_distinct": np.asarray([r[0].size for r in rows], dtype=distinct.dtype),
        "sampled_ids": merged_ids.astype(id_dtype),
        "sampled_counts": (np.concatenate([r[1] for r in rows]) if rows else np.zeros(0))
        .astype(count_dtype),
        "sampled_logprobs": (np.concatenate([r[2] for r in rows]) if rows else np.zeros(0))
        .astype(logprobs.dtype),
    }  # fmt: skip
