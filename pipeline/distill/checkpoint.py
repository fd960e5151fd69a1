"""Checkpoints of trainees and their loader: durable, replaced atomically, and written and read by
the main process alone, so the ranks of a multi-node run need no shared filesystem.

Layout of a checkpoint directory: ``<trainee>.pt`` (model, optimizer, scheduler, fp16 scaler
state) and ``<trainee>.json`` (step, tokens) per trainee, ``loader.json`` (the loader's global
position) and ``rng-rank<r>.pt`` per rank (each rank's RNG state, gathered to the main process).

Saving: every file is written and fsynced in ``<path>.tmp``, the directory fsynced; then the old
checkpoint is renamed to ``<path>.old``, the new one into place, the parent fsynced, the old one
deleted. A kill at any moment leaves ``<path>`` or ``<path>.old`` whole (``run_dir`` takes the
old one back). Loading: the main process reads the files and sends them to the other ranks
(``broadcast_object_list``); a rank the checkpoint has no RNG state for takes rank 0's.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.errors import UserError
from kdcache.storage._fs import fsync_dir, write_durable

LOADER_FILE = "loader.json"


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _save(obj: Any, path: Path) -> None:
    """``obj`` to ``path`` (torch.save for tensors, UTF-8 for a ``str``), flushed to disk."""
    if isinstance(obj, str):
        data = obj.encode("utf-8")
    else:
        buffer = io.BytesIO()
        torch.save(obj, buffer)
        data = buffer.getvalue()
    write_durable(str(path), data)


def broadcast_main(accelerator: Any, value: Any) -> Any:
    """The main process's ``value``, on every rank."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([value], from_process=0)[0]


def save_checkpoint(path: Path, trainees: list[Any], loader: Any, accelerator: Any) -> None:
    """Write ``path`` (see the module docstring); every rank calls it, the main process writes."""
    rng = [_rng_state()]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        rng = gather_object(rng)  # (world,) every rank's, in rank order
    if accelerator.is_main_process:
        tmp, old = path.with_name(path.name + ".tmp"), path.with_name(path.name + ".old")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for t in trainees:
            state = {
                "model": accelerator.unwrap_model(t.model).state_dict(),
                "optimizer": t.optimizer.state_dict(),
                "scheduler": t.scheduler.state_dict(),
            }
            if accelerator.scaler is not None:  # fp16 loss scaling
                state["scaler"] = accelerator.scaler.state_dict()
            _save(state, tmp / f"{t.name}.pt")
            progress = {"step": t.step, "tokens": t.tokens, "trained_tokens": t.trained_tokens}
            _save(json.dumps({**progress, "extra": t.extra}), tmp / f"{t.name}.json")
        _save(json.dumps(loader.state_dict()), tmp / LOADER_FILE)
        for rank, state in enumerate(rng):
            _save(state, tmp / f"rng-rank{rank}.pt")
        fsync_dir(str(tmp))
        shutil.rmtree(old, ignore_errors=True)
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        fsync_dir(str(path.parent))
        shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def has_checkpoint(path: Path, accelerator: Any) -> bool:
    """Whether ``path`` holds a checkpoint, as the main process sees it, on every rank."""
    found = path.is_dir() if accelerator.is_main_process else None
    return bool(broadcast_main(accelerator, found))


def _read(path: Path, names: list[str], processes: int) -> dict[str, Any]:
    if not (path / LOADER_FILE).is_file():
        raise UserError(
            f"the checkpoint was written by an older kdcache (a loader position per process), "
            f"{path}, start the run again in a new --out"
        )
    ranks = [path / f"rng-rank{r}.pt" for r in range(processes)]
    return {
        "trainees": {
            name: (
                torch.load(path / f"{name}.pt", map_location="cpu", weights_only=True),
                json.loads((path / f"{name}.json").read_text()),
            )
            for name in names
        },
        "loader": json.loads((path / LOADER_FILE).read_text()),
        "rng": [
            torch.load(f if f.is_file() else path / "rng-rank0.pt", weights_only=True)
            for f in ranks
        ],
    }


def load_checkpoint(path: Path, trainees: list[Any], loader: Any, accelerator: Any) -> None:
    """Restore what ``save_checkpoint`` wrote, on every rank, with any number of ranks; only the
    main process reads ``path``."""
    payload = None
    if accelerator.is_main_process:
        payload = _read(path, [t.name for t in trainees], accelerator.num_processes)
    payload = broadcast_main(accelerator, payload)
    for t in trainees:
        state, progress = payload["trainees"][t.name]
        accelerator.unwrap_model(t.model).load_state_dict(state["model"])
        t.optimizer.load_state_dict(state["optimizer"])
        t.scheduler.load_state_dict(state["scheduler"])
        if accelerator.scaler is not None and "scaler" in state:
            accelerator.scaler.load_state_dict(state["scaler"])
        t.step, t.tokens, t.extra = progress["step"], progress["tokens"], progress["extra"]
        t.trained_tokens = progress.get("trained_tokens", t.tokens)  # older checkpoints: unmasked
    loader.load_state_dict(payload["loader"])
    rng = payload["rng"][accelerator.process_index]
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
