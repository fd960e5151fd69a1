"""Where a teacher runs: processes grouped into replicas, and the memory a replica may use.

One process per device, always (``torchrun --nproc-per-node <devices>``, ``accelerate launch``
with one process per GPU). ``--devices-per-teacher N`` groups N consecutive processes of a node,
and their N devices, into one teacher *replica*; the world's processes form world / N
data-parallel replicas, and replica r computes the shards whose index % replicas == r, so the
store is the same for any layout (docs/architecture.md §3, "Teachers larger than one device").

- ``--split pipeline`` (default): the group's first process (its *leader*) loads the teacher
  with a device map balanced over the group's N devices (Accelerate's big-model inference);
  layers that do not fit go to host memory, then to disk. The other processes of the group
  lend their device and wait.
- ``--split tensor``: every process of the group holds 1/N of each layer (transformers'
  tensor-parallel plan) and all of them run every forward; the leader writes. Used only where
  it is exact (the self-check in ``placed_teacher.check_split``).

This module is plain Python (no torch import): the settings are checked before anything loads.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from kdcache.pipeline.errors import UserError
from kdcache.storage.shard_cache import parse_size as parse_bytes

SPLITS = ("pipeline", "tensor")


def parse_size(text: str, option: str = "--max-memory") -> int:
    """``"70GiB"``, ``"500MB"``, ``"1.5gb"``, ``"123456"`` -> bytes (> 0), read as every size
    option reads them (``storage.shard_cache.parse_size``: decimal units, "iB" binary)."""
    try:
        size = parse_bytes(text)
    except ValueError:
        raise UserError(
            f"cannot read {option} {text!r} as a size, give a number with a unit such as "
            "500MB, 70GiB or 1.5TB"
        ) from None
    if size < 1:
        raise UserError(f"{option} must be positive, got {text!r}, give a size such as 70GiB")
    return size


def format_size(nbytes: float) -> str:
    """Bytes as a short binary size: ``"1.5 GiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(nbytes) < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} TiB"


@dataclass(frozen=True)
class MemoryBudget:
    """What one replica may hold, from ``--max-memory SIZE[,cpu=SIZE]``.

    Attributes:
        device: bytes of weights per device of the replica (on a CPU-only machine: of the
            host); None = what the device has free.
        host: bytes of host memory for layers offloaded from the devices; None = this process'
            share of the free host memory.
    """

    device: int | None = None
    host: int | None = None

    @property
    def given(self) -> bool:
        return self.device is not None or self.host is not None


def parse_max_memory(text: str | None) -> MemoryBudget:
    """``--max-memory``: ``SIZE`` (per device), optionally ``,cpu=SIZE`` (host)."""
    if text is None:
        return MemoryBudget()
    device = host = None
    for part in (p.strip() for p in text.split(",")):
        key, _, value = part.rpartition("=")
        if key.strip().lower() == "cpu":
            host = parse_size(value, "--max-memory cpu=")
        elif key:
            raise UserError(
                f"unknown --max-memory entry {part!r}, give SIZE (per device) and optionally "
                "cpu=SIZE (host), e.g. 70GiB,cpu=200GiB"
            )
        else:
            device = parse_size(value)
    return MemoryBudget(device, host)


@dataclass(frozen=True)
class Replica:
    """This process' place among the teacher replicas.

    Attributes:
        index: the replica this process belongs to (0 .. count - 1).
        count: replicas in the world (world size / size).
        member: this process' position in its replica's group (0: the leader, which writes).
        size: processes (and devices) per replica: ``--devices-per-teacher``.
        split: ``pipeline`` or ``tensor``.
        device_indices: the CUDA devices of the replica (empty on a CPU-only machine).
    """

    index: int
    count: int
    member: int
    size: int
    split: str
    device_indices: tuple[int, ...] = ()

    @property
    def leader(self) -> bool:
        return self.member == 0

    @property
    def computes(self) -> bool:
        """Runs teacher forwards: the leader, and every member of a tensor-parallel group."""
        return self.leader or self.split == "tensor"

    @property
    def spans_devices(self) -> bool:
        """More than one process or device share this replica: the split is self-checked."""
        return self.size > 1


def check_placement_options(devices_per_teacher: int, split: str) -> None:
    """What needs no launch facts: the option values themselves."""
    if split not in SPLITS:
        raise UserError(f"unknown --split, {split}, use one of {', '.join(SPLITS)}")
    if devices_per_teacher < 1:
        raise UserError(
            f"--devices-per-teacher must be at least 1, got {devices_per_teacher}, "
            "pass a positive number"
        )


def replica_of(
    rank: int,
    world: int,
    local_world: int,
    devices_per_teacher: int,
    split: str,
    cuda_devices: int,
    local_rank: int,
) -> Replica:
    """Group the processes into replicas of ``devices_per_teacher`` and place this one.

    Args:
        rank, world: this process' rank and the number of processes.
        local_world: processes on this node (``LOCAL_WORLD_SIZE``).
        cuda_devices: CUDA devices this process sees (0 on a CPU-only machine).
        local_rank: this process' rank on its node.

    Raises:
        UserError: N does not divide the processes per node, is more than the node has, or
            asks for a pipeline split on a machine without GPUs.
    """
    n = devices_per_teacher
    check_placement_options(n, split)
    if n == 1:
        devices = (local_rank % cuda_devices,) if cuda_devices else ()
        return Replica(rank, world, 0, 1, split, devices)
    if cuda_devices == 0 and split == "pipeline":
        raise UserError(
            f"--devices-per-teacher {n} spreads a teacher over {n} GPUs, this machine has none; "
            "on the CPU one process holds a replica (use --max-memory and --offload-dir to "
            "offload it), or pass --split tensor"
        )
    have = cuda_devices if cuda_devices else local_world
    what = "GPUs" if cuda_devices else "processes"
    if n > have or n > local_world:
        raise UserError(
            f"--devices-per-teacher {n} is more than this node has ({have} {what}, "
            f"{local_world} processes), pass at most {min(have, local_world)} and launch one "
            "process per device"
        )
    if local_world % n:
        raise UserError(
            f"--devices-per-teacher {n} does not divide the {local_world} processes per node, "
            f"launch a multiple of {n} processes per node (one per device)"
        )
    if cuda_devices and local_world > cuda_devices:
        raise UserError(
            f"--devices-per-teacher {n} needs one process per GPU, got {local_world} processes "
            f"for {cuda_devices} GPUs, launch {cuda_devices} processes per node"
        )
    if split == "tensor" and world > n:
        raise UserError(
            f"--split tensor runs one replica: transformers wraps several tensor-parallel "
            f"replicas in FSDP, whose forward cannot run in inference mode, got {world} "
            f"processes for --devices-per-teacher {n}, launch {n} processes or use --split pipeline"
        )
    first = local_rank - local_rank % n  # the group's first local rank
    devices = tuple(range(first, first + n)) if cuda_devices else ()
    return Replica(rank // n, world // n, rank % n, n, split, devices)


def check_offload_dir(offload_dir: str | None) -> Path | None:
    """``--offload-dir`` exists or can be made, and is writable (before anything is written)."""
    if offload_dir is None:
        return None
    path = Path(offload_dir).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(
            f"--offload-dir is not a writable directory, {offload_dir}, ({e.strerror or e}), "
            "give a directory on a local disk with room for the offloaded weights"
        ) from e
    return path
