"""Processes grouped into teacher replicas, and the --max-memory / --offload-dir options."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kdcache.pipeline.cache.placement import (
    MemoryBudget,
    check_offload_dir,
    format_size,
    parse_max_memory,
    parse_size,
    replica_of,
)
from kdcache.pipeline.errors import UserError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("123456", 123456),
        ("500MB", 500 * 10**6),
        ("1.5gb", 1_500_000_000),
        ("70GiB", 70 << 30),
        ("64 KiB", 64 << 10),
        ("2TB", 2 * 10**12),
    ],
)
def test_sizes_read_in_decimal_and_binary_units(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "12XB", "GB", "-5GB", "0", "0.1", "1e9", "70 Gi B"])
def test_unreadable_or_empty_sizes_are_one_line_errors(text: str) -> None:
    with pytest.raises(UserError) as error:
        parse_size(text)
    assert "\n" not in str(error.value) and "--max-memory" in str(error.value)


def test_max_memory_takes_a_device_size_and_a_host_cap() -> None:
    assert parse_max_memory(None) == MemoryBudget() and not MemoryBudget().given
    assert parse_max_memory("70GiB") == MemoryBudget(70 << 30, None)
    assert parse_max_memory("70GiB, cpu=200GiB") == MemoryBudget(70 << 30, 200 << 30)
    assert parse_max_memory("cpu=1GB") == MemoryBudget(None, 10**9)
    with pytest.raises(UserError, match="unknown --max-memory entry 'gpu=3'"):
        parse_max_memory("1GB,gpu=3")


def test_sizes_print_in_binary_units() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(70 << 30) == "70.0 GiB"
    assert format_size(3 << 40) == "3.0 TiB"


def test_one_device_per_teacher_keeps_one_replica_per_process() -> None:
    replica = replica_of(5, 8, 4, 1, "pipeline", cuda_devices=4, local_rank=1)
    assert (replica.index, replica.count, replica.member, replica.size) == (5, 8, 0, 1)
    assert replica.device_indices == (1,) and replica.leader and replica.computes
    cpu = replica_of(1, 2, 2, 1, "pipeline", cuda_devices=0, local_rank=1)
    assert cpu.device_indices == () and cpu.index == 1 and not cpu.spans_devices


def test_eight_gpus_and_four_devices_per_teacher_make_two_replicas_per_node() -> None:
    # 2 nodes x 8 GPUs, one process per GPU: ranks 8..15 are node 1, local ranks 0..7
    places = [replica_of(r, 16, 8, 4, "pipeline", 8, r % 8) for r in range(16)]
    assert [p.index for p in places] == [r // 4 for r in range(16)]
    assert {p.count for p in places} == {4}
    assert [p.member for p in places] == [r % 4 for r in range(16)]
    assert places[12].device_indices == (4, 5, 6, 7) and places[12].leader
    assert places[13].device_indices == (4, 5, 6, 7) and not places[13].computes  # lends GPU 5
    tensor = replica_of(1, 4, 4, 4, "tensor", 4, 1)
    assert tensor.computes and not tensor.leader  # every tensor-parallel rank runs the forward


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((0, 6, 6, 4, "pipeline", 8, 0), "does not divide the 6 processes per node"),
        ((0, 8, 8, 16, "pipeline", 8, 0), "more than this node has (8 GPUs"),
        ((0, 4, 4, 2, "pipeline", 2, 0), "needs one process per GPU, got 4 processes"),
        ((0, 2, 2, 2, "pipeline", 0, 0), "this machine has none"),
        ((0, 2, 2, 3, "tensor", 0, 0), "more than this node has (2 processes"),
        ((0, 2, 2, 0, "pipeline", 0, 0), "must be at least 1"),
        ((0, 16, 8, 4, "tensor", 8, 0), "--split tensor runs one replica"),
        ((0, 2, 2, 2, "diagonal", 0, 0), "unknown --split, diagonal"),
    ],
)
def test_impossible_layouts_are_one_line_errors(args: tuple, message: str) -> None:
    rank, world, local_world, n, split, cuda, local_rank = args
    with pytest.raises(UserError) as error:
        replica_of(rank, world, local_world, n, split, cuda, local_rank)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_offload_dir_is_made_and_must_be_writable(tmp_path: Path) -> None:
    assert check_offload_dir(None) is None
    made = check_offload_dir(str(tmp_path / "a" / "b"))
    assert made == tmp_path / "a" / "b" and made.is_dir()
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="--offload-dir is not a writable directory"):
        check_offload_dir(str(tmp_path / "file" / "sub"))
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(UserError, match="not a writable directory"):
            check_offload_dir(str(locked))
