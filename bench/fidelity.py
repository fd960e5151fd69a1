"""Fidelity: how much of the teacher each kind of stored target keeps, measured against online KD.

On the embedded default (the default teacher, its `stdlib` corpus, the `tiny` student, the
Makefile's steps and batch), for every seed: the student trained without a teacher (CE only),
with the teacher run live (online full-vocabulary KD: 100%), and from stores of top-k targets
(`kl` and `ghost`, k in 8/32/128) and of sampled targets (`sampled-kl`, N in 8/16/32/64). All
variants of one seed start from the same weights and see the same sequences in the same order
(the stores hold the same sequences), so differences are paired by seed.

For each variant: the store's bytes/token; the exact KL(teacher ‖ student) on the store's eval
split (the teacher at hand, `kdcache compare`) and its share of the online gain
(KL_ce − KL_x) / (KL_ce − KL_online), per seed then mean ± sd; eval CE (mean ± sd) and the same
share in CE; the paired CE difference to online KD; training tokens/s. Writes
`bench/results/fidelity.md`, the raw figures `bench/results/fidelity.json` and the plot
`bench/results/fidelity.png`.

Runs are resumable: stores, students and comparisons already in the work directory are reused,
so a killed run continues where it stopped.

Usage: ``python bench/fidelity.py [--seeds 3] [--workdir DIR] [--quick]`` (``make fidelity``;
about an hour on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import end_to_end  # noqa: E402  (bench/ is a folder of scripts)
from report import machine_line  # noqa: E402

# the Makefile's embedded default (the quickstart's settings, kept in bench/end_to_end.py),
# without its target and loss choices: those are what this benchmark varies
SHARED = ("teacher_steps", "corpus", "seq_len", "max_tokens", "eval_fraction", "student", "steps",
          "batch_size")  # fmt: skip
DEFAULTS = {key: end_to_end.DEFAULTS[key] for key in SHARED}
QUICK = {key: end_to_end.QUICK[key] for key in SHARED}
QUICK_TEACHER = end_to_end.QUICK_TEACHER
TOPK = (8, 32, 128)
SAMPLES = (8, 16, 32, 64)
TARGET_SHARE = 0.95
REFERENCE_STORE = "topk-32"  # data (and its order) for the CE-only and online students


@dataclass(frozen=True)
class Variant:
    name: str
    store: str  # a store name under WORK/stores
    loss: str
    online: bool = False


def variants() -> list[Variant]:
    out = [
        Variant("CE only", REFERENCE_STORE, "ce"),
        Variant("online KD", REFERENCE_STORE, "kl", True),
    ]
    for k in TOPK:
        out += [
            Variant(f"top-{k} kl", f"topk-{k}", "kl"),
            Variant(f"top-{k} ghost", f"topk-{k}", "ghost"),
        ]
    out += [Variant(f"sampled N={n}", f"sampled-{n}", "sampled-kl") for n in SAMPLES]
    return out


def kdcache(*args: str) -> list[str]:
    return [sys.executable, "-m", "kdcache.pipeline", *args]


def run(command: list[str], log: Path) -> float:
    """Run one kdcache command, output appended to ``log``; exits on failure; wall seconds."""
    print(f"== {' '.join(command[2:])}", flush=True)
    started = time.perf_counter()
    with log.open("a") as out:
        out.write(f"\n== {' '.join(command)}\n")
        out.flush()
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=False)
    if result.returncode != 0:
        sys.exit(f"Error: {' '.join(command[2:5])} … failed (exit {result.returncode}), see {log}")
    return time.perf_counter() - started


def build(
    work: Path, s: dict, quick: bool, log: Path, chosen: list[Variant]
) -> tuple[Path, dict[str, dict]]:
    """The default teacher (always trained on its own corpus, `stdlib`) and the stores the
    chosen variants read; returns (teacher, store facts)."""
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        args = ["--corpus", "stdlib", "--out", str(teacher), "--steps", str(s["teacher_steps"])]
        args += [
            "--eval-fraction",
            str(s["eval_fraction"]),
            "--force",
            *(QUICK_TEACHER if quick else []),
        ]
        run(kdcache("build-teacher", *args), log)
    common = ["--teacher", str(teacher), "--corpus", s["corpus"], "--seq-len", str(s["seq_len"])]
    common += ["--eval-fraction", str(s["eval_fraction"]), "--max-tokens", str(s["max_tokens"])]
    kinds = {f"topk-{k}": ["--top-k", str(k)] for k in TOPK}
    kinds |= {f"sampled-{n}": ["--targets", "sampled", "--samples", str(n)] for n in SAMPLES}
    kinds = {name: options for name, options in kinds.items() if name in {v.store for v in chosen}}
    facts = {}
    for name, options in kinds.items():
        store = work / "stores" / name
        manifest = store / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("finished")):
            run(kdcache("cache-teacher", *common, *options, "--out", str(store)), log)
        stats = json.loads(manifest.read_text())["stats"]
        facts[name] = {
            "bytes_per_token": stats["bytes_per_token"],
            "tokens": stats["tokens"],
            "trained_fraction": stats.get("trained_fraction", 1.0),
        }
    return teacher, facts


def train(work: Path, s: dict, teacher: Path, v: Variant, seed: int, log: Path) -> Path:
    out = work / "students" / f"seed{seed}" / v.name.replace(" ", "_").replace("=", "")
    if (out / "metrics.json").is_file():
        return out
    if out.exists():  # a run killed before it finished: start it again
        import shutil

        shutil.rmtree(out)
    args = ["--store", str(work / "stores" / v.store), "--student", s["student"]]
    args += ["--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]), "--seed", str(seed)]
    args += ["--loss", v.loss, "--out", str(out)]
    if v.online:
        args += ["--teacher", str(teacher)]
    run(kdcache("train-student", *args), log)
    return out


def key(name: str) -> str:
    """A variant's name as compare's --student NAME (no '=')."""
    return name.replace("=", "")


def exact_metrics(work: Path, teacher: Path, dirs: dict[str, Path], seed: int, log: Path) -> dict:
    """Every student of one seed against the teacher on the eval split (exact KL), cached."""
    path = work / "students" / f"seed{seed}" / "compare.json"
    if not path.is_file():
        students = [arg for name, d in dirs.items() for arg in ("--student", f"{key(name)}={d}")]
        store = str(work / "stores" / REFERENCE_STORE)
        run(kdcache("compare", "--teacher", str(teacher), "--store", store, *students,
                    "--json", str(path)), log)  # fmt: skip
    return json.loads(path.read_text())


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 4, percent: bool = False) -> str:
    m, sd = mean_sd(values)
    if percent:
        return f"{100 * m:.1f}% ± {100 * sd:.1f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def summarize(raw: dict) -> list[dict]:
    """Per variant: paired shares of the online gain, CE, spreads — from ``raw`` results."""
    rows = []
    seeds = sorted(raw["runs"])
    for v in [v for v in variants() if v.name in raw["runs"][seeds[0]]]:
        kl, ce, share_kl, share_ce, d_ce, rate = [], [], [], [], [], []
        for seed in seeds:
            by = raw["runs"][seed]
            x, base, online = by[v.name], by["CE only"], by["online KD"]
            kl.append(x["kl_to_teacher"])
            ce.append(x["cross_entropy"])
            share_kl.append((base["kl_to_teacher"] - x["kl_to_teacher"])
                            / (base["kl_to_teacher"] - online["kl_to_teacher"]))  # fmt: skip
            share_ce.append((base["cross_entropy"] - x["cross_entropy"])
                            / (base["cross_entropy"] - online["cross_entropy"]))  # fmt: skip
            d_ce.append(x["cross_entropy"] - online["cross_entropy"])
            rate.append(x["train_tokens_per_s"])
        store = raw["stores"].get(v.store, {})
        rows.append({
            "variant": v.name, "loss": v.loss, "online": v.online,
            "bytes_per_token": None if v.online or v.loss == "ce" else store["bytes_per_token"],
            "kl": kl, "ce": ce, "share_kl": share_kl, "share_ce": share_ce, "d_ce_online": d_ce,
            "tokens_per_s": rate,
        })  # fmt: skip
    return rows


def verdict(rows: list[dict]) -> list[str]:
    """Did sampled targets at no more bytes/token than top-32 keep >= 95% of the online gain?"""
    budget = next((r["bytes_per_token"] for r in rows if r["variant"] == "top-32 ghost"), None)
    if budget is None:
        return ["- (no top-32 ghost variant in this run: no verdict)"]
    online_ce_sd = mean_sd(next(r["ce"] for r in rows if r["online"]))[1]
    lines = []
    for r in rows:
        if r["loss"] != "sampled-kl" or r["bytes_per_token"] > budget:
            continue
        share, d = mean_sd(r["share_kl"]), mean_sd(r["d_ce_online"])
        ok_share = share[0] >= TARGET_SHARE
        ok_ce = abs(d[0]) <= max(d[1], online_ce_sd)
        lines.append(
            f"- {r['variant']}: {r['bytes_per_token']:.1f} bytes/token (top-32: {budget:.1f}); "
            f"{100 * share[0]:.1f}% ± {100 * share[1]:.1f} of the online KL gain "
            f"({'meets' if ok_share else 'MISSES'} the ≥ {100 * TARGET_SHARE:.0f}% target); eval CE "
            f"{d[0]:+.4f} ± {d[1]:.4f} nats from online KD, paired "
            f"({'within' if ok_ce else 'OUTSIDE'} the seed spread {max(d[1], online_ce_sd):.4f})"
        )
    return lines or [f"- no sampled store at or below the top-32 store's {budget:.1f} bytes/token"]


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"kl": ("tab:blue", "s", "top-k kl"), "ghost": ("tab:orange", "^", "top-k ghost"),
              "sampled-kl": ("tab:green", "o", "sampled")}  # fmt: skip
    for loss, (color, marker, label) in styles.items():
        mine = [r for r in rows if r["loss"] == loss and not r["online"]]
        xs = [r["bytes_per_token"] for r in mine]
        ys = [100 * mean_sd(r["share_kl"])[0] for r in mine]
        es = [100 * mean_sd(r["share_kl"])[1] for r in mine]
        ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3, label=label, ls="-")
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(r["variant"].split()[1] if loss != "sampled-kl" else r["variant"][8:],
                        (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)  # fmt: skip
    ax.axhline(100, color="gray", ls="--", lw=1, label="online KD (100%)")
    ax.axhline(100 * TARGET_SHARE, color="gray", ls=":", lw=1, label="95% target")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes per token (log scale)")
    ax.set_ylabel("share of the online KD gain in exact KL (%)")
    ax.set_title("What a logit store keeps of the teacher (mean ± sd over seeds)")
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(
    raw: dict, rows: list[dict], s: dict, seconds: float, quick: bool, plot_name: str
) -> str:
    seeds = len(raw["runs"])
    trained = {name: f["trained_fraction"] for name, f in raw["stores"].items()}
    masked = [
        f"{name}: {100 * share:.1f}% of positions trained, "
        f"{raw['stores'][name]['bytes_per_token'] / share:.1f} bytes per trained position"
        for name, share in trained.items()
        if share < 1.0
    ]
    lines = [
        "## Fidelity: what each kind of stored target keeps of the teacher (`bench/fidelity.py`)",
        "",
        f"Machine: {raw['machine']}. Wall time {seconds / 60:.0f} min.",
        "",
        "Settings: "
        + ", ".join(f"{k}={v}" for k, v in s.items())
        + (" (--quick)" if quick else "")
        + f"; {seeds} seeds, every variant of a seed from the same initial weights and data order.",
        "",
        "Exact KL(teacher ‖ student) and eval CE on the store's held-out eval split, the teacher at "
        "hand (`kdcache compare`). Share of the online gain = (x_ce − x) / (x_ce − x_online), per "
        "seed, then mean ± sd over seeds; ΔCE vs online is the paired difference.",
        "",
        *(
            [
                "Loss mask (chat data: teacher targets, KD, CE and every metric on the trained "
                "positions only): " + "; ".join(masked) + ".",
                "",
            ]
            if masked
            else []
        ),
        "| variant | bytes/token | exact KL to teacher | share of online gain (KL) | eval CE | "
        "share of online gain (CE) | ΔCE vs online (paired) | train tokens/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        size = "—" if r["bytes_per_token"] is None else f"{r['bytes_per_token']:.1f}"
        share_kl = "0% (baseline)" if r["loss"] == "ce" else fmt(r["share_kl"], percent=True)
        share_ce = "0% (baseline)" if r["loss"] == "ce" else fmt(r["share_ce"], percent=True)
        if r["online"]:
            share_kl = share_ce = "100% (reference)"
        lines.append(
            f"| {r['variant']} | {size} | {fmt(r['kl'])} | {share_kl} | {fmt(r['ce'])} | "
            f"{share_ce} | {fmt(r['d_ce_online'])} | {statistics.fmean(r['tokens_per_s']):,.0f} |"
        )
    lines += ["", "Target: sampled targets at no more bytes/token than the top-32 store keep ≥ 95% "
              "of the online gain in exact KL, with eval CE within the seed spread of online KD's.",
              "", *verdict(rows), "", f"![fidelity](results/{plot_name})"]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant (>= 3 for claims)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-fidelity")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the wiring only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "fidelity.md")
    parser.add_argument(
        "--corpus", default=None, help="cache this corpus (e.g. stdlib-chat) [the default's]"
    )
    parser.add_argument(
        "--only", default=None, help="comma-separated variant names to run [all of them]"
    )
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else DEFAULTS)
    if args.corpus:
        s["corpus"] = args.corpus
    chosen = variants()
    if args.only:
        names = [name.strip() for name in args.only.split(",")]
        unknown = sorted(set(names) - {v.name for v in chosen})
        if unknown or REFERENCE_STORE not in {v.store for v in chosen if v.name in names}:
            sys.exit(f"Error: --only takes names of {[v.name for v in chosen]}, got {unknown}")
        chosen = [v for v in chosen if v.name in names]
    work = args.workdir / ("quick" if args.quick else "default")
    if s["corpus"] != DEFAULTS["corpus"]:
        work = work.with_name(f"{work.name}-{s['corpus'].replace('/', '_')}")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    teacher, stores = build(work, s, args.quick, log, chosen)
    raw: dict = {"settings": s, "machine": machine_line(), "stores": stores, "runs": {}}
    for seed in range(args.seeds):
        dirs = {v.name: train(work, s, teacher, v, seed, log) for v in chosen}
        compared = exact_metrics(work, teacher, dirs, seed, log)
        runs = {}
        for v in chosen:
            metrics = json.loads((dirs[v.name] / "metrics.json").read_text())
            wall = metrics["train"]["wall_seconds_this_run"]
            runs[v.name] = {
                "kl_to_teacher": compared["students"][key(v.name)]["kl_to_teacher"],
                "cross_entropy": compared["students"][key(v.name)]["cross_entropy"],
                "train_tokens_per_s": metrics["train"]["tokens"] / max(wall, 1e-9),
            }
        raw["runs"][seed] = runs
    rows = summarize(raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**raw, "rows": rows}, indent=2) + "\n")
    plot(rows, args.out.with_suffix(".png"))
    seconds = time.perf_counter() - started
    png = args.out.with_suffix(".png").name
    args.out.write_text(report(raw, rows, s, seconds, args.quick, png))
    print(f"wrote {args.out}, {args.out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
