"""One sweep worker's side of the study (``study.py``): which candidates it trains next, whether a
candidate stops at a rung, and what it records when one ends.

Every rank of the worker calls every method; the main process alone talks to the study and
sends its answer to the others, so a worker of several processes (data parallel) decides once.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.checkpoint import broadcast_main
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.leaderboard import dominates
from kdcache.pipeline.search.search_space import suggest
from kdcache.pipeline.search.strategy import OBJECTIVES
from kdcache.pipeline.search.study import (
    BAD,
    CANDIDATE,
    ROW,
    SURPLUS,
    WORKER,
    Heartbeat,
    Held,
    WorkerSlot,
    enqueue,
    fresh_allowed,
    in_flight,
    open_study,
    own_running,
    recover_stale,
    result_rows,
    wait_for_queue,
    waiting,
)
from kdcache.pipeline.search.sweep_config import SEARCH_KEYS, Candidate, SweepConfig

POLL_SECONDS = 2.0  # a worker with nothing to ask looks at the study this often


def objective_values(row: dict[str, Any], objectives: list[str]) -> list[float]:
    """``row``'s objective values, all minimized; a value that could not be measured (no eval
    split) is +inf, which Optuna ranks last (NaN would fail the trial)."""
    values = [float(row.get(OBJECTIVES[name], math.nan)) for name in objectives]
    return [v if math.isfinite(v) else math.inf for v in values]


def pareto_levels(points: list[list[float]]) -> list[int]:
    """Non-dominated sorting (all objectives minimized): level 0 is the Pareto front, level 1
    the front once level 0 is removed, …; O(n²) per level, for a rung's few candidates."""
    levels = [-1] * len(points)
    level, left = 0, set(range(len(points)))
    while left:
        front = {i for i in left if not any(dominates(points[j], points[i]) for j in left)}
        for i in front:
            levels[i] = level
        left -= front
        level += 1
    return levels


def promoted(values: list[float], competing: list[list[float]], factor: int) -> bool:
    """Multi-objective successive halving: promoted when ``values`` ranks in the best
    ⌈n / factor⌉ of the ``n`` candidates that reached the rung, by Pareto level and then by
    the first objective (``competing`` includes ``values``)."""
    levels = pareto_levels(competing)
    order = sorted(range(len(competing)), key=lambda i: (levels[i], competing[i][0]))
    keep = {i for i in order[: max(1, math.ceil(len(competing) / factor))]}
    return any(competing[i] == values for i in keep)


class SearchWorker:
    def __init__(
        self,
        config: SweepConfig,
        out: Path,
        url: str,
        name: str,
        plan: dict[str, Any],
        accelerator: Any,
        stale_after: float,
        check: Any,
    ) -> None:
        """Join (or create) the study; ``check(candidate)`` validates a sampled candidate and
        returns it with its loss resolved (raises UserError).

        Raises:
            UserError: the study storage cannot be reached, or holds another sweep.
        """
        from kdcache.pipeline.distill.trainee import on_main
        from kdcache.pipeline.search.strategy import make_pruner, make_sampler

        self.config, self.accelerator, self.check = config, accelerator, check
        self.main = accelerator.is_main_process
        self.stale_after = stale_after
        self.listed = {c.name: c for c in config.candidates}
        self.held: dict[str, Held] = {}  # candidate name → trial, while it trains here
        self.pending: list[Held] = []  # asked, waiting for a group of its reading
        self.resumed = False
        self.done_asking = False
        self.study: Any = None

        def join() -> None:
            self.slot = WorkerSlot(out)
            directions = ["minimize"] * len(config.objectives)
            budget = plan["steps"] * config.batch_size * plan["seq_len"]
            sampler = make_sampler(config.strategy, config.seed, len(config.objectives))
            pruner = make_pruner(config.strategy, budget)
            self.study, created = open_study(url, name, plan, directions, sampler, pruner)
            names = list(self.listed)
            if created:
                enqueue(self.study, names)
            else:
                wait_for_queue(self.study, names)
            self.heartbeat = Heartbeat(self.study, max(0.5, stale_after / 5))

        on_main(accelerator, join)
        self.slot_index = int(broadcast_main(accelerator, self.slot.slot if self.main else None))

    # -- what to train next ---------------------------------------------------------------
    def next_group(self, together: int, reading_of: Any) -> list[Candidate] | None:
        """Up to ``together`` candidates of one reading to train now; [] to wait (other
        workers' candidates are running and one may need a rerun); None when the search is
        over. ``reading_of(candidate)`` → a key that equal readings share."""
        answer: list[Candidate] | None = None
        if self.main:
            answer = self._next_group(together, reading_of)
        return broadcast_main(self.accelerator, answer)

    def _next_group(self, together: int, reading_of: Any) -> list[Candidate] | None:
        recover_stale(self.study, self.stale_after, self.slot.name)
        if self.done_asking and waiting(self.study):
            self.done_asking = False  # a rerun was queued since (here or by another worker)
        if not self.resumed:  # after a kill: this worker's own running trials first
            self.resumed = True
            for trial in own_running(self.study, self.slot.name):
                self._hold(trial, self._candidate(trial), queue=True)
        group: list[Held] = []
        while self.pending and len(group) < together:
            if group and reading_of(self.pending[0].candidate) != reading_of(group[0].candidate):
                break
            group.append(self.pending.pop(0))
        while len(group) < together and not self.pending and not self.done_asking:
            held = self._ask()
            if held is None:
                continue
            if group and reading_of(held.candidate) != reading_of(group[0].candidate):
                self.pending.append(held)
                break
            group.append(held)
        if group:
            self.held.update({h.candidate.name: h for h in group})
            return [h.candidate for h in group]
        if self.pending:
            return self._next_group(together, reading_of)
        return [] if in_flight(self.study) else None

    def _ask(self) -> Held | None:
        """A new trial from the study (None: it was skipped; ``done_asking`` once the queue and
        the budget are spent)."""
        from optuna.trial import TrialState

        trial = self.study.ask()
        name = trial.user_attrs.get(CANDIDATE)
        if name is None and not fresh_allowed(self.study, trial, self.config.strategy.trials):
            trial.set_user_attr(SURPLUS, True)  # past the budget: never trained, never counted
            self.study.tell(trial, state=TrialState.FAIL)
            self.done_asking = True
            return None
        try:
            candidate = self._candidate(trial)
        except UserError as e:  # a sampled point the architecture cannot have
            trial.set_user_attr(BAD, e.message)
            self.study.tell(trial, state=TrialState.FAIL)
            click.echo(f"Note: trial {trial.number} skipped: {e.message}", err=True)
            return None
        return self._hold(trial, candidate)

    def _candidate(self, trial: Any) -> Candidate:
        name = trial.user_attrs.get(CANDIDATE)
        if name in self.listed:
            return self.listed[name]
        point = suggest(trial, self.config.space, SEARCH_KEYS)  # a retry: its fixed params
        candidate = self.config.make_candidate(point)
        candidate = self.config.make_candidate(point, name or f"t{trial.number}-{candidate.name}")
        candidate = self.check(candidate)
        trial.set_user_attr(CANDIDATE, candidate.name)
        return candidate

    def _hold(self, trial: Any, candidate: Candidate, queue: bool = False) -> Held:
        trial.set_user_attr(WORKER, self.slot.name)
        self.heartbeat.hold(trial)
        held = Held(trial, candidate)
        if queue:
            self.pending.append(held)
        return held

    # -- rungs and results ----------------------------------------------------------------
    def lost(self, name: str) -> bool:
        """Whether another worker failed this candidate's trial (it took this worker for dead):
        stop training it, its rerun is queued."""
        answer = None
        if self.main:
            answer = self.held[name].trial.number in self.heartbeat.lost
        return bool(broadcast_main(self.accelerator, answer))

    def stop_at_rung(self, tokens: int, rows: dict[str, dict[str, Any]]) -> set[str]:
        """Report each candidate's objectives at ``tokens`` (``rows`` by name); the names that
        stop here. Every member of the group reports before any is decided, so the pruner
        halves the group as a whole (``strategy.RungPruner``)."""
        answer = None
        if self.main:
            answer = self._stop_at_rung(tokens, rows)
        return set(broadcast_main(self.accelerator, answer))

    def _stop_at_rung(self, tokens: int, rows: dict[str, dict[str, Any]]) -> set[str]:
        values = {n: objective_values(row, self.config.objectives) for n, row in rows.items()}
        trials = {n: self.held[n].trial for n in rows}
        if len(self.config.objectives) == 1:
            for name, trial in trials.items():
                trial.report(values[name][0], tokens)
            return {name for name, trial in trials.items() if trial.should_prune()}
        key = f"rung_{tokens}"  # multi-objective: Optuna's pruners take one value
        for name, trial in trials.items():
            trial.set_user_attr(key, values[name])
        competing = [
            t.user_attrs[key] for t in self.study.get_trials(deepcopy=False) if key in t.user_attrs
        ]
        for value in values.values():
            if value not in competing:
                competing.append(value)
        factor = self.config.strategy.reduction_factor
        return {name for name in rows if not promoted(values[name], competing, factor)}

    def record(self, name: str, row: dict[str, Any], stopped: bool = False) -> None:
        """End ``name``'s trial with its leaderboard ``row``: complete, or pruned at a rung."""
        if not self.main:
            return
        from optuna.trial import TrialState

        held = self.held.pop(name)
        self.heartbeat.release(held.trial)
        try:
            held.trial.set_user_attr(ROW, row)
            if stopped:
                self.study.tell(held.trial, state=TrialState.PRUNED)
            else:
                self.study.tell(held.trial, objective_values(row, self.config.objectives))
        except (RuntimeError, ValueError):  # optuna's UpdateFinishedTrialError is a RuntimeError
            click.echo(f"Note: {name} was rerun by another worker (this one was silent)", err=True)

    def drop(self, name: str) -> None:
        """Forget a candidate another worker took over (``lost``)."""
        if self.main:
            held = self.held.pop(name)
            self.heartbeat.release(held.trial)

    def rows(self) -> list[dict[str, Any]]:
        """Every finished or stopped candidate's row, on every rank."""
        return broadcast_main(self.accelerator, result_rows(self.study) if self.main else None)

    def finished(self) -> int:
        """How many candidates the study has results for (main process)."""
        return len(result_rows(self.study))

    def wait(self) -> None:
        time.sleep(POLL_SECONDS)

    def close(self) -> None:
        if self.main and self.study is not None:
            self.heartbeat.close()
