"""The sweep's search space: each ``search:`` key is a list of values or a range.

```yaml
search:
  num_hidden_layers: [1, 2, 4]                  # values: the grid's axis, or a categorical choice
  hidden_size: {low: 32, high: 128, step: 32}   # whole numbers 32, 64, 96, 128
  lr: {low: 1.0e-4, high: 1.0e-2, log: true}    # log-uniform (samplers only)
```

A grid enumerates values (a range needs a ``step`` to be enumerable); the samplers of
``strategy.py`` draw from the same space through Optuna's distributions, so one space serves
every strategy.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.errors import UserError

RANGE_KEYS = ("low", "high", "step", "log")
# keys whose range is of whole numbers: the architecture's sizes
WHOLE = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
NUMERIC = (*WHOLE, "temperature", "alpha", "lr")


@dataclass(frozen=True)
class Range:
    """``low`` ≤ value ≤ ``high``: whole numbers for sizes, else real; ``step`` spaces the
    values (enumerable: a grid can list them), ``log`` draws log-uniformly."""

    low: float
    high: float
    step: float | None = None
    log: bool = False
    whole: bool = False

    def values(self) -> list[float] | list[int]:
        """Every value (a grid's axis); only for a stepped range."""
        assert self.step is not None
        count = math.floor((self.high - self.low) / self.step + 1e-9) + 1
        values = [self.low + i * self.step for i in range(count)]
        return [int(v) for v in values] if self.whole else values


def _fail(path: Path, what: str, fix: str) -> UserError:
    return UserError(f"{what}, in {path}, {fix}")


def parse_range(path: Path, key: str, spec: dict[str, Any]) -> Range:
    """A ``{low, high[, step][, log]}`` mapping of ``key`` → ``Range``.

    Raises:
        UserError: unknown fields, a key that takes no range, non-numbers, low above high,
            ``log`` with low ≤ 0 or with a step, a fractional range of a size.
    """
    unknown = sorted(set(spec) - set(RANGE_KEYS))
    if unknown:
        raise _fail(
            path,
            f"unknown range field {', '.join(unknown)} in search.{key}",
            "use low, high, step, log",
        )
    if key not in NUMERIC:
        raise _fail(
            path, f"search.{key} takes a list of values, not a range", f"list the {key} values"
        )
    if "low" not in spec or "high" not in spec:
        raise _fail(path, f"search.{key} range needs low and high", "give both")
    numbers = {k: spec[k] for k in ("low", "high", "step") if k in spec}
    for name, value in numbers.items():
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise _fail(path, f"search.{key}.{name} must be a number, got {value!r}", "fix it")
    low, high, step = float(spec["low"]), float(spec["high"]), numbers.get("step")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise _fail(path, f"search.{key}.log must be true or false, got {log!r}", "fix it")
    if low > high:
        raise _fail(
            path, f"search.{key} has low {spec['low']} above high {spec['high']}", "swap them"
        )
    if step is not None and step <= 0:
        raise _fail(path, f"search.{key}.step must be above 0, got {step}", "fix it")
    if log and (low <= 0 or step is not None):
        raise _fail(path, f"search.{key}: a log range needs low > 0 and no step", "fix the range")
    whole = key in WHOLE
    if whole and any(float(v) != int(v) for v in numbers.values()):
        raise _fail(
            path, f"search.{key} is a size: low, high and step must be whole", "fix the range"
        )
    if whole and low < 1:
        raise _fail(
            path, f"search.{key} must be at least 1, got low {spec['low']}", "fix the range"
        )
    return Range(low, high, float(step) if step is not None else None, log, whole)


def parse_space(path: Path, search: dict[str, Any]) -> dict[str, list[Any] | Range]:
    """``search:`` → key: list of values or ``Range`` (a single value becomes a list of one).

    Raises:
        UserError: an empty list, a bad range (``parse_range``).
    """
    space: dict[str, list[Any] | Range] = {}
    for key, spec in search.items():
        if isinstance(spec, dict):
            space[key] = parse_range(path, key, spec)
            continue
        values = spec if isinstance(spec, list) else [spec]
        if not values:
            raise _fail(path, f"empty search space (no values for {key})", "list values")
        space[key] = values
    return space


def has_ranges(space: dict[str, list[Any] | Range]) -> bool:
    return any(isinstance(v, Range) for v in space.values())


def grid(
    path: Path, space: dict[str, list[Any] | Range], order: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Every combination, keys in ``order``, the last key varying fastest.

    Raises:
        UserError: a range without a step (its values cannot be listed).
    """
    axes: dict[str, list[Any]] = {}
    for key in (k for k in order if k in space):
        spec = space[key]
        if isinstance(spec, Range):
            if spec.step is None:
                raise _fail(
                    path,
                    f"search.{key} is a range without a step, which a grid cannot list",
                    "give it a step, or use strategy random, tpe or nsga2",
                )
            axes[key] = list(spec.values())
        else:
            axes[key] = spec
    keys = list(axes)
    return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes.values())]


def suggest(
    trial: Any, space: dict[str, list[Any] | Range], order: tuple[str, ...]
) -> dict[str, Any]:
    """One point of ``space`` drawn by ``trial``'s sampler (an Optuna trial), keys in ``order``."""
    point: dict[str, Any] = {}
    for key in (k for k in order if k in space):
        spec = space[key]
        if isinstance(spec, Range):
            if spec.whole:
                step = int(spec.step or 1)
                point[key] = trial.suggest_int(
                    key, int(spec.low), int(spec.high), step=step, log=spec.log
                )
            else:
                point[key] = trial.suggest_float(
                    key, spec.low, spec.high, step=spec.step, log=spec.log
                )
        else:
            point[key] = trial.suggest_categorical(key, spec)
    return point
