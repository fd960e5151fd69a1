"""What a manifest says about its targets: the kind (top-k, draws or both), k, and the draws'
number, seed, count dtype and temperature (docs/architecture.md §3, "Targets"); their checks."""

from __future__ import annotations

import math
from typing import Any

TARGETS = ("topk", "sampled", "topk+sampled")
MAX_SAMPLES = 65535
# a fact a manifest may lack (made before it existed): the temperature the draws were made at
SAMPLE_TEMPERATURE = "sample_temperature"


def count_dtype_for(samples: int) -> str | None:
    """The narrowest unsigned integer type that holds a count of ``samples`` draws (None for 0)."""
    if samples == 0:
        return None
    return "uint8" if samples <= 255 else "uint16"


def has_topk(manifest: dict[str, Any]) -> bool:
    """True when the store holds top-k targets (``topk`` or ``topk+sampled``)."""
    return "topk" in str(manifest.get("targets", "topk")).split("+")


def has_samples(manifest: dict[str, Any]) -> bool:
    """True when the store holds sampled targets (``sampled`` or ``topk+sampled``)."""
    return "sampled" in str(manifest.get("targets", "topk")).split("+")


def default_sample_temperature(manifest: dict[str, Any]) -> float | None:
    """What a manifest without ``sample_temperature`` means: 1.0 with samples, else None."""
    return 1.0 if has_samples(manifest) else None


def sample_temperature(manifest: dict[str, Any]) -> float | None:
    """The temperature T_s of the draws (they come from ``p^(1/T_s)``, normalized): 1.0 for a
    sampled store that does not record it, None for a store without samples."""
    value = manifest.get(SAMPLE_TEMPERATURE)
    return default_sample_temperature(manifest) if value is None else float(value)


def validate_targets(manifest: dict[str, Any], where: str, error: type[Exception]) -> None:
    """The targets kind and the facts that follow from it: top_k, samples, seed, count dtype,
    sample temperature (filled in with its default when absent)."""
    targets, top_k, samples = manifest["targets"], manifest["top_k"], manifest["samples"]
    if targets not in TARGETS:
        raise error(f"{where} targets unknown, {targets!r}, use one of {', '.join(TARGETS)}")
    if has_topk(manifest):
        if not 1 <= top_k <= manifest["vocab_size"]:
            raise error(
                f"{where} top_k must be in 1..vocab_size ({manifest['vocab_size']}) for "
                f"{targets} targets, {top_k}, fix top_k"
            )
    elif top_k != 0:
        raise error(f"{where} top_k must be 0 for {targets} targets, {top_k}, set top_k=0")
    seed, count_dtype = manifest.get("sample_seed"), manifest.get("count_dtype")
    drawn_at = manifest.setdefault(SAMPLE_TEMPERATURE, default_sample_temperature(manifest))
    if not has_samples(manifest):
        if samples != 0 or seed is not None or count_dtype is not None:
            raise error(
                f"{where} samples/sample_seed/count_dtype must be 0/null/null for {targets} "
                f"targets, {samples}/{seed!r}/{count_dtype!r}, use targets=topk+sampled to sample"
            )
        if drawn_at is not None:
            raise error(
                f"{where} sample_temperature must be null for {targets} targets, {drawn_at!r}, "
                "leave it out"
            )
        return
    if not 1 <= samples <= MAX_SAMPLES:
        raise error(
            f"{where} samples must be in 1..{MAX_SAMPLES} for {targets} targets, {samples}, "
            "fix samples"
        )
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise error(
            f"{where} sample_seed must be an integer for {targets} targets, {seed!r}, "
            "pass sample_seed"
        )
    if count_dtype not in ("uint8", "uint16") or (count_dtype == "uint8" and samples > 255):
        raise error(
            f"{where} count_dtype does not fit {samples} samples, {count_dtype!r}, "
            "recreate the store"
        )
    if (
        isinstance(drawn_at, bool)
        or not isinstance(drawn_at, int | float)
        or not (math.isfinite(drawn_at) and drawn_at > 0)
    ):
        raise error(
            f"{where} sample_temperature must be a positive number, {drawn_at!r}, "
            "pass the temperature the draws were made at"
        )
