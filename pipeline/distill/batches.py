"""Loader batches: compact dtypes, collation, device transfer.

A batch holds ``input_ids`` (B, L) int64, ``labels`` (B, L) int64, ``attention_mask`` (B, L)
int64, ``loss_mask`` (B, L) int64, and the store's targets in its compact dtypes — a field the
store lacks is absent:

- top-k: ``topk_logprobs`` (B, L, k) float16 (float32 for float32/bfloat16 stores), ``topk_ids``
  (B, L, k) uint16 (int32 for stores with more than 65 536 ids) and ``topk_tail_logprob``
  (B, L) float32 (the log mass outside the top-k; padding 0);
- sampled: ``sampled_logprobs`` (B, L, m) as ``topk_logprobs``, ``sampled_ids`` (B, L, m) as
  ``topk_ids`` and ``sampled_counts`` (B, L, m) uint8 or uint16 (the store's count dtype), with
  m the most distinct ids any position of the batch drew; a position's entries come first, in
  ascending id order, and the rest is padding (id 0, count 0, log-prob 0);
- text spans (format 6 stores): ``token_bytes`` and ``token_chars`` (B, L) int32, the UTF-8
  bytes of the text token t spells and the characters that start in it (0 for special tokens and
  padding; ``token_sizes``), and ``next_token_logprob`` (B, L) float32, the teacher's log-prob
  of token t + 1 (0 at the last position and on padding): bits per byte, the teacher's own CE.

Hugging Face conventions: ``labels`` are the input ids themselves, unshifted, with -100 where
a token is not predicted (position 0, padding, and the token after an untrained position), so
``model(**batch).loss`` of a causal LM (which shifts them) is the right cross-entropy; the
losses here shift them the same way (``losses.next_token_labels``). The targets are aligned with
the input positions: row t of ``topk_*``/``sampled_*`` is the teacher's distribution of token
t + 1, the one the student's logits at t predict.

The loss mask (docs/architecture.md §5). ``loss_mask`` marks the positions that are trained:
every real position (= ``attention_mask``) for a store without a mask, else the real positions
the store's per-token ``loss_mask`` marks. A masked store keeps target rows for its trained
positions only (T = mask.sum() rows per sequence, in token order); ``collate`` scatters them to
their positions and leaves zeros (no draws) everywhere else. ``labels[t + 1]`` is -100 where
position t is not trained, so CE counts the trained positions that have a next token, and every
KD term and metric counts ``loss_mask`` positions.

``batch_to_device`` moves a batch and widens ids and counts to int64 on the device.

All fields are views of one flat byte buffer (``batch_layout``), so a batch is one piece of
memory: one allocation (page-locked for a CUDA device) and one copy to the device.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch

from kdcache.pipeline.distill.losses import IGNORE_INDEX, widen_ids

# every field a batch can hold, in buffer order; the first four are in every batch
FIELDS = (
    "input_ids",
    "labels",
    "attention_mask",
    "loss_mask",
    "topk_logprobs",
    "topk_ids",
    "topk_tail_logprob",
    "sampled_logprobs",
    "sampled_ids",
    "sampled_counts",
    "token_bytes",
    "token_chars",
    "next_token_logprob",
)
# a sequence as the loader holds it: these store fields, those the store has, as numpy arrays;
# ``loss_mask`` (L,) uint8 only in masked stores, whose target fields then have T rows (T = its sum)
SEQUENCE_FIELDS = (
    "tokens",
    "loss_mask",
    "topk_ids",
    "topk_logprobs",
    "topk_tail_logprob",
    "sampled_distinct",
    "sampled_ids",
    "sampled_counts",
    "sampled_logprobs",
    "text",
    "token_ends",
    "next_token_logprob",
)
BASE_FIELDS = FIELDS[:4]  # input_ids, labels, attention_mask, loss_mask: (B, L) int64
WIDENED = ("topk_ids", "sampled_ids", "sampled_counts")  # int64 on the device
TARGET_ROWS = ("topk_ids", "topk_logprobs", "topk_tail_logprob")  # one row per trained position
_ALIGN = 64  # byte alignment of each field inside a batch buffer
Sequence = dict[str, np.ndarray]


class Layout(NamedTuple):
    """Shapes and dtypes of one batch: what ``batch_layout`` needs to place its fields."""

    batch: int  # B
    length: int  # L
    top_k: int  # k; 0 without top-k targets
    tail: bool  # topk_tail_logprob is present
    samples: int  # m, sampled entries per position (0 without sampled targets)
    ids: str  # torch dtype name of topk_ids and sampled_ids
    logprobs: str  # of topk_logprobs and sampled_logprobs
    counts: str  # of sampled_counts; "" without sampled targets
    spans: bool = False  # the store gives each token's text span: token_bytes, token_chars
    realized: bool = False  # the store gives next_token_logprob


def compact_dtypes(ids: np.dtype, logprobs: np.dtype) -> tuple[str, str]:
    """Batch dtype names of the ids and log-probs for a store's numpy dtypes.

    uint16 ids stay uint16; uint32 ids travel as int32 (the same bits, since ids < vocab < 2³¹);
    log-probs keep float16, anything else is float32.
    """
    return (
        "uint16" if ids == np.uint16 else "int32",
        "float16" if logprobs == np.float16 else "float32",
    )


def sequence_fields(sequence: Any) -> Sequence:
    """The fields of a store sequence (``TeacherSequence``) it has, as {name: numpy array}."""
    return {
        name: value
        for name in SEQUENCE_FIELDS
        if (value := getattr(sequence, name, None)) is not None
    }


def batch_layout(layout: Layout) -> tuple[list[tuple[str, torch.dtype, tuple[int, ...], int]], int]:
    """Where each field lives in a flat buffer: ([(name, dtype, shape, byte offset)], bytes)."""
    b, length, k, m = layout.batch, layout.length, layout.top_k, layout.samples
    ids, logprobs = getattr(torch, layout.ids), getattr(torch, layout.logprobs)
    present: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {
        name: (torch.int64, (b, length)) for name in BASE_FIELDS
    }
    if k:
        present |= {"topk_logprobs": (logprobs, (b, length, k)), "topk_ids": (ids, (b, length, k))}
    if k and layout.tail:
        present["topk_tail_logprob"] = (torch.float32, (b, length))
    if layout.spans:
        present |= {
            "token_bytes": (torch.int32, (b, length)),
            "token_chars": (torch.int32, (b, length)),
        }
    if layout.realized:
        present["next_token_logprob"] = (torch.float32, (b, length))
    if layout.counts:
        present |= {
            "sampled_logprobs": (logprobs, (b, length, m)),
            "sampled_ids": (ids, (b, length, m)),
            "sampled_counts": (getattr(torch, layout.counts), (b, length, m)),
        }
    fields, offset = [], 0
    for name in FIELDS:
        if name in present:
            dtype, shape = present[name]
            fields.append((name, dtype, shape, offset))
            offset += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
    return fields, offset


def carve(flat: torch.Tensor, layout: Layout) -> dict[str, torch.Tensor]:
    """The batch fields as views of ``flat``, a uint8 tensor of at least the layout's bytes."""
    fields, _ = batch_layout(layout)
    return {
        name: flat[offset : offset + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
        for name, dtype, shape, offset in fields
    }


def layout_of(sequences: list[Sequence]) -> Layout:
    """The layout of the batch of ``sequences`` (``SEQUENCE_FIELDS`` dicts of one store)."""
    first = sequences[0]
    ids = first.get("topk_ids", first.get("sampled_ids"))
    logprobs = first.get("topk_logprobs", first.get("sampled_logprobs"))
    if ids is None or logprobs is None:
        raise ValueError("a sequence without teacher targets (no top-k, no samples)")
    id_dtype, logprob_dtype = compact_dtypes(ids.dtype, logprobs.dtype)
    sampled = "sampled_distinct" in first
    return Layout(
        batch=len(sequences),
        length=max(s["tokens"].shape[0] for s in sequences),
        top_k=first["topk_ids"].shape[1] if "topk_ids" in first else 0,
        tail="topk_tail_logprob" in first,
        # initial=0: a masked sequence without trained positions (which writers refuse) adds none
        samples=max(int(s["sampled_distinct"].max(initial=0)) for s in sequences) if sampled else 0,
        ids=id_dtype,
        logprobs=logprob_dtype,
        counts=str(first["sampled_counts"].dtype) if sampled else "",
        spans="token_ends" in first and "text" in first,
        realized="next_token_logprob" in first,
    )


def trained_positions(sequence: Sequence) -> np.ndarray | None:
    """(T,) int64 positions a masked sequence trains (its target rows, in order); None: all.

    Raises:
        ValueError: the mask does not fit the tokens, or a target field has not T rows.
    """
    mask = sequence.get("loss_mask")
    if mask is None:
        return None
    n = sequence["tokens"].shape[0]
    if mask.shape != (n,):
        raise ValueError(f"a loss mask of shape {mask.shape} for a sequence of {n} tokens")
    positions = np.flatnonzero(mask)  # (T,)
    for name in (*TARGET_ROWS, "sampled_distinct"):
        if name in sequence and sequence[name].shape[0] != positions.shape[0]:
            raise ValueError(
                f"a sequence trains {positions.shape[0]} positions but has "
                f"{sequence[name].shape[0]} rows of {name}"
            )
    return positions


def _place_samples(
    a: dict[str, np.ndarray], i: int, sequence: Sequence, positions: np.ndarray | None
) -> None:
    """Spread a sequence's flat sampled entries (M_s,) over batch row i: (L, m), padding 0.

    Row r of ``sampled_distinct`` belongs to position ``positions[r]`` (r itself without a mask).
    """
    distinct = sequence["sampled_distinct"].astype(np.int64)  # (R,) one row per target row
    total = int(distinct.sum())
    row = np.repeat(np.arange(distinct.shape[0]), distinct)  # (M_s,) the row of each entry
    position = row if positions is None else positions[row]  # (M_s,) its position
    starts = np.cumsum(distinct) - distinct  # (R,) first entry of each row
    column = np.arange(total) - starts[row]  # (M_s,) its place in the row
    for name in ("sampled_ids", "sampled_counts", "sampled_logprobs"):
        a[name][i] = 0
        a[name][i, position, column] = sequence[name]


def collate(
    sequences: list[Sequence],
    pad_id: int = 0,
    *,
    out: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Pad and stack sequences (``SEQUENCE_FIELDS`` dicts, tokens (L,), ...) into a batch.

    A masked sequence's T target rows go to its trained positions (zeros elsewhere), its
    untrained positions get label -100 and ``loss_mask`` 0 (see the module docstring).

    Args:
        sequences: per sequence, numpy arrays in the store's dtypes.
        pad_id: ``input_ids`` value of padding.
        out: a uint8 buffer to write the batch into (else fresh memory), e.g. pinned memory.
    """
    layout = layout_of(sequences)
    if out is None:
        out = torch.empty(batch_layout(layout)[1], dtype=torch.uint8)
    batch = carve(out, layout)
    a = {name: t.numpy() for name, t in batch.items()}  # numpy views of the same memory
    if layout.ids == "int32":  # same bits; ids < 2³¹
        a |= {name: a[name].view(np.uint32) for name in ("topk_ids", "sampled_ids") if name in a}
    for i, sequence in enumerate(sequences):
        tokens = sequence["tokens"]
        n = tokens.shape[0]
        positions = trained_positions(sequence)  # (T,), or None: every position 0..n-1
        a["input_ids"][i, :n] = tokens  # (n,) int32 → int64
        a["input_ids"][i, n:] = pad_id
        # Hugging Face labels: unshifted (the model's loss shifts them), -100 where position t
        # is not predicted: t = 0, padding, and after a position the store's mask does not train
        a["labels"][i, :n] = tokens
        a["labels"][i, 0] = IGNORE_INDEX
        a["labels"][i, n:] = IGNORE_INDEX
        a["attention_mask"][i, :n] = 1
        a["attention_mask"][i, n:] = 0
        if positions is None:
            a["loss_mask"][i] = a["attention_mask"][i]
            for name in TARGET_ROWS:
                if name in a:
                    a[name][i, :n] = sequence[name]  # (n, k) or (n,), same width: a plain copy
                    a[name][i, n:] = 0
        else:
            a["labels"][i, 1:n][sequence["loss_mask"][: n - 1] == 0] = IGNORE_INDEX
            a["loss_mask"][i] = 0
            a["loss_mask"][i, positions] = 1
            for name in TARGET_ROWS:
                if name in a:
                    a[name][i] = 0
                    a[name][i, positions] = sequence[name]  # (T, k) or (T,) rows → positions
        if layout.counts:
            _place_samples(a, i, sequence, positions)
        if layout.spans:
            a["token_bytes"][i, :n], a["token_chars"][i, :n] = token_sizes(sequence)
            a["token_bytes"][i, n:] = a["token_chars"][i, n:] = 0
        if layout.realized:  # NaN at the last position (no next token): 0, never labelled
            a["next_token_logprob"][i, :n] = np.nan_to_num(sequence["next_token_logprob"], nan=0.0)
            a["next_token_logprob"][i, n:] = 0
    return batch


def token_sizes(sequence: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """(bytes, characters) of the text each token spells, (L,) each, from the sequence's
    ``text`` (UTF-8) and ``token_ends`` (L,): token i spans ``text[ends[i-1]:ends[i]]``; a
    character counts in the token holding its first byte."""
    ends = sequence["token_ends"].astype(np.int64)  # (L,)
    starts = np.concatenate([[0], ends[:-1]])  # (L,)
    text = np.frombuffer(sequence["text"], dtype=np.uint8)  # (bytes,)
    if ends.size and (ends[-1] > text.size or (ends < starts).any()):
        raise ValueError(f"token spans up to byte {ends.max()} of a {text.size}-byte text")
    leading = np.concatenate([[0], np.cumsum((text & 0xC0) != 0x80)])  # (bytes + 1,)
    return ends - starts, leading[ends] - leading[starts]


def batch_to_device(batch: dict[str, Any], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Copy a loader batch to ``device``, then widen ids and counts (``WIDENED``) to int64 there.

    The batch crosses the host→device link in its compact dtypes (~3× fewer bytes than
    int64/float32); log-probs stay float16, the losses upcast them per token chunk.
    """
    return {
        name: widen_ids(t, device) if name in WIDENED else t.to(device, non_blocking=True)
        for name, t in batch.items()
    }
