"""keep_freed_memory: large host blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import torch
from kdcache.pipeline.host_memory import keep_freed_memory

def faults_per_fresh_block(blocks=30):
    faults = []
    for _ in range(blocks):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(16 << 20)  # 64 MiB of float32, like a step's vocab-wide logits
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

default = faults_per_fresh_block()
applied = keep_freed_memory("cpu")
print(applied, *default, *faults_per_fresh_block())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only")
def test_large_blocks_are_reused_after_keep_freed_memory() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM], capture_output=True, text=True, check=True
    ).stdout.split()
    applied, faults = out[0] == "True", [int(x) for x in out[1:]]
    default, kept = faults[:30], faults[30:]
    pages = (64 << 20) // 4096
    assert applied
    assert sum(default[-10:]) >= 9 * pages  # glibc maps every block afresh: a fault per page
    # the heap settles after a few blocks (alignment slack leaves a few holes), then every
    # block reuses freed memory
    assert sum(kept[-10:]) < pages


def test_nothing_is_tuned_for_a_gpu() -> None:
    from kdcache.pipeline.host_memory import keep_freed_memory

    class Device:
        type = "cuda"

    assert keep_freed_memory(Device()) is False
