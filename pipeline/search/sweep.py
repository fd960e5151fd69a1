"""The sweep recipe: many students from one store, up to N trained on each batch read once.

Reads top to bottom: validate the YAML and every candidate (before any training) → plan groups
of ``--together`` candidates → for each unfinished group: one loader, one ``Trainee`` per
candidate, each batch fed to all of them → evaluate, save → leaderboard and Pareto plot.

Every candidate of a group sees exactly the batches it would see alone (same loader seed) and
starts from the weights it would have alone (seeded init), so training together changes wall
time, not results.

Several processes (``torchrun``/``accelerate launch … -m kdcache.pipeline sweep``): the groups
still train one after another, each candidate with every rank (data parallel, as train-student:
the YAML's ``batch_size`` is the global micro-batch, split over the processes, so the leaderboard
does not depend on their number); eval is sharded over the ranks and summed; the main process
writes OUT and prints.

As in train-student, candidates are built on the store's tokenizer size, train and are evaluated
on the trained positions only (``loss_mask``); ``tokens_seen`` counts the real input positions
read (the token budget counts those too), ``trained_tokens_seen`` (masked stores only) the
trained ones.

Each candidate keeps train-student's ``log.csv`` and ``curves.png`` in its directory
(``sweep_dir.py``); ``--report-to`` logs every candidate of the run into one tracker run, as a
series of its own (``<name>/loss``, ``<name>/eval/…``, ``tracking.py``).
"""

from __future__ import annotations

import json
import math
import shutil
import time
from functools import partial
from pathlib import Path
from typing import Any

import click
import torch

from kdcache.pipeline.distill import tracking
from kdcache.pipeline.distill.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from kdcache.pipeline.distill.checks import check_finished
from kdcache.pipeline.distill.dataset import manifest_fingerprint, records_fingerprint
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader, eval_batches
from kdcache.pipeline.distill.student import (
    build_student,
    count_parameters,
    enable_gradient_checkpointing,
)
from kdcache.pipeline.distill.trainee import (
    make_accelerator,
    make_trainee,
    on_main,
    parallel_note,
    sum_over_ranks,
    train_step,
)
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.files import write_text_atomic
from kdcache.pipeline.host_memory import keep_freed_memory
from kdcache.pipeline.precision import eval_context
from kdcache.pipeline.progress import progress
from kdcache.pipeline.search.leaderboard import (
    TEACHER_METRICS,
    best_per_size_class,
    inference_tokens_per_s,
    non_embedding_parameters,
    plot_pareto,
    write_leaderboard,
)
from kdcache.pipeline.search.readings import Reading, candidate_readings, plan_groups
from kdcache.pipeline.search.sweep_config import Candidate, SweepConfig, load_sweep_config
from kdcache.pipeline.search.sweep_dir import (
    CandidateLogs,
    candidate_dir,
    finished,
    prepare_out,
    write_all_curves,
)
from kdcache.pipeline.search.sweep_options import DEFAULT_CONFIG, sweep_options  # noqa: F401 (tests)
from kdcache.pipeline.search.teacher_init import TeacherInit
from kdcache.storage import open_store, sample_temperature

BASELINE = "baseline-ce"


def _steps(config: SweepConfig, seq_len: int) -> int:
    if config.budget_steps is not None:
        return config.budget_steps
    assert config.budget_tokens is not None  # batch_size is global: the same steps for any ranks
    return max(1, math.ceil(config.budget_tokens / (config.batch_size * seq_len)))


def _train_group(
    group: list[Candidate],
    config: SweepConfig,
    store: Any,
    reading: Reading,
    out: Path,
    accelerator: Any,
    steps: int,
    settings: dict[str, Any],
    teacher: TeacherInit,
) -> bool:
    """Train ``group`` on one shared stream of batches (in the tokens of its ``reading``), then
    evaluate and save each candidate.

    Returns False when ``--stop-after`` stopped it early (a checkpoint holds its progress).
    """
    main = accelerator.is_main_process
    masked = store.has_loss_mask
    pad_id, tokenizer, cross = reading.pad_id, reading.tokenizer, reading.cross
    keep_freed_memory(accelerator.device)  # CPU only: no page-fault storm per vocab-wide tensor
    loader = TeacherLoader(
        DistillDataset(
            store,
            "train",
            batch_size=config.batch_size,
            seed=config.seed,
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pad_id=pad_id,
        ),
        num_workers=settings["workers"],
        pin_memory=accelerator.device.type == "cuda",
        collate_fn=cross,  # None: the store's own tokens
    )
    warmup = config.warmup or max(1, steps // 10)
    vocab = reading.vocab
    drawn_at = sample_temperature(store.manifest) or 1.0  # sampled-kl trains at it
    trainees, models = [], {}
    for candidate in group:
        if candidate.init == "teacher":  # pruned from the teacher (teacher_init.py)
            model = teacher.pruner(pad_id).student(candidate.architecture)
        else:
            model, _ = build_student(
                config.base,
                vocab,
                tokenizer=tokenizer,
                overrides=candidate.architecture,
                seed=config.seed,
                max_positions=store.seq_len if cross is None else max(2048, store.seq_len),
            )
        if settings.get("gradient_checkpointing"):
            enable_gradient_checkpointing(model, config.base)
        models[candidate.name] = model
        trainees.append(
            make_trainee(
                candidate.name,
                model,
                accelerator,
                loss=candidate.loss,
                temperature=candidate.temperature,
                alpha=candidate.alpha,
                lr=candidate.lr,
                steps=steps,
                warmup=warmup,
                vocab=vocab,
                sample_temperature=drawn_at,
            )
        )
        if trainees[-1].head_note and accelerator.is_main_process:
            click.echo(f"Note: {candidate.name}: {trainees[-1].head_note}", err=True)
    checkpoint = out / "groups" / "+".join(c.name for c in group)
    if has_checkpoint(checkpoint, accelerator):  # as the main process sees it
        load_checkpoint(checkpoint, trainees, loader, accelerator)
    seconds = {t.name: float(t.extra.get("train_seconds", 0.0)) for t in trainees}
    logs = CandidateLogs(out, trainees, accelerator)  # log.csv kept to the checkpoint's steps

    bar = progress(
        total=steps,
        initial=trainees[0].step,
        unit="step",
        desc=f"{len(group)} together",
        disable=not main,
        dynamic_ncols=True,
    )
    stop_at = (
        min(steps, trainees[0].step + settings["stop_after"]) if settings["stop_after"] else steps
    )
    while trainees[0].step < stop_at:
        batch = next(loader)  # read and decoded once, fed to every candidate
        losses = {}
        for trainee in trainees:
            start = time.perf_counter()
            row = train_step(trainee, [batch], accelerator)
            seconds[trainee.name] += time.perf_counter() - start
            trainee.extra["train_seconds"] = seconds[trainee.name]
            losses[trainee.name] = row["loss"]
            logs.add(trainee, row, seconds[trainee.name])
        bar.update(1)
        bar.set_postfix(best_loss=f"{min(losses.values()):.3f}")
        if settings["checkpoint_every"] and trainees[0].step % settings["checkpoint_every"] == 0:
            save_checkpoint(checkpoint, trainees, loader, accelerator)
            logs.checkpoint()
    bar.close()
    if trainees[0].step < steps:  # --stop-after: leave a checkpoint to resume from
        save_checkpoint(checkpoint, trainees, loader, accelerator)
        logs.checkpoint()
        loader.close()
        return False
    loader.close()

    has_eval = bool(store.shards_of("eval"))
    probe = None  # a batch to time inference on (main process)
    if has_eval and main:
        probe = next(iter(eval_batches(store, config.batch_size, pad_id, collate_fn=cross)), None)
    for candidate, trainee in zip(group, trainees, strict=True):
        model = accelerator.unwrap_model(trainee.model)
        metrics: dict[str, float] = {}
        if has_eval:  # every rank its share of the eval batches, the sums summed
            batches = eval_batches(
                store,
                config.batch_size,
                pad_id,
                max_batches=config.eval_batches,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                collate_fn=cross,
            )
            sum_ranks = partial(sum_over_ranks, accelerator=accelerator)
            with eval_context(accelerator.device, accelerator.mixed_precision):
                metrics = evaluate(
                    model, batches, vocab=vocab, sum_ranks=sum_ranks, sample_temperature=drawn_at
                )
        logs.evaluated(trainee, metrics)
        if not main:
            continue
        ids = (probe or next(iter(loader)))["input_ids"].to(accelerator.device)
        row = {
            "candidate": candidate.name,
            "parameters": count_parameters(model),
            "non_embedding_parameters": non_embedding_parameters(model),
            "tokens_seen": trainee.tokens,
            **({"trained_tokens_seen": trainee.trained_tokens} if masked else {}),
            "eval_cross_entropy": metrics.get("cross_entropy", math.nan),
            # the tokenizer-free scale, from a store with text spans (format 6)
            **(
                {"eval_bits_per_byte": metrics["bits_per_byte"]}
                if "bits_per_byte" in metrics
                else {}
            ),
            # the distances to the teacher that the store's targets allow (evaluation.METRICS)
            **{name: metrics[name] for name in TEACHER_METRICS if name in metrics},
            "ece": metrics.get("ece", math.nan),
            "train_tokens_per_s": trainee.tokens / max(seconds[trainee.name], 1e-9),
            "inference_tokens_per_s": inference_tokens_per_s(model, ids),
            **candidate.settings(),
        }
        target = candidate_dir(out, candidate.name)
        model.save_pretrained(target)
        tokenizer.save_pretrained(target)
        # metrics.json last: its presence marks the candidate finished
        facts = {"row": row, "eval": metrics, "mixed_precision": accelerator.mixed_precision}
        write_text_atomic(target / "metrics.json", json.dumps(facts, indent=2) + "\n")
    if main:
        shutil.rmtree(checkpoint, ignore_errors=True)
    accelerator.wait_for_everyone()
    return True


def sweep(settings: dict[str, Any]) -> list[dict[str, Any]]:
    """The sweep recipe; returns the leaderboard rows (also written to OUT)."""
    config = load_sweep_config(Path(settings["config"]))
    if settings["together"] < 1:
        raise UserError(f"--together must be at least 1, got {settings['together']}, use e.g. 4")
    if settings["threads"]:
        torch.set_num_threads(settings["threads"])

    # 1. the store, and every candidate built once on its tokenizer — before any training
    options, cache = settings["storage_options"], settings.get("shard_cache")
    store = open_store(settings["store"], storage_options=options, cache=cache)
    note = check_finished(store, settings["allow_unfinished"])  # refused unless allowed
    # "auto" resolved for each candidate's reading of the store (its tokens, or its own
    # tokenizer's): every candidate trains and reports the loss it used
    readings, config.candidates, notes = candidate_readings(config, store)
    teacher = TeacherInit(config.teacher, store)  # loaded once, if a candidate asks for it
    for candidate in config.candidates:
        reading = readings[candidate.name]
        try:
            if candidate.init == "teacher":  # its shape checked; built when its group trains
                teacher.pruner(reading.pad_id).shape(candidate.architecture, reading.vocab)
                continue
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

    out = Path(settings["out"])
    report_to = settings.get("report_to", "none")
    accelerator = make_accelerator(
        config.seed, settings["precision"], report_to=report_to, run_dir=out
    )
    for line in [note, *notes] if accelerator.is_main_process else []:
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
    plan = {
        "config": config.raw,
        "store_fingerprint": manifest_fingerprint(store.manifest),
        "store_records": records_fingerprint(store.shards_of("train")),
        "together": settings["together"],
        "steps": steps,
    }
    on_main(accelerator, lambda: prepare_out(out, plan))  # every rank waits, or stops with it

    # 2. groups of up to N unfinished candidates, each trained on one shared stream of batches
    todo = [c for c in config.candidates if not finished(out, c)]
    if todo:  # one tracker run, each candidate a series of its own: <name>/loss, <name>/eval/…
        facts = {"store": store.url, "processes": accelerator.num_processes}
        run = {**plan, **facts, "mixed_precision": accelerator.mixed_precision}
        tracking.start(accelerator, run, series=[c.name for c in todo])
    if accelerator.is_main_process:
        done = len(config.candidates) - len(todo)
        click.echo(
            f"sweep: {len(config.candidates)} candidates ({done} already finished), "
            f"{steps} steps each, {settings['together']} per data pass"
        )
    started = time.perf_counter()
    for group in plan_groups(todo, readings, settings["together"]):
        reading = readings[group[0].name]
        complete = _train_group(
            group, config, store, reading, out, accelerator, steps, settings, teacher
        )
        if accelerator.is_main_process:
            write_all_curves(out, config.candidates)
        if not complete:
            tracking.finish(accelerator)
            if accelerator.is_main_process:
                click.echo(f"stopped early (--stop-after); rerun the same command to resume, {out}")
            return []
    wall = time.perf_counter() - started
    tracking.finish(accelerator)

    # 3. leaderboard, Pareto plot, the best candidate per size class
    rows = [
        json.loads((out / "candidates" / c.name / "metrics.json").read_text())["row"]
        for c in config.candidates
    ]
    if accelerator.is_main_process:
        write_leaderboard(rows, out, baseline=BASELINE)
        has_baseline = any(r["candidate"] == BASELINE for r in rows)
        plot_pareto(rows, out / "pareto.png", baseline=BASELINE if has_baseline else None)
        click.echo((out / "leaderboard.md").read_text())
        students = [r for r in rows if r["candidate"] != BASELINE]
        for label, row in best_per_size_class(students).items():
            click.echo(
                f"best {label} non-embedding parameters: {row['candidate']} "
                f"({row['non_embedding_parameters']:,} of {row['parameters']:,} parameters, "
                f"eval CE {row['eval_cross_entropy']:.4f}"
                + (
                    f", {row['eval_bits_per_byte']:.4f} bits/byte)"
                    if "eval_bits_per_byte" in row
                    else ")"
                )
            )
        tokens = sum(int(r["tokens_seen"]) for r in rows)
        click.echo(
            f"sweep done: {len(rows)} candidates, {tokens:,} training tokens in {wall:.1f} s "
            f"({tokens / max(wall, 1e-9):,.0f} tokens/s over all candidates); results in {out}"
        )
    return rows


@click.command("sweep")
@sweep_options
def command(**settings: Any) -> None:
    """Train many students from one store, several per data pass, with a leaderboard."""
    settings["store"] = str(settings["store"])
    sweep(settings)
