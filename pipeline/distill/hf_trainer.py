"""A logit store in the Hugging Face ``Trainer``: ``DistillTrainer`` (and ``DistillMixin`` for
Trainer subclasses such as TRL's ``SFTTrainer``, ``trl_recipe.py``).

    trainer = DistillTrainer(model, TrainingArguments(..., max_steps=300), store="artifacts/store")
    trainer.train()

Why a subclass and not ``compute_loss_func`` + a collator: ``compute_loss_func`` is handed the
model's outputs and ``labels`` only, after ``model(**inputs)`` — the teacher's targets never reach
it, the forward would get them as unknown arguments, and the model would build its (B, L, V)
logits, which the loss from hidden states exists to avoid. So the subclass overrides:

- ``get_train_dataloader``: a DataLoader over ``DistillDataset`` with each process reading its
  own rows of every global micro-batch (``per_device_train_batch_size`` × processes), in the
  order ``kdcache train-student`` reads; not handed to ``accelerator.prepare``, which would make
  every process read everything (or one process read and send everything). The teacher fields
  reach the loss whatever ``remove_unused_columns`` says (the forward gets only its inputs).
- ``get_batch_samples``: the step's trained and labelled token counts, summed over processes,
  so gradient accumulation and data parallelism give the gradient of one large batch (as in
  ``train-student``), and ``compute_loss``: ``DistillLoss`` on the hidden states, under the
  Trainer's autocast (bf16/fp16 flags).
- ``get_resumed_dataloader``: resuming skips the steps taken by stream position, reading nothing.
- ``evaluate``: kdcache's metrics on the store's eval split (cross-entropy, perplexity, KL to
  the teacher where the targets allow it; ``evaluation.py``), the figures ``train-student``
  reports, logged with the ``eval_`` prefix to every ``report_to`` tracker.
"""

from __future__ import annotations

import functools
import sys
from typing import Any, NamedTuple

import torch

from kdcache.pipeline.distill.dataset import DistillCollator, DistillDataset
from kdcache.pipeline.distill.distill_loss import DistillLoss
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.loader import eval_batches
from kdcache.pipeline.distill.losses import IGNORE_INDEX
from kdcache.pipeline.distill.student_tokenizer import cross_collator
from kdcache.pipeline.distill.trainee import kd_units
from kdcache.pipeline.errors import UserError
from kdcache.storage import Store, open_store


class StepTokens(NamedTuple):
    """What a step's terms are averaged by, over every micro-batch and process."""

    kd: int  # trained positions (``loss_mask``)
    ce: int  # labelled next tokens


def _store(store: Store | str, storage_options: dict[str, Any] | None) -> Store:
    return store if isinstance(store, Store) else open_store(store, storage_options=storage_options)


class DistillMixin:
    """The store, loss and data of a distilling ``Trainer`` subclass (see the module docstring).

    Keyword args (before the Trainer's own):
        store: the logit store (an open ``Store`` or its URL).
        loss, temperature, alpha: as ``DistillLoss`` (and ``train-student``).
        buffer_size: the shuffle window, in sequences.
        eval_batches: eval micro-batches per evaluation (None: the whole eval split).
        storage_options: fsspec options for a store URL.
    """

    loss_is_scaled_for_ga = True  # compute_loss averages over the whole step already
    distill_data: DistillDataset
    distill_loss: DistillLoss

    def _setup_distillation(
        self,
        model: Any,
        args: Any,
        kwargs: dict[str, Any],
        *,
        store: Store | str,
        loss: str,
        temperature: float,
        alpha: float,
        buffer_size: int,
        eval_batches: int | None,
        storage_options: dict[str, Any] | None,
    ) -> dict[str, Any]:
        """Check the settings and the student, build the dataset; the Trainer's kwargs."""
        for name in ("train_dataset", "eval_dataset", "data_collator"):
            if kwargs.get(name) is not None:
                raise UserError(
                    f"{type(self).__name__} reads its data from the store; drop {name}= "
                    "(the store's train and eval splits are used)"
                )
        if args.max_steps is None or args.max_steps <= 0:
            raise UserError(
                "the store is read as an endless stream of epochs: set TrainingArguments("
                "max_steps=N) (num_train_epochs does not apply)"
            )
        if args.n_gpu > 1:
            raise UserError(
                f"{args.n_gpu} GPUs in one process (torch DataParallel) is not supported: launch "
                "one process per GPU with torchrun or accelerate launch"
            )
        opened = _store(store, storage_options)
        tokenizer = kwargs.get("processing_class")
        self.distill_loss = DistillLoss(
            opened, loss=loss, temperature=temperature, alpha=alpha, student_tokenizer=tokenizer
        )
        self.distill_loss.check_student(model, tokenizer)
        pad = getattr(tokenizer, "pad_token_id", None)
        # a student with its own tokenizer reads the stored text re-tokenized
        self.distill_cross = cross_collator(opened, self.distill_loss.student_tokenizer)
        world = args.world_size
        self.distill_data = DistillDataset(
            opened,
            "train",
            batch_size=args.per_device_train_batch_size * world,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            buffer_size=buffer_size,
            rank=args.process_index,
            world_size=world,
            pad_id=pad if pad is not None else 0,
        )
        self.distill_eval_batches = eval_batches
        evaluated = None  # what the Trainer checks for; ``evaluate`` reads the split itself
        if opened.shards_of("eval"):
            evaluated = DistillDataset(
                opened, "eval", batch_size=args.per_device_eval_batch_size * world,
                shuffle=False, infinite=False, rank=args.process_index, world_size=world,
                deal="batches",
            )  # fmt: skip
        return {
            **kwargs,
            "train_dataset": self.distill_data,
            "eval_dataset": evaluated,
            "data_collator": self.distill_cross or DistillCollator(self.distill_data),
        }

    def _note_parallelism(self) -> None:
        """One line when FSDP was asked for and Accelerate did not apply it (it shards only on
        GPUs): the processes then train data-parallel, the same student."""
        from accelerate.utils import DistributedType

        accelerator: Any = self.accelerator  # type: ignore[attr-defined]
        asked = bool(self.args.fsdp)  # type: ignore[attr-defined]
        ignored = asked and accelerator.distributed_type != DistributedType.FSDP
        if ignored and accelerator.is_main_process:
            print(
                f"Note: the FSDP configuration is not applied on the {accelerator.device.type} "
                f"(Accelerate shards only on GPUs): {accelerator.num_processes} processes "
                "train data-parallel, the same student",
                file=sys.stderr,
            )

    def get_train_dataloader(self) -> torch.utils.data.DataLoader:  # type: ignore[type-arg]
        args: Any = self.args  # type: ignore[attr-defined]
        workers = args.dataloader_num_workers
        return torch.utils.data.DataLoader(
            self.distill_data,
            batch_size=self.distill_data.batch_rows,
            collate_fn=self.distill_cross or DistillCollator(self.distill_data),
            num_workers=workers,
            pin_memory=args.dataloader_pin_memory and torch.cuda.is_available(),
            persistent_workers=args.dataloader_persistent_workers and workers > 0,
            prefetch_factor=args.dataloader_prefetch_factor if workers > 0 else None,
        )

    def get_resumed_dataloader(self, dataloader: Any, num_batches: int) -> Any:
        self.distill_data.consumed = 0
        self.distill_data.skip_batches(num_batches)
        return dataloader

    def get_batch_samples(
        self, epoch_iterator: Any, num_batches: int, device: torch.device
    ) -> tuple[list[dict[str, torch.Tensor]], StepTokens | None]:
        batches = []
        for _ in range(num_batches):
            try:
                batches.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batches:
            return batches, None
        counts = torch.tensor(
            [
                sum(int(kd_units(b, self.distill_loss.loss)) for b in batches),
                sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
            ],
            device=device,
        )  # (2,) this process's trained and labelled positions
        accelerator: Any = self.accelerator  # type: ignore[attr-defined]
        if accelerator.num_processes > 1:
            counts = accelerator.reduce(counts, reduction="sum")
        kd, ce = counts.tolist()
        return batches, StepTokens(int(kd), int(ce))

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, torch.Tensor],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        step = num_items_in_batch if isinstance(num_items_in_batch, StepTokens) else None
        terms = self.distill_loss(
            model,
            inputs,
            kd_tokens=step.kd if step else None,
            ce_tokens=step.ce if step else None,
        )
        loss = terms.total
        processes = self.accelerator.num_processes  # type: ignore[attr-defined]
        if step is not None and processes > 1:
            # each process's loss is its share of the global mean; DDP averages the gradients
            loss = loss * processes
        return (loss, {"loss": terms.total.detach()}) if return_outputs else loss

    def prediction_step(
        self, model: Any, inputs: dict[str, torch.Tensor], prediction_loss_only: bool, **_: Any
    ) -> tuple[torch.Tensor, None, None]:
        with torch.no_grad():
            loss = self.distill_loss(model, inputs).total.detach()
        return loss, None, None

    def evaluate(
        self,
        eval_dataset: Any = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """kdcache's eval metrics on the store's eval split (empty without one), logged."""
        if eval_dataset is not None:
            raise UserError("DistillTrainer evaluates on the store's eval split; drop eval_dataset")
        store = self.distill_loss.store
        if not store.shards_of("eval"):
            return {}
        accelerator: Any = self.accelerator  # type: ignore[attr-defined]
        args: Any = self.args  # type: ignore[attr-defined]
        model = accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
        batches = eval_batches(
            store,
            args.per_device_eval_batch_size * accelerator.num_processes,
            self.distill_data.pad_id,
            max_batches=self.distill_eval_batches,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            collate_fn=self.distill_cross,
        )

        def sum_ranks(sums: torch.Tensor) -> torch.Tensor:
            if accelerator.num_processes == 1:
                return sums
            return accelerator.reduce(sums.to(accelerator.device), reduction="sum").cpu()

        with self.compute_loss_context_manager():  # type: ignore[attr-defined]
            metrics = evaluate(
                model,
                batches,
                vocab=self.distill_loss.vocab,
                sum_ranks=sum_ranks,
                sample_temperature=self.distill_loss.sample_temperature,
            )
        named = {f"{metric_key_prefix}_{k}": v for k, v in metrics.items()}
        self.log(named)  # type: ignore[attr-defined]
        control = self.callback_handler.on_evaluate(  # type: ignore[attr-defined]
            args,
            self.state,  # type: ignore[attr-defined]
            self.control,  # type: ignore[attr-defined]
            named,
        )
        self.control = control
        return named


@functools.cache
def trainer_class() -> type:
    from transformers import Trainer

    class DistillTrainer(DistillMixin, Trainer):  # type: ignore[misc]
        """``transformers.Trainer`` distilling from a logit store (``hf_trainer.py``).

        Args:
            model: the student (its embedding must cover the store's tokenizer).
            args: ``TrainingArguments``; ``max_steps`` is required, the micro-batch is
                ``per_device_train_batch_size`` × processes (the order's global batch).
            store, loss, temperature, alpha, buffer_size, eval_batches, storage_options:
                see ``DistillMixin``.
            **kwargs: the Trainer's own (``processing_class``, ``callbacks``, ``optimizers``...;
                not ``train_dataset``/``eval_dataset``/``data_collator``).
        """

        def __init__(
            self,
            model: Any,
            args: Any,
            *,
            store: Store | str,
            loss: str = "auto",
            temperature: float = 1.0,
            alpha: float = 0.5,
            buffer_size: int = 1024,
            eval_batches: int | None = None,
            storage_options: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            kwargs = self._setup_distillation(
                model, args, kwargs, store=store, loss=loss, temperature=temperature,
                alpha=alpha, buffer_size=buffer_size, eval_batches=eval_batches,
                storage_options=storage_options,
            )  # fmt: skip
            super().__init__(model=model, args=args, **kwargs)
            self._note_parallelism()

    DistillTrainer.__qualname__ = "DistillTrainer"

    return DistillTrainer
