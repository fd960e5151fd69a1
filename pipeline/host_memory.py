"""Keep freed host memory for reuse when a model trains or evaluates on the CPU.

glibc hands every block of 32 MiB or more back to the OS on ``free`` (``munmap``) and maps a
fresh one on the next ``malloc``, which the kernel zero-fills again, one page fault per 4 KiB. A
student's (batch, seq, vocab) logits and their gradients are such blocks, fresh every step: on 2
cores, `train-student` spent 40% of its time in the kernel (sys 25.8 s vs user 37.1 s for 60 steps
of the tiny student; 1.9x faster with this). PyTorch's CPU tuning guide answers with
jemalloc/tcmalloc via LD_PRELOAD; the same effect, in process and without a dependency, is two
``mallopt`` settings: serve large blocks from the heap, and keep up to 2 GiB of freed heap instead
of trimming it. The price is a higher resident peak (freed blocks stay mapped; 679 -> 844 MB for
that run).

Used after the model is built or loaded (load-time copies still go back to the OS), only on the
CPU: CUDA's caching allocator already reuses device memory. Stage one reuses its vocab-wide
buffers explicitly (``targets.ChunkScratch``) and only settles what glibc's adaptive threshold
would reach anyway (blocks up to 32 MiB, e.g. the teacher's attention scores), from the start and
whatever ran before: without it, a teacher forward paid 1-3 s of page faults per 65k tokens or
not, depending on the allocation history of the process.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from typing import Any

M_TRIM_THRESHOLD = -1  # <malloc.h>: keep this much free memory at the heap's top
M_MMAP_THRESHOLD = -3  # <malloc.h>: blocks from this size on are served by mmap
M_MMAP_MAX = -4  # <malloc.h>: at most this many blocks served by mmap; 0 = none
KEEP_FREE_BYTES = (1 << 31) - 1  # mallopt takes an int: 2 GiB
MMAP_THRESHOLD_CEILING = 32 << 20  # glibc's largest mmap threshold on 64-bit


def keep_freed_memory(device: Any, *, large_blocks: bool = True) -> bool:
    """On Linux/glibc with ``device`` on the CPU, reuse freed heap memory; True when applied.

    Args:
        device: where the model computes; nothing is changed unless its type is ``cpu``.
        large_blocks: also serve blocks of 32 MiB and more from the heap (training: its
            vocab-wide tensors are that large). Without it, only what glibc's own adaptive
            threshold reaches after its first large ``free`` is settled from the start: blocks
            up to 32 MiB come from the heap and up to 64 MiB of freed heap is kept (stage one:
            the teacher's attention and MLP activations; its vocab-wide buffers are reused).

    The settings last for the process (and any process it forks afterwards).
    """
    if getattr(device, "type", str(device)) != "cpu" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: no mallopt, nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    if large_blocks:
        settings = ((M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, KEEP_FREE_BYTES))
    else:
        settings = (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_CEILING),
            (M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD_CEILING),
        )
    return all(mallopt(option, value) == 1 for option, value in settings)
