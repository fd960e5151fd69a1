"""Experiment tracking (``--report-to``) through Accelerate's trackers: TensorBoard, wandb, MLflow.

Where each writes: TensorBoard under the run directory, ``OUT/tensorboard/<project>``; wandb in
the mode its environment says (``WANDB_MODE``), its files under ``$WANDB_DIR``, else OUT; MLflow
to ``MLFLOW_TRACKING_URI`` (experiment ``$MLFLOW_EXPERIMENT_NAME``, else the project). The project
is ``$WANDB_PROJECT``, else ``kdcache``; the run is named after OUT. Only the main process logs
(Accelerate starts the trackers there alone); a resumed run is a new tracker run.

What is logged (docs/architecture.md §5): the run's settings, flattened to str/int/float/bool;
every training row (``trainee.LOG_FIELDS``: ``loss``, ``kd``, ``ce``, ``lr``, ``grad_norm``, …)
at its step; every eval as ``eval/<metric>``. A sweep logs its candidates in one tracker run, each
under its name (``<candidate>/loss``, ``<candidate>/eval/cross_entropy``) as a *series* with its own
steps, since every group of candidates starts again at step 1.
"""

from __future__ import annotations

import importlib.util
import json
import numbers
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from kdcache.pipeline.errors import UserError

# --report-to name → the modules that provide it (Accelerate also takes tensorboardX)
TRACKERS = {
    "tensorboard": ("tensorboard", "tensorboardX"),
    "wandb": ("wandb",),
    "mlflow": ("mlflow",),
}
TENSORBOARD_DIR = "tensorboard"  # in OUT
PROJECT = "kdcache"
INSTALL = "pip install 'kdcache[track]'"
ConfigValue = str | int | float | bool


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def tracker_names(report_to: str) -> list[str]:
    """The trackers ``--report-to`` names (comma-separated; ``none``: no tracker), each installed.

    Raises:
        UserError: an unknown name, or a tracker whose package is not installed.
    """
    names = [name.strip().lower() for name in report_to.split(",")]
    if names == ["none"]:
        return []
    if not all(name in TRACKERS for name in names):
        raise UserError(
            f"--report-to takes {', '.join(TRACKERS)} (several comma-separated) or none, got "
            f"{report_to!r}, use e.g. --report-to tensorboard"
        )
    for name in names:
        if not any(_installed(module) for module in TRACKERS[name]):
            raise UserError(f"--report-to {name} needs the {name} package: {INSTALL}")
    return list(dict.fromkeys(names))


def accelerator_kwargs(report_to: str, run_dir: Path | None) -> dict[str, Any]:
    """What ``Accelerator(...)`` takes to log to ``report_to``'s trackers ({} for none).

    Raises:
        UserError: as ``tracker_names``.
    """
    names = tracker_names(report_to)
    if not names:
        return {}
    if run_dir is None:
        raise ValueError("tracking needs the run directory (run_dir)")
    from accelerate.utils import ProjectConfiguration

    directories = ProjectConfiguration(
        project_dir=str(run_dir), logging_dir=str(run_dir / TENSORBOARD_DIR)
    )
    return {"log_with": names, "project_config": directories}


def flat_config(config: Mapping[str, Any]) -> dict[str, ConfigValue]:
    """``config`` as one level of ``a.b.c`` keys whose values every tracker takes: str, int,
    float, bool (lists as JSON, anything else as ``str``); keys only of MLflow's characters."""
    flat: dict[str, ConfigValue] = {}

    def visit(key: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for k, v in value.items():
                visit(f"{key}.{k}" if key else str(k), v)
            return
        key = re.sub(r"[^\w.\-/ ]", "_", key)
        if isinstance(value, bool | str):
            flat[key] = value
        elif isinstance(value, numbers.Integral):
            flat[key] = int(value)
        elif isinstance(value, numbers.Real):
            flat[key] = float(value)
        elif isinstance(value, list | tuple):
            flat[key] = json.dumps(value, default=str)
        else:
            flat[key] = str(value)

    visit("", config)
    return flat


def start(
    accelerator: Any,
    config: Mapping[str, Any],
    *,
    run_name: str | None = None,
    first_step: int = 1,
    series: Iterable[str] = (),
) -> None:
    """Start the run of every tracker ``accelerator`` was made with, ``config`` as its settings.

    Call on every rank, after the run directory is prepared and before the first step.
    ``first_step``: the first step this run logs (resumed: the checkpoint's step + 1); TensorBoard
    hides what an earlier, killed run logged from that step on. ``series``: the names a sweep
    logs its candidates under (``log_train(..., series=name)``), each on its own steps.

    Raises:
        UserError: a tracker that cannot start (bad URI, no credentials), on every rank.
    """

    if not accelerator.log_with:
        return
    failure: list[str | None] = [None]
    if accelerator.is_main_process:
        run_dir = Path(accelerator.project_dir)
        name = run_name or run_dir.name
        wandb = {"name": name} | ({} if "WANDB_DIR" in os.environ else {"dir": str(run_dir)})
        tensorboard = {"purge_step": first_step} if first_step > 1 else {}
        kwargs = {"wandb": wandb, "mlflow": {"run_name": name}, "tensorboard": tensorboard}
        try:
            accelerator.init_trackers(
                os.environ.get("WANDB_PROJECT") or PROJECT,
                config=flat_config(config),
                init_kwargs=kwargs,
            )
            for tracker in accelerator.trackers:
                if tracker.name == "wandb":  # each series on its own step axis
                    for prefix in series:
                        tracker.tracker.define_metric(f"{prefix}/*", step_metric=f"{prefix}/step")
        except Exception as e:  # every tracker's own errors: one line, before any training
            reason = (str(e).strip().splitlines() or [""])[0]
            failure[0] = (
                f"--report-to {','.join(map(str, accelerator.log_with))} could not start a run "
                f"({type(e).__name__}: {reason}), fix the tracker's settings or pass --report-to none"
            )
    from kdcache.pipeline.distill.trainee import stop_together  # trainee imports this module

    stop_together(accelerator, failure[0])


def log_train(accelerator: Any, row: Mapping[str, Any], *, series: str | None = None) -> None:
    """One training row (``train_step``'s, with ``elapsed_s``, ``tokens_per_s``) at its step."""
    values = {k: v for k, v in row.items() if k != "step" and isinstance(v, numbers.Real)}
    _log(accelerator, values, int(row["step"]), series)


def log_eval(
    accelerator: Any, metrics: Mapping[str, Any], step: int, *, series: str | None = None
) -> None:
    """Eval metrics (``evaluate``'s) as ``eval/<metric>`` at ``step``."""
    values = {
        f"eval/{k}": v for k, v in metrics.items() if k != "step" and isinstance(v, numbers.Real)
    }
    _log(accelerator, values, step, series)


def _log(accelerator: Any, values: dict[str, Any], step: int, series: str | None) -> None:
    if not accelerator.trackers:  # none asked for, or not the main process
        return
    if series is None:
        accelerator.log(values, step=step)
        return
    values = {f"{series}/{k}": v for k, v in values.items()}
    for tracker in accelerator.trackers:
        if tracker.name == "wandb":  # wandb drops a step lower than its last: the series' own
            tracker.log({**values, f"{series}/step": step})
        else:
            tracker.log(values, step=step)


def finish(accelerator: Any) -> None:
    """End every tracker's run (files flushed and closed). Not ``accelerator.end_training()``,
    which also destroys the process group that the recipe's last ``wait_for_everyone`` needs."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers.clear()
