"""Checks before a student trains: impossible settings, an unfinished store, and a store that
lacks what the loss needs.

``check_store`` also resolves ``--loss auto`` from the store's targets (docs/architecture.md §5).

Shared by ``train-student``, the sweep and ``compare``, so they refuse the same things with the
same lines.
"""

from __future__ import annotations

import math
from typing import Any

import click

from kdcache.pipeline.distill.divergences import SAMPLED_LOSSES, TOPK_LOSSES
from kdcache.pipeline.distill.live_teacher import ONLINE_LOSSES
from kdcache.pipeline.distill.losses import resolve_loss
from kdcache.pipeline.distill.tracking import tracker_names
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.precision import PRECISIONS
from kdcache.pipeline.store_commands import describe_committed
from kdcache.storage import sample_temperature

allow_unfinished_option = click.option(
    "--allow-unfinished",
    is_flag=True,
    help="Use the committed shards of a store whose cache-teacher run did not finish "
    "(default: refuse it).",
)
workers_option = click.option(
    "--workers",
    default=2,
    show_default=True,
    help="Threads decoding shards, in this process (0 = 1; idle when the student is the bottleneck).",
)
precision_option = click.option(
    "--precision",
    type=click.Choice(PRECISIONS),
    metavar="PRECISION",
    default="auto",
    show_default=True,
    help="Autocast of training and eval: no (float32), bf16, fp16 or auto = accelerate launch's "
    "--mixed_precision if given, else bf16 on GPUs that run it natively (CUDA 8.0+), fp16 on older "
    "CUDA GPUs, no on the CPU and MPS (docs/architecture.md §5).",
)


def check_finished(store: Any, allow_unfinished: bool, doing: str = "training on") -> str | None:
    """An unfinished store (no ``finished`` in its manifest: cache-teacher stopped or is still
    running) is refused unless ``allow_unfinished``; then returns the note to print (None for a
    finished store)."""
    if store.manifest.get("finished"):
        return None
    committed = describe_committed(store)
    if not allow_unfinished:
        raise UserError(
            f"the store is unfinished (its cache-teacher run did not complete; committed: "
            f"{committed}), "
            f"{store.url}, rerun that cache-teacher command to finish it, or pass "
            "--allow-unfinished to use the committed shards"
        )
    return (
        f"{doing} {len(store.shards)} committed shards of an unfinished store, {store.url} "
        f"({committed})"
    )


def check_settings(s: dict[str, Any]) -> None:
    """Reject impossible settings before touching the store, one line each."""
    for name in ("steps", "batch_size", "grad_accum", "eval_batches", "buffer_size"):
        if s[name] < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, got {s[name]}, pass a positive number")
    for name in ("eval_every", "checkpoint_every", "workers", "warmup", "threads", "stop_after"):
        if s[name] is not None and s[name] < 0:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be 0 or more, got {s[name]}, pass 0 or a positive number")
    if not s["lr"] > 0:
        raise UserError(f"--lr must be positive, got {s['lr']}, use e.g. 1e-3")
    if not (math.isfinite(s["temperature"]) and s["temperature"] > 0):
        raise UserError(
            f"--temperature must be a positive number, got {s['temperature']}, use e.g. 1.0"
        )
    if not 0.0 <= s["alpha"] <= 1.0:
        raise UserError(f"--alpha must be between 0 and 1, got {s['alpha']}, use e.g. 0.5")


def check_store(
    store: Any,
    loss: str,
    *,
    online: bool = False,
    temperature: float | None = None,
    candidate: str | None = None,
) -> str:
    """The store must hold training data and the targets ``loss`` needs; returns the loss to use.

    ``auto`` resolves to ``sampled-kl`` for a store with samples, else ``ghost``. A top-k loss
    on a store without top-k targets, or ``sampled-kl`` on one without samples, is refused, and
    so is ``sampled-kl`` at a ``temperature`` other than the store's sample temperature (checked
    when given; ``candidate``: the sweep candidate it belongs to). ``online`` (the teacher runs
    live, the store gives only the data): ``auto`` is ``kl``, and only the full-vocabulary
    losses ``kl``, ``reverse-kl`` (and ``ce``) apply.
    """
    if not store.shards_of("train"):
        raise UserError(
            f"the store has no committed train shards, {store.url}, "
            "run `kdcache cache-teacher` to fill it first"
        )
    if online:
        loss = resolve_loss(loss, has_topk=False, has_samples=False, online=True)
        if loss not in ONLINE_LOSSES:
            raise UserError(
                f"--loss {loss} is for cached targets, got it with --teacher (online KD on the "
                "full distribution), use --loss kl, reverse-kl or ce, or drop --teacher"
            )
        return loss
    loss = resolve_loss(loss, has_topk=store.has_topk, has_samples=store.has_samples)
    targets = store.manifest.get("targets", "topk")
    if loss in TOPK_LOSSES and not store.has_topk:
        raise UserError(
            f"--loss {loss} needs the teacher's top-k, the store holds {targets} targets, "
            "use --loss sampled-kl (or auto) or a store from cache-teacher --targets topk+sampled"
        )
    if loss in SAMPLED_LOSSES and not store.has_samples:
        raise UserError(
            f"--loss {loss} needs sampled targets, the store holds {targets} targets, "
            "use --loss ghost (or auto) or a store from cache-teacher --targets sampled"
        )
    if loss == "kl" and store.top_k < 2:
        raise UserError(
            f"--loss {loss} needs at least 2 teacher log-probs per token, the store has "
            f"top_k={store.top_k}, use --loss ghost (which also uses the tail) or a store with larger --top-k"
        )
    if loss != "ce" and float(store.manifest.get("capture_temperature", 1.0)) != 1.0:
        raise UserError(
            f"--loss {loss} assumes log-probs captured at temperature 1, the store has "
            f"{store.manifest['capture_temperature']}, re-create the store at temperature 1"
        )
    if loss in SAMPLED_LOSSES and temperature is not None:
        check_sample_temperature(store, temperature, candidate)
    return loss


def check_sample_temperature(store: Any, temperature: float, candidate: str | None = None) -> None:
    """``sampled-kl`` trains at the temperature the store's draws were made at, T = T_s, where
    ``counts / N`` is an unbiased estimate of p_T. Elsewhere the draws would have to be
    reweighted by ``p^(1/T − 1/T_s)``, a bias that stays large at any N a store holds on a large
    vocabulary (docs/architecture.md §5), so another temperature is refused."""
    drawn_at = sample_temperature(store.manifest)
    if drawn_at is None or math.isclose(temperature, drawn_at, rel_tol=1e-6):
        return
    other = ", or --loss ghost" if store.has_topk else ""
    setting = "--temperature" if candidate is None else "temperature"
    raise UserError(
        ("" if candidate is None else f"candidate {candidate}: ")
        + "--loss sampled-kl trains at the temperature the store's draws were made at, "
        f"{setting} {temperature:g} on a store drawn at {drawn_at:g}, use {setting} "
        f"{drawn_at:g}, or a store from cache-teacher --sample-temperature {temperature:g}{other}"
    )


gradient_checkpointing_option = click.option(
    "--gradient-checkpointing",
    is_flag=True,
    help="Recompute the student's layer activations in the backward instead of keeping them: "
    "less memory for long sequences and large students, about a third more compute.",
)


def check_report_to(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``--report-to``'s value, checked as the command line is read (before anything runs):
    known trackers whose packages are installed; returned as ``a,b`` or ``none``."""
    return ",".join(tracker_names(value)) or "none"


report_to_option = click.option(
    "--report-to",
    default="none",
    show_default=True,
    metavar="TRACKERS",
    callback=check_report_to,
    help="Log the settings, every training row and every eval to tensorboard (in OUT/tensorboard), "
    "wandb, mlflow — several comma-separated — or none; a plot of the curves is always written, "
    "OUT/curves.png (docs/architecture.md §5).",
)
