"""`--parallel` / `--devices-per-candidate`: how many workers, on which devices, with which
arguments (the GPU cases are planned here; the CPU case runs in test_sweep_workers.py)."""

from __future__ import annotations

import pytest

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.parallel import _worker_argv, plan_workers


@pytest.mark.parametrize(
    ("parallel", "per", "gpus", "planned"),
    [
        (1, 0, 0, (1, 1)),  # CPU, today's single worker
        (2, 0, 0, (2, 1)),  # CPU, two workers side by side
        (1, 0, 8, (1, 8)),  # 8 GPUs, one worker data parallel over all (today's behaviour)
        (1, 1, 8, (8, 1)),  # one candidate per GPU
        (1, 2, 8, (4, 2)),  # pairs of GPUs
        (2, 0, 8, (2, 4)),  # two workers share the GPUs equally
        (3, 2, 8, (3, 2)),  # 6 of 8 GPUs used
    ],
)
def test_workers_and_their_devices(parallel, per, gpus, planned):
    assert plan_workers(parallel, per, gpus) == planned


@pytest.mark.parametrize(
    ("parallel", "per", "gpus", "message"),
    [
        (0, 0, 0, "--parallel must be at least 1"),
        (1, -1, 0, "--devices-per-candidate must be 0 or more"),
        (3, 4, 8, "3 workers of 4 GPUs need 12 GPUs, this machine has 8"),
    ],
)
def test_impossible_plans_are_one_line(parallel, per, gpus, message):
    with pytest.raises(UserError, match=message):
        plan_workers(parallel, per, gpus)


def test_workers_get_the_sweeps_arguments_without_the_plans_own():
    argv = [
        "--store",
        "s",
        "--parallel",
        "2",
        "--devices-per-candidate=1",
        "--threads",
        "4",
        "--out",
        "o",
    ]
    assert _worker_argv(argv) == ["--store", "s", "--out", "o"]
