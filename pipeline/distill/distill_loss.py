"""The distillation loss of a store, for any training loop: ``DistillLoss`` and the student
checks it makes first.

    loss_fn = DistillLoss(dataset, loss="auto", temperature=1.0, alpha=0.5)
    loss_fn.check_student(model, tokenizer)  # the store's ids must be the student's ids
    terms = loss_fn(model, batch)            # the model's forward, the head per chunk
    terms.total.backward()

``__call__`` runs the model's own forward with its output head split off (``student_head.py``:
the loss is taken from the final hidden states a chunk of rows at a time, never building the
(B, L, V) logits); ``from_hidden`` takes hidden states and a head the caller made, and
``from_logits`` the logits of a model whose head cannot be split off. All three give the same
``LossTerms`` as ``kdcache train-student`` for the same batch: ``total`` is
``alpha · KD + (1 − alpha) · CE`` with KD averaged over the trained positions (``loss_mask``)
and CE over the labelled next tokens, or over ``kd_tokens``/``ce_tokens`` when given (a whole
optimizer step over every rank: gradient accumulation, data parallel).
"""

from __future__ import annotations

from typing import Any

import torch

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.checks import check_store
from kdcache.pipeline.distill.cross_tokenizer import CROSS_LOSS, cross_batch_loss
from kdcache.pipeline.distill.dataset import DistillDataset
from kdcache.pipeline.distill.fused_chunks import IdentityHead
from kdcache.pipeline.distill.live_teacher import LiveTeacher
from kdcache.pipeline.distill.losses import LossTerms, batch_loss
from kdcache.pipeline.distill.student_head import StudentHead, student_head
from kdcache.pipeline.distill.vocabulary import check_batch_ids, embedding_rows
from kdcache.pipeline.errors import UserError
from kdcache.storage import Store, sample_temperature


class DistillLoss:
    """The loss a store's targets train (see the module docstring).

    Args:
        source: the ``DistillDataset`` (or the open ``Store``) the batches come from.
        loss: "auto" (sampled-kl for a store with samples, else ghost), "kl", "ghost",
            "reverse-kl", "sampled-kl" or "ce" (``losses.LOSSES``); "alm" for a student with
            its own tokenizer, on ``CrossTokenizerCollator`` batches (``cross_tokenizer.py``).
        temperature: KD temperature (CE always at 1); sampled-kl only at the draws' own.
        alpha: the KD weight; CE gets ``1 − alpha``.
        student_tokenizer: the student's tokenizer. When it is not the store's (any token's
            id differs, or one of them lacks it), the student reads ``CrossTokenizerCollator``
            batches and its logits cover its own ids; "auto" is train-student's choice from a
            probe of the stored text (``student_tokenizer.cross_loss``), and "alm",
            "sampled-kl" (the matched draws) and "ce" are taken.

    Raises:
        UserError: the store lacks the targets ``loss`` needs, or the temperature does not fit.
    """

    def __init__(
        self,
        source: DistillDataset | Store,
        *,
        loss: str = "auto",
        temperature: float = 1.0,
        alpha: float = 0.5,
        student_tokenizer: Any = None,
    ) -> None:
        from kdcache.pipeline.distill.student import load_store_tokenizer
        from kdcache.pipeline.distill.student_tokenizer import (
            check_encodes,
            cross_collator,
            cross_loss,
        )

        store = source.store if isinstance(source, DistillDataset) else source
        self.store: Store | None = store
        self.student_tokenizer = None  # set for a student with its own tokenizer
        if student_tokenizer is not None and (
            student_tokenizer.get_vocab() != load_store_tokenizer(store).get_vocab()
        ):
            self.student_tokenizer = student_tokenizer
            if loss == "auto":  # train-student's choice, from a probe of the stored text
                probe = cross_collator(store, student_tokenizer)
                check_encodes(store, probe)
                loss = cross_loss(loss, store, probe)
            if loss not in (CROSS_LOSS, "sampled-kl", "ce"):
                raise UserError(
                    f"a student with its own tokenizer learns by --loss {CROSS_LOSS}, sampled-kl "
                    f"(matched draws) or ce, not {loss}"
                )
            if loss == "sampled-kl":
                check_store(store, loss, temperature=temperature)  # a store with samples
        cross = loss == CROSS_LOSS or self.student_tokenizer is not None
        self.loss = loss if cross else check_store(store, loss, temperature=temperature)
        self.temperature, self.alpha = temperature, alpha
        # the logits' ids: the store's tokenizer's, or the student's own (all of them)
        self.vocab: int | None = store.tokenizer_size if not cross else None
        if self.student_tokenizer is not None:
            self.vocab = len(self.student_tokenizer)
        self.sample_temperature = sample_temperature(store.manifest) or 1.0

    @classmethod
    def resolved(
        cls,
        *,
        loss: str,
        temperature: float,
        alpha: float,
        vocab: int | None,
        sample_temperature: float = 1.0,
    ) -> DistillLoss:
        """The loss from settings already checked against a store (train-student's trainees:
        ``loss`` resolved, ``vocab`` the store's tokenizer size)."""
        made = cls.__new__(cls)
        made.store = None
        made.loss, made.temperature, made.alpha = loss, temperature, alpha
        made.vocab, made.sample_temperature = vocab, sample_temperature
        return made

    def check_student(self, model: Any, tokenizer: Any = None) -> None:
        """The student must read the store's ids: its embedding covers the store's tokenizer,
        and ``tokenizer`` (when given) maps every token to the store tokenizer's id.

        Raises:
            UserError: naming the first token whose id differs, or the sizes.
        """
        if self.store is None:
            raise ValueError("check_student needs the loss made from a store (DistillLoss(store))")
        rows = embedding_rows(model)
        if rows is not None and self.vocab is not None and rows < self.vocab:
            whose = "the store's" if self.student_tokenizer is None else "its own"
            raise UserError(
                f"the student's embedding has {rows} rows, {whose} tokenizer {self.vocab} "
                f"ids, {self.store.url}; build the student on {whose} tokenizer"
            )
        if tokenizer is not None and self.student_tokenizer is None:
            check_tokenizer(self.store, tokenizer)

    def head(self, model: Any) -> StudentHead:
        """The model's head split off (probed once per model; see ``student_head``)."""
        return student_head(model, self.vocab)

    def __call__(
        self,
        model: Any,
        batch: dict[str, torch.Tensor],
        *,
        kd_tokens: int | None = None,
        ce_tokens: int | None = None,
    ) -> LossTerms:
        """The loss of ``model`` on ``batch`` (a ``DistillCollator`` batch, on any device)."""
        head = self.head(model)
        batch = self.to_device(batch, model)
        return self.from_hidden(
            head.rows(model, batch), head, batch, kd_tokens=kd_tokens, ce_tokens=ce_tokens
        )

    def to_device(self, batch: dict[str, torch.Tensor], model: Any) -> dict[str, torch.Tensor]:
        """``batch`` on the model's device with its ids widened to int64, checked against the
        student's embedding and the store's ids."""
        device = next(model.parameters()).device
        batch = batch_to_device(batch, device)
        check_batch_ids(batch, embedding_rows(model), self.vocab)
        return batch

    def from_hidden(
        self,
        hidden: torch.Tensor,
        head: StudentHead,
        batch: dict[str, torch.Tensor],
        *,
        kd_tokens: int | None = None,
        ce_tokens: int | None = None,
        teacher: LiveTeacher | None = None,
    ) -> LossTerms:
        """The loss from (B, L, H) final hidden states and the model's ``head``; with a live
        ``teacher`` (online KD) from the batch's ``teacher_hidden`` instead of stored targets;
        for a cross-tokenizer student (``alm``) from its batch's chunks."""
        if self.loss == CROSS_LOSS:
            return cross_batch_loss(
                hidden, batch, head, temperature=self.temperature, alpha=self.alpha,
                kd_tokens=kd_tokens, ce_tokens=ce_tokens,
            )  # fmt: skip
        return batch_loss(
            hidden,
            batch,
            head=head,
            loss=self.loss,
            temperature=self.temperature,
            alpha=self.alpha,
            kd_tokens=kd_tokens,
            ce_tokens=ce_tokens,
            teacher=teacher,
            sample_temperature=self.sample_temperature,
        )

    def from_logits(
        self,
        logits: torch.Tensor,
        batch: dict[str, torch.Tensor],
        *,
        kd_tokens: int | None = None,
        ce_tokens: int | None = None,
    ) -> LossTerms:
        """The loss from (B, L, V') logits (sliced to the store's V ids here)."""
        if self.loss == CROSS_LOSS:
            return cross_batch_loss(
                logits if self.vocab is None else logits[..., : self.vocab], batch,
                IdentityHead(), temperature=self.temperature, alpha=self.alpha,
                kd_tokens=kd_tokens, ce_tokens=ce_tokens,
            )  # fmt: skip
        return batch_loss(
            logits if self.vocab is None else logits[..., : self.vocab],
            batch,
            loss=self.loss,
            temperature=self.temperature,
            alpha=self.alpha,
            kd_tokens=kd_tokens,
            ce_tokens=ce_tokens,
            sample_temperature=self.sample_temperature,
        )


def check_tokenizer(store: Store, tokenizer: Any) -> None:
    """``tokenizer`` must give every token the id the store's tokenizer gives it.

    Raises:
        UserError: naming a token whose id differs (or that one of them lacks).
    """
    from kdcache.pipeline.distill.student import load_store_tokenizer

    ours, theirs = load_store_tokenizer(store).get_vocab(), tokenizer.get_vocab()
    if ours == theirs:
        return
    differ = sorted(t for t in ours.keys() | theirs.keys() if ours.get(t) != theirs.get(t))
    token = differ[0]
    raise UserError(
        f"the student's tokenizer is not the store's: {len(differ)} tokens differ, e.g. "
        f"{token!r} is {ours.get(token, 'missing')} in the store and "
        f"{theirs.get(token, 'missing')} in the student's, {store.url}; train the student on "
        "the store's tokenizer (kdcache.pipeline.distill.load_store_tokenizer)"
    )
