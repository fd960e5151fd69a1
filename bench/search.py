"""Architecture search benchmark on the embedded default store: early stopping against the grid,
students initialized from the teacher against random ones, two workers against one.

On the default teacher and its sampled store (bench/fidelity.py's `build`, shared with
bench/cross_tokenizer.py), a 12-candidate grid of `tiny`-family students (hidden 32/64/96 ×
layers 1/2 × lr 1e-3/3e-3):

(a) `strategy: asha` (successive halving over the same grid, rungs at 1/9 and 1/3 of the
    budget in training tokens, reduction factor 3) against the full grid: total student steps
    (rows of every candidate's log.csv), the best candidate of each, and the seed spread of the
    grid's best (it retrained at seeds 1 and 2: sd of eval CE over the 3 seeds).
(b) `init: teacher` (the teacher pruned to half its width and depth, by measured importance)
    against `init: random` of the same shape and budget, 3 paired seeds (same data order):
    eval CE of each and the paired difference random − teacher (mean ± sd).
(c) the grid's wall time with `--parallel 2` (two workers side by side, one core each) against
    one worker (both cores), the same `--together`.

Writes bench/results/search.md and .json. Usage: ``python bench/search.py [--steps 90]``
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from fidelity import DEFAULTS, Variant, build, kdcache, run  # noqa: E402
from report import machine_line  # noqa: E402

STORE = "sampled-32"
GRID = "search:\n  hidden_size: [32, 64, 96]\n  num_hidden_layers: [1, 2]\n  lr: [0.001, 0.003]\n"
PRUNED = {"hidden_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "intermediate_size": 352}  # fmt: skip


def config(work: Path, name: str, seed: int, steps: int, body: str) -> Path:
    path = work / "search" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    head = (
        f"base: tiny\nseed: {seed}\nbudget: {{steps: {steps}}}\nbatch_size: 8\neval_batches: 10\n"
    )
    path.write_text(head + body)
    return path


def sweep(work: Path, store: Path, yaml: Path, out: Path, log: Path, *extra: str) -> float:
    """One sweep from scratch; its wall seconds."""
    if out.exists():
        import shutil

        shutil.rmtree(out)
    args = ["sweep", "--store", str(store), "--config", str(yaml), "--out", str(out), *extra]
    return run(kdcache(*args), log)


def rows(out: Path) -> dict[str, dict[str, str]]:
    with (out / "leaderboard.csv").open() as f:
        return {r["candidate"]: r for r in csv.DictReader(f)}


def steps_trained(out: Path) -> int:
    return sum(
        sum(1 for _ in csv.DictReader(p.open())) for p in (out / "candidates").glob("*/log.csv")
    )


def best(table: dict[str, dict[str, str]]) -> tuple[str, float]:
    finished = {n: r for n, r in table.items() if r["status"] == "finished"}
    name = min(finished, key=lambda n: float(finished[n]["eval_cross_entropy"]))
    return name, float(finished[name]["eval_cross_entropy"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=90, help="budget per candidate")
    parser.add_argument("--init-steps", type=int, default=150, help="budget of (b)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-cross")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "search.md")
    parser.add_argument(
        "--parts",
        default="abc",
        help="which of (a), (b), (c) to run; the others' figures are kept from the last run's JSON",
    )
    parser.add_argument(
        "--together",
        type=int,
        default=12,
        help="(a)'s successive halving: candidates per data "
        "pass (12: the whole grid reaches each rung together)",
    )
    args = parser.parse_args(argv)
    s = dict(DEFAULTS)
    work = args.workdir / "default"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "search-log.txt"
    started = time.perf_counter()
    teacher, _ = build(work, s, False, log, [Variant("store", STORE, "auto")])
    store = work / "stores" / STORE
    runs = work / "search"
    tokens_per_step = 8 * s["seq_len"]
    budget = args.steps * tokens_per_step
    json_path = args.out.with_suffix(".json")
    kept = json.loads(json_path.read_text()) if json_path.is_file() else {}
    result: dict = {"machine": machine_line(), "steps": args.steps, "budget_tokens": budget}
    result.update({k: v for k, v in kept.items() if k in ("asha", "init", "parallel", "grid_s")})

    # (a) the grid (one worker, 2 candidates per data pass), then successive halving over it
    grid_yaml = config(work, "grid", 0, args.steps, GRID)
    result.setdefault("grid_s", kept.get("parallel", {}).get("one_worker_s"))
    if "c" in args.parts or not (runs / "grid" / "leaderboard.csv").is_file():  # deterministic
        result["grid_s"] = sweep(work, store, grid_yaml, runs / "grid", log, "--together", "2")
    grid = rows(runs / "grid")
    if "a" in args.parts:
        result["asha"] = halving(work, store, runs, log, grid, args, budget)
    if "b" in args.parts:
        result["init"] = teacher_init(work, store, runs, log, teacher, args)
    if "c" in args.parts:  # two workers side by side against one
        wall_two = sweep(
            work, store, grid_yaml, runs / "grid-2", log, "--together", "2", "--parallel", "2"
        )
        same = rows(runs / "grid-2")
        result["parallel"] = {
            "one_worker_s": result["grid_s"],
            "two_workers_s": wall_two,
            "ratio": result["grid_s"] / wall_two,
            "same_results": all(
                abs(float(same[n]["eval_cross_entropy"]) - float(grid[n]["eval_cross_entropy"]))
                < 1e-3
                for n in grid
            ),
        }
    result["seconds"] = time.perf_counter() - started
    result["parts_run"] = args.parts
    args.out.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    args.out.write_text(report(result))
    print(f"wrote {args.out}")
    return 0


def halving(
    work: Path, store: Path, runs: Path, log: Path, grid: dict, args: Any, budget: int
) -> dict:
    """(a): successive halving over the grid, and the seed spread of the grid's best."""
    asha = f"strategy: {{early_stopping: asha, min_tokens: {budget // 9}, reduction_factor: 3}}\n"
    asha_yaml = config(work, "asha", 0, args.steps, asha + GRID)
    sweep(work, store, asha_yaml, runs / "asha", log, "--together", str(args.together))
    halving_rows = rows(runs / "asha")
    grid_best, grid_ce = best(grid)
    asha_best, asha_ce = best(halving_rows)
    spread = [grid_ce]
    chosen = {k: grid[grid_best][k] for k in ("hidden_size", "num_hidden_layers", "lr")}
    listed = "candidates:\n  - {" + ", ".join(f"{k}: {v}" for k, v in chosen.items()) + "}\n"
    for seed in (1, 2):
        yaml = config(work, f"best-seed{seed}", seed, args.steps, listed)
        if not (runs / f"best-seed{seed}" / "leaderboard.csv").is_file():  # deterministic
            sweep(work, store, yaml, runs / f"best-seed{seed}", log, "--together", "1")
        row = next(iter(rows(runs / f"best-seed{seed}").values()))
        spread.append(float(row["eval_cross_entropy"]))
    return {
        "together": args.together,
        "grid_steps": steps_trained(runs / "grid"),
        "asha_steps": steps_trained(runs / "asha"),
        "grid_best": grid_best,
        "grid_best_ce": grid_ce,
        "asha_best": asha_best,
        "asha_best_ce": asha_ce,
        "asha_best_grid_ce": float(grid[asha_best]["eval_cross_entropy"]),
        "seed_sd": statistics.stdev(spread),
        "stopped": sum(r["status"] != "finished" for r in halving_rows.values()),
    }


def teacher_init(work: Path, store: Path, runs: Path, log: Path, teacher: Path, args: Any) -> dict:
    """(b): teacher-initialized against random students of one shape, paired by seed."""
    shape = ", ".join(f"{k}: {v}" for k, v in PRUNED.items())
    pair = (
        f"teacher: {teacher}\ncandidates:\n  - {{{shape}, init: teacher}}\n"
        f"  - {{{shape}, init: random}}\n"
    )
    init: dict[str, list[float]] = {"teacher": [], "random": []}
    for seed in range(3):
        yaml = config(work, f"init-seed{seed}", seed, args.init_steps, pair)
        sweep(work, store, yaml, runs / f"init-seed{seed}", log, "--together", "2")
        for row in rows(runs / f"init-seed{seed}").values():
            init[row["init"]].append(float(row["eval_cross_entropy"]))
    gains = [r - t for r, t in zip(init["random"], init["teacher"], strict=True)]
    return {**init, "gain_mean": statistics.mean(gains), "gain_sd": statistics.stdev(gains)}


def report(r: dict) -> str:
    a, b, c = r["asha"], r["init"], r["parallel"]
    ratio = a["asha_steps"] / a["grid_steps"]
    found = (
        "the grid's best"
        if a["asha_best"] == a["grid_best"]
        else f"{a['asha_best']}, {a['asha_best_grid_ce'] - a['grid_best_ce']:+.4f} nats from it in the grid"
    )
    teacher = ", ".join(f"{v:.4f}" for v in b["teacher"])
    random = ", ".join(f"{v:.4f}" for v in b["random"])
    return f"""## Architecture search (`python bench/search.py`)

{r["machine"]}; {r["seconds"] / 60:.1f} min. The default teacher's sampled store; 12-candidate
grid (hidden 32/64/96 × layers 1/2 × lr 1e-3/3e-3), {r["steps"]} steps of batch 8 each
({r["budget_tokens"]:,} tokens).

### (a) Successive halving against the grid

| | student steps | best candidate | its eval CE |
| --- | --- | --- | --- |
| grid | {a["grid_steps"]:,} | {a["grid_best"]} | {a["grid_best_ce"]:.4f} |
| asha (rungs 1/9, 1/3; factor 3; `--together {a["together"]}`) | {a["asha_steps"]:,} ({ratio:.0%} of the grid's) | {a["asha_best"]} | {a["asha_best_ce"]:.4f} |

Early stopping is `strategy.RungPruner` (Optuna's pruner interface): a group that reaches a
rung together reports every value before any is decided and keeps the best ⌈n/3⌉; with
`--together 12` the whole grid is one group, halved as synchronous successive halving would.
ASHA stopped {a["stopped"]} of 12 candidates early and found {found}. Seed spread of the grid's
best (sd of eval CE over seeds 0, 1, 2): {a["seed_sd"]:.4f} nats. Target: at most a third of the
grid's steps ({"met" if ratio <= 1 / 3 else "NOT met"}), the best within the seed spread
({"met" if a["asha_best_grid_ce"] - a["grid_best_ce"] <= a["seed_sd"] else "NOT met"}).

### (b) Students initialized from the teacher

Shape {PRUNED}, the teacher's half in width and depth; 3 seeds paired by data order.

| init | eval CE per seed |
| --- | --- |
| teacher (pruned) | {teacher} |
| random | {random} |

Paired random − teacher: **{b["gain_mean"]:+.4f} ± {b["gain_sd"]:.4f}** nats (mean ± sd).

### (c) Two workers against one

The same grid, `--together 2`: one worker {c["one_worker_s"]:.0f} s (2 threads), `--parallel 2`
{c["two_workers_s"]:.0f} s (1 thread each): **{c["ratio"]:.2f}×**; the same leaderboard:
{"yes" if c["same_results"] else "NO"}.
"""


if __name__ == "__main__":
    sys.exit(main())
