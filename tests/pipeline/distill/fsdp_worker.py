"""Run under torchrun (2 CPU processes, gloo): the same student trained on the same batches,
once wrapped in DDP and once sharded by FSDP2 (``fully_shard``), both through kdcache's loss;
rank 0 writes both final weights' largest difference and how each computed its loss."""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.distill.losses import batch_loss
from kdcache.pipeline.distill.student_head import student_head

V, B, L, K, STEPS = 64, 4, 12, 6, 3


def build() -> torch.nn.Module:
    config = AutoConfig.for_model(
        "llama", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def global_batch(step: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    ids = torch.randint(0, V, (B, L), generator=g)
    logprobs = torch.log_softmax(torch.randn(B, L, V, generator=g), -1)
    top, top_ids = logprobs.topk(K, dim=-1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": ids, "topk_ids": top_ids, "topk_logprobs": top,
            "topk_tail_logprob": torch.log1p(-top.exp().sum(-1))}  # fmt: skip


def train(wrap: str) -> tuple[dict[str, torch.Tensor], bool]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build()
    if wrap == "fsdp":
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        model = DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    head = student_head(model, V)
    for step in range(STEPS):
        full = global_batch(step)
        mine = {name: t[rank::world] for name, t in full.items()}  # this rank's rows
        terms = batch_loss(head.rows(model, mine), mine, head=head, loss="ghost", alpha=0.5,
                           kd_tokens=B * L, ce_tokens=B * L, chunk_tokens=7)  # fmt: skip
        (terms.total * world).backward()  # both average the ranks' gradients: × R sums them
        optimizer.step()
        optimizer.zero_grad()
    state = model.state_dict()
    full_state = {
        name.removeprefix("module."): (t.full_tensor() if hasattr(t, "full_tensor") else t)
        for name, t in state.items()
    }
    return full_state, head.whole_logits


def main() -> None:
    dist.init_process_group("gloo")
    ddp, ddp_whole = train("ddp")
    fsdp, fsdp_whole = train("fsdp")
    if dist.get_rank() == 0:
        gap = max(float((ddp[n] - fsdp[n]).abs().max()) for n in ddp)
        moved = max(float((ddp[n] - build().state_dict()[n]).abs().max()) for n in ddp)
        result = {"gap": gap, "moved": moved, "ddp_whole_logits": ddp_whole,
                  "fsdp_whole_logits": fsdp_whole, "names": sorted(ddp) == sorted(fsdp)}  # fmt: skip
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    # both ranks leave together: gloo aborts a rank whose peer tears the group down while it
    # still waits on it (the SIGABRT this test met under load)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
