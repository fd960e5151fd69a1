"""What does offloading a teacher cost? Stage one in memory vs with its layers streamed from disk.

For each teacher size (Llama-style, random weights, vocab 32k), ``kdcache cache-teacher`` runs
on the same tokens with three placements, each in its own subprocess (peak RSS is its own):

1. memory — the whole teacher in memory (no --max-memory: it fits);
2. half   — ``--max-memory`` at half the teacher's weights: the first layers stay, the rest are
            read from the safetensors checkpoint (page cache) on every forward;
3. disk   — ``--max-memory`` at the largest layer: every layer streams through memory in turn.

Rounds interleave the placements (memory, half, disk, then reversed), so drift of a shared
machine hits each alike; the report gives the best loop tokens/s of each, its ratio to the
in-memory run of the same size, the peak RSS, and the stores' equality (byte for byte).
On a GPU, "half" is what CPU offload costs (host memory -> device on every forward) and "disk"
what disk offload costs; on a CPU-only machine both read from the page cache.

Run: ``.venv/bin/python bench/offload.py`` (about 10 minutes on 2 CPU cores). Writes
``bench/results/offload.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_overhead import bench_tokenizer, make_teacher
from report import machine_line

PLACEMENTS = ("memory", "half", "disk")
RESULTS = Path(__file__).parent / "results" / "offload.md"


def weights(teacher: Path) -> tuple[int, int]:
    """(weights bytes, largest layer bytes) of a saved teacher, as kdcache plans them."""
    import torch

    from kdcache.pipeline.cache.placed_teacher import plan_placement
    from kdcache.pipeline.cache.placement import MemoryBudget, Replica
    from kdcache.pipeline.teacher import open_teacher

    source = open_teacher(str(teacher))
    plan = plan_placement(
        source,
        torch.float32,
        Replica(0, 1, 0, 1, "pipeline"),
        MemoryBudget(1 << 50),
        trust_remote_code=False,
    )
    return plan.weights_bytes, plan.largest_layer[1]


def run(args: argparse.Namespace, teacher: Path, budget: int | None, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    command = [
        sys.executable, "-m", "kdcache.pipeline", "cache-teacher", "--teacher", str(teacher),
        "--corpus", args.corpus, "--out", str(out), "--max-tokens", str(args.tokens),
        "--batch-size", str(args.batch), "--seq-len", str(args.seq_len), "--top-k", "64",
        "--shard-tokens", str(args.tokens // 4), "--eval-fraction", "0",
    ]  # fmt: skip
    if budget is not None:
        command += ["--max-memory", str(budget)]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "KDCACHE_PROGRESS_SECONDS": "600"}
    result = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
    if result.returncode != 0:
        raise SystemExit(f"cache-teacher failed:\n{result.stderr[-3000:]}")
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    loop = stats["seconds"] - stats["setup_seconds"]
    return {
        "tokens_per_second": stats["tokens_computed"] / loop,
        "setup_seconds": stats["setup_seconds"],
        "peak_rss_mb": stats["peak_host_bytes"] / 2**20,
    }


def same_store(a: Path, b: Path) -> bool:
    from kdcache.storage import open_store

    x, y = open_store(str(a)), open_store(str(b))
    for ra, rb in zip(x.shards, y.shards, strict=True):
        u, v = x.read_shard(ra), y.read_shard(rb)
        for field in ("tokens", "topk_ids", "topk_logprobs", "topk_tail_logprob"):
            if getattr(u, field).tobytes() != getattr(v, field).tobytes():
                return False
    return len(x.shards) == len(y.shards)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="256x4,512x6", help="hidden x layers, comma-separated")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=16384, help="tokens per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--corpus", default="stdlib")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from kdcache.pipeline.cache.placement import format_size

    started = time.perf_counter()
    facts = machine_line()
    print(facts)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_tokenizer(work / "tokenizer")
        for size in args.sizes.split(","):
            hidden, layers = (int(x) for x in size.split("x"))
            teacher = work / f"teacher-{size}"
            params = make_teacher(teacher, work / "tokenizer", hidden, layers, args.vocab)
            total, largest = weights(teacher)
            budgets = {"memory": None, "half": total // 2, "disk": largest}
            runs: dict[str, list[dict]] = {p: [] for p in PLACEMENTS}
            for round_ in range(args.repeats):
                order = PLACEMENTS if round_ % 2 == 0 else PLACEMENTS[::-1]
                for placement in order:
                    out = work / f"store-{size}-{placement}"
                    runs[placement].append(run(args, teacher, budgets[placement], out))
                    print(f"{size} {placement}: {runs[placement][-1]}", flush=True)
            equal = all(
                same_store(work / f"store-{size}-memory", work / f"store-{size}-{p}")
                for p in PLACEMENTS[1:]
            )
            best = {p: max(r["tokens_per_second"] for r in runs[p]) for p in PLACEMENTS}
            peak = {p: max(r["peak_rss_mb"] for r in runs[p]) for p in PLACEMENTS}
            rows.append(
                f"| {size} ({params / 1e6:.1f}M, {format_size(total)}) | "
                + " | ".join(
                    f"{best[p]:,.0f} ({best[p] / best['memory']:.2f}) {peak[p]:,.0f} MB"
                    for p in PLACEMENTS
                )
                + f" | {format_size(largest)} | {'yes' if equal else 'NO'} |"
            )
            print(rows[-1], flush=True)
    minutes = (time.perf_counter() - started) / 60
    lines = [
        "## Offloaded teachers: the price of --max-memory (`bench/offload.py`)",
        "",
        f"{facts}. Wall time {minutes:.0f} min.",
        "",
        f"`cache-teacher` on {args.tokens:,} tokens of `{args.corpus}`, seq-len {args.seq_len}, "
        f"batch {args.batch}, k=64, vocab {args.vocab:,}, float32, random Llama-style teachers; "
        f"best of {args.repeats} interleaved rounds. Each cell: loop tokens/s (ratio to in "
        "memory), peak RSS.",
        "",
        "| teacher (params, weights) | in memory | half offloaded | all offloaded (budget = largest "
        "layer) | largest layer | stores identical |",
        "| --- | --- | --- | --- | --- | --- |",
        *rows,
        "",
        "Offloaded layers are read from the teacher's safetensors files on every forward (here "
        "from the page cache: the files fit in RAM). What bounds it: the copy of each offloaded "
        "layer's weights per batch, which grows with the weights and not with the tokens, so "
        "larger --batch-size and --seq-len amortize it; with weights beyond RAM the disk's read "
        "rate sets the pace (weights bytes / read rate per batch). On a GPU the same path moves "
        "host-memory layers over PCIe per batch. On this CPU-only box the forward's compute "
        "dominates, so the ratios sit within the machine's noise (compare rows of one run only). "
        "Peak RSS counts the checkpoint's memory-mapped pages, which are file-backed: the kernel "
        "reclaims them under pressure instead of killing the process, which is what offloading "
        "buys here.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
