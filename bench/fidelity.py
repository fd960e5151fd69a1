"""Fidelity: how much of the teacher each kind of stored target keeps, measured against online KD.

On the embedded default (the default teacher, its `stdlib` corpus, the `tiny` student, the
Makefile's steps and batch), for every seed: the student trained without a teacher (CE only),
with the teacher run live (online full-vocabulary KD: 100%), and from stores of top-k targets
(`kl` and `ghost`, k in 8/32/128) and of sampled targets (`sampled-kl`, N in 8/16/32/64). All
variants of one seed start from the same weights and see the same sequences in the same order
(the stores hold the same sequences), so differences are paired by seed.

``--codec-twins`` runs the store codec's comparison instead (CE only, online KD, and top-64
ghost and sampled N=32 each from a `raw` store and from its `gaps` twin; writes
`bench/results/fidelity_codec.md`): is a gaps student's eval CE within the seed spread of its
raw twin's?

For each variant: the store's bytes/token; the exact KL(teacher ‖ student) on the store's eval
split (the teacher at hand, `kdcache compare`) and its share of the online gain
(KL_ce − KL_x) / (KL_ce − KL_online), per seed then mean ± sd; eval CE (mean ± sd) and the same
share in CE; the paired CE difference to online KD; training tokens/s. Writes
`bench/results/fidelity.md`, the raw figures `bench/results/fidelity.json` and the plot
`bench/results/fidelity.png`.

Runs are resumable: stores, students and comparisons already in the work directory are reused,
so a killed run continues where it stopped.

Usage: ``python bench/fidelity.py [--seeds 3] [--workdir DIR] [--quick] [--codec-twins]``
(``make fidelity``, about an hour on 2 CPU cores; ``make fidelity-codec``, ~35 min alone, ~15
after ``make fidelity``: both share one work directory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import end_to_end  # noqa: E402  (bench/ is a folder of scripts)
from _fidelity_report import plot, report  # noqa: E402
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
REFERENCE_STORE = "topk-32"  # data (and its order) for the CE-only and online students
TWINS = {"topk-64": ["--top-k", "64"], "sampled-32": ["--targets", "sampled", "--samples", "32"]}


@dataclass(frozen=True)
class Variant:
    name: str
    store: str  # a store name under WORK/stores
    loss: str
    online: bool = False
    twin: str | None = None  # a gaps variant: the raw variant it is compared with


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


def codec_variants() -> list[Variant]:
    """CE only, online KD, and each raw store's variant beside its gaps twin (``--codec-twins``)."""
    out = variants()[:2]
    for raw in (Variant("top-64 ghost", "topk-64", "ghost"),
                Variant("sampled N=32", "sampled-32", "sampled-kl")):  # fmt: skip
        twin = Variant(f"{raw.name} (gaps)", f"{raw.store}-gaps", raw.loss, twin=raw.name)
        out += [raw, twin]
    return out


def known_variants() -> list[Variant]:
    """Every variant this script can run, each once."""
    out = variants()
    return out + [v for v in codec_variants() if v.name not in {o.name for o in out}]


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
    kinds |= TWINS | {f"{name}-gaps": options for name, options in TWINS.items()}
    # the codec explicitly: the stores stay what their names say whatever the default
    kinds = {
        name: [*options, "--codec", "gaps" if name.endswith("-gaps") else "raw"]
        for name, options in kinds.items()
        if name in {v.store for v in chosen}
    }
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
    """Every student of one seed against the teacher on the eval split (exact KL), cached (one
    file per set of students: a run of other variants compares again)."""
    path = work / "students" / f"seed{seed}" / "compare.json"
    if path.is_file() and not {key(n) for n in dirs} <= set(
        json.loads(path.read_text())["students"]
    ):
        path = path.with_name(
            f"compare-{hashlib.sha256(' '.join(sorted(dirs)).encode()).hexdigest()[:8]}.json"
        )
    if not path.is_file():
        students = [arg for name, d in dirs.items() for arg in ("--student", f"{key(name)}={d}")]
        store = str(work / "stores" / REFERENCE_STORE)
        run(kdcache("compare", "--teacher", str(teacher), "--store", store, *students,
                    "--json", str(path)), log)  # fmt: skip
    return json.loads(path.read_text())


def summarize(raw: dict) -> list[dict]:
    """Per variant: paired shares of the online gain, CE, spreads — from ``raw`` results."""
    rows = []
    seeds = sorted(raw["runs"])
    known = {v.name: v for v in known_variants()}
    for v in [known[name] for name in raw["runs"][seeds[0]]]:  # in the order they ran
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
            "variant": v.name, "loss": v.loss, "online": v.online, "twin": v.twin,
            "bytes_per_token": None if v.online or v.loss == "ce" else store["bytes_per_token"],
            "kl": kl, "ce": ce, "share_kl": share_kl, "share_ce": share_ce, "d_ce_online": d_ce,
            "tokens_per_s": rate,
        })  # fmt: skip
    return rows


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
    parser.add_argument(
        "--codec-twins",
        action="store_true",
        help="CE only, online KD and raw/gaps store twins instead (out: results/fidelity_codec.md)",
    )
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else DEFAULTS)
    if args.corpus:
        s["corpus"] = args.corpus
    chosen = codec_variants() if args.codec_twins else variants()
    if args.codec_twins and args.out == HERE / "results" / "fidelity.md":
        args.out = HERE / "results" / "fidelity_codec.md"
    if args.only:
        names = [name.strip() for name in args.only.split(",")]
        known = known_variants()
        unknown = sorted(set(names) - {v.name for v in known})
        if unknown or REFERENCE_STORE not in {v.store for v in known if v.name in names}:
            sys.exit(f"Error: --only takes names of {[v.name for v in known]}, got {unknown}")
        chosen = [v for v in known if v.name in names]
    work = args.workdir / ("quick" if args.quick else "default")
    if s["corpus"] != DEFAULTS["corpus"]:
        work = work.with_name(f"{work.name}-{s['corpus'].replace('/', '_')}")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    teacher, stores = build(work, s, args.quick, log, chosen)
    command = " ".join(["python bench/fidelity.py", *(argv if argv is not None else sys.argv[1:])])
    raw: dict = {"settings": s, "machine": machine_line(), "command": command, "stores": stores,
                 "runs": {}}  # fmt: skip
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
                "train_seconds": wall,
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
