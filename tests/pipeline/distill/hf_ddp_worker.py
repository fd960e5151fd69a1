"""A torchrun worker: DistillTrainer on a store, its log history and final eval to a JSON file.

python -m torch.distributed.run --nproc_per_node 2 hf_ddp_worker.py STORE OUT PER_DEVICE
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainingArguments

from kdcache.pipeline.distill import DistillTrainer, load_store_tokenizer, make_optimizer
from kdcache.pipeline.distill.student import build_student
from kdcache.storage import open_store

STEPS = 3


def run(store_url: str, out: Path, per_device: int, fsdp: bool = False) -> dict:
    store = open_store(store_url)
    tokenizer = load_store_tokenizer(store)
    model, _ = build_student("tiny", store.tokenizer_size, tokenizer=tokenizer, seed=0)
    args = TrainingArguments(
        output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=per_device,
        per_device_eval_batch_size=per_device, gradient_accumulation_steps=2, logging_steps=1,
        report_to="none", use_cpu=True, save_strategy="no", seed=0, max_grad_norm=1.0,
        disable_tqdm=True, **({"fsdp": True, "fsdp_config": {"fsdp_version": 2}} if fsdp else {}),
    )  # fmt: skip
    trainer = DistillTrainer(
        model, args, store=store, processing_class=tokenizer,
        optimizers=make_optimizer(model, lr=3e-3, steps=STEPS, warmup=1),
    )  # fmt: skip
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    return {"losses": losses, "eval": trainer.evaluate(), "world": args.world_size}


if __name__ == "__main__":
    import torch.distributed as dist

    result = run(sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4:] == ["fsdp"])
    if result["world"] == 1 or int(__import__("os").environ.get("RANK", "0")) == 0:
        (Path(sys.argv[2]) / "result.json").write_text(json.dumps(result))
    if dist.is_initialized():
        # both ranks done before gloo is torn down: a rank leaving while the other's gloo
        # threads still talk to it aborts it at exit ("terminate called", SIGABRT) under load
        dist.barrier()
        dist.destroy_process_group()
