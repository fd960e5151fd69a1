"""The chat demo: is the default teacher, adapted to stdlib-chat, worth distilling?

What ``make cache-teacher CORPUS=stdlib-chat train-student`` runs, over paired seeds: the default
teacher (150 steps on `stdlib`), tuned on the `stdlib-chat` records' training split with
``build-teacher --from`` at its defaults (the held-out records untouched), a sampled store (N=32)
of `stdlib-chat` cached from it with the Makefile's settings; then per seed the `tiny` student
twice, KD (``--loss auto``) and CE only, from the same initial weights in the same data order,
and ``kdcache compare`` on the store's eval split (the held-out records). The same students are
also distilled from the untuned teacher (its store holds the same sequences, so the CE-only twins
are shared; ``--without-base`` leaves them out).

Reported: eval CE of each student (mean ± sd), the paired CE-only − KD gain (mean ± sd, and
whether it exceeds its spread), exact KL to the tuned teacher, and the teacher's held-out CE
before and after the fine-tune. Writes ``bench/results/chat_demo.md`` and ``.json``. Resumable
like bench/fidelity.py: teachers, stores, students and comparisons in the work directory are
reused (a tuned teacher only while its settings are build-teacher's current defaults).

Usage: ``python bench/chat_demo.py [--seeds 3] [--workdir DIR] [--quick] [--without-base]``
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
import end_to_end  # noqa: E402  (bench/ is a folder of scripts)
from fidelity import kdcache, run  # noqa: E402
from report import machine_line  # noqa: E402

from kdcache.pipeline.cache.default_teacher import MODE_DEFAULTS  # noqa: E402

CORPUS = "stdlib-chat"
SHARED = ("teacher_steps", "targets", "samples", "seq_len", "max_tokens", "eval_fraction",
          "student", "steps", "batch_size", "loss")  # fmt: skip
DEFAULTS = {key: end_to_end.DEFAULTS[key] for key in SHARED}
QUICK = {key: end_to_end.QUICK[key] for key in SHARED}
QUICK_TUNE = ["--steps", "10"]


def tuned_is_current(tuned: Path, quick: bool) -> bool:
    """The tuned teacher exists and was made with build-teacher --from's current defaults."""
    meta_file = tuned / "kdcache_teacher.json"
    if not meta_file.is_file():
        return False
    settings = json.loads(meta_file.read_text())["settings"]
    wanted = {name: defaults[1] for name, defaults in MODE_DEFAULTS.items()}
    if quick:
        wanted["steps"] = int(QUICK_TUNE[1])
    return all(settings.get(name) == value for name, value in wanted.items())


def build(work: Path, s: dict, quick: bool, log: Path, with_base: bool) -> dict[str, Path]:
    """The default teacher, its tuned twin and the stores; returns {name: store}."""
    teacher, tuned = work / "teacher", work / "teacher-stdlib-chat"
    if not (teacher / "config.json").is_file():
        args = ["--corpus", "stdlib", "--out", str(teacher), "--steps", str(s["teacher_steps"])]
        args += ["--eval-fraction", str(s["eval_fraction"]), "--force"]
        run(kdcache("build-teacher", *args, *(end_to_end.QUICK_TEACHER if quick else [])), log)
    if not tuned_is_current(tuned, quick):
        for stale in (work / "stores" / "tuned", work / "students"):  # made from an older one
            shutil.rmtree(stale, ignore_errors=True)
        args = ["--from", str(teacher), "--corpus", CORPUS, "--out", str(tuned), "--force"]
        args += ["--seq-len", str(s["seq_len"]), "--eval-fraction", str(s["eval_fraction"])]
        run(kdcache("build-teacher", *args, *(QUICK_TUNE if quick else [])), log)
    stores = {"tuned": (tuned, work / "stores" / "tuned")}
    if with_base:
        stores["base"] = (teacher, work / "stores" / "base")
    for source, store in stores.values():
        manifest = store / "manifest.json"
        if not (manifest.is_file() and json.loads(manifest.read_text()).get("finished")):
            args = ["--teacher", str(source), "--corpus", CORPUS, "--out", str(store)]
            args += [*end_to_end.target_options(s), "--seq-len", str(s["seq_len"])]
            args += [
                "--eval-fraction",
                str(s["eval_fraction"]),
                "--max-tokens",
                str(s["max_tokens"]),
            ]
            run(kdcache("cache-teacher", *args), log)
    return {name: store for name, (_, store) in stores.items()}


def train(work: Path, s: dict, store: Path, name: str, loss: str, seed: int, log: Path) -> Path:
    out = work / "students" / f"seed{seed}" / name
    if (out / "metrics.json").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)  # a run killed before it finished: start it again
    args = ["--store", str(store), "--student", s["student"], "--loss", loss, "--seed", str(seed)]
    args += ["--steps", str(s["steps"]), "--batch-size", str(s["batch_size"]), "--out", str(out)]
    run(kdcache("train-student", *args), log)
    return out


def compared(work: Path, teacher: Path, store: Path, dirs: dict[str, Path], seed: int, log: Path):
    """Every student of one seed and the tuned teacher on the eval split (cached per seed)."""
    path = work / "students" / f"seed{seed}" / "compare.json"
    if path.is_file() and set(dirs) <= set(json.loads(path.read_text())["students"]):
        return json.loads(path.read_text())
    students = [arg for name, d in dirs.items() for arg in ("--student", f"{name}={d}")]
    run(kdcache("compare", "--teacher", str(teacher), "--store", str(store), *students,
                "--json", str(path)), log)  # fmt: skip
    return json.loads(path.read_text())


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarize(raw: dict) -> dict:
    seeds = sorted(raw["runs"])
    names = list(raw["runs"][seeds[0]]["students"])
    out: dict = {"students": {}}
    for name in names:
        ce = [raw["runs"][seed]["students"][name]["cross_entropy"] for seed in seeds]
        kl = [raw["runs"][seed]["students"][name]["kl_to_teacher"] for seed in seeds]
        out["students"][name] = {"ce": spread(ce), "kl": spread(kl), "ce_per_seed": ce}
    for kd in [n for n in names if n.startswith("kd")]:
        gain = [raw["runs"][seed]["students"]["ce"]["cross_entropy"]
                - raw["runs"][seed]["students"][kd]["cross_entropy"] for seed in seeds]  # fmt: skip
        mean, sd = spread(gain)
        out[f"gain_{kd}"] = {"per_seed": gain, "mean": mean, "sd": sd, "beats_spread": mean > sd}
    teacher_ce = [raw["runs"][seed]["teacher"]["cross_entropy"] for seed in seeds]
    out["teacher_ce_compare"] = teacher_ce[0]
    return out


LABELS = {"kd": "KD (`--loss auto`), tuned teacher", "ce": "CE only",
          "kd-base": "KD (`--loss auto`), untuned teacher"}  # fmt: skip


def report(raw: dict, summary: dict, seconds: float) -> str:
    s, tune = raw["settings"], raw["tuned"]
    gain = summary["gain_kd"]
    tuned_settings = tune["settings"]
    lines = [
        "## Chat demo: the default teacher tuned on stdlib-chat, distilled (`bench/chat_demo.py`)",
        "",
        f"Machine: {raw['machine']}. Command: `{raw['command']}` ({seconds / 60:.0f} min in this "
        "run; teachers, stores and students of earlier runs reused). Another CPU gives slightly "
        "different figures (float summation order); the claim to check is the sign of the gain.",
        "",
        f"What `make cache-teacher CORPUS=stdlib-chat train-student` runs: the default teacher "
        f"({s['teacher_steps']} steps on `stdlib`), tuned with `build-teacher --from` at its "
        f"defaults ({tuned_settings['steps']} steps of {tuned_settings['batch_size']} sequences, "
        f"lr {tuned_settings['lr']:g}) on the {tune['train_documents']:,} training records' "
        f"completions (the {tune['eval_documents']} held-out records untouched); a "
        f"{s['targets']} store (N={s['samples']}, seq_len {s['seq_len']}, eval fraction "
        f"{s['eval_fraction']}); the `{s['student']}` student, {s['steps']} steps of batch "
        f"{s['batch_size']}, {len(raw['runs'])} seeds, KD and CE-only twins from the same initial "
        "weights in the same data order. Eval = the store's eval split (the held-out records' "
        "completion tokens).",
        "",
        "| teacher | held-out CE (nats) |",
        "| --- | --- |",
        f"| default teacher, before the fine-tune | {tune['eval_cross_entropy_before']:.4f} |",
        f"| tuned (`build-teacher --from`, {tune['train_seconds']:.0f} s) | "
        f"{tune['eval_cross_entropy']:.4f} |",
        f"| tuned, as `kdcache compare` measures it | {summary['teacher_ce_compare']:.4f} |",
        "",
        "| student | eval CE (nats) | exact KL to the tuned teacher |",
        "| --- | --- | --- |",
    ]
    for name, row in summary["students"].items():
        (ce, ce_sd), (kl, kl_sd) = row["ce"], row["kl"]
        lines.append(f"| {LABELS[name]} | {ce:.4f} ± {ce_sd:.4f} | {kl:.4f} ± {kl_sd:.4f} |")
    per_seed = ", ".join(f"{g:+.4f}" for g in gain["per_seed"])
    lines += [
        "",
        f"Paired gain, CE only − KD: **{gain['mean']:+.4f} ± {gain['sd']:.4f} nats** (per seed "
        f"{per_seed}); more than the paired spread: {'yes' if gain['beats_spread'] else 'no'}.",
    ]
    if "gain_kd-base" in summary:
        base = summary["gain_kd-base"]
        lines.append(
            f"From the untuned teacher's store: {base['mean']:+.4f} ± {base['sd']:.4f} nats."
        )
    lines += ["", "Target: KD beats its CE-only twin by more than the paired spread."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds (>= 3 for claims)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-chat-demo")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the wiring only")
    parser.add_argument(
        "--without-base", action="store_true", help="no KD students from the untuned teacher"
    )
    parser.add_argument("--out", type=Path, default=HERE / "results" / "chat_demo.md")
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else DEFAULTS)
    work = args.workdir / ("quick" if args.quick else "default")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    machine = machine_line()
    with_base = not args.without_base
    stores = build(work, s, args.quick, log, with_base)
    tuned = work / "teacher-stdlib-chat"
    command = " ".join(["python bench/chat_demo.py", *(argv if argv is not None else sys.argv[1:])])
    raw: dict = {"settings": s, "machine": machine, "command": command, "runs": {},
                 "tuned": json.loads((tuned / "kdcache_teacher.json").read_text())}  # fmt: skip
    for seed in range(args.seeds):
        dirs = {
            "kd": train(work, s, stores["tuned"], "kd", s["loss"], seed, log),
            "ce": train(work, s, stores["tuned"], "ce", "ce", seed, log),
        }
        if with_base:
            dirs["kd-base"] = train(work, s, stores["base"], "kd-base", s["loss"], seed, log)
        facts = compared(work, tuned, stores["tuned"], dirs, seed, log)
        raw["runs"][seed] = {
            "teacher": facts["teacher"],
            "students": {name: facts["students"][name] for name in dirs},
        }
    summary = summarize(raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    raw["tuned"].pop("base", None)  # the default teacher's own metadata: not a result here
    args.out.with_suffix(".json").write_text(
        json.dumps({**raw, "summary": summary}, indent=2) + "\n"
    )
    args.out.write_text(report(raw, summary, time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
