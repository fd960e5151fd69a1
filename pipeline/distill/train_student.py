"""Stage two: train a student from a logit store — ``kdcache train-student``.

The recipe (``train``) reads top to bottom: check settings and the store → student and
tokenizer → loaders → trainee (model, optimizer, schedule) → resume → loop (step, log, eval,
checkpoint) → save → report. The reusable parts (``Trainee``, ``train_step``, checkpoints) live
in ``trainee.py`` so the sweep can train several students on each batch read once.

Outputs in OUT: the student (``save_pretrained``) + its tokenizer (the teacher's, or its own:
``student_tokenizer.py``), ``run.json`` (store, manifest fingerprint, every setting), ``log.csv``,
``metrics.json`` (final eval, eval history, training summary), ``curves.png`` and
``checkpoint/`` (for ``--resume``). A store without an ``eval`` split reports no eval metrics.

Several processes (``torchrun``/``accelerate launch … -m kdcache.pipeline train-student``):
``--batch-size`` is the global micro-batch, split over the processes (each reads its rows of
every global batch, ``loader.py``), so a run trains the same student with any number of
processes and resumes with any number; gradients and token counts are summed over ranks
(``trainee.py``), eval is sharded and summed, and only the main process writes OUT and prints.

Token counts: ``tokens`` (log.csv, metrics.json, tokens/s) are the real input positions the
student read, over every process; ``trained_tokens`` those its loss counted (``loss_mask``),
fewer only in a store with a loss mask, whose summary line then says "N tokens (M trained)".
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import click
import torch

from kdcache.pipeline.distill import tracking
from kdcache.pipeline.distill.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint
from kdcache.pipeline.distill.checks import (
    check_finished,
    check_settings,
    check_store,
)
from kdcache.pipeline.distill.dataset import manifest_fingerprint, records_fingerprint
from kdcache.pipeline.distill.evaluation import evaluate, history_table, in_words
from kdcache.pipeline.distill.loader import (
    DistillDataset,
    TeacherLoader,
    data_wait_note,
    eval_batches,
)
from kdcache.pipeline.distill.run_dir import RUN_FILE, Run, prepare_out, truncate_log
from kdcache.pipeline.distill.run_plot import write_curves
from kdcache.pipeline.distill.student import (
    build_student,
    count_parameters,
    enable_gradient_checkpointing,
    load_store_tokenizer,
)
from kdcache.pipeline.distill.student_tokenizer import check_encodes, cross_loss, cross_student
from kdcache.pipeline.distill.train_options import train_student_options
from kdcache.pipeline.distill.trainee import (
    LOG_FIELDS,
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
from kdcache.storage import open_store, sample_temperature

# not in run.json (options hold keys; the cache changes where bytes come from, not the run)
UNRECORDED = ("stop_after", "threads", "storage_options", "shard_cache")


def _live_teacher(name: str, store: Any, accelerator: Any) -> Any:
    """The teacher for online KD, its tokenizer checked against the store's and its chunked head
    checked against its own forward on the store's first tokens."""
    from kdcache.pipeline.distill.live_teacher import load_live_teacher

    teacher = load_live_teacher(name, store, accelerator.device, "auto")
    first = store.read_shard(store.shards_of("train")[0]).tokens[:64]  # (≤ 64,) int32
    probe = torch.as_tensor(first, dtype=torch.long, device=accelerator.device)[None]
    note = teacher.self_check(probe)
    if note and accelerator.is_main_process:
        click.echo(f"Note: {note}", err=True)
    return teacher


def train(settings: dict[str, Any]) -> dict[str, Any]:
    """The train-student recipe; returns the final metrics (also written to OUT/metrics.json)."""
    s = dict(settings)
    check_settings(s)
    if s["threads"]:
        torch.set_num_threads(s["threads"])
    run = open_run(s)  # accelerator, store, loss resolved
    build_model(run)  # the student on the store's tokenizer
    prepare_run_dir(run)  # OUT: a new run, or --resume's checks; run.json
    keep_freed_memory(run.accelerator.device)  # CPU only: no page-fault storm per vocab tensor
    run.loader = train_loader(run)  # this rank's rows of every global batch, endless
    if s["teacher"]:
        run.teacher = _live_teacher(s["teacher"], run.store, run.accelerator)
    run.trainee = build_trainee(run)  # model + AdamW + warmup/cosine + loss settings
    resume(run)
    tracking.start(run.accelerator, run.facts, first_step=run.trainee.step + 1)
    wall, counts = train_loop(run)
    checkpoint(run)
    if run.trainee.step < s["steps"]:
        return stopped_early(run)
    metrics = final_metrics(run, wall)
    report(run, metrics, wall, counts)
    tracking.finish(run.accelerator)
    run.accelerator.wait_for_everyone()
    return metrics


def open_run(s: dict[str, Any]) -> Run:
    """The accelerator, the store (finished, holding what the loss needs) and the loss."""
    out = Path(s["out"])
    accelerator = make_accelerator(
        s["seed"], s["precision"], report_to=s.get("report_to", "none"), run_dir=out
    )
    if s["batch_size"] < accelerator.num_processes:
        raise UserError(
            f"--batch-size is the global micro-batch, split over the processes, got "
            f"{s['batch_size']} for {accelerator.num_processes} processes, pass at least "
            f"{accelerator.num_processes}"
        )
    store = open_store(s["store"], storage_options=s["storage_options"], cache=s.get("shard_cache"))
    run = Run(s, accelerator, store, out)
    run.note(parallel_note(accelerator))
    run.note(check_finished(store, s["allow_unfinished"]))  # else refused
    # a student with its own tokenizer (student_tokenizer.py) learns by chunk likelihood matching
    run.cross = cross_student(s["student"], store, s["loss"], bool(s["teacher"]))
    if run.cross is not None:
        run.tokenizer = run.cross.tokenizer
        run.note(check_encodes(store, run.cross))  # a probe: unknown tokens, aligned tokens
        s["loss"] = cross_loss(s["loss"], store, run.cross)  # matched draws, alm, or ce
        return run
    # "auto" resolved (run.json has it); sampled-kl only at the draws' temperature; online: the
    # teacher runs live, the store gives the data
    s["loss"] = check_store(
        store, s["loss"], online=bool(s["teacher"]), temperature=s["temperature"]
    )
    return run


def build_model(run: Run) -> None:
    """The student on its tokenizer — the store's, or its own (its embedding checked)."""
    s, store = run.s, run.store
    if run.tokenizer is None:  # a student on the store's tokenizer
        run.tokenizer = load_store_tokenizer(store)
    run.vocab = len(run.tokenizer) if run.cross is not None else store.tokenizer_size
    run.model, run.source = build_student(
        s["student"],
        run.vocab,  # the student's logits cover these ids only
        tokenizer=run.tokenizer,
        seed=s["seed"],
        max_positions=max(2048, store.seq_len),
    )
    if s.get("gradient_checkpointing"):
        enable_gradient_checkpointing(run.model, run.source)


def prepare_run_dir(run: Run) -> None:
    """OUT: a new run, or the checks --resume makes; run.json (the main process decides, every
    rank sees its decision or stops with its error)."""
    s, store, accelerator = run.s, run.store, run.accelerator
    records = store.shards_of("train")
    run.facts = {
        "store": store.url,
        "manifest_fingerprint": manifest_fingerprint(store.manifest),
        "train_shards": [len(records), sum(r.num_tokens for r in records)],
        "train_records": records_fingerprint(records),
        "teacher": store.manifest.get("teacher"),
        "student": {"source": run.source, "parameters": count_parameters(run.model)},
        "settings": {k: v for k, v in s.items() if k not in UNRECORDED},
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "command": sys.argv,
    }
    if store.has_loss_mask:  # the train split's trained positions (a fact; --resume ignores it)
        run.facts["train_trained_tokens"] = sum(r.num_trained or 0 for r in records)
    on_main(accelerator, lambda: prepare_out(run.out, s["resume"], run.facts))
    if run.main and not (run.out / RUN_FILE).is_file():
        write_text_atomic(run.out / RUN_FILE, json.dumps(run.facts, indent=2, default=str) + "\n")
    if not run.has_eval and run.main:
        click.echo(
            f"warning: the store has no eval split, {store.url}: no eval metrics will be "
            "reported; re-create the store with --eval-fraction > 0 to measure the student",
            err=True,
        )


def train_loader(run: Run) -> TeacherLoader:
    """This rank's rows of every global micro-batch, shuffled, epochs back to back."""
    s, accelerator = run.s, run.accelerator
    dataset = DistillDataset(
        run.store,
        "train",
        batch_size=s["batch_size"],
        seed=s["seed"],
        buffer_size=s["buffer_size"],
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        pad_id=run.pad_id,
    )
    return TeacherLoader(
        dataset,
        num_workers=s["workers"],
        pin_memory=accelerator.device.type == "cuda",
        collate_fn=run.cross,  # None: the store's own tokens
    )


def build_trainee(run: Run) -> Any:
    """The model prepared with AdamW, warmup/cosine and the loss settings."""
    s = run.s
    trainee = make_trainee(
        "student",
        run.model,
        run.accelerator,
        loss=s["loss"],
        temperature=s["temperature"],
        alpha=s["alpha"],
        lr=s["lr"],
        steps=s["steps"],
        warmup=s["warmup"] if s["warmup"] is not None else max(1, s["steps"] // 10),
        vocab=run.vocab,
        sample_temperature=sample_temperature(run.store.manifest) or 1.0,
    )
    trainee.teacher = run.teacher
    run.note(trainee.head_note)
    return trainee


def resume(run: Run) -> None:
    """--resume: the checkpoint's weights, optimizer, schedule, loader position and RNG; the
    log cut back to its step."""
    if run.s["resume"] and has_checkpoint(run.out / "checkpoint", run.accelerator):
        load_checkpoint(run.out / "checkpoint", [run.trainee], run.loader, run.accelerator)
    if run.main:
        truncate_log(run.out / "log.csv", run.trainee.step)
    run.eval_history = list(run.trainee.extra.get("eval_history", []))


def run_eval(run: Run) -> None:
    """Every rank its share of the eval batches, the sums summed; logged and kept."""
    if not run.has_eval:
        return
    accelerator, trainee = run.accelerator, run.trainee
    batches = eval_batches(
        run.store,
        run.s["batch_size"],
        run.pad_id,
        max_batches=run.s["eval_batches"],
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        collate_fn=run.cross,
    )
    with eval_context(accelerator.device, accelerator.mixed_precision):
        metrics = evaluate(
            accelerator.unwrap_model(trainee.model),
            batches,
            teacher=run.teacher,
            vocab=trainee.vocab,
            sum_ranks=lambda sums: sum_over_ranks(sums, accelerator),
            sample_temperature=trainee.sample_temperature,
        )
    run.eval_history.append({"step": trainee.step, **metrics})
    trainee.extra["eval_history"] = run.eval_history
    tracking.log_eval(accelerator, metrics, trainee.step)


def checkpoint(run: Run) -> None:
    """The checkpoint (atomic) and the curves so far."""
    save_checkpoint(run.out / "checkpoint", [run.trainee], run.loader, run.accelerator)
    if run.main:
        write_curves(run.out, run.out / "log.csv", run.eval_history)


def train_loop(run: Run) -> tuple[float, dict[str, float]]:
    """Steps until --steps (or --stop-after): log, eval, checkpoint; (wall seconds, counts)."""
    s, trainee, accelerator = run.s, run.trainee, run.accelerator
    start_step, started = trainee.step, time.perf_counter()
    stop_at = min(s["steps"], start_step + s["stop_after"]) if s["stop_after"] else s["steps"]
    counts = {"data_seconds": 0.0, "tokens": 0, "trained": 0, "start_step": start_step}
    first: tuple[float, float] | None = None  # (seconds, data seconds) up to the first batch
    bar = progress(
        total=s["steps"], initial=start_step, unit="step", disable=not run.main, dynamic_ncols=True
    )
    # closing the bar first (also on errors) keeps an error message on a line of its own
    log_file = (run.out / "log.csv").open("a", newline="") if run.main else open(os.devnull, "w")  # noqa: SIM115
    with bar, log_file:
        log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
        while trainee.step < stop_at:
            t0 = time.perf_counter()
            micro_batches = [next(run.loader) for _ in range(s["grad_accum"])]
            counts["data_seconds"] += time.perf_counter() - t0
            first = first or (time.perf_counter() - started, counts["data_seconds"])
            row = train_step(trainee, micro_batches, accelerator)
            counts["tokens"] += int(row["tokens"])
            counts["trained"] += int(row["trained_tokens"])
            elapsed = time.perf_counter() - started
            row.update(
                elapsed_s=round(elapsed, 3), tokens_per_s=round(counts["tokens"] / elapsed, 1)
            )
            log.writerow(row)
            tracking.log_train(accelerator, row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if (
                s["eval_every"]
                and trainee.step % s["eval_every"] == 0
                and trainee.step < s["steps"]
            ):
                run_eval(run)
            if s["checkpoint_every"] and trainee.step % s["checkpoint_every"] == 0:
                log_file.flush()
                checkpoint(run)
    wall = time.perf_counter() - started
    steady = (wall - first[0], counts["data_seconds"] - first[1]) if first else (0.0, 0.0)
    counts["steady_wall"], counts["steady_wait"] = steady
    return wall, counts


def stopped_early(run: Run) -> dict[str, Any]:
    """--stop-after ended the run before --steps: say how to continue."""
    if run.main:
        click.echo(
            f"stopped after step {run.trainee.step} of {run.s['steps']} (--stop-after), "
            f"checkpoint in {run.out / 'checkpoint'}; continue with the same command plus --resume"
        )
    tracking.finish(run.accelerator)
    return {"step": run.trainee.step}


def final_metrics(run: Run, wall: float) -> dict[str, Any]:
    """The final eval (unless the last step's eval is there), the training summary."""
    trainee = run.trainee
    if not run.eval_history or run.eval_history[-1]["step"] != trainee.step:
        run_eval(run)
    return {
        "final": run.eval_history[-1] if run.eval_history else None,
        "eval_history": run.eval_history,
        "train": {
            "steps": trainee.step,
            "tokens": trainee.tokens,
            "trained_tokens": trainee.trained_tokens,
            "last_loss": trainee.extra.get("last_loss"),
            "wall_seconds_this_run": round(wall, 3),
            "data_wait_share": 0.0,  # report() fills it in
        },
        "settings": run.facts["settings"],
        "student": run.facts["student"],
    }


def report(run: Run, metrics: dict[str, Any], wall: float, counts: dict[str, float]) -> None:
    """The main process saves the student, its tokenizer, metrics.json and curves.png, and
    prints the eval table and the one-line summary."""
    metrics["train"]["data_wait_share"] = round(counts["data_seconds"] / max(wall, 1e-9), 4)
    if not run.main:
        return
    out, final = run.out, metrics["final"]
    run.accelerator.unwrap_model(run.trainee.model).save_pretrained(out)
    run.tokenizer.save_pretrained(out)
    write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
    write_curves(out, out / "log.csv", run.eval_history)
    if run.eval_history:
        click.echo(history_table(run.eval_history))
    rate = counts["tokens"] / max(wall, 1e-9)
    quality = in_words(final) if final else "no eval split"
    trained = f" ({int(counts['trained']):,} trained)" if run.store.has_loss_mask else ""
    click.echo(
        f"trained {run.source} ({run.facts['student']['parameters']:,} parameters) for "
        f"{run.trainee.step} steps: {int(counts['tokens']):,} tokens{trained} in {wall:.1f} s "
        f"({rate:,.0f} tokens/s); {quality}; saved to {out}"
    )
    steps = run.trainee.step - int(counts["start_step"])
    wait = data_wait_note(counts["steady_wall"], counts["steady_wait"], steps, run.s["workers"])
    run.note(wait)


@click.command("train-student")
@train_student_options
def command(**settings: Any) -> None:
    """Train a student from the teacher's cached soft targets (docs/architecture.md §5)."""
    settings["store"] = str(settings["store"])
    settings["out"] = str(settings["out"])
    train(settings)
