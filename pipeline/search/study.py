"""The sweep's Optuna study: the one record of which candidates exist, which run where, and what
each measured, shared by every worker of a search (on one machine or many).

Storage (``--study``): a journal file (default ``OUT/study.journal``; on a shared filesystem for
workers on several machines) or a database URL (``sqlite:///…``, ``postgresql://…``). The first
worker creates the study, records the plan (store and search space: a worker of another sweep is
refused) and, for the grid and the list, enqueues every candidate; Optuna's queue hands each
enqueued trial to exactly one worker.

Liveness, written here because Optuna's heartbeats cover database storages only: a worker
stamps its running trials (``heartbeat``, every ``stale_after / 5`` s, from a thread). A trial
whose stamp is older than ``stale_after`` belongs to a dead worker (kill -9, a lost node): the
first worker to see it marks it failed — the storage lets exactly one do so — and enqueues a
copy (same candidate, same parameters) that some worker reruns; a failed trial is never counted.
A worker restarted with the same identity (host, OUT, slot) takes its own running trials back
at once and resumes them from its checkpoint.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.errors import UserError

STUDY_FILE = "study.journal"
HEARTBEAT, WORKER, CANDIDATE, ROW, RETRY_OF, SURPLUS, BAD = (
    "heartbeat",
    "worker",
    "candidate",
    "row",
    "retry_of",
    "surplus",
    "invalid",
)
PLAN_ATTR, ENQUEUED_ATTR = "kdcache_plan", "kdcache_enqueued"


def storage(url: str) -> Any:
    """An Optuna storage for ``url``: a database URL (``scheme://``) or a journal file path.

    Raises:
        UserError: a database that cannot be reached or a driver not installed, a journal
            file whose directory does not exist.
    """
    import optuna
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    try:
        if "://" in url:
            return optuna.storages.RDBStorage(url, engine_kwargs=_engine_kwargs(url))
        path = Path(url)
        if not path.parent.is_dir():
            raise UserError(f"--study {url}: the directory {path.parent} does not exist, create it")
        return JournalStorage(JournalFileBackend(str(path)))
    except UserError:
        raise
    except Exception as e:  # sqlalchemy's OperationalError, ArgumentError, a missing driver
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot reach the study storage {url} ({first[:200]})") from e


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}  # workers writing at once wait for the lock
    return {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}


def open_study(
    url: str, name: str, plan: dict[str, Any], directions: list[str], sampler: Any, pruner: Any
) -> tuple[Any, bool]:
    """The study ``name`` at ``url``, created (returns True) or joined (False).

    Raises:
        UserError: the study was created for another store, search space or objectives.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    store = storage(url)
    text = json.dumps(plan, sort_keys=True, default=str)
    kwargs = {"study_name": name, "storage": store, "sampler": sampler, "pruner": pruner}
    try:
        study = optuna.create_study(directions=directions, **kwargs)
        study.set_user_attr(PLAN_ATTR, text)
        return study, True
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(**kwargs)
    recorded = study.user_attrs.get(PLAN_ATTR)
    for _ in range(100):  # its creator writes the plan right after creating it
        if recorded is not None:
            break
        time.sleep(0.1)
        recorded = optuna.load_study(**kwargs).user_attrs.get(PLAN_ATTR)
    if recorded != text or [d.name.lower() for d in study.directions] != directions:
        theirs = json.loads(recorded) if recorded else {}
        differs = sorted(
            k
            for k in {*plan, *theirs}
            if json.dumps(plan.get(k), sort_keys=True, default=str)
            != json.dumps(theirs.get(k), sort_keys=True, default=str)
        )
        raise UserError(
            f"study {name!r} in {url} was created for another sweep (differs in "
            f"{', '.join(differs) or 'objectives'}), give another --study or --study-name"
        )
    return study, False


def enqueue(study: Any, names: list[str]) -> None:
    """Queue every listed candidate once (the creator does it; a joiner completes a queue its
    creator died filling)."""
    have = {t.user_attrs.get(CANDIDATE) for t in study.get_trials(deepcopy=False)}
    for name in names:
        if name not in have:
            study.enqueue_trial({}, user_attrs={CANDIDATE: name})
    study.set_user_attr(ENQUEUED_ATTR, True)


def wait_for_queue(study: Any, names: list[str], seconds: float = 30.0) -> None:
    """A joiner of a listed sweep: wait for the creator's queue, or fill it after ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if study.user_attrs.get(ENQUEUED_ATTR):
            return
        time.sleep(0.5)
    enqueue(study, names)


class WorkerSlot:
    """This worker's identity (host, OUT, slot): slot i is held by an exclusive lock on
    ``OUT/workers/slot-<i>.lock`` for the process's life, so a second worker on the same OUT
    takes slot i+1 and a restarted one (the kernel freed its lock) takes its slot back."""

    def __init__(self, out: Path) -> None:
        directory = out / "workers"
        directory.mkdir(parents=True, exist_ok=True)
        slot = 0
        while True:
            handle = (directory / f"slot-{slot}.lock").open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError:
                handle.close()
                slot += 1
        self._handle = handle  # held until the process ends
        self.slot = slot
        self.name = f"{socket.gethostname()}:{out.resolve()}:{slot}"


@dataclass
class Held:
    """A trial this worker runs and the candidate it trains."""

    trial: Any
    candidate: Any


class Heartbeat:
    """Stamps the held trials every ``interval`` seconds from a daemon thread; a trial another
    worker has failed meanwhile (it thought this one dead) is noted in ``lost``."""

    def __init__(self, study: Any, interval: float) -> None:
        self.study, self.interval = study, interval
        self.held: dict[int, Any] = {}  # trial number → trial
        self.lost: set[int] = set()
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="kdcache-heartbeat")
        self._thread.start()

    def hold(self, trial: Any) -> None:
        with self._lock:
            self.held[trial.number] = trial
        stamp(trial)

    def release(self, trial: Any) -> None:
        with self._lock:
            self.held.pop(trial.number, None)

    def _run(self) -> None:

        while not self._stop.wait(self.interval):
            with self._lock:
                trials = list(self.held.values())
            for trial in trials:
                try:
                    stamp(trial)
                except RuntimeError:  # optuna's UpdateFinishedTrialError
                    self.lost.add(trial.number)
                except Exception:  # a storage hiccup: the next beat tries again
                    pass

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def stamp(trial: Any) -> None:
    trial.set_user_attr(HEARTBEAT, time.time())


def recover_stale(study: Any, stale_after: float, me: str) -> list[int]:
    """Fail every running trial of another worker silent for ``stale_after`` seconds and queue
    its rerun; returns the numbers failed here (another worker may have won some)."""
    from optuna.trial import TrialState

    failed = []
    now = time.time()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        beat = trial.user_attrs.get(HEARTBEAT)
        if trial.user_attrs.get(WORKER) == me or beat is None or now - beat < stale_after:
            continue
        try:
            study.tell(trial.number, state=TrialState.FAIL)
        except (RuntimeError, ValueError):  # optuna's UpdateFinishedTrialError is a RuntimeError
            continue  # another worker failed it first, or its owner finished it
        attrs = {CANDIDATE: trial.user_attrs.get(CANDIDATE), RETRY_OF: trial.number}
        study.enqueue_trial(dict(trial.params), user_attrs=attrs)
        failed.append(trial.number)
    return failed


def own_running(study: Any, me: str) -> list[Any]:
    """This worker's trials still running in the study (a restart after kill -9): Trial objects
    to report and tell through."""
    import optuna
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    return [
        optuna.trial.Trial(study, t._trial_id) for t in trials if t.user_attrs.get(WORKER) == me
    ]


def in_flight(study: Any) -> bool:
    """Whether any trial waits or runs (a worker with nothing to ask waits for them: it may
    have to rerun one whose worker died)."""
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING)))


def waiting(study: Any) -> bool:
    """Whether a trial waits in the queue (a listed candidate, or a rerun of a stale one)."""
    from optuna.trial import TrialState

    return bool(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


def fresh_allowed(study: Any, trial: Any, limit: int | None) -> bool:
    """Whether a newly sampled trial is within the ``trials`` budget: fewer than ``limit``
    sampled trials (not enqueued ones) carry a smaller number. Numbers are handed out in
    order, so racing workers agree on which trials are surplus."""
    if limit is None:
        return False
    earlier = [
        t
        for t in study.get_trials(deepcopy=False)
        if t.number < trial.number and "fixed_params" not in t.system_attrs
    ]
    return len(earlier) < limit


def result_rows(study: Any) -> list[dict[str, Any]]:
    """The leaderboard rows of every finished or stopped candidate (one per candidate)."""
    from optuna.trial import TrialState

    rows: dict[str, dict[str, Any]] = {}
    states = (TrialState.COMPLETE, TrialState.PRUNED)
    for trial in study.get_trials(deepcopy=False, states=states):
        row = trial.user_attrs.get(ROW)
        if row is not None:
            rows.setdefault(row["candidate"], row)
    return list(rows.values())


def default_url(out: Path) -> str:
    return str(out / STUDY_FILE)


def identity_note(worker: WorkerSlot) -> str:
    return f"worker {worker.slot} (pid {os.getpid()})"
