"""Sweep configuration: a YAML file → validated candidates, before any training starts.

Example (``sweeps/default.yaml``)::

    base: tiny                 # preset name, config .json/.yaml, or HF model directory
    seed: 0
    budget: {steps: 300}       # or {tokens: 2000000}
    batch_size: 8
    search:                    # a grid: every combination is one candidate
      hidden_size: [64, 128]
      num_hidden_layers: [1, 2, 4]
      loss: [kl]
    baseline: true             # also train the base student with --loss ce (no teacher)

``tokenizer:`` (top level, in ``search:`` or in a candidate) gives students a tokenizer of their
own: a directory written by ``save_pretrained``, relative to the YAML file, or ``store`` (the
store's own, the default); such candidates re-tokenize the stored text (``readings.py``) and the
leaderboard ranks by bits per byte.

``init:`` (top level, in ``search:`` or in a candidate) is ``random`` (the default) or
``teacher``: the student starts from the weights of the top-level ``teacher:`` model directory
(relative to the YAML file), pruned to its architecture keys (``teacher_init.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from kdcache.pipeline.distill.losses import LOSSES
from kdcache.pipeline.distill.student_tokenizer import tokenizer_dir
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.search_space import Range, grid, has_ranges, parse_space
from kdcache.pipeline.search.strategy import Strategy, parse_objectives, parse_strategy

ARCHITECTURE_KEYS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)
TRAINING_KEYS = ("loss", "temperature", "alpha", "lr")
SEARCH_KEYS = (*ARCHITECTURE_KEYS, "tokenizer", *TRAINING_KEYS, "init")
INITS = ("random", "teacher")
STORE_TOKENIZER = "store"  # a `tokenizer:` value: the store's own
TOP_LEVEL_KEYS = (
    "base",
    "seed",
    "budget",
    "batch_size",
    "lr",
    "loss",
    "temperature",
    "alpha",
    "tokenizer",
    "init",
    "teacher",
    "warmup",
    "eval_batches",
    "search",
    "candidates",
    "baseline",
    "strategy",
    "objectives",
)
BUDGET_KEYS = ("steps", "tokens")
_SHORT = {
    "hidden_size": "h",
    "num_hidden_layers": "l",
    "num_attention_heads": "a",
    "num_key_value_heads": "kv",
    "intermediate_size": "i",
    "tokenizer": "tok-",
    "loss": "",
    "temperature": "T",
    "alpha": "alpha",
    "lr": "lr",
    "init": "init-",
}


@dataclass(frozen=True)
class Candidate:
    """One student to train: architecture overrides of the base plus training settings."""

    name: str
    architecture: dict[str, int]
    loss: str
    temperature: float
    alpha: float
    lr: float
    tokenizer: str = STORE_TOKENIZER  # the directory of its own tokenizer, or the store's
    init: str = "random"  # or "teacher": pruned from SweepConfig.teacher (teacher_init.py)

    def settings(self) -> dict[str, Any]:
        return {
            **self.architecture,
            "tokenizer": Path(self.tokenizer).name,  # "store" for the store's
            "loss": self.loss,
            "temperature": self.temperature,
            "alpha": self.alpha,
            "lr": self.lr,
            "init": self.init,
        }


@dataclass
class SweepConfig:
    base: str
    seed: int
    budget_steps: int | None
    budget_tokens: int | None
    batch_size: int
    warmup: int
    eval_batches: int
    candidates: list[Candidate] = field(default_factory=list)
    teacher: str | None = None  # the model directory `init: teacher` candidates start from
    raw: dict[str, Any] = field(default_factory=dict)
    strategy: Strategy = field(default_factory=Strategy)
    objectives: list[str] = field(default_factory=lambda: ["eval_cross_entropy"])
    space: dict[str, list[Any] | Range] = field(default_factory=dict)  # sampled strategies
    path: Path = Path("sweep.yaml")
    defaults: dict[str, Any] = field(default_factory=dict)  # top-level training settings

    def make_candidate(self, overrides: dict[str, Any], name: str | None = None) -> Candidate:
        """A candidate of this sweep from search-key ``overrides`` (a sampled point), named
        ``name`` or after its settings.

        Raises:
            UserError: sizes that do not divide, an unknown loss, a bad tokenizer.
        """
        candidate = _make_candidate(self.path, self.defaults, overrides, self.base, self.teacher)
        return candidate if name is None else replace(candidate, name=name)


def _fail(path: Path, what: str, fix: str) -> UserError:
    return UserError(f"{what}, in {path}, {fix}")


def _unknown(path: Path, where: str, keys: set[str], allowed: tuple[str, ...]) -> None:
    if keys:
        raise _fail(
            path,
            f"unknown key{'s' if len(keys) > 1 else ''} {', '.join(sorted(keys))} {where}",
            f"allowed: {', '.join(allowed)}",
        )


def _positive_int(path: Path, name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _fail(path, f"{name} must be a whole number >= 1, got {value!r}", "fix the value")
    return value


def _number(path: Path, name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _fail(path, f"{name} must be a number in [{low}, {high}], got {value!r}", "fix it")
    if not math.isfinite(value):
        raise _fail(path, f"{name} must be finite, got {value!r}", "fix it")
    return float(value)


def _candidate_name(overrides: dict[str, Any]) -> str:
    parts = []
    for key in SEARCH_KEYS:
        if key in overrides:
            value = overrides[key]
            if key == "tokenizer":
                value = Path(str(value)).name
            parts.append(
                f"{_SHORT[key]}{value:g}" if isinstance(value, float) else f"{_SHORT[key]}{value}"
            )
    return "-".join(parts) or "base"


def _make_candidate(
    path: Path,
    defaults: dict[str, Any],
    overrides: dict[str, Any],
    base: str = "tiny",
    teacher: str | None = None,
) -> Candidate:
    settings = {**defaults, **overrides}
    architecture = {}
    for key in ARCHITECTURE_KEYS:
        if key in settings:
            architecture[key] = _positive_int(path, key, settings[key])
    hidden, heads = architecture.get("hidden_size"), architecture.get("num_attention_heads")
    if hidden is not None and heads is not None and hidden % heads:
        raise _fail(
            path,
            f"hidden_size {hidden} is not divisible by num_attention_heads {heads}",
            "choose sizes that divide",
        )
    kv = architecture.get("num_key_value_heads")
    if kv is not None and heads is not None and heads % kv:
        raise _fail(
            path,
            f"num_attention_heads {heads} is not divisible by num_key_value_heads {kv}",
            "choose sizes that divide",
        )
    tokenizer = _tokenizer_dir(path, settings.get("tokenizer"), base)
    loss = settings.get("loss", "auto")  # resolved from the store by the sweep
    if loss not in LOSSES:
        raise _fail(path, f"unknown loss {loss!r}", f"use one of {', '.join(LOSSES)}")
    init = settings.get("init", "random")
    if init not in INITS:
        raise _fail(path, f"unknown init {init!r}", f"use one of {', '.join(INITS)}")
    if init == "teacher" and teacher is None:
        raise _fail(path, "init: teacher needs a teacher", "set `teacher:` to a model directory")
    if init == "teacher" and tokenizer != STORE_TOKENIZER:
        raise _fail(
            path,
            f"init: teacher reads the store's tokens, not tokenizer {Path(tokenizer).name!r}",
            "set `tokenizer: store` for those candidates",
        )
    return Candidate(
        name=_candidate_name(overrides),
        architecture=architecture,
        loss=loss,
        temperature=_number(path, "temperature", settings.get("temperature", 1.0), 1e-3, 100.0),
        alpha=_number(path, "alpha", settings.get("alpha", 0.5), 0.0, 1.0),
        lr=_number(path, "lr", settings.get("lr", 1e-3), 1e-8, 10.0),
        tokenizer=tokenizer,
        init=init,
    )


def _tokenizer_dir(path: Path, value: Any, base: str) -> str:
    """A ``tokenizer:`` value → the tokenizer's directory (absolute), or ``store``; none given:
    the base student's own tokenizer (a config's ``tokenizer:``, a model directory's files)."""
    if value is None:
        own = tokenizer_dir(base)
        return str(own.resolve()) if own is not None else STORE_TOKENIZER
    if value == STORE_TOKENIZER:
        return STORE_TOKENIZER
    found = (path.parent / str(value)).resolve()
    if not isinstance(value, str) or tokenizer_dir(str(found)) is None:
        raise _fail(
            path,
            f"tokenizer {value!r} is not a tokenizer directory ({found})",
            f"name a directory written by save_pretrained, relative to the file, or "
            f"{STORE_TOKENIZER!r}",
        )
    return str(found)


def _teacher_dir(path: Path, value: Any) -> str:
    """A ``teacher:`` value → the model directory (absolute), relative to the YAML file."""
    found = (path.parent / str(value)).resolve()
    if not isinstance(value, str) or not found.is_dir():
        raise _fail(
            path,
            f"teacher {value!r} is not a model directory ({found})",
            "name a directory written by save_pretrained, relative to the file",
        )
    return str(found)


def load_sweep_config(path: Path) -> SweepConfig:
    """Read and validate a sweep YAML; every mistake is a ``UserError`` before any training.

    Raises:
        UserError: unreadable file, unknown keys (named), empty search space, budget < 1,
            invalid sizes, losses or inits, ``init: teacher`` without a ``teacher:``.
    """
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise UserError(f"cannot read sweep config, {path}, ({e.strerror})") from e
    except yaml.YAMLError as e:
        raise UserError(f"sweep config is not valid YAML, {path}, fix the syntax") from e
    if not isinstance(raw, dict):
        raise _fail(path, "sweep config must be a mapping of keys", "see sweeps/default.yaml")
    _unknown(path, "at the top level", set(raw) - set(TOP_LEVEL_KEYS), TOP_LEVEL_KEYS)

    budget = raw.get("budget")
    if not isinstance(budget, dict) or len(budget) != 1:
        raise _fail(
            path, f"budget must be {{steps: N}} or {{tokens: N}}, got {budget!r}", "set one"
        )
    _unknown(path, "in budget", set(budget) - set(BUDGET_KEYS), BUDGET_KEYS)
    ((budget_kind, budget_value),) = budget.items()
    budget_value = _positive_int(path, f"budget {budget_kind}", budget_value)

    defaults = {k: raw[k] for k in (*TRAINING_KEYS, "tokenizer", "init") if k in raw}
    teacher = _teacher_dir(path, raw["teacher"]) if "teacher" in raw else None
    search = raw.get("search") or {}
    explicit = raw.get("candidates") or []
    if not isinstance(search, dict):
        raise _fail(path, "search must be a mapping of key: [values]", "see sweeps/default.yaml")
    _unknown(path, "in search", set(search) - set(SEARCH_KEYS), SEARCH_KEYS)
    if not isinstance(explicit, list):
        raise _fail(path, "candidates must be a list of mappings", "see sweeps/default.yaml")

    space = parse_space(path, search)
    strategy = parse_strategy(path, raw.get("strategy"), has_ranges(space))
    objectives = parse_objectives(path, raw.get("objectives"), strategy)
    overrides_list: list[dict[str, Any]] = []
    if space and strategy.enumerated:
        overrides_list += grid(path, space, SEARCH_KEYS)
    for entry in explicit:
        if not isinstance(entry, dict):
            raise _fail(path, f"a candidate must be a mapping, got {entry!r}", "fix the list")
        _unknown(path, "in a candidate", set(entry) - set(SEARCH_KEYS), SEARCH_KEYS)
        overrides_list.append(dict(entry))
    if not overrides_list and not (space and not strategy.enumerated):
        raise _fail(path, "empty search space", "give `search:` values or a `candidates:` list")

    base_spec = str(raw.get("base", "tiny"))
    candidates = [_make_candidate(path, defaults, o, base_spec, teacher) for o in overrides_list]
    if raw.get("baseline", False):
        base = _make_candidate(path, defaults, {}, base_spec, teacher)
        candidates.append(
            Candidate("baseline-ce", base.architecture, "ce", 1.0, 0.0, base.lr, base.tokenizer)
        )
    names = [c.name for c in candidates]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise _fail(path, f"duplicate candidates {', '.join(duplicates)}", "remove the repeats")

    return SweepConfig(
        base=base_spec,
        seed=int(raw.get("seed", 0)),
        budget_steps=budget_value if budget_kind == "steps" else None,
        budget_tokens=budget_value if budget_kind == "tokens" else None,
        batch_size=_positive_int(path, "batch_size", raw.get("batch_size", 8)),
        warmup=int(raw.get("warmup", 0)),
        eval_batches=_positive_int(path, "eval_batches", raw.get("eval_batches", 20)),
        candidates=candidates,
        raw=raw,
        teacher=teacher,
        strategy=strategy,
        objectives=objectives,
        space={} if strategy.enumerated else space,
        path=path,
        defaults=defaults,
    )
