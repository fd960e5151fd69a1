"""One student being trained — model, optimizer, schedule, loss settings — and its checkpoints.

``train-student`` trains one ``Trainee``; the sweep trains several on each batch read once,
calling the same ``train_step`` for each. Checkpoints are our own files (no pickle of untrusted
data: ``torch.load(weights_only=True)`` and JSON), written to a temporary directory and renamed
into place, so a kill at any moment (of any rank) leaves the previous checkpoint intact.

Several processes (``torchrun``, ``accelerate launch``; gloo on CPU): the model is wrapped in
DDP by Accelerate; each rank trains on its rows of every global micro-batch (``loader.py``), the
token counts are summed over ranks before the loss is averaged by them, and the gradients are
summed by DDP's all-reduce, so R ranks take the step one process would take with the whole global
batch. Checkpoints hold one loader position (global) and each rank's RNG state; the main process
writes everything else.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.cross_tokenizer import CROSS_LOSS
from kdcache.pipeline.distill.distill_loss import DistillLoss
from kdcache.pipeline.distill.losses import IGNORE_INDEX, trained_mask
from kdcache.pipeline.distill.student_head import student_head
from kdcache.pipeline.distill.tracking import accelerator_kwargs
from kdcache.pipeline.distill.vocabulary import check_batch_ids, embedding_rows
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.precision import compute_device, mixed_precision

# tokens: real input positions the student read; trained_tokens: those its KD terms counted
# (loss_mask; fewer than tokens only in a store with a loss mask)
LOG_FIELDS = ("step", "tokens", "trained_tokens", "loss", "kd", "ce", "lr", "grad_norm",
              "elapsed_s", "tokens_per_s")  # fmt: skip
# settings that must be identical to resume a run exactly (not --workers, nor the number of
# processes: neither changes the data order or the global batch)
RESUMABLE_SETTINGS = (
    "store", "student", "steps", "batch_size", "grad_accum", "lr", "warmup", "loss",
    "temperature", "alpha", "seed", "buffer_size", "teacher",
)  # fmt: skip
T = TypeVar("T")


@dataclass
class Trainee:
    """A model with its optimizer, LR schedule, loss settings and progress."""

    name: str
    model: Any  # prepared by Accelerate
    optimizer: Any
    scheduler: torch.optim.lr_scheduler.LRScheduler
    loss: str
    temperature: float
    alpha: float
    max_grad_norm: float = 1.0
    teacher: Any = None  # a LiveTeacher for online KD (train-student --teacher), else None
    vocab: int | None = None  # the store's tokenizer size: logits are sliced to it
    sample_temperature: float = 1.0  # the store's draws' temperature (sampled-kl)
    head_note: str | None = None  # why the loss uses whole logits (student_head.py), if it does
    step: int = 0
    tokens: int = 0  # real input positions read, over all ranks
    trained_tokens: int = 0  # of those, the trained ones (loss_mask)
    extra: dict[str, Any] = field(default_factory=dict)  # JSON-able state saved with checkpoints

    @property
    def loss_fn(self) -> DistillLoss:
        """This trainee's loss as the public ``DistillLoss`` (what users' loops call)."""
        return DistillLoss.resolved(
            loss=self.loss,
            temperature=self.temperature,
            alpha=self.alpha,
            vocab=self.vocab,
            sample_temperature=self.sample_temperature,
        )


def make_accelerator(
    seed: int, precision: str = "auto", *, report_to: str = "none", run_dir: Path | None = None
) -> Any:
    """An Accelerator on the GPU torch finds (CUDA, XPU, MPS), else the CPU (gloo across ranks),
    in the mixed precision of ``precision.mixed_precision`` (``--precision``), with the
    experiment trackers of ``report_to`` (``--report-to``; TensorBoard's files under
    ``run_dir``, which they need), started later by ``tracking.start``.

    Raises:
        UserError: an unknown precision, or one the device cannot run; an unknown tracker, or
            one that is not installed.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed

    trackers = accelerator_kwargs(report_to, run_dir)  # {} for "none"
    cpu = compute_device().type == "cpu"
    device = PartialState(cpu=cpu).device  # this rank's device (cuda:LOCAL_RANK under torchrun)
    accelerator = Accelerator(
        cpu=cpu, mixed_precision=mixed_precision(precision, device), **trackers
    )
    set_seed(seed)
    return accelerator


def parallel_note(accelerator: Any) -> str | None:
    """One line when the launcher asked for FSDP and Accelerate did not apply it: Accelerate
    shards only on GPUs, so on the CPU the processes train data-parallel (the same student)."""
    from accelerate.utils import DistributedType, parse_flag_from_env

    if not parse_flag_from_env("ACCELERATE_USE_FSDP") or accelerator.num_processes == 1:
        return None
    if accelerator.distributed_type == DistributedType.FSDP:
        return None
    return (
        f"the FSDP configuration is not applied on the {accelerator.device.type} (Accelerate "
        f"shards only on GPUs): {accelerator.num_processes} processes train data-parallel, "
        "the same student"
    )


def sum_over_ranks(values: torch.Tensor, accelerator: Any) -> torch.Tensor:
    """``values`` (any shape, on the CPU) summed over every process; itself with one process."""
    if accelerator.num_processes == 1:
        return values
    return accelerator.reduce(values.to(accelerator.device), reduction="sum").cpu()


def on_main(accelerator: Any, action: Callable[[], T]) -> T | None:
    """``action()`` on the main process (None elsewhere), every rank waiting for it; a UserError
    there stops every rank, the main one printing its one line."""

    result, failure = None, [None]
    if accelerator.is_main_process:
        try:
            result = action()
        except UserError as e:
            failure[0] = e.message
    stop_together(accelerator, failure[0])
    accelerator.wait_for_everyone()
    return result


def stop_together(accelerator: Any, failure: str | None) -> None:
    """The main process's ``failure`` (None: none) stops every rank: the main one with that
    UserError line, the others with exit code 2 and nothing printed."""
    from accelerate.utils import broadcast_object_list

    sent = [failure]
    if accelerator.num_processes > 1:
        broadcast_object_list(sent, from_process=0)
    if sent[0] is not None:
        if not accelerator.is_main_process:
            raise SystemExit(2)
        raise UserError(sent[0])


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to 10% of it at ``steps``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module, *, lr: float, steps: int, warmup: int, weight_decay: float = 0.1
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """train-student's optimizer and schedule: AdamW (betas 0.9/0.95; no decay on norms and
    biases) + linear warmup and cosine decay to 10% (``lr_factor``). Pass them to a Trainer as
    ``optimizers=make_optimizer(...)`` to train as train-student does."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, steps)
    )
    return optimizer, scheduler


def make_trainee(
    name: str,
    model: torch.nn.Module,
    accelerator: Any,
    *,
    loss: str,
    temperature: float,
    alpha: float,
    lr: float,
    steps: int,
    warmup: int,
    weight_decay: float = 0.1,
    max_grad_norm: float = 1.0,
    vocab: int | None = None,
    sample_temperature: float = 1.0,
) -> Trainee:
    """AdamW (no decay on norms and biases) + warmup/cosine, prepared with ``accelerator``.

    ``vocab`` is the store's tokenizer size: the student's logits are sliced to it (its padded
    embedding rows, if any, get no probability); None keeps every column.
    """
    optimizer, scheduler = make_optimizer(
        model, lr=lr, steps=steps, warmup=warmup, weight_decay=weight_decay
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    trainee = Trainee(
        name, model, optimizer, scheduler, loss, temperature, alpha, max_grad_norm, vocab=vocab,
        sample_temperature=sample_temperature,
    )  # fmt: skip
    # probed once here: a head that cannot be split off trains from whole logits, with a note
    trainee.head_note = student_head(model, vocab).note
    return trainee


def kd_units(batch: dict[str, torch.Tensor], loss: str) -> torch.Tensor:
    """What a batch's KD term is averaged over: its trained positions, or for chunk likelihood
    matching (a cross-tokenizer student) its trained chunks."""
    if loss == CROSS_LOSS:
        return batch["chunk_mask"].sum()
    return trained_mask(batch).sum()


def train_step(
    trainee: Trainee, micro_batches: list[dict[str, torch.Tensor]], accelerator: Any
) -> dict[str, Any]:
    """One optimizer step over ``micro_batches`` (gradient accumulation); returns the log row.

    Each term is averaged over the tokens of the whole step on every rank (KD over the trained
    positions, CE over those with a label), so accumulating N micro-batches gives the gradient of
    one N-times larger batch, and R ranks the gradient of one process reading all their rows.
    """
    # compact loader dtypes cross to the device, widened there (ids → int64)
    batches = [batch_to_device(b, accelerator.device) for b in micro_batches]
    counts = torch.tensor(
        [
            sum(int(b["attention_mask"].sum()) for b in batches),
            sum(int(kd_units(b, trainee.loss)) for b in batches),
            sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches),
        ]
    )  # (3,) int64: this rank's real, trained and labelled positions
    real_tokens, kd_tokens, ce_tokens = sum_over_ranks(counts, accelerator).tolist()
    ranks = accelerator.num_processes
    model = trainee.model
    model.train()
    total_loss = total_kd = total_ce = 0.0
    for i, b in enumerate(batches):
        last = i == len(batches) - 1
        sync = contextlib.nullcontext() if last else accelerator.no_sync(model)
        with sync:
            teacher = trainee.teacher if trainee.loss != "ce" else None
            if teacher is not None:  # online KD: the teacher's final hidden states (B, L, H)
                check_batch_ids(b, embedding_rows(model), trainee.vocab)  # before the teacher
                b["teacher_hidden"] = teacher.hidden(b["input_ids"], b["attention_mask"])
            loss_fn = trainee.loss_fn  # the public DistillLoss, with train-student's settings
            head = loss_fn.head(model)
            terms = loss_fn.from_hidden(
                head.rows(model, b),  # (B, L, H): the head runs per chunk inside the loss
                head,
                b,
                kd_tokens=kd_tokens,
                ce_tokens=ce_tokens,
                teacher=teacher,
            )
            loss, kd, ce = terms.total, terms.kd, terms.ce
            # DDP averages the ranks' gradients; each rank's loss is its share of the global
            # mean, so × R makes the all-reduce their sum
            accelerator.backward(loss * ranks if ranks > 1 else loss)
        total_loss += float(loss.detach())
        total_kd += float(kd.detach())
        total_ce += float(ce.detach())
    shares = torch.tensor([total_loss, total_kd, total_ce], dtype=torch.float64)
    total_loss, total_kd, total_ce = sum_over_ranks(shares, accelerator).tolist()
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), trainee.max_grad_norm)
    lr = trainee.scheduler.get_last_lr()[0]
    trainee.optimizer.step()
    if not accelerator.optimizer_step_was_skipped:  # fp16: the scaler skips overflowing steps
        trainee.scheduler.step()
    trainee.optimizer.zero_grad(set_to_none=True)
    trainee.step += 1
    tokens, trained = int(real_tokens), int(kd_tokens)  # over every rank
    trainee.tokens += tokens
    trainee.trained_tokens += trained
    trainee.extra["last_loss"] = total_loss
    return {
        "step": trainee.step,
        "tokens": tokens,
        "trained_tokens": trained,
        "loss": round(total_loss, 6),
        "kd": round(total_kd, 6),
        "ce": round(total_ce, 6),
        "lr": lr,
        "grad_norm": round(float(grad_norm), 6),
    }
