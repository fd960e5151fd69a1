"""What the two teacher recipes of ``build-teacher`` share: the optimizer and its schedule, and
the atomic save of a teacher directory.

``default_teacher`` trains a teacher from scratch; ``teacher_finetune`` adapts an existing one to a
corpus' training split (``build-teacher --from``). Both write an ordinary Hugging Face model
directory with ``kdcache_teacher.json`` beside it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

METADATA_FILE = "kdcache_teacher.json"


def lr_factor(step: int, warmup: int, steps: int) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(
    model: torch.nn.Module, lr: float, warmup: int, steps: int, device: torch.device
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW (weight decay 0.1 on matrices only) and its warmup + cosine schedule."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
        fused=device.type == "cuda",
    )
    warmup = min(warmup, steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, warmup, steps)
    )
    return optimizer, scheduler


def check_out(out: Path, force: bool) -> None:
    """Refuse to replace a non-empty ``--out`` without ``--force``."""
    from kdcache.pipeline.errors import UserError

    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise UserError(
            f"the output directory already holds files, {out}, "
            "pass --force to replace it or choose another --out"
        )


def save_teacher_dir(
    out: Path,
    model: torch.nn.Module,
    write_tokenizer: Callable[[Path], Any],
    metadata: dict[str, Any],
) -> None:
    """Write the model, its tokenizer (``write_tokenizer(directory)``) and ``METADATA_FILE`` into
    a sibling ``.partial`` directory, then rename it over ``out``: a half-written directory never
    looks like a teacher."""
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        model.save_pretrained(partial)
        write_tokenizer(partial)
        (partial / METADATA_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists():
        out.unlink()
    partial.rename(out)
