"""Stage two: everything that turns a logit store into trained students — and its public API.

For your own training loop (docs/training-stack.md):

- ``DistillDataset``: a split of a store as a ``torch.utils.data.IterableDataset`` of sequences,
  rank- and DataLoader-worker-aware, in the one global order ``train-student`` reads, resumable
  (``state_dict``/``load_state_dict``, ``skip_batches``, ``set_epoch``);
- ``DistillCollator``: its sequences → a batch in Hugging Face conventions (unshifted ``labels``,
  -100 where nothing is trained; the teacher's targets at the input positions);
- ``DistillLoss``: the loss from the student's hidden states and head (or from logits);
- ``CrossTokenizerCollator``: batches for a student with its own tokenizer (``loss="alm"``);
- ``DistillTrainer`` (``transformers.Trainer``), ``DistillSFTTrainer`` (TRL) — imported on use;
- ``evaluate``, ``eval_batches``: the eval figures ``train-student`` reports;
- ``load_store_tokenizer``: the teacher's tokenizer, stored with the store.

The name: the package's layout is ``kdcache.storage`` (the store) and ``kdcache.pipeline``
(the two stages); stage two's API is this package, ``kdcache.pipeline.distill``, with no alias
module that would import the same classes under two names. Inside: the store loader and its
epoch order, the losses, the student and its training state, evaluation, the recipes
``train_student`` and ``compare``. May import ``kdcache.storage`` and the helpers at the top of
``kdcache.pipeline``; never ``cache`` or ``search``.
"""

from __future__ import annotations

from typing import Any

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.cross_tokenizer import CrossTokenizerCollator
from kdcache.pipeline.distill.dataset import DistillCollator, DistillDataset
from kdcache.pipeline.distill.distill_loss import DistillLoss, check_tokenizer
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.loader import eval_batches
from kdcache.pipeline.distill.losses import LossTerms, batch_loss, next_token_labels
from kdcache.pipeline.distill.student import load_store_tokenizer
from kdcache.pipeline.distill.student_head import StudentHead, student_head
from kdcache.pipeline.distill.trainee import make_optimizer

__all__ = [
    "CrossTokenizerCollator",
    "DistillCollator",
    "DistillDataset",
    "DistillLoss",
    "DistillSFTTrainer",
    "DistillTrainer",
    "LossTerms",
    "StudentHead",
    "batch_loss",
    "batch_to_device",
    "check_tokenizer",
    "eval_batches",
    "evaluate",
    "load_store_tokenizer",
    "make_optimizer",
    "next_token_labels",
    "student_head",
]


def __getattr__(name: str) -> Any:
    """The Trainer integrations, imported on first use (transformers.Trainer, TRL)."""
    if name == "DistillTrainer":
        from kdcache.pipeline.distill.hf_trainer import trainer_class

        return trainer_class()
    if name == "DistillSFTTrainer":
        from kdcache.pipeline.distill.trl_recipe import sft_trainer_class

        return sft_trainer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
