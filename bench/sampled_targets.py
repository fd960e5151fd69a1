"""What do sampled targets cost in stage one? `kdcache cache-teacher --targets sampled` and
`--targets topk+sampled` against `--targets topk`, same teacher, corpus and settings.

Each run is the whole command in its own process (`python -m kdcache.pipeline cache-teacher`),
timed from start to exit; the variants run interleaved, in a rotated order per round, so load
from other processes on the machine hits every variant alike (one discarded run first warms
the caches).
Reported: the best wall and loop time of the rounds (other load only ever adds time) and the
median ratio of CPU seconds (user + system), which load from other processes barely moves.

Teachers: Llama-style, random weights (`cache_overhead.make_teacher`), sizes WIDTHxLAYERS:VOCAB.

Run: ``.venv/bin/python bench/sampled_targets.py`` (about 8 minutes on 2 CPU cores).
Writes ``bench/results/sampled_targets.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cache_overhead import bench_tokenizer, make_teacher
from report import machine_line

VARIANTS = ("topk", "sampled", "topk+sampled")
RESULT = Path(__file__).parent / "results" / "sampled_targets.md"


def run_variant(args: argparse.Namespace, variant: str, teacher: Path, out: Path) -> dict:
    """One whole cache-teacher command; returns wall seconds and the store's summary facts."""
    targets = ["--targets", variant]
    if variant != "sampled":
        targets += ["--top-k", str(args.top_k)]
    if variant != "topk":
        targets += ["--samples", str(args.samples)]
    argv = [sys.executable, "-m", "kdcache.pipeline", "cache-teacher", "--teacher", str(teacher),
            "--corpus", "stdlib", "--out", str(out), "--seq-len", str(args.seq_len),
            "--batch-size", str(args.batch), "--max-tokens", str(args.tokens),
            "--eval-fraction", "0", *targets]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run(argv, env=env, check=True, capture_output=True)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    return {"wall": wall, "cpu": cpu, "loop": stats["seconds"] - stats["setup_seconds"], **stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="64x2:512,256x4:32000", help="WIDTHxLAYERS:VOCAB,...")
    parser.add_argument("--tokens", type=int, default=32768)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    machine = machine_line()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bench_tokenizer(work / "tokenizer", files=200, vocab_size=512)
        for size in args.sizes.split(","):
            shape, vocab = size.split(":")
            hidden, layers = (int(x) for x in shape.split("x"))
            teacher = work / f"teacher-{size}"
            make_teacher(teacher, work / "tokenizer", hidden, layers, int(vocab))
            run_variant(args, "topk", teacher, work / f"warm-up-{size}")  # page cache, imports
            runs: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for round_ in range(args.rounds):
                order = VARIANTS[round_ % 3 :] + VARIANTS[: round_ % 3]
                for variant in order:
                    out = work / f"store-{size}-{variant}-{round_}".replace("+", "_")
                    runs[variant].append(run_variant(args, variant, teacher, out))
                    print(size, variant, f"{runs[variant][-1]['wall']:.2f} s", flush=True)
            rows.append((size, runs))
    write_results(args, machine, rows)


def write_results(args: argparse.Namespace, machine: str, rows: list) -> None:
    lines = [
        "## Sampled targets in stage one (`bench/sampled_targets.py`)",
        "",
        f"Machine: {machine}.",
        "",
        f"`kdcache cache-teacher` over {args.tokens:,} stdlib tokens, seq-len {args.seq_len}, "
        f"batch {args.batch}, k = {args.top_k}, N = {args.samples} draws, {args.rounds} "
        "interleaved rounds. Wall: the whole command (model load and setup included), best "
        "of the rounds (other load only adds time); loop: the summary's `seconds` minus "
        "`setup_seconds`, best of the rounds; CPU: user + system seconds of the command, "
        "median of the rounds' ratios to topk.",
        "",
        "| teacher (width x layers : vocab) | targets | wall s | wall / topk | loop s "
        "| loop / topk | CPU s | CPU / topk | bytes/token | distinct ids/position |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, runs in rows:
        for variant in VARIANTS:
            best = {key: min(r[key] for r in runs[variant]) for key in ("wall", "loop")}
            base = {key: min(r[key] for r in runs["topk"]) for key in ("wall", "loop")}
            cpu = [r["cpu"] for r in runs[variant]]
            ratios = [a / b["cpu"] for a, b in zip(cpu, runs["topk"], strict=True)]
            distinct = runs[variant][0].get("sampled_distinct_per_position")
            lines.append(
                f"| {size} | {variant} | {best['wall']:.2f} | {best['wall'] / base['wall']:.2f} "
                f"| {best['loop']:.2f} | {best['loop'] / base['loop']:.2f} "
                f"| {statistics.median(cpu):.1f} | {statistics.median(ratios):.2f} "
                f"| {runs[variant][0]['bytes_per_token']:.1f} "
                f"| {'—' if distinct is None else f'{distinct:.2f}'} |"
            )
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
