"""Log-probs as numbers and as stored: bfloat16 bit patterns, the stored dtype of a log-prob
field, and the top-k tail mass computed from a row when the teacher's was not kept."""

from __future__ import annotations

from typing import Any

import numpy as np
import numpy.typing as npt

NDArray = npt.NDArray[Any]


def tail_from_topk(logprobs: NDArray, *, complete: bool = False) -> npt.NDArray[np.float32]:
    """log(1 - sum(exp(row))) of top-k rows (N, k), in float64, as float32 (N,).

    The mass is clamped to 1 (then the tail is -inf); ``complete`` (k = vocab) gives -inf
    outright. Inexact for a small tail when the rows are float16: prefer the teacher's
    logsumexp over the other ids where it is at hand.
    """
    if complete:
        return np.full(logprobs.shape[0], -np.inf, np.float32)
    mass = np.exp(logprobs.astype(np.float64)).sum(axis=-1)  # (N,)
    with np.errstate(divide="ignore"):
        tail: npt.NDArray[np.float32] = np.log1p(-np.minimum(mass, 1.0)).astype(np.float32)
    return tail


def bf16_to_float32(raw: npt.NDArray[np.uint16]) -> npt.NDArray[np.float32]:
    """Raw bfloat16 bit patterns (any shape) -> float32 (exact)."""
    return (raw.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: NDArray) -> npt.NDArray[np.uint16]:
    """float32 (any shape) -> raw bfloat16 bit patterns, round-to-nearest-even like torch."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    out = (rounded >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        out[nan] = 0x7FC0
    return out


def stored_logprobs(values: NDArray, logprob_dtype: str) -> NDArray:
    """Log-probs (any shape, any float, or raw bfloat16 bits) in the dtype they are stored in."""
    if logprob_dtype == "bfloat16":
        if values.dtype == np.uint16:
            return values
        return float32_to_bf16(values.astype(np.float32, copy=False))
    return values.astype(logprob_dtype, copy=False)


def decoded_logprobs(raw: NDArray, logprob_dtype: str) -> NDArray:
    """Stored log-probs as numbers: float16/float32 as they are, bfloat16 as float32."""
    return bf16_to_float32(raw) if logprob_dtype == "bfloat16" else raw
