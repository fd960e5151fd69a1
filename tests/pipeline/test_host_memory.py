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
    assert sum(default) >= 27 * pages  # glibc maps every block afresh: a fault per page
    # the heap settles after a few blocks (alignment slack leaves a few holes), then the blocks
    # reuse freed memory: far fewer faults in all
    assert sum(kept) < sum(default) / 2


MMAPPED = """
import ctypes, sys
import torch
from kdcache.pipeline.host_memory import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_while_alive(mib):
    before = libc.mallinfo2().hblks  # blocks currently served by mmap
    block = torch.ones(mib << 18)
    return libc.mallinfo2().hblks - before

print(mmapped_while_alive(16), keep_freed_memory("cpu", large_blocks=False),
      mmapped_while_alive(16), mmapped_while_alive(64), keep_freed_memory("cpu"),
      mmapped_while_alive(64))
"""


@linux_only
def test_blocks_come_from_the_heap_up_to_the_chosen_size() -> None:
    out = subprocess.run(
        [sys.executable, "-c", MMAPPED], capture_output=True, text=True, check=True
    ).stdout.split()
    fresh, settled, large, training = (int(out[i]) for i in (0, 2, 3, 5))
    assert out[1] == out[4] == "True"  # both settings applied
    assert fresh >= 1  # a fresh process maps its first 16 MiB block
    assert settled == 0  # from the heap: reusable without a page fault per 4 KiB
    assert large >= 1  # beyond glibc's 32 MiB ceiling: still mapped, as before
    assert training == 0  # large_blocks=True: every block comes from the heap


def test_nothing_is_tuned_for_a_gpu() -> None:
    from kdcache.pipeline.host_memory import keep_freed_memory

    class Device:
        type = "cuda"

    assert keep_freed_memory(Device()) is False
