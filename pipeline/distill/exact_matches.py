"""The teacher's stored draws as a target over a cross-tokenizer student's next token, at every
trained student position.

A student position predicts "the token starting at byte b"; where a teacher token starts at the
same byte b, the teacher's stored distribution at its position predicts the text from b on over
the teacher's vocabulary. A drawn teacher token spells a piece of that text, and the student
would begin that piece with one of its own tokens: the same vocabulary entry when it holds it
(TRL's GOLD compares such exact matches directly), else the first token of the entry as the
student's own tokenizer model splits it (byte-level BPEs share their alphabet, so a teacher's
entry is a string the student's BPE can split). Each draw counts, as its share of the row's
draws, for that student token (``first_pieces``); the realized teacher token counts by its exact
stored probability instead. Inside a teacher token, and to undo the teacher's boundary at b, the
draws that continue the text seen so far count instead (``continuations.py``). Entries with no
student token (a tokenizer family whose entries the student's model cannot split) are left out,
the rest renormalized. The row is written as weights in units of 1/``QUANTUM`` and the ordinary
``sampled-kl`` loss applies: the teacher's distribution over the student's next token, up to the
tokenization bias one level of marginalization leaves.

A student position the store says nothing about (no draw continues its text) gets the data's
own next token, a one-hot teacher (log-prob 0), so there the KD term is the plain
cross-entropy. The loss then mixes ``alpha · KD + (1 − alpha) · CE`` at every trained position
and the positions without a teacher keep their full CE weight: averaging KD over the aligned
positions alone gave the rest only ``1 − alpha`` of their CE (a byte-level student, whose
positions are two-thirds inside teacher tokens, then trained worse than its CE-only twin).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kdcache.pipeline.distill.continuations import EntrySplits


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


def first_pieces(
    ids: np.ndarray, counts: np.ndarray, mapping: np.ndarray, known: tuple[int, float] | None
) -> dict[int, float]:
    """{student token: mass} of one row's draws, each counted for the student token its entry
    begins with (``mapping``), as shares of all the row's draws; ``known`` = (the realized
    entry, its exact probability) counts by that probability instead of by its draws (no
    variance where it matters most). Entries with no student token are left out."""
    total = float(counts.astype(np.float64).sum())
    mass: dict[int, float] = {}
    for teacher_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
        if count <= 0 or (known is not None and teacher_id == known[0]):
            continue
        piece = int(mapping[teacher_id]) if teacher_id < mapping.size else -1
        if piece >= 0:
            mass[piece] = mass.get(piece, 0.0) + count / total
    if known is not None and known[0] < mapping.size and mapping[known[0]] >= 0:
        piece = int(mapping[known[0]])
        mass[piece] = mass.get(piece, 0.0) + known[1]
    return mass


QUANTUM = 4096  # a mixed row's target weights, as draw counts summing to about this


def _row(weights: dict[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """A target distribution over student tokens as a sampled row: (ids ascending, counts — the
    weights in units of 1/``QUANTUM`` — and log-probs, the weights' logs); None if empty."""
    total = sum(weights.values())
    if total <= 0:
        return None
    ids = np.asarray(sorted(weights), np.int64)
    share = np.asarray([weights[i] for i in ids.tolist()]) / total
    counts = np.rint(share * QUANTUM)
    keep = counts > 0
    if not keep.any():
        return None
    return ids[keep], counts[keep], np.log(share[keep])


def matched_draws(
    sequence: dict[str, Any],
    student_ids: np.ndarray,
    student_ends: np.ndarray,
    mapping: np.ndarray,
    labelled: np.ndarray | None = None,
    splits: EntrySplits | None = None,
) -> dict[str, np.ndarray]:
    """A student-token sequence for ``batches.collate``: ``tokens`` (L_s,), ``loss_mask`` (L_s,)
    marking its trained positions, and their rows ``sampled_distinct`` (T,),
    ``sampled_ids`` (M,) and ``sampled_counts`` (M,) uint16 (weights, see ``_row``),
    ``sampled_logprobs`` (M,) in the store's dtype.

    Position m − 1 of the student predicts its token m, starting at byte b. Where teacher token
    k starts at b too: the teacher's draws at position k − 1, mapped; with ``splits`` mixed with
    the continuations of the teacher token before (``continuations.py``). Where b is inside
    teacher token k: with ``splits``, the continuations of the draws at position k − 1. Else,
    or if nothing remains, the data's token (one-hot). ``labelled`` (L_s,) bool marks the
    student tokens that are trained (default: all but the first).
    """
    text = bytes(sequence["text"])
    teacher_ends = np.asarray(sequence["token_ends"], np.int64)
    t_starts = starts_of(teacher_ends)
    mask = sequence.get("loss_mask")
    trained = np.ones(teacher_ends.size, bool) if mask is None else mask.astype(bool)
    row_of = np.cumsum(trained) - 1  # (L_t,) target row of each trained teacher position
    distinct = np.asarray(sequence["sampled_distinct"], np.int64)  # (T,)
    offsets = np.concatenate([[0], np.cumsum(distinct)])  # (T + 1,)
    ids, counts = np.asarray(sequence["sampled_ids"]), np.asarray(sequence["sampled_counts"])
    logprobs = np.asarray(sequence["sampled_logprobs"])
    realized = np.asarray(sequence["next_token_logprob"], np.float64)  # (L_t,) of token t+1
    tokens = np.asarray(sequence["tokens"], np.int64)  # (L_t,) the teacher's
    usable = splits is not None and splits.usable

    def drawn(position: int) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """The stored draws at teacher ``position`` (predicting token position + 1)."""
        if position < 0 or not trained[position]:
            return None
        a, b = offsets[row_of[position]], offsets[row_of[position] + 1]
        return ids[a:b], counts[a:b], logprobs[a:b]

    def target(byte: int) -> dict[int, float] | None:
        """The teacher's distribution of the student token starting at ``byte``:
        ``P(k−1 ends) · C_{k−1}(seen since k) + C_{k−2}(seen since k − 1)`` (continuations.py),
        C_{k−1} of nothing seen being the mapped draws; None if the store says nothing."""
        k = int(np.searchsorted(teacher_ends, byte, side="right"))  # the token holding byte
        if k >= teacher_ends.size or k < 1:
            return None
        here = drawn(k - 1)
        if here is None:
            return None
        known = None  # the realized token k and its exact probability (the stored log-prob)
        if np.isfinite(realized[k - 1]):
            known = (int(tokens[k]), float(np.exp(min(realized[k - 1], 0.0))))
        if t_starts[k] == byte:  # a teacher token starts here too: its draws, mapped
            weights = first_pieces(here[0], here[1], mapping, known)
        elif usable:  # inside teacher token k: the draws that continue what it has spelled
            seen = text[t_starts[k] : byte]
            weights = splits.continuations(here[0], here[1], seen, known)  # type: ignore[union-attr]
        else:
            return None
        before = drawn(k - 2) if usable and k >= 2 and t_starts[k - 1] < t_starts[k] else None
        if before is None or not np.isfinite(realized[k - 2]):
            return weights or None
        # the teacher token before could have gone on past its end: undo its boundary
        going_on = splits.continuations(before[0], before[1], text[t_starts[k - 1] : byte])  # type: ignore[union-attr]
        ended = float(np.exp(min(realized[k - 2], 0.0)))  # P(the token before ends where it did)
        mixed = {i: ended * w for i, w in weights.items()}
        for i, w in going_on.items():
            mixed[i] = mixed.get(i, 0.0) + w
        return mixed or None

    s_starts = starts_of(student_ends)
    if labelled is None:
        labelled = np.arange(student_ids.size) > 0
    loss_mask = np.zeros(student_ids.size, np.uint8)
    rows: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    for m in range(1, student_ids.size):
        if not labelled[m] or student_ends[m] <= s_starts[m]:
            continue
        weights = target(int(s_starts[m]))
        row = _row(weights) if weights else None
        if row is None:  # no teacher here: the data's token, one-hot
            row = (student_ids[m : m + 1].astype(np.int64), np.full(1, QUANTUM), np.zeros(1))
        loss_mask[m - 1] = 1
        rows.append(row)
    merged_ids = np.concatenate([r[0] for r in rows]) if rows else np.zeros(0, np.int64)
    id_dtype = np.uint16 if merged_ids.max(initial=0) < 1 << 16 else np.uint32
    return {
        "tokens": student_ids.astype(np.int32),
        "loss_mask": loss_mask,
        "sampled_distinct": np.asarray([r[0].size for r in rows], dtype=distinct.dtype),
        "sampled_ids": merged_ids.astype(id_dtype),
        "sampled_counts": (np.concatenate([r[1] for r in rows]) if rows else np.zeros(0))
        .astype(np.uint16),
        "sampled_logprobs": (np.concatenate([r[2] for r in rows]) if rows else np.zeros(0))
        .astype(logprobs.dtype),
    }  # fmt: skip
