"""Stage two's training step: memory and time with the head per chunk vs the whole logits, and
train-student against a bare loop.

    .venv/bin/python bench/student_memory.py            # ~20-25 min on 2 cores
    .venv/bin/python bench/student_memory.py --quick    # the wiring, in a few minutes

(a) one step of the same student at each vocabulary x token rows, by both paths
(``_student_step.py``), each in a fresh process, and both paths timed in one process, round
after round; (b) ``kdcache train-student`` against the bare loop over the same batches. The
written section says how each figure is measured. Writes ``bench/results/student_memory.md``
and ``.json`` (``--render``: the .md again from the .json).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from report import machine_line

RESULTS = Path(__file__).resolve().parent / "results" / "student_memory.md"
# float32 [rows, V] tensors' worth a whole-logits step is estimated to grow by, at least (those
# measured here: 6 to 10, the allocator's kept blocks making the difference)
MIN_COPIES = 8.0
TARGET_VOCAB = 152_064
TARGET_REPEATS = 3  # fresh processes for each of the memory target's pair (kept allocator)
# (b): store and student (a `small` step at 8k ids: a few hundred ms on 2 cores), rounds
LOOP = dict(vocab=8192, student="small", batch=4, seq_len=512, steps=30, workers=2, skip=5)
LOOP_ROUNDS = 5
ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def run_child(kind: str, spec: dict[str, Any], timeout: float = 1800) -> dict[str, Any]:
    """``_student_step.<kind>(**spec)`` in a fresh process: its JSON, or {"error": why}."""
    command = [sys.executable, __file__, "--child", kind, "--spec", json.dumps(spec)]
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, env=ENV, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if done.returncode != 0:
        killed = " (killed: out of memory?)" if done.returncode == -9 else ""
        last = (done.stderr.strip().splitlines() or [""])[-1][:200]
        return {"error": f"exit {done.returncode}{killed}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def available_gb() -> float:
    """MemAvailable of /proc/meminfo in GiB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return float("inf")


def logits_gb(run: dict[str, Any]) -> float:
    """One float32 [rows, vocab] tensor of ``run``, in GiB."""
    return run["rows"] * run["vocab"] * 4 / 2**30


def planned_runs(vocabs: list[int], rows: list[int], target: int) -> list[dict[str, Any]]:
    """Every (vocab, rows, path, loss, allocator) to measure; the first whole-logits run first
    (it calibrates the estimate of the others)."""

    def run(v: int, r: int, path: str, loss: str = "ghost", allocator: str = "kept") -> dict:
        return {"vocab": v, "rows": r, "path": path, "loss": loss, "allocator": allocator}

    v0, r0 = vocabs[0], rows[0]
    runs = [run(v, r, p) for v in vocabs for r in rows for p in ("whole", "head")]
    runs += [run(v0, r0, "head", "ce"), run(v0, r0, "whole", "ce")]
    # glibc's own allocator setting: the resident peak is about the live bytes
    runs += [run(v0, r0, p, allocator="default") for p in ("whole", "head")]
    runs += [run(target, r, "head", allocator="default") for r in rows]
    # the target pair twice more: with freed blocks kept, the heap's layout (and so the peak)
    # varies from process to process, as glibc's arenas depend on the threads' timing
    return runs + [run(target, r, "head") for _ in range(TARGET_REPEATS - 1) for r in rows]


def measure_memory(args: argparse.Namespace, target: int) -> tuple[list[dict], float]:
    """Each planned step in its own process: the rows, and the copies the last estimate used."""
    copies = MIN_COPIES  # raised by every whole-logits step measured with freed blocks kept
    measured = []
    for run in planned_runs(args.vocabs, args.rows, target):
        row, started = dict(run), time.perf_counter()
        cap = min(args.limit_gb, available_gb() - 2.0)  # 2 GB left to the machine's other users
        if run["path"] == "whole":
            row["estimate_gb"] = need = copies * logits_gb(run)
            if need > cap:
                row["skipped"] = f"not run (needs ≈ {need:.0f} GB)"
        if "skipped" not in row:
            row.update(run_child("measure_step", {**run, "seq_len": args.seq_len, "cap_gb": cap}))
        if "growth_gb" in row and run["path"] == "whole" and run["allocator"] == "kept":
            copies = max(copies, row["growth_gb"] / logits_gb(run))
        outcome = {k: v for k, v in row.items() if k not in run and k != "estimate_gb"}
        print(*run.values(), outcome, f"({time.perf_counter() - started:.0f} s)", flush=True)
        measured.append(row)
    return measured, copies


def measure_time(args: argparse.Namespace) -> dict[str, Any]:
    """Both paths' step times in one process, interleaved; the rounds' ratios and median."""
    spec = dict(vocab=args.vocabs[0], rows=args.rows[0], seq_len=args.seq_len, rounds=args.repeats)
    timing = {**spec, **run_child("interleaved_times", spec)}
    if "times" in timing:
        pairs = zip(timing["times"]["head"], timing["times"]["whole"], strict=True)
        timing["ratios"] = [h / w for h, w in pairs]
        timing["ratio"] = statistics.median(timing["ratios"])
    print("time head / whole by round:", timing.get("ratios", timing.get("error")), flush=True)
    return timing


def kdcache(command: str, *options: str) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "kdcache.pipeline", command, *options]
    return subprocess.run(argv, capture_output=True, text=True, check=False, env=ENV)


def train_student_run(loop: dict[str, Any], store: Path, out: Path) -> dict[str, Any]:
    """One ``kdcache train-student`` run: its steps' end times and tokens (log.csv)."""
    shutil.rmtree(out, ignore_errors=True)
    done = kdcache(
        "train-student", "--store", str(store), "--out", str(out), "--student", loop["student"],
        "--steps", str(loop["steps"]), "--batch-size", str(loop["batch"]), "--loss", "ghost",
        "--eval-every", "0", "--checkpoint-every", "0", "--eval-batches", "1",
        "--workers", str(loop["workers"]), "--seed", "0",
    )  # fmt: skip
    if done.returncode != 0:
        return {"error": f"exit {done.returncode}: {done.stderr.strip()[-300:]}"}
    with (out / "log.csv").open() as f:
        log = list(csv.DictReader(f))
    said = [line for line in done.stdout.splitlines() if line.startswith("trained ")]
    ends, tokens = [float(r["elapsed_s"]) for r in log], [int(r["tokens"]) for r in log]
    return {"ends": ends, "tokens": tokens, "said": said[-1].split("; saved to")[0] if said else ""}


def loop_overhead(loop: dict[str, Any], work: Path) -> dict[str, Any]:
    """(b): a store cached from a tiny teacher; train-student and the bare loop, interleaved."""
    from cache_overhead import bench_tokenizer, make_teacher
    from transformers import AutoTokenizer

    tokenizer = bench_tokenizer(work / "tokenizer", vocab_size=loop["vocab"])
    vocab = len(AutoTokenizer.from_pretrained(tokenizer))
    make_teacher(work / "teacher", tokenizer, 64, 2, vocab)
    store, tokens = work / "store", loop["steps"] * loop["batch"] * loop["seq_len"]
    done = kdcache(
        "cache-teacher", "--teacher", str(work / "teacher"), "--corpus", "stdlib", "--out",
        str(store), "--top-k", "64", "--seq-len", str(loop["seq_len"]), "--eval-fraction",
        "0.05", "--max-tokens", str(tokens), "--shard-tokens", "16384",
    )  # fmt: skip
    if done.returncode != 0:
        return {"vocab": vocab, "error": f"cache-teacher: {done.stderr.strip()[-300:]}"}
    bare = {
        "store_url": str(store),
        **{k: loop[k] for k in ("student", "batch", "steps", "workers")},
    }
    runs: dict[str, list[dict[str, Any]]] = {"train-student": [], "bare": []}
    for round_ in range(loop["rounds"]):
        for name in list(runs) if round_ % 2 == 0 else list(runs)[::-1]:
            if name == "bare":
                run = run_child("bare_loop", bare)
            else:
                run = train_student_run(loop, store, work / "run")
            if "error" in run:
                return {"vocab": vocab, "error": f"{name}: {run['error']}"}
            ends, skip = run["ends"], loop["skip"]
            run["rate"] = sum(run["tokens"][skip:]) / (ends[-1] - ends[skip - 1])  # tokens/s
            run["steps"] = [b - a for a, b in zip([0.0, *ends[:-1]], ends, strict=True)]
            runs[name].append(run)
            print(f"round {round_ + 1}, {name}: {run['rate']:,.0f} tokens/s", flush=True)
    # both read the same batches in the same order: each step's least disturbed time over the
    # rounds keeps what recurs at that step (a shard's decoding, logging), not the bursts of
    # other load that hit one run (on this shared machine a step takes 1-4 s instead of 0.4)
    quiet = {
        name: sum(run["tokens"][loop["skip"] :])
        / sum(map(min, zip(*(run["steps"][loop["skip"] :] for run in group), strict=True)))
        for name, group in runs.items()
    }
    ratios = [t["rate"] / b["rate"] for t, b in zip(*runs.values(), strict=True)]
    return {
        "vocab": vocab,
        "runs": runs,
        "quiet_rate": quiet,
        "ratio": quiet["train-student"] / quiet["bare"],
        "rate_ratios": ratios,
    }


def growths(raw: dict[str, Any], rows: int, allocator: str) -> list[float]:
    """The head path's step peaks (GB) at the target vocabulary and ``rows``, one per process."""
    facts = (raw["target_vocab"], rows, "head", "ghost", allocator)
    keys = ("vocab", "rows", "path", "loss", "allocator")
    return [
        r["growth_gb"]
        for r in raw["memory"]
        if "growth_gb" in r and tuple(r[k] for k in keys) == facts
    ]


def verdicts(raw: dict[str, Any]) -> list[str]:
    """The PASS/FAIL lines, each with its measured ratio."""
    s, lines = raw["settings"], []
    small, large, target = s["rows"][0], s["rows"][-1], raw["target_vocab"]

    def mark(ok: bool) -> str:
        return "**PASS**" if ok else "**FAIL**"

    settings = {
        "kept": "train-student's allocator setting (its process)",
        "default": "glibc's default allocator (about the live bytes)",
    }
    for allocator, setting in settings.items():
        a, b = growths(raw, small, allocator), growths(raw, large, allocator)
        if not (a and b):
            lines.append(f"- **FAIL** memory, {setting}: not measured at {target:,} ids.")
            continue
        ratio = statistics.median(b) / statistics.median(a)
        each = " → ".join(", ".join(f"{x:.2f}" for x in runs) for runs in (a, b))
        medians = (
            f"{each} GB, {len(a)} processes each: their medians" if len(a) > 1 else each + " GB"
        )
        lines.append(
            f"- {mark(ratio <= 1.5)} memory, {setting}: at {target:,} ids the head path's step "
            f"peak grows **{ratio:.2f}x** from {small:,} to {large:,} rows per step "
            f"({large // small}x the tokens; {medians}; target ≤ 1.5x)."
        )
    t = raw["timing"]
    if "ratio" in t:
        head, whole = (statistics.median(t["times"][p]) for p in ("head", "whole"))
        lines.append(
            f"- {mark(t['ratio'] <= 1.05)} time: at {t['vocab']:,} ids x {t['rows']:,} rows the "
            f"head path's step takes **{t['ratio']:.3f}x** the whole-logits step's (median of "
            f"{len(t['ratios'])} interleaved rounds' ratios: "
            f"{', '.join(f'{r:.3f}' for r in t['ratios'])}; target ≤ 1.05). Median step "
            f"{head:.2f} s vs {whole:.2f} s, fastest {min(t['times']['head']):.2f} s vs "
            f"{min(t['times']['whole']):.2f} s. First step's loss: "
            f"{t['first_loss']['head']:.6f} (head), {t['first_loss']['whole']:.6f} (whole)."
        )
    else:
        lines.append(f"- **FAIL** time: not measured ({t.get('error')}).")
    loop = raw["loop"]
    if "ratio" in loop:
        quiet = loop["quiet_rate"]
        lines.append(
            f"- {mark(loop['ratio'] >= 0.95)} loop: `train-student` runs at "
            f"**{loop['ratio']:.3f}x** the bare loop's tokens/s ({quiet['train-student']:,.0f} vs "
            f"{quiet['bare']:,.0f}, each step's least disturbed time over "
            f"{len(loop['rate_ratios'])} rounds; target ≥ 0.95). The rounds' own ratios of "
            f"steady tokens/s, for comparison: {', '.join(f'{r:.3f}' for r in loop['rate_ratios'])}."
        )
    else:
        lines.append(f"- **FAIL** loop: not measured ({loop.get('error')}).")
    return lines


def what_grows(raw: dict[str, Any]) -> str:
    """The head path's live peak at the target vocabulary split into a part that does not grow
    with the tokens and one per token row (a line through the default allocator's pair)."""
    s, target = raw["settings"], raw["target_vocab"]
    small, large = s["rows"][0], s["rows"][-1]
    live = [growths(raw, rows, "default") for rows in (small, large)]
    kept = [growths(raw, rows, "kept") for rows in (small, large)]
    if not all(live + kept):
        return ""
    a, b = (statistics.median(x) for x in live)
    per_row = (b - a) / (large - small)  # GB per token row
    fixed = a - per_row * small
    more = [statistics.median(m) - x for m, x in zip(kept, (a, b), strict=True)]
    k = large // small
    return (
        f"What grows: with glibc's default allocator the head path's step peak at {target:,} ids "
        f"is ≈ {fixed:.2f} GB that does not grow with the tokens — a few float32 [chunk, V] "
        "tensors of `losses.CHUNK_BYTES` (128 MiB: the chunk's logits, their copies in the loss, "
        f"their gradient) and the head's weight-gradient buffers ({target:,} x 256 x 4 B = "
        f"{target * 1024 / 2**30:.2f} GB each) — plus ≈ {per_row * 2**20:.0f} KB per token row: the "
        "transformer body's activations kept for the backward (2 layers, hidden 256, MLP 768), "
        f"which every training step holds and the loss path does not touch. A {k}x growth of "
        f"the tokens stays within 1.5x only while the first part is at least {2 * k - 3}x the "
        f"second at the small size; here it is {fixed / (per_row * small):.1f}x. With "
        "train-student's allocator setting the peaks are higher by what the heap keeps of freed "
        f"chunks: {more[0]:.2f} and {more[1]:.2f} GB (medians)."
    )


def write_report(raw: dict[str, Any], out: Path) -> list[str]:
    """Write the section to ``out``; returns its PASS/FAIL lines."""
    s, loop, marks = raw["settings"], raw["loop"], verdicts(raw)
    table = [
        "| vocab | rows/step | path | loss | allocator | before step GB | step peak GB | step s |",
        "|---:|---|---|---|---|---:|---:|---:|",
    ]
    for r in raw["memory"]:
        shape = f"{r['rows']:,} ({r['rows'] // s['seq_len']} x {s['seq_len']})"
        cells = [f"{r['vocab']:,}", shape, r["path"], r["loss"], r["allocator"]]
        if "growth_gb" in r:
            cells += [f"{r['before_gb']:.2f}", f"{r['growth_gb']:.2f}", f"{r['seconds']:.1f}"]
        else:
            why = r.get("skipped") or r.get("stopped") or f"failed: {r.get('error')}"
            cells += ["", why, ""]
        table.append("| " + " | ".join(cells) + " |")
    lines = [
        "## Stage two: a step's memory and time, head per chunk vs whole logits "
        "(`bench/student_memory.py`)",
        "",
        f"Machine: {raw['machine']}. Benchmark wall time {raw['seconds'] / 60:.0f} min.",
        "",
        "One training step (forward, backward, gradient clipping, AdamW) of one student "
        "(`_student_step.STUDENT`: Llama-style, 2 layers, hidden 256, tied embeddings; float32, "
        "CPU, random weights) on random tokens with top-64 targets and their tail mass, `ghost` "
        "loss, alpha 0.5 (`ce`: labels only). **head**: train-student's path, the model's "
        "forward up to its final hidden states, then `batch_loss` takes each chunk's logits, "
        "loss and gradient at once. **whole**: the plain computation, the model's (B, L, V) "
        "logits, `kd_per_token` + `F.cross_entropy` over every row at once, autograd.",
        "",
        "Each row is a fresh process: model and AdamW built, the optimizer state allocated by a "
        "16-token step, freed heap handed back (`malloc_trim`), then one full step. *Before "
        "step*: the resident size then (model, optimizer state, batch). *Step peak*: how far "
        "the resident high-water mark (VmHWM, reset via `/proc/self/clear_refs`) rose above it "
        "in the step. *kept*: train-student's allocator setting (`keep_freed_memory`: freed "
        "blocks stay in the heap for reuse; the layout, and so the peak, varies from process "
        "to process, hence the target pair three times); *default*: glibc's (blocks of 32 MiB "
        "or more are unmapped when freed: the peak is about the live bytes). *Step s*: that "
        "step, its process's first at full size, page faults included (speed: see the time "
        f"target). A step was not run when estimated above {s['limit_gb']:.0f} GB or above what "
        f"the machine had free less 2 GB — rows x V x 4 B x {raw['copies']:.1f}, the most "
        f"float32 [rows, V] tensors' worth a whole-logits step here grew by, at least "
        f"{MIN_COPIES:.0f} — and was stopped at that cap (`RLIMIT_AS`) if it grew beyond.",
        "",
        *table,
        "",
        "Targets:",
        "",
        *marks,
        "",
        what_grows(raw),
        "",
        "The time ratio: one process holds two copies of the student (same weights, each its "
        "own AdamW), takes an untimed step of each, then times a step of each per round on the "
        "same batch, the order alternating, with train-student's allocator setting. A round's "
        "two steps run back to back, so the load of this shared machine moves both alike.",
        "",
    ]
    if "ratio" in loop:
        lines += [
            f"The loop: a store of stdlib text cached by `kdcache cache-teacher` from a 2-layer, "
            f"64-wide random teacher (vocab {loop['vocab']:,}, top-64, seq-len "
            f"{s['loop']['seq_len']}); `kdcache train-student --student {s['loop']['student']} "
            f"--loss ghost --batch-size {s['loop']['batch']} --steps {s['loop']['steps']} "
            "--eval-every 0 --checkpoint-every 0` (log.csv) against `_student_step.bare_loop` "
            "(the same batches from the same loader read into a list first; then per batch: "
            "widen, `student_head` + `batch_loss`, backward, clip, AdamW step, zero_grad), each "
            f"in a fresh process, rounds in alternating order, steps {s['loop']['skip'] + 1}-"
            f"{s['loop']['steps']} counted. A train-student run: "
            f'"{loop["runs"]["train-student"][0]["said"]}".',
            "",
        ]
    out.write_text("\n".join(lines))
    return marks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocabs", default="32768,152064,256000", help="comma-separated")
    parser.add_argument("--rows", default="4096,16384", help="token rows per step")
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--limit-gb", type=float, default=18.0, help="whole-logits cap")
    parser.add_argument("--repeats", type=int, default=11, help="interleaved timing rounds")
    parser.add_argument("--quick", action="store_true", help="small sizes: the wiring only")
    parser.add_argument("--render", action="store_true", help="rewrite the .md from the .json")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import _student_step

        print(json.dumps(getattr(_student_step, args.child)(**json.loads(args.spec))))
        return
    if args.render:
        write_report(json.loads(args.out.with_suffix(".json").read_text()), args.out)
        return
    loop = {**LOOP, "rounds": LOOP_ROUNDS}
    if args.quick:
        args.vocabs, args.rows, args.seq_len, args.repeats = "8192,32768", "1024,4096", 512, 3
        loop.update(vocab=4096, steps=12, rounds=2)
        args.out = Path(tempfile.gettempdir()) / "student_memory_quick.md"
    args.vocabs = [int(v) for v in args.vocabs.split(",")]
    args.rows = [int(r) for r in args.rows.split(",")]
    if any(r % args.seq_len for r in args.rows):
        parser.error("--rows must be multiples of --seq-len")
    target = TARGET_VOCAB if TARGET_VOCAB in args.vocabs else args.vocabs[-1]

    started = time.perf_counter()
    facts = machine_line()
    print(facts, flush=True)
    memory, copies = measure_memory(args, target)
    timing = measure_time(args)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
        loop_result = loop_overhead(loop, Path(tmp))
    settings = {k: getattr(args, k) for k in ("vocabs", "rows", "seq_len", "limit_gb", "repeats")}
    raw = {
        "machine": facts,
        "settings": {**settings, "loop": loop},
        "copies": copies,
        "seconds": time.perf_counter() - started,
        "target_vocab": target,
        "memory": memory,
        "timing": timing,
        "loop": loop_result,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1) + "\n")
    for line in write_report(raw, args.out):
        print(line)
    print(f"wrote {args.out} and its .json ({raw['seconds'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
