"""Checkpoints are durable (every file, the directory and its parent fsynced before the new one
replaces the old) and portable: the main process writes every rank's RNG state and reads the
checkpoint for all, so ranks need no shared filesystem (torchrun, gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def test_a_checkpoint_reaches_the_disk_before_it_replaces_the_old_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sys.path.insert(0, str(HERE))
    from accelerate import Accelerator
    from checkpoint_worker import Loader, trainee

    from kdcache.pipeline.distill.checkpoint import load_checkpoint, save_checkpoint

    accelerator = Accelerator(cpu=True)
    path = tmp_path / "checkpoint"
    save_checkpoint(path, [trainee(0)], Loader(), accelerator)  # an old checkpoint to replace
    events: list[tuple[str, str]] = []
    fsync, rename = os.fsync, Path.rename

    def logged_fsync(fd: int) -> None:
        fsync(fd)
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))

    def logged_rename(self: Path, target: Path) -> Path:
        events.append(("rename", f"{self} -> {target}"))
        return rename(self, target)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(Path, "rename", logged_rename)
    loader = Loader()
    loader.position = 5
    save_checkpoint(path, [trainee(2)], loader, accelerator)
    first_rename = next(i for i, (kind, _) in enumerate(events) if kind == "rename")
    synced = {p for kind, p in events[:first_rename] if kind == "fsync"}
    tmp = f"{path}.tmp"
    for name in ("student.pt", "student.json", "loader.json", "rng-rank0.pt"):
        assert f"{tmp}/{name}" in synced, name
    assert tmp in synced  # the directory, before any rename
    renames = [p for kind, p in events if kind == "rename"]
    assert renames == [f"{path} -> {path}.old", f"{tmp} -> {path}"]
    into_place = events.index(("rename", f"{tmp} -> {path}"))
    assert ("fsync", str(tmp_path)) in events[into_place + 1 :]  # the new entry, on disk
    assert not Path(f"{path}.old").exists() and not Path(tmp).exists()
    restored = Loader()
    load_checkpoint(path, [trainee(3)], restored, accelerator)
    assert restored.position == 5


@pytest.mark.timeout(300)
def test_ranks_without_a_shared_filesystem_restore_from_the_main_process(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", str(29700 + os.getpid() % 100),
            str(HERE / "checkpoint_worker.py"), str(tmp_path)]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, done.stderr[-3000:]
    main, other = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert main["own_dir_holds"] == ["loader.json", "rng-rank0.pt", "rng-rank1.pt",
                                     "student.json", "student.pt"]  # fmt: skip
    assert other["own_dir_holds"] == []  # rank 1 wrote nothing, and read nothing, of its own
    for facts in (main, other):
        assert facts["found"] and facts["weights_equal"] and facts["step"] == 7
        assert facts["loader"] == 96 and facts["rng_equal"]  # each rank's own RNG state


def test_a_resume_refuses_a_store_whose_shard_records_changed(tmp_path: Path) -> None:
    from conftest import write_synthetic_store

    from kdcache.pipeline.distill.dataset import records_fingerprint
    from kdcache.storage import open_store

    lengths = {"train": [[16] * 3, [16] * 3]}
    a = open_store(write_synthetic_store(str(tmp_path / "a"), lengths=lengths))
    b = open_store(write_synthetic_store(str(tmp_path / "b"), lengths=lengths, seed=1))
    same_counts = [(r.num_sequences, r.num_tokens) for r in a.shards_of("train")]
    assert same_counts == [(r.num_sequences, r.num_tokens) for r in b.shards_of("train")]
    assert records_fingerprint(a.shards_of("train")) != records_fingerprint(b.shards_of("train"))
    assert records_fingerprint(a.shards_of("train")) == records_fingerprint(
        open_store(str(tmp_path / "a")).shards_of("train")
    )
