"""A logit store in TRL's ``SFTTrainer``: ``DistillSFTTrainer`` (``DistillMixin`` + ``SFTTrainer``).

    trainer = DistillSFTTrainer(model, SFTConfig(..., max_steps=300, bf16=False), store="store",
                                peft_config=LoraConfig(r=16, task_type="CAUSAL_LM"))
    trainer.train()

The mixin (``hf_trainer.py``) replaces SFTTrainer's data and loss: the DataLoader reads the
store's train split, the loss is ``DistillLoss`` on the hidden states, ``evaluate`` gives kdcache's
eval figures. SFTTrainer keeps the rest: its ``SFTConfig``, ``peft_config`` (the LoRA wrapping),
gradient checkpointing (with the input gradients PEFT needs), activation offloading, its model card
and logging. SFTTrainer's data pipeline does not apply:

- its dataset checks: it requires ``datasets`` datasets and reads a sample, so it is handed
  one-row stand-ins (never trained or evaluated on), and ``train_dataset``/``eval_dataset`` are
  the mixin's ``DistillDataset``s after its ``__init__``; ``_prepare_dataset`` (tokenizing,
  packing, truncation to ``max_length``, label building) returns its dataset untouched — the
  store is tokenized and packed already by ``cache-teacher``, so ``max_length`` and
  ``truncation_mode`` do nothing;
- settings that would change what is trained are refused with a ``UserError``: ``packing``,
  ``eval_packing``, ``padding_free``, ``completion_only_loss``, ``assistant_only_loss``,
  ``loss_type`` other than "nll", ``label_smoothing_factor``, ``formatting_func``,
  ``compute_loss_func`` — the store's ``loss_mask`` decides which positions are trained, and
  the batches carry unshifted ``labels`` that ``DistillLoss`` shifts itself;
- ``processing_class`` defaults to the store's tokenizer (not one loaded by the model's name).

SFTConfig's defaults differ from TrainingArguments': ``bf16=True`` (autocast, also on CPU) and
``gradient_checkpointing=True``; pass ``bf16=False`` for float32 (the figures of a
``DistillTrainer`` or ``kdcache train-student`` run). SFTTrainer's own metrics (entropy,
mean_token_accuracy, num_tokens) are computed from its fused head in its ``compute_loss``, which
the mixin's replaces: they are not logged.
"""

from __future__ import annotations

import functools
from typing import Any

from kdcache.pipeline.distill.hf_trainer import DistillMixin, _store
from kdcache.pipeline.distill.student import load_store_tokenizer
from kdcache.pipeline.errors import UserError
from kdcache.storage import Store

_MASK = "the store's loss_mask decides which positions are trained"
_LOSS = "the loss is DistillLoss (loss=, alpha=, temperature=)"
# (setting, the values that change nothing — the first is suggested —, why no other applies)
_SFT_SETTINGS = (
    ("packing", (False,), "the store's sequences are packed already by cache-teacher"),
    ("eval_packing", (False, None), "the store's sequences are packed already by cache-teacher"),
    ("padding_free", (False,), "DistillCollator pads the store's sequences"),
    ("completion_only_loss", (False, None), _MASK),
    ("assistant_only_loss", (False,), _MASK),
    ("loss_type", ("nll",), _LOSS),
    ("label_smoothing_factor", (0.0,), _LOSS),
)


def check_sft_settings(model: Any, args: Any, kwargs: dict[str, Any]) -> None:
    """Refuse the SFTTrainer settings that would not apply to a store's batches.

    Raises:
        UserError: one line naming the setting, why, and what to pass instead.
    """
    if isinstance(model, str):
        raise UserError(
            f"DistillSFTTrainer needs the student itself, got the name {model!r}; load it "
            "(kdcache.pipeline.distill.student.build_student or from_pretrained) and pass the model"
        )
    for name, neutral, why in _SFT_SETTINGS:
        value = getattr(args, name, neutral[0])
        if value not in neutral:
            raise UserError(
                f"DistillSFTTrainer cannot use {name}={value!r}: {why}; pass {name}={neutral[0]!r}"
            )
    for name in ("formatting_func", "compute_loss_func"):
        if kwargs.get(name) is not None:
            raise UserError(
                f"DistillSFTTrainer reads tokenized batches from the store and trains DistillLoss; "
                f"drop {name}="
            )


def _stand_in(pad: int) -> Any:
    """A one-row ``datasets.Dataset`` of token ids: what SFTTrainer checks; never read."""
    import datasets

    return datasets.Dataset.from_dict({"input_ids": [[pad, pad]]})


@functools.cache
def sft_trainer_class() -> type:
    from trl.trainer.sft_trainer import SFTTrainer

    class DistillSFTTrainer(DistillMixin, SFTTrainer):  # type: ignore[misc]
        """TRL's ``SFTTrainer`` distilling from a logit store (``trl_recipe.py``).

        Args:
            model: the student (not a name); ``peft_config=`` wraps it as SFTTrainer does.
            args: ``SFTConfig`` (or ``TrainingArguments``); ``max_steps`` is required.
            store, loss, temperature, alpha, buffer_size, eval_batches, storage_options:
                see ``DistillMixin``.
            **kwargs: SFTTrainer's own (``processing_class`` — default the store's tokenizer —,
                ``peft_config``, ``callbacks``, ``optimizers``...; not ``train_dataset``,
                ``eval_dataset``, ``data_collator``, ``formatting_func``, ``compute_loss_func``).

        Raises:
            UserError: a setting of SFTTrainer's data pipeline or loss that cannot apply
                (see the module docstring).
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
            check_sft_settings(model, args, kwargs)
            opened = _store(store, storage_options)
            if kwargs.get("processing_class") is None:
                kwargs["processing_class"] = load_store_tokenizer(opened)
            kwargs = self._setup_distillation(
                model, args, kwargs, store=opened, loss=loss, temperature=temperature,
                alpha=alpha, buffer_size=buffer_size, eval_batches=eval_batches,
                storage_options=storage_options,
            )  # fmt: skip
            # SFTTrainer checks and prepares ``datasets`` datasets: it is given stand-ins
            ours = {name: kwargs[name] for name in ("train_dataset", "eval_dataset")}
            pad = self.distill_data.pad_id
            for name, dataset in ours.items():
                kwargs[name] = None if dataset is None else _stand_in(pad)
            super().__init__(model=model, args=args, **kwargs)
            self.train_dataset, self.eval_dataset = ours["train_dataset"], ours["eval_dataset"]
            self._note_parallelism()

        def _prepare_dataset(self, dataset: Any, *_: Any, **__: Any) -> Any:
            """The store is tokenized and packed: nothing to prepare (no truncation either)."""
            return dataset

    DistillSFTTrainer.__qualname__ = "DistillSFTTrainer"

    return DistillSFTTrainer
