"""Loader throughput at k=64 (vocab 32k) with 1 and 2 workers, and a tiny student's data-wait share.

    .venv/bin/python bench/loader.py [--tokens 1048576] [--seq-len 1024] [--backend zarr]

Builds a store of realistic rows (float16 log-probs sorted descending, top-k mass 0.5-0.99,
Zipf-like ids), then measures in the same run: decode-only (``Store.read_shard``), the loader in
process and with 1 and 2 DataLoader workers (one pass), and ``train_step`` of a ``tiny`` student
fed by the loader, timing how long each step waits for its batch. Writes
``bench/results/loader.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.pipeline.loader import TeacherDataset, TeacherLoader
from kdcache.pipeline.student import build_student
from kdcache.pipeline.trainee import make_accelerator, make_trainee, train_step
from kdcache.storage import create_store, make_manifest, open_store

VOCAB, K = 32_000, 64


def build_store(path: str, tokens: int, seq_len: int, backend: str, seed: int = 0) -> float:
    """Write ``tokens`` realistic rows into a new store; returns the seconds it took."""
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    manifest = make_manifest(
        backend=backend,
        teacher={"name": "bench-synthetic"},
        tokenizer={"name": "none"},
        vocab_size=VOCAB,
        top_k=K,
        seq_len=seq_len,
        corpus={"spec": "synthetic"},
        shard_tokens=tokens // 4,
    )
    writer = create_store(path, manifest)
    for start in range(0, tokens, seq_len):
        n = min(seq_len, tokens - start)
        scores = np.sort(rng.gumbel(size=(n, K)) * 1.5, axis=1)[:, ::-1]  # (n, k) descending
        mass = rng.uniform(0.5, 0.99, size=(n, 1))  # the teacher's top-k mass
        logprobs = scores - np.logaddexp.reduce(scores, axis=1, keepdims=True) + np.log(mass)
        ids = (VOCAB * rng.random((n, K)) ** 3).astype(np.int64)  # frequent ids are small
        writer.append("train", rng.integers(0, VOCAB, n), ids, logprobs)
    writer.flush()
    return time.perf_counter() - started


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its reaped children (DataLoader workers)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def loader_pass(url: str, workers: int, batch_size: int) -> tuple[float, float, int]:
    """One epoch through TeacherLoader: (wall seconds, CPU seconds, tokens).

    CPU seconds include the worker processes (reaped when the pass ends): tokens per CPU-second
    is what one dedicated core delivers, whatever else the machine is running.
    """
    dataset = TeacherDataset(url, batch_size=batch_size, infinite=False, seed=0)
    cpu, started = _cpu_seconds(), time.perf_counter()
    tokens = sum(
        int(b["attention_mask"].sum()) for b in TeacherLoader(dataset, num_workers=workers)
    )
    return time.perf_counter() - started, _cpu_seconds() - cpu, tokens


def student_wait(url: str, workers: int, batch_size: int, steps: int) -> tuple[float, float, int]:
    """Train a tiny student for ``steps``: (seconds waiting for data, total seconds, tokens)."""
    accelerator = make_accelerator(0)
    model, _ = build_student("tiny", VOCAB)
    trainee = make_trainee(
        "bench", model, accelerator, loss="kl", temperature=1.0, alpha=0.5, lr=1e-3, steps=steps,
        warmup=1,
    )  # fmt: skip
    loader = TeacherLoader(TeacherDataset(url, batch_size=batch_size), num_workers=workers)
    train_step(trainee, [next(loader)], accelerator)  # warm-up: worker start, first allocations
    waiting = 0.0
    tokens = 0
    started = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(loader)
        waiting += time.perf_counter() - t0
        tokens += int(batch["attention_mask"].sum())
        train_step(trainee, [batch], accelerator)
    total = time.perf_counter() - started
    loader.close()
    return waiting, total, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 20)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--backend", default="zarr", choices=("zarr", "arrow"))
    parser.add_argument("--student-steps", type=int, default=6)
    parser.add_argument("--student-batch", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "loader.md"))
    args = parser.parse_args()

    facts = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "torch threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
    }
    for name, value in facts.items():
        print(f"{name}: {value}")
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        url = str(Path(tmp) / "store")
        build_s = build_store(url, args.tokens, args.seq_len, args.backend)
        store = open_store(url)
        print(
            f"store: {store.num_tokens:,} tokens, {len(store.shards)} shards, {store.nbytes / store.num_tokens:.1f} bytes/token, built in {build_s:.1f} s"
        )
        cpu, started = _cpu_seconds(), time.perf_counter()
        for record in store.shards:
            store.read_shard(record)
        wall, cpu = time.perf_counter() - started, _cpu_seconds() - cpu
        n = store.num_tokens
        rows = [("decode only (read_shard)", n / wall, n / wall, n / cpu)]
        for workers in (0, 1, 2):
            wall, cpu, tokens = loader_pass(url, workers, args.batch_size)
            label = "in process" if workers == 0 else f"{workers} worker{'s' * (workers > 1)}"
            per = tokens / wall / max(workers, 1)
            rows.append((f"loader, {label}", tokens / wall, per, tokens / cpu))
        for name, rate, per, per_cpu in rows:
            print(
                f"{name}: {rate:,.0f} tokens/s ({per:,.0f} per worker, {per_cpu:,.0f} per CPU-second)"
            )
        waiting, total, tokens = student_wait(url, 1, args.student_batch, args.student_steps)
        share = waiting / total
        print(
            f"tiny student, 1 worker: {total / args.student_steps:.2f} s/step, {tokens / total:,.0f} tokens/s, waiting {share:.2%}"
        )

    best = max(per for name, _, per, _ in rows if "worker" in name)
    best_cpu = max(c for name, _, _, c in rows if name.startswith("loader"))
    lines = [
        "## Loader (`bench/loader.py`)",
        "",
        f"Store: {args.tokens:,} synthetic tokens, vocab {VOCAB:,}, k={K}, float16 log-probs, "
        f"{args.backend}, seq_len {args.seq_len}, batch {args.batch_size}. Machine: "
        + ", ".join(f"{k} {v}" for k, v in facts.items())
        + ".",
        "",
        "| what | tokens/s (wall) | per worker (wall) | tokens per CPU-second |",
        "|---|---:|---:|---:|",
        *[f"| {n} | {r:,.0f} | {p:,.0f} | {c:,.0f} |" for n, r, p, c in rows],
        "",
        f"`tiny` student (batch {args.student_batch} × {args.seq_len}, loss kl, {args.student_steps} steps, 1 worker): "
        f"{total / args.student_steps:.2f} s/step, waiting on data **{share:.2%}** of step time "
        "(target < 2%).",
        "",
        f"Target ≥ 1,000,000 tokens/s per worker: {'met' if best >= 1e6 else 'not met'} in this run "
        f"(best per worker {best:,.0f} tokens/s wall, {best_cpu:,.0f} per CPU-second). "
        "Wall-clock rates depend on what else the machine runs (see the load average); tokens per "
        "CPU-second (this process plus its workers) is what one dedicated core delivers. "
        "Per-worker throughput is bounded by decoding (zarr decompression, see the decode-only row) "
        "and by widening k=64 ids to int64 and log-probs to float32 in `collate` (12 bytes per "
        "id/log-prob pair written, ~770 bytes per token); with workers, batches also cross process "
        "boundaries through shared memory. A student step at vocab 32k costs far more than a batch, "
        "so the data wait is noise once the first batch is ready.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
