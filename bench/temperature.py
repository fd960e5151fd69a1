"""How much of the tempered teacher does each loss put outside the top-k? (docs/architecture.md §5)

Synthetic teachers on 151,665 ids (Qwen2.5's tokenizer): the top 64 ids hold 96% of the mass
(a Zipf head), the other ids a log-normal tail of spread sigma (0: a flat tail), each below the
64th. For every temperature T the table gives the share of ``p_T ∝ p^(1/T)`` outside the top 64:

- exact, from the whole distribution;
- ghost / reverse-kl: the tail's mass spread evenly over the other ids
  (``divergences.tempered_tail``), and the other bound, the tail held by ids as likely as the
  64th; the exact share lies between the two;
- ghost before this treatment: the 65 buckets tempered as if the tail were one id;
- sampled-kl from N draws made at T = 1, reweighted to T (``divergences.sampled_weights``,
  self-normalized), and from N draws made at T (``--sample-temperature T``: counts / N); the
  mean over R rows of independent draws, with its standard error.

Run: ``.venv/bin/python bench/temperature.py`` (about a minute on 2 CPU cores).
Writes ``bench/results/temperature.md``.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
from report import machine_line

from kdcache.pipeline.distill.divergences import sampled_weights, tempered_tail

RESULT = Path(__file__).parent / "results" / "temperature.md"


def teacher(vocab: int, k: int, sigma: float, head: float, seed: int) -> torch.Tensor:
    """(V,) float64 log-probs, the top k first (ids do not matter here)."""
    g = torch.Generator().manual_seed(seed)
    top = 1.0 / torch.arange(1, k + 1, dtype=torch.float64)
    tail = (sigma * torch.randn(vocab - k, generator=g, dtype=torch.float64)).exp()
    probs = torch.cat([top / top.sum() * head, tail / tail.sum() * (1.0 - head)])
    assert probs[k:].max() < probs[k - 1], "a tail id above the k-th: lower sigma"
    return probs.log()


def share_outside(log_top: torch.Tensor, log_tail: torch.Tensor) -> float:
    """The tail bucket's share of the tempered (k+1)-bucket distribution: (k,), () → float."""
    return float(torch.softmax(torch.cat([log_top, log_tail.reshape(1)]), 0)[-1])


def sampled_share(
    logp: torch.Tensor, k: int, t: float, drawn_at: float, n: int, rows: int, seed: int
) -> tuple[float, float]:
    """Mean and standard error over ``rows`` rows of N draws at ``drawn_at`` of the weight
    sampled-kl at T gives to ids outside the top k."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(logp / drawn_at, 0)
    draws = torch.multinomial(probs, rows * n, replacement=True, generator=g).reshape(rows, n)
    shares = []
    for row in draws:
        ids, counts = torch.unique(row, return_counts=True)
        w, _ = sampled_weights(counts[None], logp[ids][None].float(), t, drawn_at)  # (1, m)
        shares.append(float(w[0, ids >= k].sum()))
    mean = sum(shares) / rows
    spread = math.sqrt(sum((s - mean) ** 2 for s in shares) / (rows - 1) / rows)
    return mean, spread


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=151_665)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--head", type=float, default=0.96, help="mass of the top k")
    parser.add_argument("--sigmas", default="0,1,2", help="spreads of the tail's log-normal")
    parser.add_argument("--temperatures", default="0.5,2,4")
    parser.add_argument("--samples", default="32,256", help="draws N per row")
    parser.add_argument("--rows", type=int, default=200, help="rows of draws per estimate")
    args = parser.parse_args()
    k, vocab = args.top_k, args.vocab
    counts = [int(n) for n in args.samples.split(",")]
    lines = [
        "## Temperature: the tempered teacher outside the top-k (`bench/temperature.py`)",
        "",
        f"Machine: {machine_line()}.",
        "",
        f"Synthetic teachers on {vocab:,} ids: the top {k} hold {args.head:.0%} of the mass, "
        "the tail is log-normal with spread sigma (0: flat). Each cell is the share of "
        f"p_T ∝ p^(1/T) outside the top {k}: exact; what ghost/reverse-kl use (the tail spread "
        f"evenly over the other ids) and the other bound (the tail in ids as likely as the "
        f"{k}th); ghost before (the {k + 1} buckets tempered as if the tail were one id); "
        "sampled-kl's weights from N draws made at T = 1 and reweighted, or made at T "
        f"(`--sample-temperature T`): mean ± standard error over {args.rows} rows.",
        "",
        "| sigma | T | exact | spread (ghost) | at the k-th | one-id bucket (ghost before) | "
        + " | ".join(f"drawn at 1, N = {n}" for n in counts)
        + f" | drawn at T, N = {counts[0]} |",
        "| --- " * (7 + len(counts)) + "|",
    ]
    for sigma in (float(s) for s in args.sigmas.split(",")):
        logp = teacher(vocab, k, sigma, args.head, seed=int(sigma * 10))
        top, tail = logp[:k], logp[k:].logsumexp(0)
        for t in (float(x) for x in args.temperatures.split(",")):
            exact = float(torch.softmax(logp / t, 0)[k:].sum())
            spread = share_outside(top / t, tempered_tail(tail, t, vocab - k))
            at_kth = share_outside(top / t, tail + (1 / t - 1) * top[-1])
            bucket = share_outside(top / t, tail / t)
            cells = [f"{sigma:g}", f"{t:g}"] + [f"{x:.3f}" for x in (exact, spread, at_kth, bucket)]
            for n, drawn_at in [(n, 1.0) for n in counts] + [(counts[0], t)]:
                mean, error = sampled_share(logp, k, t, drawn_at, n, args.rows, seed=n)
                cells.append(f"{mean:.3f} ± {error:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
            print(lines[-1], flush=True)
    RESULT.parent.mkdir(exist_ok=True)
    RESULT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
