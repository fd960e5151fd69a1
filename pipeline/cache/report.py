"""What a cache-teacher run shows and leaves behind: the progress bar and the summary facts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kdcache.pipeline.cache.corpus import CorpusStats
from kdcache.pipeline.cache.packing import ShardPlan
from kdcache.pipeline.cache.placement import format_size
from kdcache.pipeline.progress import progress


@contextmanager
def progress_bar(estimate: int, *, enabled: bool) -> Iterator[Callable[..., None]]:
    """One progress bar in tokens (plain lines when stderr is not a terminal, see
    ``pipeline/progress.py``); yields ``advance(tokens, shards_done=None)``. Closed (even on an
    error) before the caller prints anything, so an error line never lands inside the bar."""
    bar = progress(
        total=estimate,
        unit="tok",
        unit_scale=True,
        desc="cache-teacher",
        disable=not enabled,
        dynamic_ncols=True,
    )

    def advance(tokens: int, shards_done: int | None = None) -> None:
        bar.update(tokens)
        if bar.n > bar.total:  # the size estimate (corpus bytes / 3) was low: keep the ETA sane
            bar.total = int(bar.n * 1.1)
        if shards_done is not None:
            bar.set_postfix(shards=shards_done, refresh=False)

    try:
        yield advance
        bar.total = bar.n
    finally:
        bar.close()


@dataclass
class PlanFacts:
    """What the shard plan held, over every shard (computed in this run or before)."""

    positions: int = 0
    trained: int = 0

    def count(self, plan: ShardPlan) -> None:
        self.positions += plan.num_tokens
        masks = plan.loss_masks
        self.trained += plan.num_tokens if masks is None else int(sum(m.sum() for m in masks))

    def summary(self, corpus: dict[str, Any]) -> dict[str, Any]:
        return {
            "corpus_kind": corpus["kind"],
            "packing": corpus["packing"],
            "train_on": corpus["train_on"],
            "trained_positions": self.trained,
            "trained_fraction": self.trained / max(self.positions, 1),
        }


def summarize(
    records: dict[str, Any], already: set[str], stats: CorpusStats, seconds: float, method: str
) -> dict[str, Any]:
    """The facts of the final summary line (also stored as the manifest's ``stats``)."""
    tokens = sum(r.num_tokens for r in records.values())
    computed = sum(r.num_tokens for name, r in records.items() if name not in already)
    nbytes = sum(r.nbytes for r in records.values())
    return {
        "shards": len(records),
        "shards_resumed": len(already),
        "sequences": sum(r.num_sequences for r in records.values()),
        "tokens": tokens,
        "tokens_by_split": {
            split: sum(r.num_tokens for r in records.values() if r.split == split)
            for split in sorted({r.split for r in records.values()})
        },
        "bytes": nbytes,
        "bytes_per_token": nbytes / max(tokens, 1),
        "tokens_computed": computed,
        "seconds": round(seconds, 3),
        "tokens_per_second": computed / max(seconds, 1e-9),
        "documents": stats.documents,
        "empty_documents_skipped": stats.empty_skipped,
        "unparseable_documents_skipped": stats.unparseable_skipped,
        "invalid_utf8_documents_repaired": stats.invalid_utf8_replaced,
        "examples_split": stats.split_examples,
        "examples_skipped_too_long": stats.skipped_too_long,
        "examples_skipped_nothing_to_train": stats.skipped_nothing_to_train,
        "untrained_sequences_dropped": stats.untrained_sequences_dropped,
        "method": method,
    }


def summary_line(f: dict[str, Any], out: str) -> str:
    resumed = f", {f['shards_resumed']} already there" if f["shards_resumed"] else ""
    sampled = ""
    if f.get("sampled_distinct_per_position") is not None:
        scope = " (of this run's positions)" if f["shards_resumed"] else ""
        sampled = (
            f", {f['sampled_distinct_per_position']:.2f} distinct ids per position{scope} "
            f"from {f['samples']} draws"
        )
    trained = ""
    if f.get("trained_fraction", 1.0) < 1.0:
        per_trained = f["bytes"] / max(f["trained_positions"], 1)
        trained = (
            f" ({f['trained_fraction']:.1%} of positions trained, {per_trained:.1f} bytes per "
            "trained position)"
        )
    examples = ""
    if f.get("corpus_kind", "text") != "text" or f.get("examples_split"):
        examples = (
            f"; examples: {f['examples_split']} split, {f['examples_skipped_too_long']} skipped "
            f"as longer than --seq-len, {f['examples_skipped_nothing_to_train']} skipped with "
            f"nothing to train, {f['untrained_sequences_dropped']} sequences without a trained "
            "position dropped"
        )
    memory = ""
    if f.get("peak_host_bytes"):
        memory = f", peak memory: host {format_size(f['peak_host_bytes'])}"
        if f.get("peak_device_bytes") is not None:
            memory += f", GPU {format_size(f['peak_device_bytes'])}"
    return (
        f"cache-teacher: {f['sequences']:,} sequences, {f['tokens']:,} tokens, "
        f"{f['shards']} shards{resumed}, {f['bytes_per_token']:.1f} bytes/token{trained}{sampled}, "
        f"{f['seconds']:.1f} s, {f['tokens_per_second']:,.0f} tokens/s{memory}, skipped documents: "
        f"{f['empty_documents_skipped']} empty, {f['unparseable_documents_skipped']} unparseable "
        f"({f['invalid_utf8_documents_repaired']} with invalid UTF-8 repaired){examples} -> {out}"
    )
