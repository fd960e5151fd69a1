"""Bits per byte and per character: a batch's text spans (token_bytes, token_chars), the
student's and the stored teacher's cross-entropy over the bytes the predicted tokens spell."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from kdcache.pipeline.distill.batches import collate, token_sizes
from kdcache.pipeline.distill.evaluation import evaluate

V, K = 30, 4
TEXTS = ["héllo wörld ✓", "ab≈c"]
# each token's end byte: "é" (2 bytes) and "✓" (3) split across tokens in the first text
ENDS = [[0, 1, 2, 4, 6, 9, 13, 15, 17], [1, 2, 5, 6]]


class FixedLogits(torch.nn.Module):
    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = logits

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits)


def sequences(seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    out = []
    for text, ends in zip(TEXTS, ENDS, strict=True):
        n = len(ends)
        realized = -rng.random(n).astype(np.float32) * 3
        realized[-1] = np.nan  # no next token after the last
        out.append({
            "tokens": rng.integers(0, V, n).astype(np.int32),
            "topk_ids": rng.integers(0, V, (n, K)).astype(np.uint16),
            "topk_logprobs": np.sort(np.log(rng.dirichlet(np.ones(K + 1), n)[:, :K]), -1)[:, ::-1]
            .astype(np.float16),
            "text": text.encode(),
            "token_ends": np.asarray(ends, np.int32),
            "next_token_logprob": realized,
        })  # fmt: skip
    return out


def test_token_sizes_count_each_tokens_bytes_and_the_characters_starting_in_it() -> None:
    text_bytes, chars = token_sizes(sequences()[0])
    assert text_bytes.sum() == len(TEXTS[0].encode()) and chars.sum() == len(TEXTS[0])
    # "é" is bytes 1-2: its first byte is in token 2 (ends 2), its second in token 3 (ends 4)
    assert text_bytes.tolist() == [0, 1, 1, 2, 2, 3, 4, 2, 2]
    assert chars.tolist()[:4] == [0, 1, 1, 1]
    bad = {**sequences()[0], "token_ends": np.asarray([0, 40], np.int32)}
    with pytest.raises(ValueError, match="token spans"):
        token_sizes(bad)


def test_bits_per_byte_is_the_summed_ce_in_bits_over_the_predicted_tokens_bytes() -> None:
    seqs = sequences()
    batch = collate(seqs)
    assert batch["token_bytes"].dtype == torch.int32
    assert batch["token_bytes"][1, 4:].eq(0).all()  # padding spells nothing
    assert batch["next_token_logprob"].isfinite().all()
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=g)
    metrics = evaluate(FixedLogits(logits), [batch])
    nats = byte_count = chars = teacher = 0.0
    for i, seq in enumerate(seqs):
        sizes, characters = token_sizes(seq)
        log_s = torch.log_softmax(logits[i].double(), -1)
        for t in range(len(seq["tokens"]) - 1):  # position t predicts token t + 1
            nats -= float(log_s[t, int(seq["tokens"][t + 1])])
            byte_count += sizes[t + 1]
            chars += characters[t + 1]
            teacher -= float(seq["next_token_logprob"][t])
    assert metrics["bits_per_byte"] == pytest.approx(nats / math.log(2) / byte_count, rel=1e-6)
    assert metrics["bits_per_char"] == pytest.approx(nats / math.log(2) / chars, rel=1e-6)
    assert metrics["teacher_bits_per_byte"] == pytest.approx(
        teacher / math.log(2) / byte_count, rel=1e-5
    )
    # summed over two "ranks" (the same sums twice): the same ratios
    doubled = evaluate(FixedLogits(logits), [batch], sum_ranks=lambda sums: 2 * sums)
    assert doubled["bits_per_byte"] == pytest.approx(metrics["bits_per_byte"], rel=1e-12)


def test_a_store_without_spans_reports_no_bits_per_byte() -> None:
    seqs = [{k: v for k, v in s.items() if k not in ("text", "token_ends")} for s in sequences()]
    batch = collate(seqs)
    assert "token_bytes" not in batch
    logits = torch.randn(*batch["input_ids"].shape, V)
    metrics = evaluate(FixedLogits(logits), [batch])
    assert "bits_per_byte" not in metrics and "cross_entropy" in metrics


def test_the_leaderboard_ranks_by_bits_per_byte_when_tokenizers_differ(tmp_path) -> None:
    from kdcache.pipeline.search.leaderboard import pareto_front, ranking_metric, write_leaderboard

    rows = [
        {"candidate": "a", "parameters": 10, "non_embedding_parameters": 5, "tokens_seen": 1,
         "eval_cross_entropy": 2.0, "eval_bits_per_byte": 1.5, "ece": 0.1, "tokenizer": "x"},
        {"candidate": "b", "parameters": 20, "non_embedding_parameters": 5, "tokens_seen": 1,
         "eval_cross_entropy": 3.0, "eval_bits_per_byte": 1.0, "ece": 0.1, "tokenizer": "y"},
    ]  # fmt: skip
    assert ranking_metric(rows) == "eval_bits_per_byte"
    assert [r["candidate"] for r in pareto_front(rows)] == ["a", "b"]
    write_leaderboard(rows, tmp_path)
    table = (tmp_path / "leaderboard.md").read_text().splitlines()
    assert table[2].startswith("| 1 | b |") and "eval_bits_per_byte" in table[0]
    same = [{**r, "tokenizer": "x"} for r in rows]
    assert ranking_metric(same) == "eval_cross_entropy"
    with pytest.raises(ValueError, match="bits per byte"):
        ranking_metric([rows[0], {k: v for k, v in rows[1].items() if k != "eval_bits_per_byte"}])
