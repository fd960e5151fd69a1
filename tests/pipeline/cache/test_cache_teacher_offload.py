"""Teachers larger than the memory given: offloaded to host memory and disk, split over
processes, refused when a split is not exact — and the store is the single-device one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, save_tiny_model
from test_cache_teacher import cache_args, run, store_content
from test_cache_teacher_distributed import (
    assert_same_store,
    command,
    env,
    kill_9_after_the_first_commit,
    single,
)
from transformers import AutoModelForCausalLM

from kdcache.pipeline.errors import UserError
from kdcache.storage import open_store, verify_store

pytestmark = pytest.mark.floors

BUDGET = "200KB"  # the tiny teacher's weights take ~0.5 MB, its largest layer ~150 KB


@pytest.fixture(scope="module")
def in_memory(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("in_memory") / "store"
    assert run(*cache_args(tiny_teacher_dir, small_corpus_dir, out)) == 0
    return out


def assert_same_content(a: Path, b: Path) -> None:
    left, right = store_content(a), store_content(b)
    assert left.keys() == right.keys()
    for name in left:
        for x, y in zip(left[name], right[name], strict=True):
            assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), name


def test_a_teacher_over_the_budget_streams_from_disk_into_the_same_store(
    in_memory: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    out = tmp_path / "store"
    args = cache_args(tiny_teacher_dir, small_corpus_dir, out, "--max-memory", BUDGET)
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "on disk" in err and "its weights take" in err  # the placement note
    assert "peak memory: host " in stdout
    assert_same_content(in_memory, out)
    assert verify_store(str(out)) == []
    stats = open_store(str(out)).manifest["stats"]
    assert stats["peak_host_bytes"] > 0 and stats["peak_device_bytes"] is None


def test_a_checkpoint_that_is_not_safetensors_offloads_through_offload_dir(
    in_memory: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    teacher = tmp_path / "bin_teacher"
    teacher.mkdir()
    for file in tiny_teacher_dir.iterdir():
        if file.suffix != ".safetensors":
            (teacher / file.name).write_bytes(file.read_bytes())
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir)
    torch.save(model.state_dict(), teacher / "pytorch_model.bin")

    refused = tmp_path / "refused"
    args = cache_args(teacher, small_corpus_dir, refused, "--max-memory", BUDGET)
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "pass --offload-dir DIR" in err and err.count("\n") == 1
    assert not refused.exists()

    out, offload = tmp_path / "store", tmp_path / "offload"
    args = cache_args(teacher, small_corpus_dir, out, "--max-memory", BUDGET,
                      "--offload-dir", str(offload))  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    assert_same_content(in_memory, out)


def test_without_max_memory_a_teacher_beyond_the_free_memory_is_offloaded_not_killed(
    monkeypatch, tiny_teacher_dir: Path
) -> None:
    from kdcache.pipeline.cache import placed_teacher
    from kdcache.pipeline.cache.placement import MemoryBudget, Replica
    from kdcache.pipeline.teacher import open_teacher

    source, cpu = open_teacher(str(tiny_teacher_dir)), Replica(0, 1, 0, 1, "pipeline")
    fits = placed_teacher.plan_placement(
        source, torch.float32, cpu, MemoryBudget(), trust_remote_code=False
    )
    assert fits.device_map is None  # plenty free here: loaded whole, as ever
    monkeypatch.setattr(placed_teacher, "_free_host_bytes", lambda: 300_000)  # a crowded host
    short = placed_teacher.plan_placement(
        source, torch.float32, cpu, MemoryBudget(), trust_remote_code=False
    )
    assert short.device_map is not None and "disk" in short.offloaded
    assert short.weights_bytes > 300_000 > short.largest_layer[1]
    monkeypatch.setattr(placed_teacher, "_free_host_bytes", lambda: 50_000)  # not even a layer
    with pytest.raises(UserError, match="the free host memory of 48.8 KiB is below the teacher"):
        placed_teacher.plan_placement(
            source, torch.float32, cpu, MemoryBudget(), trust_remote_code=False
        )


def test_a_budget_below_one_layer_names_the_layer_and_writes_nothing(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    out = tmp_path / "store"
    code, _, err = run_cli(
        cache_args(tiny_teacher_dir, small_corpus_dir, out, "--max-memory", "20KB"), capsys
    )
    assert code == 2 and err.count("\n") == 1
    assert "below the teacher's largest layer, model.layers.0 (" in err and "KiB in float32" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--max-memory", "lots"], "cannot read --max-memory 'lots' as a size"),
        (["--devices-per-teacher", "0"], "--devices-per-teacher must be at least 1"),
        (["--devices-per-teacher", "2"], "spreads a teacher over 2 GPUs, this machine has none"),
        (["--split", "tensor", "--devices-per-teacher", "2"], "more than this node has"),
        (["--split", "tensor", "--max-memory", "1GB"], "--split tensor keeps every weight"),
        (["--split", "sideways"], "unknown --split, sideways"),
    ],
)
def test_bad_placement_options_are_one_line_errors_and_write_nothing(
    extra: list[str],
    message: str,
    tmp_path: Path,
    tiny_teacher_dir: Path,
    small_corpus_dir: Path,
    capsys,
) -> None:
    out = tmp_path / "store"
    code, _, err = run_cli(cache_args(tiny_teacher_dir, small_corpus_dir, out, *extra), capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not out.exists()


def test_an_offload_dir_that_cannot_be_written_is_refused(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    (tmp_path / "a_file").write_text("x")
    out = tmp_path / "store"
    args = cache_args(
        tiny_teacher_dir, small_corpus_dir, out, "--offload-dir", str(tmp_path / "a_file")
    )
    code, _, err = run_cli(args, capsys)
    assert code == 2 and "--offload-dir is not a writable directory" in err
    assert not out.exists()


def test_a_split_whose_output_differs_from_the_single_device_forward_is_refused(
    tiny_teacher_dir: Path,
) -> None:
    from kdcache.pipeline.cache.placed_teacher import check_split
    from kdcache.pipeline.teacher import open_teacher

    source = open_teacher(str(tiny_teacher_dir))
    probe = torch.tensor([[5, 17, 42, 99, 7, 3, 250, 11]])
    cpu = torch.device("cpu")
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()

    def verdict() -> str | None:
        return check_split(model, source, torch.float32, probe, cpu, None,
                           trust_remote_code=False, what="pipeline split over 2 devices")  # fmt: skip

    assert verdict() is None  # the same weights, the same forward
    with torch.no_grad():  # what a wrong shard layout does: one layer's output goes astray
        model.model.layers[1].mlp.down_proj.weight.mul_(1.5)
    note = verdict()
    assert note is not None and "differs from its single-device forward by" in note
    model.model.layers[1].mlp.down_proj.forward = lambda x: x.reshape(3, -1)  # cannot run
    note = verdict()
    assert note is not None and "fails on this platform" in note


# --- real processes: torchrun, kill -9 ----------------------------------------------------------


def torchrun(*args: str, nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
         "--master_port", str(29600 + os.getpid() % 1000 + nproc),
         "-m", "kdcache.pipeline", *args],
        env=env(), capture_output=True, timeout=timeout,
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "store"
    process = single(tiny_teacher_dir, small_corpus_dir, out)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]
    return out


@pytest.mark.slow
def test_two_offloaded_ranks_write_the_in_memory_store(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    out = tmp_path / "store"
    result = torchrun(*command(tiny_teacher_dir, small_corpus_dir, out), "--max-memory", BUDGET)
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert_same_store(reference, out)


@pytest.mark.slow
def test_a_tensor_parallel_replica_of_two_processes_matches_up_to_rounding(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    out = tmp_path / "store"
    result = torchrun(*command(tiny_teacher_dir, small_corpus_dir, out),
                      "--devices-per-teacher", "2", "--split", "tensor")  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    assert verify_store(str(out)) == []
    a, b = open_store(str(reference)), open_store(str(out))
    assert [r.name for r in a.shards] == [r.name for r in b.shards]
    for ra, rb in zip(a.shards, b.shards, strict=True):
        x, y = a.read_shard(ra), b.read_shard(rb)
        assert np.array_equal(x.tokens, y.tokens) and np.array_equal(x.seq_offsets, y.seq_offsets)
        # all-reduced partial sums round differently: the same log-probs within float16's step
        diff = np.abs(x.topk_logprobs.astype(np.float32) - y.topk_logprobs.astype(np.float32))
        assert float(diff.max()) <= 2**-6
        assert np.mean(x.topk_ids == y.topk_ids) > 0.99  # near-ties may swap neighbours


@pytest.mark.slow
def test_an_inexact_tensor_split_is_refused_before_anything_is_written(
    tmp_path: Path, tiny_tokenizer_dir: Path, small_corpus_dir: Path
) -> None:
    # one key/value head cannot be split over two processes: the platform's split fails
    teacher = save_tiny_model("llama", tiny_tokenizer_dir, tmp_path / "mqa", num_key_value_heads=1)
    out = tmp_path / "store"
    result = torchrun(*command(teacher, small_corpus_dir, out),
                      "--devices-per-teacher", "2", "--split", "tensor")  # fmt: skip
    assert result.returncode != 0
    errors = [line for line in result.stderr.decode().splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "tensor split over 2 devices" in errors[0], errors
    assert "refused, nothing written, use --split pipeline" in errors[0]
    assert "pipeline/cache/" not in result.stderr.decode()  # no traceback through our code
    assert not out.exists()


@pytest.mark.slow
def test_kill_9_with_offload_then_rerun_gives_the_in_memory_store(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    out = tmp_path / "store"
    process = single(tiny_teacher_dir, small_corpus_dir, out, "--max-memory", BUDGET)
    committed = kill_9_after_the_first_commit(process, out)
    assert 1 <= committed < len(open_store(str(reference)).shards)
    rerun = single(tiny_teacher_dir, small_corpus_dir, out, "--max-memory", BUDGET)
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert f"{committed} already there" in stdout.decode()
    assert_same_store(reference, out)
