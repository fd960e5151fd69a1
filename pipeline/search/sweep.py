"""The sweep recipe: many students from one store, searched by an Optuna study, up to N trained on
each batch read once.

Reads top to bottom: validate the YAML and every listed candidate (before any training) → join
the study (``study.py``: created by the first worker, shared by every worker of the search) →
take up to ``--together`` candidates of one reading from it (the grid's and the list's in
order, a sampler's as it proposes them) → train them on one shared stream of batches, stopping
those early stopping stops at a rung (``group_training.py``) → evaluate, save, record → once
nothing is left to train or running elsewhere: leaderboard, Pareto front and plot.

Every candidate of a group sees exactly the batches it would see alone (same loader seed) and
starts from the weights it would have alone (seeded init), so training together changes wall
time, not results.

Several processes (``torchrun``/``accelerate launch … -m kdcache.pipeline sweep``): one worker,
each candidate trained with every rank (data parallel, as train-student: the YAML's
``batch_size`` is the global micro-batch, split over the processes, so the leaderboard does not
depend on their number); eval is sharded over the ranks and summed; the main process talks to
the study and writes OUT. Several workers (``--parallel``, or sweeps started on other machines
with the same ``--study``): candidates side by side, each worker its own devices.

As in train-student, candidates are built on the store's tokenizer size, train and are evaluated
on the trained positions only (``loss_mask``); ``tokens_seen`` counts the real input positions
read (the token budget and the rungs count those too), ``trained_tokens_seen`` (masked stores
only) the trained ones.

Each candidate keeps train-student's ``log.csv`` and ``curves.png`` in its directory
(``sweep_dir.py``); ``--report-to`` logs every candidate of the run into one tracker run, as a
series of its own (``<name>/loss``, ``<name>/eval/…``, ``tracking.py``).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

import click
import torch

from kdcache.pipeline.distill import tracking
from kdcache.pipeline.distill.checks import check_finished
from kdcache.pipeline.distill.dataset import manifest_fingerprint, records_fingerprint
from kdcache.pipeline.distill.student import build_student, enable_gradient_checkpointing
from kdcache.pipeline.distill.trainee import make_accelerator, on_main, parallel_note
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.group_training import GroupRun, train_group
from kdcache.pipeline.search.parallel import plan_workers, run_workers
from kdcache.pipeline.search.readings import Readings
from kdcache.pipeline.search.search_worker import SearchWorker
from kdcache.pipeline.search.strategy import rung_tokens, steps_for
from kdcache.pipeline.search.study import default_url
from kdcache.pipeline.search.sweep_config import Candidate, SweepConfig, load_sweep_config
from kdcache.pipeline.search.sweep_dir import prepare_out, write_all_curves
from kdcache.pipeline.search.sweep_options import DEFAULT_CONFIG, sweep_options  # noqa: F401 (tests)
from kdcache.pipeline.search.sweep_report import report
from kdcache.pipeline.search.teacher_init import TeacherInit
from kdcache.storage import open_store


def _steps(config: SweepConfig, seq_len: int) -> int:
    if config.budget_steps is not None:
        return config.budget_steps
    assert config.budget_tokens is not None  # batch_size is global: the same steps for any ranks
    return max(1, math.ceil(config.budget_tokens / (config.batch_size * seq_len)))


def _checker(
    config: SweepConfig,
    store: Any,
    readings: Readings,
    teacher: TeacherInit,
    settings: dict[str, Any],
) -> Any:
    """``check(candidate)``: its loss resolved for its reading and its model buildable (a
    teacher-initialized one: a shape the teacher can give), before it trains.

    The returned function raises UserError naming the candidate.
    """

    def check(candidate: Candidate) -> Candidate:
        reading, candidate = readings.of(candidate)
        try:
            if candidate.init == "teacher":  # its shape checked; built when its group trains
                teacher.pruner(reading.pad_id).shape(candidate.architecture, reading.vocab)
                return candidate
            model, source = build_student(
                config.base,
                reading.vocab,
                tokenizer=reading.tokenizer,
                overrides=candidate.architecture,
                max_positions=store.seq_len,
            )
            if settings.get("gradient_checkpointing"):
                enable_gradient_checkpointing(model, source)
        except UserError as e:
            raise UserError(f"candidate {candidate.name}: {e.message}") from e
        return candidate

    return check


def _check_strategy(config: SweepConfig, store: Any, settings: dict[str, Any]) -> None:
    """What the strategy needs of the store and the options.

    Raises:
        UserError: early stopping or a sampler on a store without an eval split; bits per byte
            from a store without text; ``--stale-after`` out of range.
    """
    strategy = config.strategy
    if (strategy.early_stopping != "none" or not strategy.enumerated) and not store.shards_of(
        "eval"
    ):
        raise UserError(
            f"strategy {strategy.sampler}/{strategy.early_stopping} compares candidates on the "
            f"eval split, which {store.url} has none of, cache it with --eval-fraction above 0"
        )
    if "eval_bits_per_byte" in config.objectives and not store.manifest.get("text"):
        raise UserError(
            f"objective eval_bits_per_byte needs the store's text (format 6), {store.url}, "
            "re-cache it with this kdcache or use eval_cross_entropy"
        )
    if not 1 <= settings["stale_after"] <= 86400:
        raise UserError(
            f"--stale-after must be between 1 and 86400 seconds, got {settings['stale_after']}"
        )


def sweep(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep recipe; returns the leaderboard rows (also written to OUT)."""
    config = load_sweep_config(Path(settings["config"]))
    if settings["together"] < 1:
        raise UserError(f"--together must be at least 1, got {settings['together']}, use e.g. 4")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])

    # 1. the store, and every listed candidate checked on its reading — before any training
    options, cache = settings["storage_options"], settings.get("shard_cache")
    store = open_store(settings["store"], storage_options=options, cache=cache)
    note = check_finished(store, settings["allow_unfinished"])  # refused unless allowed
    _check_strategy(config, store, settings)
    # "auto" resolved for each candidate's reading of the store (its tokens, or its own
    # tokenizer's): every candidate trains and reports the loss it used
    readings = Readings(store)
    teacher = TeacherInit(config.teacher, store)  # loaded once, if a candidate asks for it
    check = _checker(config, store, readings, teacher, settings)
    config.candidates = [check(c) for c in config.candidates]

    out = Path(settings["out"])
    report_to = settings.get("report_to", "none")
    accelerator = make_accelerator(
        config.seed, settings["precision"], report_to=report_to, run_dir=out
    )
    for line in [note, *readings.notes] if accelerator.is_main_process else []:
        if line:
            click.echo(f"Note: {line}", err=True)
    if (note := parallel_note(accelerator)) and accelerator.is_main_process:
        click.echo(f"Note: {note}", err=True)
    if config.batch_size < accelerator.num_processes:
        raise UserError(
            f"batch_size is the global micro-batch, split over the processes, got "
            f"{config.batch_size} for {accelerator.num_processes} processes, set at least "
            f"{accelerator.num_processes} in {settings['config']}"
        )
    steps = _steps(config, store.seq_len)
    tokens_per_step = config.batch_size * store.seq_len
    rungs = {
        steps_for(t, tokens_per_step): t
        for t in rung_tokens(config.strategy, steps * tokens_per_step)
    }
    plan = {
        "config": config.raw,
        "store_fingerprint": manifest_fingerprint(store.manifest),
        "store_records": records_fingerprint(store.shards_of("train")),
        "together": settings["together"],
        "steps": steps,
    }
    on_main(accelerator, lambda: prepare_out(out, plan))  # every rank waits, or stops with it

    # 2. the study: every worker of this search takes its candidates from it
    study_plan = {k: v for k, v in plan.items() if k != "together"} | {"seq_len": store.seq_len}
    url = settings.get("study") or default_url(out)
    worker = SearchWorker(
        config, out, url, settings["study_name"], study_plan, accelerator,
        settings["stale_after"], check,
    )  # fmt: skip
    facts = {"store": store.url, "processes": accelerator.num_processes, "study": url}
    run_facts = {**plan, **facts, "mixed_precision": accelerator.mixed_precision}
    tracking.start(accelerator, run_facts, series=[c.name for c in config.candidates])
    if accelerator.is_main_process:
        click.echo(
            f"sweep: {config.strategy.sampler} search"
            + (f" with {config.strategy.early_stopping}" if rungs else "")
            + f", {steps} steps per candidate"
            + (f" (rungs at {', '.join(f'{t:,}' for t in rungs.values())} tokens)" if rungs else "")
            + f", {settings['together']} per data pass ({worker.finished()} already finished), "
            f"study {url}"
        )
    run = GroupRun(config, store, out, accelerator, steps, settings, teacher, worker, rungs)
    started = time.perf_counter()
    try:
        while (
            group := worker.next_group(settings["together"], lambda c: id(readings.of(c)[0]))
        ) is not None:
            if not group:  # others' candidates still run: one may need a rerun here
                worker.wait()
                continue
            complete = train_group(run, group, readings.of(group[0])[0])
            if accelerator.is_main_process:
                write_all_curves(out)
            if not complete:
                tracking.finish(accelerator)
                if accelerator.is_main_process:
                    click.echo(
                        f"stopped early (--stop-after); rerun the same command to resume, {out}"
                    )
                return []
        rows = worker.rows()
    finally:
        worker.close()
    wall = time.perf_counter() - started
    tracking.finish(accelerator)

    # 3. leaderboard, Pareto plot, the best candidate per size class
    if accelerator.is_main_process:
        report(rows, out, config.objectives, wall)
    return rows


@click.command("sweep")
@sweep_options
def command(**settings: Any) -> None:
    """Search student architectures on one store: a grid, a list or Optuna's samplers, early
    stopping by rungs of training tokens, several candidates per data pass and several workers
    side by side, with a leaderboard and its Pareto front."""
    settings["store"] = str(settings["store"])
    gpus = torch.cuda.device_count()
    workers, per = plan_workers(settings["parallel"], settings["devices_per_candidate"], gpus)
    if workers > 1 or (per > 1 and not gpus) or (gpus and per < gpus):
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise UserError(
                "--parallel and --devices-per-candidate start their own processes, run the "
                "sweep without torchrun or accelerate launch"
            )
        from kdcache.pipeline.cli import INVOKED_WITH

        argv = INVOKED_WITH[INVOKED_WITH.index("sweep") + 1 :]
        code = run_workers(settings, argv, workers, per, gpus)
        if code:
            raise SystemExit(code)
        return
    sweep(settings)
