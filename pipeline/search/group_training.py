"""Train a group of sweep candidates on one stream of batches: each batch read and decoded once,
fed to every candidate; at each rung of early stopping every candidate is evaluated and the
study (``search_worker.py``) says which stop; at the end each is evaluated and saved.

Every candidate of a group sees exactly the batches it would see alone (same loader seed) and
starts from the weights it would have alone (seeded init), so training together changes wall
time, not results; a candidate stopped at a rung only leaves the group.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.distill.checkpoint import (
    broadcast_main,
    has_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader, eval_batches
from kdcache.pipeline.distill.student import (
    build_student,
    count_parameters,
    enable_gradient_checkpointing,
)
from kdcache.pipeline.distill.trainee import Trainee, make_trainee, sum_over_ranks, train_step
from kdcache.pipeline.files import write_text_atomic
from kdcache.pipeline.host_memory import keep_freed_memory
from kdcache.pipeline.precision import eval_context
from kdcache.pipeline.progress import progress
from kdcache.pipeline.search.leaderboard import (
    TEACHER_METRICS,
    inference_tokens_per_s,
    non_embedding_parameters,
)
from kdcache.pipeline.search.readings import Reading
from kdcache.pipeline.search.sweep_config import Candidate, SweepConfig
from kdcache.pipeline.search.sweep_dir import CandidateLogs, candidate_dir
from kdcache.pipeline.search.teacher_init import TeacherInit
from kdcache.storage import sample_temperature


@dataclass
class GroupRun:
    """What every group of a sweep shares."""

    config: SweepConfig
    store: Any
    out: Path
    accelerator: Any
    steps: int
    settings: dict[str, Any]
    teacher: TeacherInit
    worker: Any  # SearchWorker
    rungs: dict[int, int]  # step → the training tokens it reaches (early stopping's rungs)


def _build(run: GroupRun, candidate: Candidate, reading: Reading) -> Any:
    config, store = run.config, run.store
    if candidate.init == "teacher":  # pruned from the teacher (teacher_init.py)
        model = run.teacher.pruner(reading.pad_id).student(candidate.architecture)
    else:
        model, _ = build_student(
            config.base,
            reading.vocab,
            tokenizer=reading.tokenizer,
            overrides=candidate.architecture,
            seed=config.seed,
            max_positions=store.seq_len if reading.cross is None else max(2048, store.seq_len),
        )
    if run.settings.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model, config.base)
    return model


def _checkpoint(run: GroupRun, names: list[str]) -> Path | None:
    """This worker's group checkpoint when it holds every one of ``names`` (a restart resumes
    it), else None (a stale one is removed)."""
    path = run.out / "groups" / f"worker-{run.worker.slot_index}"
    if not has_checkpoint(path, run.accelerator):
        return None
    whole = None
    if run.accelerator.is_main_process:
        whole = all((path / f"{name}.pt").is_file() for name in names)
        if not whole:
            shutil.rmtree(path, ignore_errors=True)
    return path if broadcast_main(run.accelerator, whole) else None


def measure(
    run: GroupRun,
    candidate: Candidate,
    trainee: Trainee,
    reading: Reading,
    probe: Any,
    max_batches: int,
) -> tuple[dict[str, float], dict[str, Any]]:
    """Evaluate ``trainee`` (every rank its share of the eval batches) → its eval metrics and
    its leaderboard row (the row is complete on the main process only)."""
    accelerator, store = run.accelerator, run.store
    model = accelerator.unwrap_model(trainee.model)
    drawn_at = sample_temperature(store.manifest) or 1.0
    metrics: dict[str, float] = {}
    if store.shards_of("eval"):
        batches = eval_batches(
            store,
            run.config.batch_size,
            reading.pad_id,
            max_batches=max_batches,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            collate_fn=reading.cross,
        )
        sum_ranks = partial(sum_over_ranks, accelerator=accelerator)
        with eval_context(accelerator.device, accelerator.mixed_precision):
            metrics = evaluate(
                model,
                batches,
                vocab=reading.vocab,
                sum_ranks=sum_ranks,
                sample_temperature=drawn_at,
            )
    row: dict[str, Any] = {"candidate": candidate.name}
    if not accelerator.is_main_process:
        return metrics, row
    ids = probe["input_ids"].to(accelerator.device)
    speed = inference_tokens_per_s(model, ids)
    seconds = float(trainee.extra.get("train_seconds", 0.0))
    row.update(
        parameters=count_parameters(model),
        non_embedding_parameters=non_embedding_parameters(model),
        tokens_seen=trainee.tokens,
        **({"trained_tokens_seen": trainee.trained_tokens} if store.has_loss_mask else {}),
        eval_cross_entropy=metrics.get("cross_entropy", math.nan),
        # the tokenizer-free scale, from a store with text spans (format 6)
        **({"eval_bits_per_byte": metrics["bits_per_byte"]} if "bits_per_byte" in metrics else {}),
        # the distances to the teacher that the store's targets allow (evaluation.METRICS)
        **{name: metrics[name] for name in TEACHER_METRICS if name in metrics},
        ece=metrics.get("ece", math.nan),
        train_tokens_per_s=trainee.tokens / max(seconds, 1e-9),
        inference_tokens_per_s=speed,
        inference_latency_ms=1000.0 * ids.numel() / speed,  # one forward of the probe batch
        **candidate.settings(),
    )
    return metrics, row


def _save(
    run: GroupRun, candidate: Candidate, trainee: Trainee, reading: Reading, facts: dict[str, Any]
) -> None:
    """The student, its tokenizer, then metrics.json (its presence marks it finished)."""
    target = candidate_dir(run.out, candidate.name)
    run.accelerator.unwrap_model(trainee.model).save_pretrained(target)
    reading.tokenizer.save_pretrained(target)
    write_text_atomic(target / "metrics.json", json.dumps(facts, indent=2) + "\n")


def train_group(run: GroupRun, group: list[Candidate], reading: Reading) -> bool:
    """Train ``group`` (candidates of one ``reading``) to the budget, stopping those the study
    stops at a rung; evaluate, save and record each. Returns False when ``--stop-after``
    stopped it early (a checkpoint holds its progress)."""
    accelerator, config, settings = run.accelerator, run.config, run.settings
    main = accelerator.is_main_process
    keep_freed_memory(accelerator.device)  # CPU only: no page-fault storm per vocab-wide tensor
    loader = TeacherLoader(
        DistillDataset(
            run.store,
            "train",
            batch_size=config.batch_size,
            seed=config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pad_id=reading.pad_id,
        ),
        num_workers=settings["workers"],
        pin_memory=accelerator.device.type == "cuda",
        collate_fn=reading.cross,  # None: the store's own tokens
    )
    warmup = config.warmup or max(1, run.steps // 10)
    drawn_at = sample_temperature(run.store.manifest) or 1.0  # sampled-kl trains at it
    trainees, by_name = [], {c.name: c for c in group}
    for candidate in group:
        trainee = make_trainee(
            candidate.name,
            _build(run, candidate, reading),
            accelerator,
            loss=candidate.loss,
            temperature=candidate.temperature,
            alpha=candidate.alpha,
            lr=candidate.lr,
            steps=run.steps,
            warmup=warmup,
            vocab=reading.vocab,
            sample_temperature=drawn_at,
        )
        trainees.append(trainee)
        if trainee.head_note and main:
            click.echo(f"Note: {candidate.name}: {trainee.head_note}", err=True)
    checkpoint = run.out / "groups" / f"worker-{run.worker.slot_index}"
    if (found := _checkpoint(run, [t.name for t in trainees])) is not None:
        load_checkpoint(found, trainees, loader, accelerator)
    for trainee in trainees:
        trainee.extra.setdefault("train_seconds", 0.0)
    logs = CandidateLogs(run.out, trainees, accelerator)  # log.csv kept to the checkpoint's steps

    probe = None  # a batch to time inference on (main process): the first eval batch
    if main:
        first = eval_batches(run.store, config.batch_size, reading.pad_id, collate_fn=reading.cross)
        probe = next(iter(first), None)
    batch = None
    bar = progress(
        total=run.steps,
        initial=trainees[0].step,
        unit="step",
        desc=f"{len(group)} together",
        disable=not main,
        dynamic_ncols=True,
    )
    every = settings["checkpoint_every"]
    stop_at = (
        min(run.steps, trainees[0].step + settings["stop_after"])
        if settings["stop_after"]
        else run.steps
    )
    while trainees and trainees[0].step < stop_at:
        batch = next(loader)  # read and decoded once, fed to every candidate
        losses = {}
        for trainee in trainees:
            start = time.perf_counter()
            row = train_step(trainee, [batch], accelerator)
            trainee.extra["train_seconds"] += time.perf_counter() - start
            losses[trainee.name] = row["loss"]
            logs.add(trainee, row, trainee.extra["train_seconds"])
        bar.update(1)
        bar.set_postfix(best_loss=f"{min(losses.values()):.3f}")
        step = trainees[0].step
        if step in run.rungs and step < run.steps:
            trainees = _rung(run, trainees, by_name, reading, probe or batch, run.rungs[step], logs)
        if trainees and every and step % every == 0:
            save_checkpoint(checkpoint, trainees, loader, accelerator)
            logs.checkpoint()
    bar.close()
    if trainees and trainees[0].step < run.steps:  # --stop-after: a checkpoint to resume from
        save_checkpoint(checkpoint, trainees, loader, accelerator)
        logs.checkpoint()
        loader.close()
        return False
    loader.close()

    if probe is None and batch is None and main:  # no eval split, nothing left to train
        probe = next(iter(loader))
    for trainee in trainees:
        candidate = by_name[trainee.name]
        metrics, row = measure(
            run, candidate, trainee, reading, probe or batch, config.eval_batches
        )
        logs.evaluated(trainee, metrics)
        if main:
            facts = {"row": row, "eval": metrics, "mixed_precision": accelerator.mixed_precision}
            _save(run, candidate, trainee, reading, facts)
        run.worker.record(candidate.name, row)
    if main:
        shutil.rmtree(checkpoint, ignore_errors=True)
    accelerator.wait_for_everyone()
    return True


def _rung(
    run: GroupRun,
    trainees: list[Trainee],
    by_name: dict[str, Candidate],
    reading: Reading,
    probe: Any,
    tokens: int,
    logs: CandidateLogs,
) -> list[Trainee]:
    """Evaluate every trainee at a rung of ``tokens``; the ones the study stops are recorded
    (their row says where) and leave the group; so do those another worker took over."""
    live = []
    for trainee in trainees:
        if run.worker.lost(trainee.name):
            run.worker.drop(trainee.name)
        else:
            live.append(trainee)
    measured = {
        t.name: measure(run, by_name[t.name], t, reading, probe, run.config.eval_batches)
        for t in live
    }
    stops = run.worker.stop_at_rung(tokens, {name: row for name, (_, row) in measured.items()})
    kept = []
    for trainee in live:
        metrics, row = measured[trainee.name]
        if trainee.name not in stops:
            kept.append(trainee)
            continue
        logs.evaluated(trainee, metrics)
        row["stopped_at_tokens"] = trainee.tokens
        run.worker.record(trainee.name, row, stopped=True)
        if run.accelerator.is_main_process:
            click.echo(f"{trainee.name}: stopped at {trainee.tokens:,} tokens (rung)")
    return kept
