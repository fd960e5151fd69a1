"""A loss over token rows whose gradient is taken in the forward, one chunk of rows at a time.

For each chunk of rows the head's vocab-wide logits are computed, the chunk's loss and its
gradient with respect to them are taken at once, and the gradient is pushed through the head by
hand (rows: ``g @ W``; weight: ``W.grad += gᵀ @ rows``; bias: ``Σ g``) into buffers the size of
the inputs. Then the chunk's vocab-wide tensors are freed. The backward only scales those
buffers by the incoming gradient. So no [rows, V] tensor outlives its chunk, in the forward or
the backward, and nothing is computed twice: activation checkpointing would run the head and
the loss again in the backward (about a third more time at a 32k vocabulary). Fused linear
cross-entropy kernels (Liger, Cut Cross-Entropy) take the same route inside one kernel for one
loss; here each chunk is ordinary torch code, so every loss and final-logit transform works.

The weights of the KD and CE sums in the total must be known in the forward (the token counts
of the whole optimizer step are), and the graph can be walked back once (no ``retain_graph``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, Protocol

import torch

# (logits (n, V') of one chunk, the chunk's rows) -> (KD sum, CE sum), float32 scalars
ChunkLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


class Head(Protocol):
    """What the fused loss needs of a head (``student_head.StudentHead``)."""

    whole_logits: bool
    vocab: int | None

    @property
    def params(self) -> tuple[torch.Tensor, ...]: ...

    def columns(self, rows: torch.Tensor) -> int: ...

    def autocast_context(self, device_type: str) -> contextlib.AbstractContextManager[Any]: ...

    def project(self, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor: ...

    def transform(self, raw: torch.Tensor) -> torch.Tensor: ...


class IdentityHead:
    """The head of rows that are logits already (a user who has only a model's logits)."""

    whole_logits = True
    vocab = None
    params: tuple[torch.Tensor, ...] = ()

    def columns(self, rows: torch.Tensor) -> int:
        return int(rows.shape[-1])

    def autocast_context(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def project(self, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        return rows

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        return raw


def _push_through_head(
    grad_raw: torch.Tensor,
    rows: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    grads: list[torch.Tensor | None],
    vocab: int | None,
) -> torch.Tensor:
    """Accumulate the head's parameter gradients of one chunk; return the rows' gradient.

    grad_raw (n, V'), rows (n, H), params (weight (V, H)[, bias (V,)]) → (n, H).
    """
    weight = params[0]
    columns = slice(None) if vocab is None else slice(0, vocab)
    g = grad_raw.to(rows.dtype)
    if grads[0] is not None:
        grads[0][columns] += (g.t() @ rows).to(grads[0].dtype)  # (V', H)
    if len(params) > 1 and grads[1] is not None:
        grads[1][columns] += g.sum(0).to(grads[1].dtype)  # (V',)
    return (g @ weight[columns]).to(rows.dtype)  # (n, H)


class _GradInForward(torch.autograd.Function):
    """total = w_kd · Σ KD + w_ce · Σ CE over every chunk; see the module docstring."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        head: Head,
        chunk_loss: ChunkLoss,
        weights: tuple[float, float],
        chunk_rows: int,
        rows: torch.Tensor,
        *params: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        need_rows = ctx.needs_input_grad[4]
        need_params = ctx.needs_input_grad[5:]
        need_any = need_rows or any(need_params)
        grad_rows = torch.zeros_like(rows) if need_rows else None  # (N, H)
        grads: list[torch.Tensor | None] = [
            torch.zeros_like(p) if need else None
            for p, need in zip(params, need_params, strict=True)
        ]
        detached = tuple(p.detach() for p in params)
        kd_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        ce_sum = torch.zeros((), dtype=torch.float32, device=rows.device)
        w_kd, w_ce = weights
        for start in range(0, rows.shape[0], chunk_rows):
            chunk = slice(start, start + chunk_rows)
            x = rows[chunk].detach()  # (n, H)
            raw = head.project(x, *detached)  # (n, V')
            with torch.enable_grad():
                raw_leaf = raw.detach().requires_grad_(need_any)
                kd, ce = chunk_loss(head.transform(raw_leaf), chunk)
                if need_any:
                    (grad_raw,) = torch.autograd.grad(w_kd * kd + w_ce * ce, raw_leaf)
            kd_sum += kd.detach()
            ce_sum += ce.detach()
            if not need_any:
                continue
            if head.whole_logits:
                if grad_rows is not None:
                    grad_rows[chunk] = grad_raw
            else:
                with head.autocast_context(x.device.type):  # the head's precision
                    grad_x = _push_through_head(grad_raw, x, detached, grads, head.vocab)
                if grad_rows is not None:
                    grad_rows[chunk] = grad_x
            del raw, raw_leaf, grad_raw
        ctx.grads = (grad_rows, *grads)
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return w_kd * kd_sum + w_ce * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_total: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        grads = ctx.grads
        ctx.grads = None  # the buffers go to the caller: a second backward is not supported
        scaled = tuple(None if g is None else g.mul_(grad_total.to(g.dtype)) for g in grads)
        return (None, None, None, None, *scaled)


def fused_chunk_loss(
    head: Head,
    rows: torch.Tensor,
    params: tuple[torch.Tensor, ...],
    chunk_loss: ChunkLoss,
    *,
    weights: tuple[float, float],
    chunk_rows: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``w_kd · Σ KD + w_ce · Σ CE`` over ``rows`` (N, H) in chunks of ``chunk_rows``.

    Args:
        head: projects a chunk of rows to its raw logits and applies the final transform.
        rows: (N, H) hidden rows (or (N, V') logits for an ``IdentityHead`` / whole logits).
        params: the head's parameters (``head.params``) whose gradients are taken.
        chunk_loss: the chunk's (KD sum, CE sum) from its logits.
        weights: (w_kd, w_ce).

    Returns:
        (total, KD sum, CE sum): float32 scalars; only ``total`` is differentiable.
    """
    total, kd_sum, ce_sum = _GradInForward.apply(
        head, chunk_loss, weights, max(1, chunk_rows), rows, *params
    )
    return total, kd_sum, ce_sum
