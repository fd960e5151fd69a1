"""Cross-tokenizer fidelity: does a student with another tokenizer learn from the default store?

On the embedded default (the default teacher, its `stdlib` corpus, the default sampled store —
format 6, with text spans and realized-token log-probs — the `tiny` student's sizes, the
Makefile's steps and batch), for every seed, three student tokenizers each trained twice, with
distillation and CE only (the same initial weights and data order per seed, so differences are
paired):

- `same`: the store's own tokenizer (the teacher's 8k BPE), KD = the store's `auto` loss
  (`sampled-kl`);
- `bpe-4k`: a byte-level BPE of 4,096 ids trained on the same corpus;
- `bytes`: a byte-level tokenizer with no merges (its ids are the 256 bytes).

A cross student is distilled two ways: `matched` (`sampled-kl` on the teacher's draws at
aligned positions mapped to the student tokens they begin with, the data's token elsewhere,
pipeline/distill/exact_matches.py) and `alm` (chunk likelihood matching,
pipeline/distill/cross_tokenizer.py).

Every student is ranked on eval bits per byte (of the text its predicted tokens spell), the scale
every tokenizer shares. Reported per tokenizer: bits/byte (mean ± sd over seeds) of KD and CE,
the paired KD − CE difference (mean ± sd), and the share of the same-tokenizer gain a cross
student keeps (its mean paired gain / the same-tokenizer one). Writes
`bench/results/cross_tokenizer.md` and `.json`. Resumable like bench/fidelity.py.

Usage: ``python bench/cross_tokenizer.py [--seeds 3] [--workdir DIR] [--quick]``
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
from fidelity import DEFAULTS, QUICK, Variant, build, kdcache, run  # noqa: E402
from report import machine_line  # noqa: E402

STORE = "sampled-32"  # the Makefile's default targets (TARGETS=sampled, SAMPLES=32)
TOKENIZERS = {"bpe-4k": 4096, "bytes": 0}  # 0: the byte alphabet alone, no merges
TINY = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True}  # fmt: skip


def student_tokenizers(work: Path) -> dict[str, Path]:
    """Each cross student's config (its `tokenizer:` trained here on the default corpus)."""
    from kdcache.pipeline.cache.corpus import stdlib_files
    from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer

    configs = {}
    for name, size in TOKENIZERS.items():
        folder = work / "tokenizers" / name
        if not (folder / "tokenizer.json").is_file():
            texts = (path.read_text(encoding="utf-8", errors="replace") for path in stdlib_files())
            tokenizer = train_bpe_tokenizer(texts, vocab_size=size or 1)
            tokenizer.save_pretrained(folder)
        config = work / "tokenizers" / f"{name}.json"
        config.write_text(json.dumps({"tokenizer": name, **TINY}))
        configs[name] = config
    return configs


def train(work: Path, s: dict, student: str, name: str, loss: str, seed: int, log: Path) -> dict:
    out = work / "students" / f"seed{seed}" / name
    if not (out / "metrics.json").is_file():
        if out.exists():  # a run killed before it finished: start it again
            shutil.rmtree(out)
        args = ["--store", str(work / "stores" / STORE), "--student", student, "--loss", loss]
        args += ["--steps", str(s["steps"]), "--batch-size", str(s["batch_size"])]
        args += ["--seed", str(seed), "--out", str(out)]
        run(kdcache("train-student", *args), log)
    return json.loads((out / "metrics.json").read_text())["final"]


# (student, KD variant): the loss of each; every student also trains CE only
VARIANTS = {
    "same": {"kd": "auto"},
    **{name: {"matched": "sampled-kl", "alm": "alm"} for name in TOKENIZERS},
}


def summarize(raw: dict) -> list[dict]:
    rows = []
    seeds = sorted(raw["runs"])
    same_gain = None
    pairs = [(name, kd) for name, kinds in VARIANTS.items() for kd in kinds]
    for name, variant in pairs:
        kd = [raw["runs"][seed][name][variant]["bits_per_byte"] for seed in seeds]
        ce = [raw["runs"][seed][name]["ce"]["bits_per_byte"] for seed in seeds]
        gain = [c - k for k, c in zip(kd, ce, strict=True)]  # > 0: KD has fewer bits per byte
        mean_gain = statistics.mean(gain)
        if name == "same":
            same_gain = mean_gain
        spread = statistics.stdev(gain) if len(gain) > 1 else 0.0
        rows.append({
            "tokenizer": name,
            "variant": variant,
            "kd_bpb": statistics.mean(kd), "kd_sd": statistics.stdev(kd) if len(kd) > 1 else 0.0,
            "ce_bpb": statistics.mean(ce), "ce_sd": statistics.stdev(ce) if len(ce) > 1 else 0.0,
            "gain": mean_gain, "gain_sd": spread,
            "beats_spread": mean_gain > spread,
            "share_of_same": mean_gain / same_gain if same_gain else float("nan"),
        })  # fmt: skip
    return rows


def report(raw: dict, rows: list[dict], seconds: float) -> str:
    lines = [
        "## Cross-tokenizer students (bench/cross_tokenizer.py)",
        "",
        f"Machine: {raw['machine']}. Command: `{raw['command']}` ({seconds / 60:.0f} min). "
        f"Store: the default sampled store (format 6), {len(raw['runs'])} paired seeds, "
        f"{raw['settings']['steps']} steps of batch {raw['settings']['batch_size']}, tiny "
        "student sizes. Eval bits per byte of the text the predicted tokens spell; gain = CE-only "
        "− KD, paired by seed (mean ± sd); share = a tokenizer's mean gain / the same-tokenizer "
        "student's.",
        "",
        "| student tokenizer | KD | KD bits/byte | CE-only bits/byte | paired gain | "
        "gain > spread | share of same-tokenizer gain |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['variant']} | {r['kd_bpb']:.4f} ± {r['kd_sd']:.4f} | "
            f"{r['ce_bpb']:.4f} ± {r['ce_sd']:.4f} | {r['gain']:+.4f} ± {r['gain_sd']:.4f} | "
            f"{'yes' if r['beats_spread'] else 'no'} | {r['share_of_same']:.0%} |"
        )
    lines += ["", "Targets: a cross student beats its CE-only twin by more than the paired spread, "
              "and keeps at least half of the same-tokenizer gain."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3, help="paired seeds (>= 3 for claims)")
    parser.add_argument("--workdir", type=Path, default=ROOT / "artifacts" / "bench-cross")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check the wiring only")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "cross_tokenizer.md")
    args = parser.parse_args(argv)
    s = dict(QUICK if args.quick else DEFAULTS)
    work = args.workdir / ("quick" if args.quick else "default")
    work.mkdir(parents=True, exist_ok=True)
    log = work / "log.txt"
    started = time.perf_counter()
    build(work, s, args.quick, log, [Variant("store", STORE, "auto")])
    configs = {"same": s["student"], **{k: str(v) for k, v in student_tokenizers(work).items()}}
    command = " ".join(["python bench/cross_tokenizer.py", *(argv or sys.argv[1:])])
    raw: dict = {"settings": s, "machine": machine_line(), "command": command, "runs": {}}
    for seed in range(args.seeds):
        raw["runs"][seed] = {
            name: {
                **{
                    variant: train(work, s, student, f"{name}-{variant}", loss, seed, log)
                    for variant, loss in VARIANTS[name].items()
                },
                "ce": train(work, s, student, f"{name}-ce", "ce", seed, log),
            }
            for name, student in configs.items()
        }
    rows = summarize(raw)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({**raw, "rows": rows}, indent=2) + "\n")
    args.out.write_text(report(raw, rows, time.perf_counter() - started))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
