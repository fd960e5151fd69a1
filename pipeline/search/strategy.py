"""How a sweep chooses and stops candidates: ``strategy:`` and ``objectives:`` of the sweep YAML,
turned into Optuna's samplers and pruners (the engine; kdcache adds only what a logit store
changes: rungs counted in training tokens, candidates trained together on one data pass).

```yaml
strategy: asha              # grid | list | random | tpe | nsga2 | asha | hyperband, or:
strategy:
  sampler: tpe              # grid (every combination of `search:` and the `candidates:` list),
                            # random, tpe, nsga2
  early_stopping: asha      # none, asha (successive halving), hyperband
  trials: 12                # samplers: candidates to train (grid: every one)
  min_tokens: 40000         # early stopping: the first rung (default: budget / factor³)
  reduction_factor: 3       # keep 1 in 3 at every rung
objectives: [eval_cross_entropy, non_embedding_parameters]   # all minimized
```

Without ``strategy:`` a sweep is the grid of ``search:`` plus the ``candidates:`` list, trained
to the full budget (the sweeps of earlier kdcache versions). ``asha``/``hyperband`` alone take
the grid when ``search:`` has no ranges, else ``tpe``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.pruners import BasePruner

from kdcache.pipeline.errors import UserError

SAMPLERS = ("grid", "random", "tpe", "nsga2")
EARLY_STOPPING = ("none", "asha", "hyperband")
SHORTHANDS = {"grid": "grid", "list": "grid", "random": "random", "tpe": "tpe", "nsga2": "nsga2"}
STRATEGY_KEYS = ("sampler", "early_stopping", "trials", "min_tokens", "reduction_factor")
# objective → the leaderboard row's column; every objective is minimized
OBJECTIVES = {
    "eval_cross_entropy": "eval_cross_entropy",
    "eval_bits_per_byte": "eval_bits_per_byte",
    "non_embedding_parameters": "non_embedding_parameters",
    "parameters": "parameters",
    "inference_latency": "inference_latency_ms",  # one forward of an eval batch, milliseconds
}
QUALITY = ("eval_cross_entropy", "eval_bits_per_byte")  # measured by training: the rungs' scale


@dataclass(frozen=True)
class Strategy:
    sampler: str = "grid"
    early_stopping: str = "none"
    trials: int | None = None  # samplers other than grid
    min_tokens: int | None = None
    reduction_factor: int = 3

    @property
    def enumerated(self) -> bool:
        """Every candidate is listed up front (the grid and the list)."""
        return self.sampler == "grid"


def _fail(path: Path, what: str, fix: str) -> UserError:
    return UserError(f"{what}, in {path}, {fix}")


def _whole(path: Path, name: str, value: Any, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise _fail(
            path, f"strategy {name} must be a whole number >= {low}, got {value!r}", "fix it"
        )
    return value


def parse_strategy(path: Path, raw: Any, space_has_ranges: bool) -> Strategy:
    """``strategy:`` (a name or a mapping; absent: the grid) → ``Strategy``.

    Raises:
        UserError: an unknown strategy, sampler or key; a sampler without ``trials``; ranges
            under the grid; a rung setting out of range.
    """
    if raw is None:
        raw = "grid"
    if isinstance(raw, str):
        if raw in SHORTHANDS:
            raw = {"sampler": SHORTHANDS[raw]}
        elif raw in EARLY_STOPPING[1:]:
            raw = {"sampler": "tpe" if space_has_ranges else "grid", "early_stopping": raw}
        else:
            names = [*SHORTHANDS, *EARLY_STOPPING[1:]]
            raise _fail(path, f"unknown strategy {raw!r}", f"use one of {', '.join(names)}")
    if not isinstance(raw, dict):
        raise _fail(path, f"strategy must be a name or a mapping, got {raw!r}", "see docs")
    unknown = sorted(set(raw) - set(STRATEGY_KEYS))
    if unknown:
        raise _fail(
            path,
            f"unknown strategy key {', '.join(unknown)}",
            f"allowed: {', '.join(STRATEGY_KEYS)}",
        )
    sampler = raw.get("sampler", "tpe" if space_has_ranges else "grid")
    if sampler == "list":
        sampler = "grid"
    if sampler not in SAMPLERS:
        raise _fail(path, f"unknown sampler {sampler!r}", f"use one of {', '.join(SAMPLERS)}")
    stopping = raw.get("early_stopping", "none")
    if stopping not in EARLY_STOPPING:
        raise _fail(
            path, f"unknown early_stopping {stopping!r}", f"use one of {', '.join(EARLY_STOPPING)}"
        )
    trials = raw.get("trials")
    if sampler == "grid":
        if trials is not None:
            raise _fail(
                path,
                "strategy trials is for samplers: the grid trains every candidate",
                "remove it",
            )
    else:
        if trials is None:
            raise _fail(
                path, f"sampler {sampler} needs a number of candidates", "set strategy trials: N"
            )
        trials = _whole(path, "trials", trials, 1)
    min_tokens = raw.get("min_tokens")
    if min_tokens is not None:
        min_tokens = _whole(path, "min_tokens", min_tokens, 1)
    factor = _whole(path, "reduction_factor", raw.get("reduction_factor", 3), 2)
    return Strategy(sampler, stopping, trials, min_tokens, factor)


def parse_objectives(path: Path, raw: Any, strategy: Strategy) -> list[str]:
    """``objectives:`` (a name or a list; absent: eval cross-entropy) → objective names.

    Raises:
        UserError: an unknown or repeated objective, none measured by training first.
    """
    names = [raw] if isinstance(raw, str) else raw if raw is not None else ["eval_cross_entropy"]
    if not isinstance(names, list) or not names:
        raise _fail(
            path, f"objectives must be a name or a list, got {raw!r}", "e.g. [eval_cross_entropy]"
        )
    for name in names:
        if name not in OBJECTIVES:
            raise _fail(path, f"unknown objective {name!r}", f"use one of {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise _fail(path, "an objective is repeated", "list each once")
    if names[0] not in QUALITY:
        raise _fail(
            path,
            f"the first objective must be what training improves, got {names[0]!r}",
            f"start with {' or '.join(QUALITY)}",
        )
    return names


def rung_tokens(strategy: Strategy, budget_tokens: int) -> list[int]:
    """The token counts at which early stopping evaluates (rungs below the budget, ascending):
    ``min_tokens`` × factor^k; none without early stopping."""
    if strategy.early_stopping == "none":
        return []
    factor = strategy.reduction_factor
    first = strategy.min_tokens or max(1, budget_tokens // factor**3)
    rungs, tokens = [], first
    while tokens < budget_tokens:
        rungs.append(tokens)
        tokens *= factor
    return rungs


def make_sampler(strategy: Strategy, seed: int, objectives: int) -> Any:
    """The Optuna sampler (seeded: the same sweep proposes the same candidates)."""
    import optuna

    if strategy.sampler == "random" or strategy.sampler == "grid":  # grid: all enqueued
        return optuna.samplers.RandomSampler(seed=seed)
    if strategy.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True)


def make_pruner(strategy: Strategy, budget_tokens: int) -> Any:
    """The Optuna pruner; its steps are training tokens (``rung_tokens``)."""
    import optuna

    if strategy.early_stopping == "none":
        return optuna.pruners.NopPruner()
    first = strategy.min_tokens or max(1, budget_tokens // strategy.reduction_factor**3)
    if strategy.early_stopping == "asha":
        return RungPruner(first, strategy.reduction_factor)
    return optuna.pruners.HyperbandPruner(
        min_resource=first, max_resource=budget_tokens, reduction_factor=strategy.reduction_factor
    )


class RungPruner(BasePruner):
    """Successive halving on Optuna's pruner interface (``optuna.pruners.BasePruner``'s
    ``prune``), with rungs at ``min_tokens`` × factor^k training tokens: at a rung a candidate
    goes on when its value ranks in the best ⌈n / factor⌉ of the n values reported at that rung
    so far (its own included).

    Optuna's SuccessiveHalvingPruner compares a candidate with those already *decided* at the
    rung, so of a group that reaches a rung together (``--together``: one data pass) the first
    reported is promoted whatever it measured. Here every member reports before any is decided,
    so a group is halved as synchronous successive halving would halve it, and candidates
    arriving one by one (other groups, other workers) meet the asynchronous rule (ASHA).
    """

    def __init__(self, min_tokens: int, reduction_factor: int) -> None:
        self.min_tokens, self.factor = min_tokens, reduction_factor

    def prune(self, study: Any, trial: Any) -> bool:
        step = trial.last_step
        if step is None or step < self.min_tokens:
            return False
        value = trial.intermediate_values[step]
        if not math.isfinite(value):
            return True
        competing = sorted(
            t.intermediate_values[step]
            for t in study.get_trials(deepcopy=False)
            if step in t.intermediate_values
        )
        if value not in competing:  # this trial's report not yet visible in the list
            competing = sorted([*competing, value])
        keep = max(1, math.ceil(len(competing) / self.factor))
        return value > competing[keep - 1]


def steps_for(tokens: int, tokens_per_step: int) -> int:
    """The step at which ``tokens`` have been read (rounded up)."""
    return max(1, math.ceil(tokens / tokens_per_step))
