"""``sweep --parallel N`` / ``--devices-per-candidate K``: candidates side by side on one machine.

Instead of one worker training each candidate data parallel over every device (a small student
then spends its steps in all-reduce), N worker processes join the sweep's study
(``study.py``), each on its own devices: GPUs ``[i*K, (i+1)*K)`` through
``CUDA_VISIBLE_DEVICES`` (a worker of K > 1 GPUs is a ``torchrun`` of K processes), or on a CPU
an equal share of the cores. Each worker's output goes to ``OUT/workers/worker-<i>.log``; this
process waits for them and prints the leaderboard they wrote.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.errors import UserError

OWN_OPTIONS = ("--parallel", "--devices-per-candidate", "--threads")


def plan_workers(parallel: int, per_candidate: int, gpus: int) -> tuple[int, int]:
    """(workers, devices per worker) on a machine of ``gpus`` GPUs (0: a CPU machine).

    Raises:
        UserError: a count below its floor, more GPUs asked than the machine has.
    """
    if parallel < 1:
        raise UserError(f"--parallel must be at least 1, got {parallel}")
    if per_candidate < 0:
        raise UserError(f"--devices-per-candidate must be 0 or more, got {per_candidate}")
    if not gpus:
        return parallel, per_candidate or 1  # CPU: K processes per worker if asked
    if per_candidate == 0:
        per_candidate = max(1, gpus // parallel) if parallel > 1 else gpus
    elif parallel == 1:
        parallel = max(1, gpus // per_candidate)
    if parallel * per_candidate > gpus:
        raise UserError(
            f"{parallel} workers of {per_candidate} GPUs need {parallel * per_candidate} GPUs, "
            f"this machine has {gpus}; lower --parallel or --devices-per-candidate"
        )
    return parallel, per_candidate


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker_argv(argv: list[str]) -> list[str]:
    """The sweep's own arguments without the options this module sets per worker."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in OWN_OPTIONS:
            skip = True
            continue
        if arg.startswith(tuple(f"{o}=" for o in OWN_OPTIONS)):
            continue
        kept.append(arg)
    return kept


def run_workers(
    settings: dict[str, Any], argv: list[str], workers: int, per: int, gpus: int
) -> int:
    """Start the workers, wait for them; the exit code of the first that failed, else 0."""
    out = Path(settings["out"])
    (out / "workers").mkdir(parents=True, exist_ok=True)
    cores = os.cpu_count() or 1
    threads = settings["threads"] or max(1, cores // (workers * per))
    base = [*_worker_argv(argv), "--parallel", "1", "--threads", str(threads)]
    processes = []
    for i in range(workers):
        env = dict(os.environ)
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in range(i * per, (i + 1) * per))
        if per > 1:
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(per)]
            launch += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
            command = [*launch, "-m", "kdcache.pipeline", "sweep", *base]
        else:
            command = [sys.executable, "-m", "kdcache.pipeline", "sweep", *base]
        log = (out / "workers" / f"worker-{i}.log").open("w")
        processes.append((subprocess.Popen(command, env=env, stdout=log, stderr=log), log))
        time.sleep(0.5)  # the first creates the study; the others join it
    click.echo(f"sweep: {workers} workers side by side, logs in {out / 'workers'}")
    failed = 0
    for i, (process, log) in enumerate(processes):
        code = process.wait()
        log.close()
        if code and not failed:
            failed = code if code > 0 else 1
            lines = (out / "workers" / f"worker-{i}.log").read_text().strip().splitlines()
            click.echo(f"worker {i} ended with {code}: {lines[-1] if lines else ''}", err=True)
    if not failed and (out / "leaderboard.md").is_file():
        click.echo((out / "leaderboard.md").read_text())
        click.echo(f"sweep done: {workers} workers; results in {out}")
    return failed
