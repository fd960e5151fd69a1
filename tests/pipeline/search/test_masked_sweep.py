"""`kdcache sweep` on a store with a loss mask and a padded teacher vocabulary: candidates on the
tokenizer's size, trained and ranked on the trained positions only."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_VOCAB
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cli import main
from kdcache.storage import create_store, make_manifest, open_store

SWEEP = """
base: tiny
seed: 2
budget: {steps: 3}
batch_size: 4
eval_batches: 2
search:
  num_hidden_layers: [1, 2]
"""
LENGTH = 20


def write_masked_store(url: str, tokenizer_dir: Path) -> str:
    """A masked top-k store (v3) of random sequences: the first quarter of each untrained, then
    holes; the teacher embeds 64 padded rows beyond the 512-id tokenizer."""
    rng = np.random.default_rng(0)
    manifest = make_manifest(
        backend="zarr",
        teacher={
            "name": "synthetic",
            "sha256": "0" * 64,
            "dtype": "float32",
            "architecture": "none",
        },
        tokenizer={"name": "tiny-bpe", "size": TINY_VOCAB},
        vocab_size=TINY_VOCAB + 64,
        top_k=8,
        seq_len=LENGTH,
        corpus={"spec": "synthetic", "fingerprint": "0", "eval_fraction": 0.0},
        shard_tokens=10_000,
        loss_mask=True,
    )
    writer = create_store(url, manifest)
    writer.write_tokenizer({p.name: p.read_bytes() for p in tokenizer_dir.iterdir() if p.is_file()})
    for split, count in (("train", 12), ("eval", 8)):  # eval: 2 batches of 4, all evaluated
        with writer.open_shard(split, 0) as shard:
            for _ in range(count):
                tokens = rng.integers(0, TINY_VOCAB, LENGTH)
                mask = rng.random(LENGTH) < 0.6
                mask[: LENGTH // 4], mask[-3] = False, True
                logits = rng.normal(size=(int(mask.sum()), TINY_VOCAB))  # (T, V)
                logits[np.arange(len(logits)), (3 * tokens[mask] + 1) % TINY_VOCAB] += 5.0
                logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
                ids = np.argsort(-logprobs, axis=-1)[:, :8]
                top = np.take_along_axis(logprobs, ids, -1)
                shard.append(tokens, topk_ids=ids, topk_logprobs=top, loss_mask=mask)
    writer.mark_finished({})  # a complete store (the sweep refuses an unfinished one)
    return url


def trained_cross_entropy(model: torch.nn.Module, store: str) -> float:
    """Mean CE over the eval split's trained positions that have a next token, by hand."""
    total, count = 0.0, 0
    for seq in open_store(store).iter_sequences("eval"):
        ids = torch.as_tensor(seq.tokens, dtype=torch.long)
        positions = [t for t in np.flatnonzero(seq.loss_mask) if t + 1 < len(ids)]
        with torch.no_grad():
            log_s = torch.log_softmax(model(input_ids=ids[None]).logits[0].double(), -1)
        total -= float(log_s[positions, ids[[t + 1 for t in positions]]].sum())
        count += len(positions)
    return total / count


def test_a_masked_store_sweeps_on_its_trained_positions(
    tmp_path: Path, tiny_tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = write_masked_store(str(tmp_path / "store"), tiny_tokenizer_dir)
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    out = tmp_path / "out"
    argv = ["sweep", "--store", store, "--config", str(config), "--out", str(out)]
    try:
        main([*argv, "--threads", "1", "--together", "2", "--workers", "0"])
    except SystemExit as e:
        assert not e.code, capsys.readouterr().err
    with (out / "leaderboard.csv").open() as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"l1", "l2"}
    assert "trained_tokens_seen" in (out / "leaderboard.md").read_text()
    for name, row in rows.items():
        assert 0 < int(row["trained_tokens_seen"]) < int(row["tokens_seen"]) == 3 * 4 * LENGTH
        model = AutoModelForCausalLM.from_pretrained(out / "candidates" / name)
        assert model.config.vocab_size == TINY_VOCAB  # the tokenizer's size, not the store's 576
        want = trained_cross_entropy(model, store)
        assert float(row["eval_cross_entropy"]) == pytest.approx(want, rel=1e-4), name
