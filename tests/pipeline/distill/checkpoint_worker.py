"""A torchrun worker: each rank saves and loads a checkpoint under a directory of its own (as on
nodes without a shared filesystem), then writes what it restored to a JSON file.

python -m torch.distributed.run --nproc_per_node 2 checkpoint_worker.py ROOT
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from accelerate import Accelerator

from kdcache.pipeline.distill.checkpoint import has_checkpoint, load_checkpoint, save_checkpoint


class Loader:
    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict:
        return {"consumed": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["consumed"]


def trainee(seed: int) -> SimpleNamespace:
    torch.manual_seed(seed)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)
    return SimpleNamespace(name="student", model=model, optimizer=optimizer, scheduler=scheduler,
                           step=7, tokens=70, trained_tokens=60, extra={"x": 1})  # fmt: skip


def main(root: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    path = root / f"node{rank}" / "checkpoint"  # no directory is shared between the ranks
    path.parent.mkdir(parents=True, exist_ok=True)
    saved, loader = trainee(0), Loader()
    loader.position = 96
    torch.manual_seed(100 + rank)  # each rank's own RNG stream
    save_checkpoint(path, [saved], loader, accelerator)
    expected = torch.rand(3).tolist()  # what this rank draws right after the checkpoint
    restored, fresh = trainee(1), Loader()
    found = has_checkpoint(path, accelerator)
    load_checkpoint(path, [restored], fresh, accelerator)
    pairs = zip(
        saved.model.state_dict().values(), restored.model.state_dict().values(), strict=True
    )
    same = all(torch.equal(a, b) for a, b in pairs)
    facts = {
        "found": found,
        "own_dir_holds": sorted(p.name for p in path.glob("*")) if path.exists() else [],
        "weights_equal": same,
        "step": restored.step,
        "loader": fresh.position,
        "rng_equal": torch.rand(3).tolist() == expected,
    }
    (root / f"rank{rank}.json").write_text(json.dumps(facts))
    # both ranks meet before the gloo group goes: a rank that exits while its peer still
    # talks to it aborts ("terminate called without an active exception") on a loaded machine
    accelerator.wait_for_everyone()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
