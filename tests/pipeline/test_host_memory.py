"""keep_freed_memory: large host blocks are reused instead of page-faulted in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROGRAM = """
import resource, sys
import torch
from kdcache.pipeline.host_memory import keep_freed_memory

def faults_per_fresh_block(mib, blocks=30):
    faults = []
    for _ in range(blocks):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        block = torch.ones(mib << 18)  # float32: like a step's activations or logits
        del block
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return faults

mib, large_blocks = int(sys.argv[1]), sys.argv[2] == "large"
default = faults_per_fresh_block(mib)
applied = keep_freed_memory("cpu", large_blocks=large_blocks)
print(applied, *default, *faults_per_fresh_block(mib))
"""


def faults(mib: int, mode: str) -> tuple[list[int], list[int]]:
    """Page faults per fresh block of ``mib`` MiB, before and after keep_freed_memory."""
    out = subprocess.run(
        [sys.executable, "-c", PROGRAM, str(mib), mode], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[0] == "True"
    counts = [int(x) for x in out[1:]]
    return counts[:30], counts[30:]


linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="glibc mallopt is Linux-only"
)


@linux_only
def test_large_blocks_are_reused_for_training() -> None:
    default, kept = faults(64, "large")
    pages = (64 << 20) // 4096
    assert sum(default[-10:]) >= 9 * pages  # glibc maps every block afresh: a fault per page
    # the heap settles after a few blocks (alignment slack leaves a few holes), then every
    # block reuses freed memory
    assert sum(kept[-10:]) < pages


@linux_only
def test_stage_one_settles_blocks_up_to_32_mib_and_leaves_larger_ones_to_mmap() -> None:
    pages = (16 << 20) // 4096
    _, kept = faults(16, "settle")
    assert sum(kept[1:]) < pages  # faulted in once, then reused
    _, large = faults(64, "settle")
    assert sum(large[-10:]) >= 9 * 4 * pages  # beyond glibc's ceiling: unchanged


def test_nothing_is_tuned_for_a_gpu() -> None:
    from kdcache.pipeline.host_memory import keep_freed_memory

    class Device:
        type = "cuda"

    assert keep_freed_memory(Device()) is False
