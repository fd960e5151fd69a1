"""The report of bench/fidelity.py: verdicts, the table, the plot (a module, not a benchmark:
``make bench`` skips ``bench/_*.py``)."""

from __future__ import annotations

import statistics
from pathlib import Path

TARGET_SHARE = 0.95


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 4, percent: bool = False) -> str:
    m, sd = mean_sd(values)
    if percent:
        return f"{100 * m:.1f}% ± {100 * sd:.1f}"
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


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


def codec_verdict(rows: list[dict]) -> list[str]:
    """Is each gaps variant's eval CE within the seed spread (sd over seeds) of its raw twin's?
    Paired by seed: same initial weights, same sequences in the same order."""
    by = {r["variant"]: r for r in rows}
    lines = []
    for r in rows:
        raw = by.get(r["twin"] or "")
        if raw is None:
            continue
        d_ce = mean_sd([a - b for a, b in zip(r["ce"], raw["ce"], strict=True)])
        d_kl = mean_sd([a - b for a, b in zip(r["kl"], raw["kl"], strict=True)])
        spread = mean_sd(raw["ce"])[1]
        lines.append(
            f"- {r['variant']}: {r['bytes_per_token']:.1f} bytes/token ({raw['variant']}: "
            f"{raw['bytes_per_token']:.1f}, {100 * r['bytes_per_token'] / raw['bytes_per_token']:.0f}%); "
            f"eval CE {d_ce[0]:+.5f} ± {d_ce[1]:.5f} nats from {raw['variant']}, paired "
            f"({'within' if abs(d_ce[0]) <= spread else 'OUTSIDE'} its seed spread {spread:.4f}); "
            f"exact KL to the teacher {d_kl[0]:+.5f} ± {d_kl[1]:.5f}"
        )
    return lines


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    styles = {"kl": ("tab:blue", "s", "top-k kl"), "ghost": ("tab:orange", "^", "top-k ghost"),
              "sampled-kl": ("tab:green", "o", "sampled")}  # fmt: skip
    for loss, (color, marker, label) in styles.items():
        twins = [r for r in rows if r["loss"] == loss and r["twin"]]  # gaps: hollow, unjoined
        ax.scatter([r["bytes_per_token"] for r in twins],
                   [100 * mean_sd(r["share_kl"])[0] for r in twins],
                   facecolors="none", edgecolors=color, marker=marker, s=60,
                   label=f"{label} (gaps codec)" if twins else None)  # fmt: skip
        mine = [r for r in rows if r["loss"] == loss and not r["online"] and not r["twin"]]
        if not mine:
            continue
        xs = [r["bytes_per_token"] for r in mine]
        ys = [100 * mean_sd(r["share_kl"])[0] for r in mine]
        es = [100 * mean_sd(r["share_kl"])[1] for r in mine]
        ax.errorbar(xs, ys, yerr=es, color=color, marker=marker, capsize=3, label=label, ls="-")
        for r, x, y in zip(mine, xs, ys, strict=True):
            ax.annotate(r["variant"].split()[0] if loss != "sampled-kl" else r["variant"][8:],
                        (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)  # fmt: skip
    ax.axhline(100, color="gray", ls="--", lw=1, label="online KD (100%)")
    ax.axhline(100 * TARGET_SHARE, color="gray", ls=":", lw=1, label="95% target")
    ax.set_xscale("log")
    ax.set_xlabel("store bytes per token (log scale)")
    ax.set_ylabel("share of the online KD gain in exact KL (%)")
    ax.set_title("What a logit store keeps of the teacher (mean ± sd over seeds)")
    ax.legend(fontsize=8, loc="best")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def report(
    raw: dict, rows: list[dict], s: dict, seconds: float, quick: bool, plot_name: str
) -> str:
    seeds = len(raw["runs"])
    train = sum(v.get("train_seconds", 0.0) for r in raw["runs"].values() for v in r.values())
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
        f"Command: `{raw['command']}`. Machine: {raw['machine']}. Wall time {seconds / 60:.0f} min "
        f"(stores, students and comparisons already in the work directory are reused; training "
        f"the {sum(len(r) for r in raw['runs'].values())} students took {train / 60:.0f} min).",
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
    if any(r["variant"] == "top-32 ghost" for r in rows):
        lines += ["", "Target: sampled targets at no more bytes/token than the top-32 store keep ≥ "
                  "95% of the online gain in exact KL, with eval CE within the seed spread of "
                  "online KD's.", "", *verdict(rows)]  # fmt: skip
    if any(r["twin"] for r in rows):
        lines += ["", "Codec: a student trained from a `gaps` store (int16 log-prob levels, at "
                  "most 1/16 nat off) against its twin trained from the same targets in a `raw` "
                  "(float16) store; target: eval CE within the seed spread (sd over seeds) of the "
                  "raw twin's. (`sampled-kl` at temperature 1 weighs the draws by their counts "
                  "alone, so a sampled store's codec, which changes only its log-probs, cannot "
                  "move the student: those serve T ≠ 1 and the sampled-KL estimate.)", "",
                  *codec_verdict(rows)]  # fmt: skip
    lines += ["", f"![fidelity](results/{plot_name})"]
    return "\n".join(lines) + "\n"
