"""Which precision a run computes in, by device: one rule for both stages.

Low precision only where the device runs it natively. bfloat16 needs CUDA compute capability
8.0 or later (``torch.cuda.is_bf16_supported()`` also says yes for the emulated bfloat16 of a
T4 or V100). docs/architecture.md §5 has the why.

=================  ==================================  ==========================================
device             stage two, ``--precision auto``     teacher, ``--dtype auto``
=================  ==================================  ==========================================
CUDA >= 8.0        bf16 autocast                       the config's dtype (bfloat16 when unset)
CUDA < 8.0         fp16 autocast, loss scaling         the config's dtype, bfloat16 → float16
XPU with bf16      bf16 autocast                       the config's dtype
XPU without        no (float32)                        the config's dtype, bfloat16 → float16
MPS                no (float32)                        float16 if the config says so, else float32
CPU                no (float32)                        float32
=================  ==================================  ==========================================

Stage two: an explicit ``--precision`` wins, then ``accelerate launch --mixed_precision`` or the
accelerate config (``ACCELERATE_MIXED_PRECISION``), then the table. Training and every eval
(``train-student``, ``sweep``, ``compare``) run under the same autocast (``eval_context``).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch

from kdcache.pipeline.errors import UserError

PRECISIONS = ("auto", "no", "bf16", "fp16")  # --precision
LAUNCHER_VARIABLE = "ACCELERATE_MIXED_PRECISION"  # accelerate launch sets it (flag, else config)
LAUNCHER_PRECISIONS = ("no", "fp16", "bf16", "fp8")  # what Accelerate takes there
# the autocast dtype of each mixed precision; Accelerate runs what fp8 leaves in bfloat16
_AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp8": torch.bfloat16}
_FLOATS = (torch.float32, torch.bfloat16, torch.float16)  # a teacher's dtypes (--dtype)


def compute_device() -> torch.device:
    """Where a run computes: the GPU torch finds (CUDA, XPU or MPS), else the CPU; the CPU too
    when ``ACCELERATE_USE_CPU`` asks (``accelerate launch --cpu``)."""
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_CPU"):
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return torch.device("xpu")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bfloat16 in hardware, not emulated."""
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 0)
    if device.type == "xpu":
        return bool(torch.xpu.is_bf16_supported())
    return False


def default_precision(device: torch.device) -> str:
    """Stage two's mixed precision on ``device`` when nobody asked: the table's middle column."""
    if device.type in ("cuda", "xpu") and native_bf16(device):
        return "bf16"
    if device.type == "cuda":  # Volta, Turing: float16 tensor cores; Accelerate scales the loss
        return "fp16"
    return "no"


def mixed_precision(requested: str, device: torch.device) -> str:
    """Accelerate's ``mixed_precision`` for a run on ``device``.

    Args:
        requested: ``--precision``; ``auto`` defers to ``ACCELERATE_MIXED_PRECISION``, then to
            ``default_precision``.

    Raises:
        UserError: an unknown precision, or fp16 on the CPU (Accelerate would run float32).
    """
    source = "--precision"
    if requested == "auto":
        launched = os.environ.get(LAUNCHER_VARIABLE, "").strip().lower()
        if not launched:
            return default_precision(device)
        if launched not in LAUNCHER_PRECISIONS:
            raise UserError(
                f"{LAUNCHER_VARIABLE} must be one of {', '.join(LAUNCHER_PRECISIONS)}, got "
                f"{launched!r}, fix accelerate launch's --mixed_precision or its config"
            )
        requested, source = launched, LAUNCHER_VARIABLE
    elif requested not in PRECISIONS:
        raise UserError(
            f"--precision must be one of {', '.join(PRECISIONS)}, got {requested!r}, "
            "use auto for the device's own"
        )
    if requested == "fp16" and device.type == "cpu":
        raise UserError(
            f"fp16 needs a GPU (its loss scaling does not run on the CPU), got {source} fp16 "
            "on the CPU, use bf16 or no"
        )
    return requested


def eval_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The autocast that training under ``precision`` (Accelerate's) runs in, for an eval on
    ``device``: the same figures from every command that evaluates a student."""
    dtype = _AUTOCAST.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def teacher_dtype(wanted: torch.dtype | None, device: torch.device) -> torch.dtype:
    """A teacher's dtype for ``--dtype auto``: the table's last column.

    Args:
        wanted: the dtype its config names (None: unset or not a float type).
    """
    if device.type in ("cuda", "xpu"):
        dtype = wanted if wanted in _FLOATS else torch.bfloat16
        if dtype == torch.bfloat16 and not native_bf16(device):
            dtype = torch.float16
        return dtype
    if device.type == "mps" and wanted == torch.float16:  # Apple GPUs: float16 natively
        return torch.float16
    return torch.float32
