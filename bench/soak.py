"""Soak: train-student for thousands of steps from an S3 store larger than its --cache-limit.

    .venv/bin/python bench/soak.py [--steps 3000] [--max-tokens 120000] [--cache-shards 3]

Builds a tiny random-weight teacher (2 layers, 64 wide, a 512-id BPE tokenizer trained on the
fly), caches its top-8 targets of the ``stdlib`` corpus into a local store of many small shards
and copies it to moto's S3 server (a subprocess on 127.0.0.1: nothing leaves the loopback).
Then ``kdcache train-student`` runs twice in a subprocess, from the local store and from the
S3 store through a shard cache whose ``--cache-limit`` holds ``--cache-shards`` shards (every
epoch evicts and refetches the store), sampling the child's resident memory (VmRSS), open file
descriptors and threads every ``--every`` seconds. Reports their growth after warm-up (the
first ``--warmup`` of the run): target < 5% RSS, no fd or thread growth; and whether the two
runs' losses (log.csv) and final weights are identical. Writes ``bench/results/soak.md``.
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from remote_loader import ENV, start_moto

TRAIN = ["--student", "tiny", "--batch-size", "4", "--eval-every", "0", "--eval-batches", "2",
         "--threads", "1", "--checkpoint-every", "500", "--seed", "0"]  # fmt: skip


def build_teacher(path: Path) -> Path:
    """A 2-layer, 64-wide Llama with random weights and a 512-id tokenizer trained on the fly."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from kdcache.pipeline.cache.corpus import stdlib_files
    from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer

    texts = [f.read_text(encoding="utf-8", errors="replace") for f in stdlib_files()[:60]]
    tokenizer = train_bpe_tokenizer(texts, vocab_size=512)
    config = AutoConfig.for_model(
        "llama", vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def kdcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.pipeline", *args]


def proc_facts(pid: int) -> tuple[int, int, int] | None:
    """(resident bytes, open fds, threads) of process ``pid``, or None once it has gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    if "VmRSS" not in fields:  # exiting (a zombie has no memory left)
        return None
    rss = int(fields["VmRSS"].split()[0]) * 1024  # "123456 kB"
    return rss, fds, int(fields["Threads"])


def train(store: str, out: Path, extra: list[str], steps: int, every: float) -> dict:
    """Run train-student, sampling the child; returns its samples, seconds and exit code."""
    argv = kdcache("train-student", "--store", store, "--out", str(out), "--steps", str(steps),
                   *TRAIN, *extra)  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KDCACHE_PROGRESS_SECONDS": "3600"}
    started = time.perf_counter()
    child = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # (step reached, rss bytes, fds, threads); the step from log.csv's rows (flushed each step)
    samples: list[tuple[int, int, int, int]] = []
    while child.poll() is None:
        facts = proc_facts(child.pid)
        log = out / "log.csv"
        step = max(0, log.read_bytes().count(b"\n") - 1) if log.is_file() else 0
        if facts is not None:
            samples.append((step, *facts))
        time.sleep(every)
    seconds = time.perf_counter() - started
    if child.returncode:
        raise SystemExit(f"train-student failed on {store}: {child.stderr.read().decode()[-2000:]}")
    return {"samples": samples, "seconds": seconds}


def growth(samples: list[tuple[int, int, int, int]], warmup: float, steps: int) -> dict:
    """RSS growth from just after warm-up (the first ``warmup`` of the steps) to the last step
    (medians of a tenth of those samples each), and the fd and thread counts over the same
    span (their maxima); start-up before the first step and the final eval are left out."""
    after = [s for s in samples if warmup * steps <= s[0] < steps]
    tenth = max(1, len(after) // 10)
    first, last = after[:tenth], after[-tenth:]
    rss0 = statistics.median(s[1] for s in first)
    rss1 = statistics.median(s[1] for s in last)
    return {
        "rss_start": rss0,
        "rss_end": rss1,
        "rss_growth": rss1 / rss0 - 1,
        "rss_peak": max(s[1] for s in after),
        "fds": (max(s[2] for s in first), max(s[2] for s in last), max(s[2] for s in after)),
        "threads": (max(s[3] for s in first), max(s[3] for s in last), max(s[3] for s in after)),
    }


def losses(out: Path) -> list[dict[str, str]]:
    with (out / "log.csv").open() as f:
        skip = ("elapsed_s", "tokens_per_s")
        return [{k: v for k, v in row.items() if k not in skip} for row in csv.DictReader(f)]


def weights(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.glob("*.safetensors"))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--max-tokens", type=int, default=120_000)
    parser.add_argument("--shard-tokens", type=int, default=2048)
    parser.add_argument("--cache-shards", type=int, default=3)
    parser.add_argument("--warmup", type=float, default=0.2, help="share of the run")
    parser.add_argument("--every", type=float, default=0.5, help="seconds between samples")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "soak.md"))
    args = parser.parse_args()
    if min(args.steps, args.max_tokens, args.cache_shards) < 1 or not 0 < args.warmup < 0.9:
        parser.error("--steps, --max-tokens, --cache-shards >= 1; 0 < --warmup < 0.9")
    facts = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "python": sys.version.split()[0],
    }
    print(", ".join(f"{k}: {v}" for k, v in facts.items()))
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(ENV)
    server, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    try:
        import s3fs

        from kdcache.storage import open_store

        with tempfile.TemporaryDirectory(prefix="kdcache-soak-") as tmp:
            root = Path(tmp)
            teacher = build_teacher(root / "teacher")
            local = str(root / "store")
            subprocess.run(
                kdcache(
                    "cache-teacher",
                    "--teacher",
                    str(teacher),
                    "--corpus",
                    "stdlib",
                    "--out",
                    local,
                    "--top-k",
                    "8",
                    "--seq-len",
                    "64",
                    "--shard-tokens",
                    str(args.shard_tokens),
                    "--max-tokens",
                    str(args.max_tokens),
                    "--eval-fraction",
                    "0.05",
                ),  # fmt: skip
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "OMP_NUM_THREADS": "2"},
            )
            admin = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            admin.mkdir("soak")
            admin.put(local, "soak/store", recursive=True)
            store = open_store(local)
            train_shards = store.shards_of("train")
            largest = max(r.nbytes for r in store.shards)
            limit = args.cache_shards * largest
            epochs = args.steps * 4 / sum(r.num_sequences for r in train_shards)
            print(
                f"store: {store.num_tokens:,} tokens, {len(store.shards)} shards, "
                f"{store.nbytes / 1e6:.2f} MB; cache limit {limit:,} bytes "
                f"({args.cache_shards} shards); {epochs:.1f} epochs"
            )
            runs = {}
            for name, url, extra in (
                ("local disk", local, []),
                ("S3 via the shard cache", "s3://soak/store",
                 ["--cache-dir", str(root / "cache"), "--cache-limit", str(limit)]),
            ):  # fmt: skip
                runs[name] = train(url, root / name.split()[0], extra, args.steps, args.every)
                runs[name]["growth"] = growth(runs[name]["samples"], args.warmup, args.steps)
                runs[name]["out"] = root / name.split()[0]
                g = runs[name]["growth"]
                print(
                    f"{name}: {runs[name]['seconds']:.0f} s, RSS {g['rss_start'] / 2**20:.0f} → "
                    f"{g['rss_end'] / 2**20:.0f} MiB ({g['rss_growth']:+.1%}), fds {g['fds']}, "
                    f"threads {g['threads']}"
                )
            cached = sum(1 for p in (root / "cache").glob("*/*/*") if ".tmp-" not in p.name)
            a, b = runs["local disk"]["out"], runs["S3 via the shard cache"]["out"]
            same_losses = losses(a) == losses(b) and len(losses(a)) == args.steps
            same_weights = weights(a) == weights(b) and bool(weights(a))
    finally:
        server.terminate()
        server.wait()
    write_report(args, facts, store, limit, epochs, runs, cached, same_losses, same_weights)


def write_report(args, facts, store, limit, epochs, runs, cached, same_losses, same_weights):  # noqa: ANN001, ANN201
    """bench/results/soak.md."""
    rows = []
    for name, run in runs.items():
        g = run["growth"]
        rows.append(
            f"| {name} | {run['seconds']:.0f} | {args.steps / run['seconds']:.0f} | "
            f"{g['rss_start'] / 2**20:.1f} | {g['rss_end'] / 2**20:.1f} | {g['rss_growth']:+.2%} | "
            f"{g['rss_peak'] / 2**20:.1f} | {g['fds'][0]} → {g['fds'][1]} (max {g['fds'][2]}) | "
            f"{g['threads'][0]} → {g['threads'][1]} (max {g['threads'][2]}) |"
        )
    worst = max(run["growth"]["rss_growth"] for run in runs.values())
    leak = any(
        run["growth"][k][1] > run["growth"][k][0]
        for run in runs.values()
        for k in ("fds", "threads")
    )
    lines = [
        "## Soak: train-student from S3 through an evicting shard cache (`bench/soak.py`)",
        "",
        f"Store: {store.num_tokens:,} tokens of the stdlib corpus in {len(store.shards)} shards "
        f"({store.nbytes / 1e6:.2f} MB, zarr, top-8 of a tiny random-weight teacher, seq_len "
        f"64); `--cache-limit` {limit:,} bytes = {args.cache_shards} of its largest shards, so "
        f"every epoch evicts and fetches again ({epochs:.1f} epochs; {cached} entries left in "
        f"the cache). `kdcache train-student --student tiny --steps {args.steps} --batch-size 4 "
        "--threads 1` in a subprocess, sampled every "
        f"{args.every} s from /proc (VmRSS, fd/, Threads); growth from the first to the last "
        f"tenth of the training steps after warm-up (the first {args.warmup:.0%} of the steps; start-up and the final eval left out). S3: moto's server on "
        "127.0.0.1 in a subprocess. Machine: "
        + ", ".join(f"{k} {v}" for k, v in facts.items())
        + ".",
        "",
        "| store | seconds | steps/s | RSS after warm-up (MiB) | RSS at the end (MiB) | growth "
        "| peak (MiB) | open fds | threads |",
        "|---|---:|---:|---:|---:|---:|---:|---|---|",
        *rows,
        "",
        f"Target RSS growth < 5% after warm-up: {'met' if worst < 0.05 else 'not met'} (worst "
        f"{worst:+.2%}); fd and thread counts {'grew' if leak else 'flat'}. Losses of every step "
        f"identical to the local-disk run: {'yes' if same_losses else 'NO'}; final weights "
        f"identical: {'yes' if same_weights else 'NO'}.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
