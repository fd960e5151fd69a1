"""A student's output head, applied to its final hidden states a chunk of token rows at a time.

Every loss and metric of stage two reaches the student's vocab-wide logits through this: the
model's own forward runs with a hook on its output embedding that keeps the head's input
(the final hidden states, after the model's own norm and any scaling of hidden states) and
hands the head zero rows, so the model computes no logits at all. ``StudentHead.logits`` then
applies the head — its rows for the tokenizer's ids only (padded embedding rows dropped), bias
and tied embeddings as they are — and the model's final-logit transform (logit scaling,
soft-capping; read by ``logit_head``) to one chunk of rows. Going through the model's forward
(not its body alone) keeps DDP's hooks and gradient checkpointing in place.

A probe at construction compares this with the model's own logits (float32, eval mode). A
student whose head cannot be split off this way (no output embedding module, a forward that
does not call it, a sharded head under FSDP, a transform we do not know) is trained from its
whole logits instead — ``whole_logits`` — with a one-line ``note`` for the user: never
silently different.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.vocabulary import check_batch_ids, embedding_rows, student_logits
from kdcache.pipeline.logit_head import logit_head

_PROBE_TOKENS = 12
_HEADS: weakref.WeakKeyDictionary[Any, StudentHead] = weakref.WeakKeyDictionary()


def unwrap(model: Any) -> Any:
    """The module inside DDP / Accelerate wrappers (``.module``), or ``model`` itself."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The autocast dtype in force on ``device_type``, None when autocast is off."""
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


@contextlib.contextmanager
def _hidden_capture(lm_head: torch.nn.Module) -> Iterator[list[Any]]:
    """Within it, ``lm_head`` records its input (B, L, H) and the autocast it runs under, and
    computes on zero rows (B, 0, H)."""
    seen: list[Any] = []

    def keep_input(_module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        seen.append((hidden, _autocast_dtype(hidden.device.type)))
        return (hidden[..., :0, :], *args[1:])

    handle = lm_head.register_forward_pre_hook(keep_input)
    try:
        yield seen
    finally:
        handle.remove()


class StudentHead:
    """The student's logits, chunk by chunk, from the hidden states its head is given.

    Args:
        model: the student (possibly wrapped by DDP / Accelerate).
        vocab: the store's tokenizer size: logits cover these ids only; None: every head row.

    Attributes:
        whole_logits: the head could not be split off; ``rows`` returns the model's logits.
        note: why, in one line (None when the head is split off).
    """

    def __init__(self, model: Any, vocab: int | None) -> None:
        inner = unwrap(model)
        self.vocab = vocab
        self.whole_logits = False
        self.note: str | None = None
        self.lm_head: Any = None
        self.autocast: torch.dtype | None = None  # as the model's forward ran its head
        self.multiplier = self.divisor = self.softcap = None
        try:
            self.lm_head = inner.get_output_embeddings()
            transform = logit_head(inner)
        except (AttributeError, NotImplementedError, TypeError, ValueError) as e:
            self._fall_back(inner, f"its output head cannot be found ({e})")
            return
        if not isinstance(self.lm_head, torch.nn.Linear):
            self._fall_back(inner, f"its output head is a {type(self.lm_head).__name__}")
            return
        weight = self.lm_head.weight
        if type(weight) not in (torch.Tensor, torch.nn.Parameter) or weight.is_meta:
            # FSDP2 keeps a DTensor shard outside the forward; accelerate offload a meta tensor
            what = "sharded (FSDP)" if type(weight).__name__ == "DTensor" else "not in memory"
            self._fall_back(inner, f"its head's weight is {what} outside its forward")
            return
        # the hook sees the head's input, so a division of the hidden states is already done
        self.multiplier = transform.logit_multiplier
        self.divisor = transform.logit_divisor
        self.softcap = transform.softcap
        self._probe(inner)

    def _fall_back(self, inner: Any, why: str) -> None:
        self.whole_logits = True
        self.note = (
            f"{type(inner).__name__}: {why}; the loss is computed from its whole logits, "
            "whose memory grows with tokens x vocabulary"
        )

    @property
    def params(self) -> tuple[torch.Tensor, ...]:
        """The head's weight (V, H) and bias (V,), if any; () in the whole-logits mode."""
        if self.whole_logits:
            return ()
        bias = self.lm_head.bias
        return (self.lm_head.weight,) if bias is None else (self.lm_head.weight, bias)

    def columns(self, rows: torch.Tensor) -> int:
        """V': the logits' width for ``rows`` of ``rows(...)`` (sizes a chunk)."""
        if self.whole_logits:
            return int(rows.shape[-1])
        return self.vocab or int(self.lm_head.weight.shape[0])

    def rows(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The model's forward on ``batch``, its ids checked first: (B, L, H) hidden states the
        head is given, or (B, L, V') logits over the tokenizer's ids in the whole-logits mode."""
        if self.whole_logits:
            return student_logits(model, batch, self.vocab)  # (B, L, V'), ids checked there
        check_batch_ids(batch, embedding_rows(model), self.vocab)
        with _hidden_capture(self.lm_head) as seen:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if len(seen) != 1:
            raise RuntimeError(f"the student's head was called {len(seen)} times in a forward")
        hidden, self.autocast = seen[0]  # the head runs per chunk under the model's autocast
        return hidden

    def project(self, rows: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        """(n, H) rows → (n, V') raw head output, before the final-logit transform.

        ``params`` replaces ``self.params`` (the fused loss passes detached copies); in the
        whole-logits mode the rows are the logits already.
        """
        if self.whole_logits:
            return rows
        weight, *bias = params or self.params
        columns = slice(None) if self.vocab is None else slice(0, self.vocab)
        with self.autocast_context(rows.device.type):
            return F.linear(rows, weight[columns], bias[0][columns] if bias else None)

    def autocast_context(self, device_type: str) -> contextlib.AbstractContextManager[Any]:
        """The autocast the model's forward ran its head under (mixed precision), unless one
        is in force already; the head's matmuls, forward and backward, run in it."""
        cast = self.autocast is not None and _autocast_dtype(device_type) is None
        return torch.autocast(device_type, dtype=self.autocast, enabled=cast)

    def transform(self, raw: torch.Tensor) -> torch.Tensor:
        """The model's final-logit transform, out of place (differentiable): (n, V') → (n, V');
        none in the whole-logits mode (the model applied it)."""
        if self.whole_logits:
            return raw
        if self.multiplier is not None:
            raw = raw * self.multiplier
        if self.divisor is not None:
            raw = raw / self.divisor
        if self.softcap is not None:
            raw = torch.tanh(raw / self.softcap) * self.softcap
        return raw

    def logits(self, rows: torch.Tensor) -> torch.Tensor:
        """(n, H) rows of ``rows(...)`` → (n, V') logits (a view in the whole-logits mode)."""
        return self.transform(self.project(rows))

    @torch.no_grad()
    def _probe(self, inner: Any) -> None:
        """Compare the split head with the model's own logits on a few tokens; fall back if they
        differ by more than float rounding."""
        parameter = next(inner.parameters())
        ids_limit = self.vocab or int(self.lm_head.weight.shape[0])
        ids = torch.arange(_PROBE_TOKENS, device=parameter.device)[None] % ids_limit  # (1, P)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        was_training = inner.training
        inner.eval()
        try:
            with torch.random.fork_rng(devices=[]):
                reference = inner(**batch).logits[0].float()  # (P, V)
                if self.vocab is not None:
                    reference = reference[:, : self.vocab]
                ours = self.logits(self.rows(inner, batch)[0]).float()  # (P, V')
        except Exception as e:  # an unusual architecture: the head cannot be split off
            self._fall_back(inner, f"its head cannot be applied apart ({type(e).__name__}: {e})")
            return
        finally:
            inner.train(was_training)
        eps = torch.finfo(self.autocast or parameter.dtype).eps
        tolerance = 1e-4 + 16 * eps * float(reference.abs().max())
        error = float((ours - reference).abs().max()) if ours.shape == reference.shape else None
        if error is None or error > tolerance:
            found = "another shape" if error is None else f"logits {error:.3g} apart"
            self._fall_back(inner, f"its head applied apart gives {found} from its own forward")


def student_head(model: Any, vocab: int | None) -> StudentHead:
    """The ``StudentHead`` of ``model`` for ``vocab``, probed once per model and vocab."""
    inner = unwrap(model)
    head = _HEADS.get(inner)
    if head is None or head.vocab != vocab:
        head = _HEADS[inner] = StudentHead(inner, vocab)
    return head
