"""Stage two: train a student from a logit store — ``kdcache train-student``.

The recipe (``train``) reads top to bottom: check settings and the store → student and
tokenizer → loaders → trainee (model, optimizer, schedule) → resume → loop (step, log, eval,
checkpoint) → save → report. The reusable parts (``Trainee``, ``train_step``, checkpoints) live
in ``trainee.py`` so the sweep can train several students on each batch read once.

Outputs in OUT: the student (``save_pretrained``) + the teacher's tokenizer, ``run.json`` (store,
manifest fingerprint, every setting), ``log.csv`` (one row per step), ``metrics.json`` (final
eval, eval history, training summary) and ``checkpoint/`` (for ``--resume``). A store without an
``eval`` split trains with a warning and reports no eval metrics (``"final": null``).

Several processes (``torchrun``/``accelerate launch … -m kdcache.pipeline train-student``):
``--batch-size`` is the global micro-batch, split over the processes (each reads its rows of
every global batch, ``loader.py``), so a run trains the same student with any number of
processes and resumes with any number; gradients and token counts are summed over ranks
(``trainee.py``), eval is sharded and summed, and only the main process writes OUT and prints.

Token counts: ``tokens`` (log.csv, metrics.json, tokens/s) are the real input positions the
student read, over every process; ``trained_tokens`` those its loss counted (``loss_mask``),
fewer only in a store with a loss mask, whose summary line then says "N tokens (M trained)".
The student is built on the store's tokenizer size and its logits sliced to it
(``vocabulary.py``).
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

from kdcache.pipeline.distill.checks import (
    check_finished,
    check_settings,
    check_store,
)
from kdcache.pipeline.distill.evaluation import evaluate, history_table, in_words
from kdcache.pipeline.distill.loader import (
    TeacherDataset,
    TeacherLoader,
    data_wait_note,
    eval_batches,
)
from kdcache.pipeline.distill.run_dir import RUN_FILE, prepare_out, truncate_log
from kdcache.pipeline.distill.student import (
    build_student,
    count_parameters,
    enable_gradient_checkpointing,
    load_store_tokenizer,
)
from kdcache.pipeline.distill.train_options import train_student_options
from kdcache.pipeline.distill.trainee import (
    LOG_FIELDS,
    load_checkpoint,
    make_accelerator,
    make_trainee,
    manifest_fingerprint,
    on_main,
    parallel_note,
    save_checkpoint,
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
    accelerator = make_accelerator(s["seed"], s["precision"])
    main = accelerator.is_main_process
    if (note := parallel_note(accelerator)) and main:
        click.echo(f"Note: {note}", err=True)
    if s["batch_size"] < accelerator.num_processes:
        raise UserError(
            f"--batch-size is the global micro-batch, split over the processes, got "
            f"{s['batch_size']} for {accelerator.num_processes} processes, pass at least "
            f"{accelerator.num_processes}"
        )

    # 1. the store and the student (its embedding checked against the tokenizer before training)
    store = open_store(s["store"], storage_options=s["storage_options"], cache=s.get("shard_cache"))
    if (note := check_finished(store, s["allow_unfinished"])) and main:  # else refused
        click.echo(f"Note: {note}", err=True)
    online = bool(s["teacher"])  # the reference: the teacher runs live, the store gives the data
    # "auto" resolved (run.json has it); sampled-kl only at the draws' temperature
    s["loss"] = check_store(store, s["loss"], online=online, temperature=s["temperature"])
    drawn_at = sample_temperature(store.manifest) or 1.0
    tokenizer = load_store_tokenizer(store)
    vocab = store.tokenizer_size  # the student's logits cover these ids only
    masked = store.has_loss_mask
    model, source = build_student(
        s["student"],
        vocab,
        tokenizer=tokenizer,
        seed=s["seed"],
        max_positions=max(2048, store.seq_len),
    )
    if s.get("gradient_checkpointing"):
        enable_gradient_checkpointing(model, source)
    out = Path(s["out"])
    train_records = store.shards_of("train")
    run = {
        "store": store.url,
        "manifest_fingerprint": manifest_fingerprint(store.manifest),
        "train_shards": [len(train_records), sum(r.num_tokens for r in train_records)],
        "teacher": store.manifest.get("teacher"),
        "student": {"source": source, "parameters": count_parameters(model)},
        "settings": {k: v for k, v in s.items() if k not in UNRECORDED},
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "processes": accelerator.num_processes,
        "command": sys.argv,
    }
    if masked:  # the train split's trained positions (a fact for the reader; --resume ignores it)
        run["train_trained_tokens"] = sum(r.num_trained or 0 for r in train_records)
    # OUT is shared: every rank sees what the main one decided (or stops with its error)
    on_main(accelerator, lambda: prepare_out(out, s["resume"], run))
    resuming = s["resume"] and (out / "checkpoint").is_dir()
    if main and not (out / RUN_FILE).is_file():
        write_text_atomic(out / RUN_FILE, json.dumps(run, indent=2, default=str) + "\n")

    keep_freed_memory(accelerator.device)  # CPU only: no page-fault storm per vocab-wide tensor

    # 2. loaders: this rank's rows of every global batch (endless, shuffled); eval below
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    train_loader = TeacherLoader(
        TeacherDataset(
            store,
            "train",
            batch_size=s["batch_size"],
            seed=s["seed"],
            buffer_size=s["buffer_size"],
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
            pad_id=pad_id,
        ),
        num_workers=s["workers"],
        pin_memory=accelerator.device.type == "cuda",
    )
    has_eval = bool(store.shards_of("eval"))
    if not has_eval and main:
        click.echo(
            f"warning: the store has no eval split, {store.url}: no eval metrics will be reported; "
            "re-create the store with --eval-fraction > 0 to measure the student",
            err=True,
        )

    teacher = _live_teacher(s["teacher"], store, accelerator) if online else None

    # 3. the trainee: model + AdamW + warmup/cosine schedule + loss settings
    warmup = s["warmup"] if s["warmup"] is not None else max(1, s["steps"] // 10)
    trainee = make_trainee(
        "student",
        model,
        accelerator,
        loss=s["loss"],
        temperature=s["temperature"],
        alpha=s["alpha"],
        lr=s["lr"],
        steps=s["steps"],
        warmup=warmup,
        vocab=vocab,
        sample_temperature=drawn_at,
    )
    trainee.teacher = teacher
    if trainee.head_note and main:
        click.echo(f"Note: {trainee.head_note}", err=True)
    if resuming:
        load_checkpoint(out / "checkpoint", [trainee], train_loader, accelerator)
    log_path = out / "log.csv"
    if main:
        truncate_log(log_path, trainee.step)
    eval_history: list[dict[str, float]] = list(trainee.extra.get("eval_history", []))

    def run_eval() -> None:  # every rank its share of the eval batches, the sums summed
        if not has_eval:
            return
        model_ = accelerator.unwrap_model(trainee.model)
        batches = eval_batches(
            store,
            s["batch_size"],
            pad_id,
            max_batches=s["eval_batches"],
            rank=accelerator.process_index,
            world_size=accelerator.num_processes,
        )
        with eval_context(accelerator.device, accelerator.mixed_precision):
            metrics = evaluate(
                model_,
                batches,
                teacher=teacher,
                vocab=vocab,
                sum_ranks=lambda sums: sum_over_ranks(sums, accelerator),
                sample_temperature=drawn_at,
            )
        eval_history.append({"step": trainee.step, **metrics})
        trainee.extra["eval_history"] = eval_history

    def checkpoint() -> None:
        save_checkpoint(out / "checkpoint", [trainee], train_loader, accelerator)

    # 4. the loop
    start_step, started = trainee.step, time.perf_counter()
    stop_at = min(s["steps"], start_step + s["stop_after"]) if s["stop_after"] else s["steps"]
    data_seconds, tokens_this_run, trained_this_run = 0.0, 0, 0
    first: tuple[float, float] | None = None  # (seconds, data seconds) up to the first batch
    bar = progress(
        total=s["steps"], initial=start_step, unit="step", disable=not main, dynamic_ncols=True
    )
    # closing the bar first (also on errors) keeps an error message on a line of its own
    log_file = log_path.open("a", newline="") if main else open(os.devnull, "w")  # noqa: SIM115
    with bar, log_file:
        log = csv.DictWriter(log_file, fieldnames=LOG_FIELDS)
        while trainee.step < stop_at:
            t0 = time.perf_counter()
            micro_batches = [next(train_loader) for _ in range(s["grad_accum"])]
            data_seconds += time.perf_counter() - t0
            first = first or (time.perf_counter() - started, data_seconds)  # start-up waits
            row = train_step(trainee, micro_batches, accelerator)
            tokens_this_run += int(row["tokens"])
            trained_this_run += int(row["trained_tokens"])
            elapsed = time.perf_counter() - started
            row.update(
                elapsed_s=round(elapsed, 3), tokens_per_s=round(tokens_this_run / elapsed, 1)
            )
            log.writerow(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
            if (
                s["eval_every"]
                and trainee.step % s["eval_every"] == 0
                and trainee.step < s["steps"]
            ):
                run_eval()
            if s["checkpoint_every"] and trainee.step % s["checkpoint_every"] == 0:
                log_file.flush()
                checkpoint()
    wall = time.perf_counter() - started
    checkpoint()
    if trainee.step < s["steps"]:
        if main:
            click.echo(
                f"stopped after step {trainee.step} of {s['steps']} (--stop-after), "
                f"checkpoint in {out / 'checkpoint'}; continue with the same command plus --resume"
            )
        return {"step": trainee.step}

    # 5. final eval, save the student + tokenizer, write metrics, report
    if not eval_history or eval_history[-1]["step"] != trainee.step:
        run_eval()
    final = eval_history[-1] if eval_history else None
    metrics = {
        "final": final,
        "eval_history": eval_history,
        "train": {
            "steps": trainee.step,
            "tokens": trainee.tokens,
            "trained_tokens": trainee.trained_tokens,
            "last_loss": trainee.extra.get("last_loss"),
            "wall_seconds_this_run": round(wall, 3),
            "data_wait_share": round(data_seconds / max(wall, 1e-9), 4),
        },
        "settings": run["settings"],
        "student": run["student"],
    }
    if main:
        model_ = accelerator.unwrap_model(trainee.model)
        model_.save_pretrained(out)
        tokenizer.save_pretrained(out)
        write_text_atomic(out / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        if eval_history:
            click.echo(history_table(eval_history))
        rate = tokens_this_run / max(wall, 1e-9)
        quality = in_words(final) if final else "no eval split"
        trained = f" ({trained_this_run:,} trained)" if masked else ""
        click.echo(
            f"trained {source} ({run['student']['parameters']:,} parameters) for {trainee.step} steps: "
            f"{tokens_this_run:,} tokens{trained} in {wall:.1f} s ({rate:,.0f} tokens/s); "
            f"{quality}; saved to {out}"
        )
        steady = (wall - first[0], data_seconds - first[1]) if first else (0.0, 0.0)
        if note := data_wait_note(*steady, trainee.step - start_step, s["workers"]):
            click.echo(f"Note: {note}", err=True)
    accelerator.wait_for_everyone()
    return metrics


@click.command("train-student")
@train_student_options
def command(**settings: Any) -> None:
    """Train a student from the teacher's cached soft targets (docs/architecture.md §5)."""
    settings["store"] = str(settings["store"])
    settings["out"] = str(settings["out"])
    train(settings)
