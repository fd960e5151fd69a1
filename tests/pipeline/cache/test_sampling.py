"""Sampled targets: the counter-based uniforms, inverse-CDF draws, distinct ids with counts,
the ragged layout, and the exact tail mass of the top-k — against independent references."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kdcache.pipeline.cache.sampling import (
    distinct_counts,
    draw,
    fmix32,
    position_keys,
    uniforms,
)
from kdcache.pipeline.cache.targets import TargetSpec, chunked_targets
from kdcache.pipeline.logit_head import default_chunk_tokens

Z_999 = 3.090  # upper 0.1 % point of the standard normal: every test below fails by chance 1/1000


def chi2_critical(df: int, z: float = Z_999) -> float:
    """Upper critical value of chi-square(df) (Wilson–Hilferty; within 1 % for df >= 3)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def ks_critical(n: int, alpha: float = 1e-3) -> float:
    """Kolmogorov–Smirnov critical distance for n samples (asymptotic)."""
    return math.sqrt(-math.log(alpha / 2) / 2) / math.sqrt(n)


def chi2(observed: np.ndarray, expected: np.ndarray) -> float:
    return float(((observed - expected) ** 2 / expected).sum())


def reference_fmix32(h: int) -> int:
    """murmur3's finalizer on Python integers (no tensor arithmetic)."""
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & 0xFFFFFFFF
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & 0xFFFFFFFF
    return h ^ (h >> 16)


def random_keys(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 1 << 32, (n, 4), generator=g, dtype=torch.int64)  # (n, 4)


def test_fmix32_is_exact_32_bit_arithmetic() -> None:
    """The int64 tensor version (16-bit split multiplies) equals big-integer arithmetic, so the
    result cannot depend on the device's int64 overflow behaviour."""
    values = torch.cat([torch.tensor([0, 1, 0xFFFFFFFF, 0x80000000]), random_keys(2000)[:, 0]])
    assert fmix32(values).tolist() == [reference_fmix32(int(v)) for v in values]
    if torch.cuda.is_available():
        keys = random_keys(500)
        assert torch.equal(uniforms(7, keys.cuda(), 16).cpu(), uniforms(7, keys, 16))


def test_uniforms_look_uniform() -> None:
    u = uniforms(0, random_keys(4000), 32).numpy()  # (4000, 32): 128 000 numbers
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    flat = np.sort(u.ravel())
    n = flat.size
    ks = np.maximum(np.arange(1, n + 1) / n - flat, flat - np.arange(n) / n).max()
    assert ks < ks_critical(n), ks
    # both 32-bit halves: the top 8 bits and the lowest 8 of the 53 bits, 256 bins each
    bits = (u * 2.0**53).astype(np.int64)
    for byte in (bits >> 45, bits & 0xFF):
        observed = np.bincount(byte.ravel(), minlength=256)
        assert chi2(observed, np.full(256, n / 256)) < chi2_critical(255)
    # draws of one position are independent: consecutive j uncorrelated
    r = np.corrcoef(u[:, :-1].ravel(), u[:, 1:].ravel())[0, 1]
    assert abs(r) < Z_999 / math.sqrt(n)


@pytest.mark.parametrize("word", [0, 1, 2, 3])
def test_neighbouring_keys_give_unrelated_numbers(word: int) -> None:
    keys = random_keys(20_000, seed=1) >> 1  # room to add 1
    neighbours = keys.clone()
    neighbours[:, word] += 1
    a, b = uniforms(3, keys, 2), uniforms(3, neighbours, 2)  # (n, 2)
    assert not (a == b).any()
    n = a.numel()
    r = np.corrcoef(a.ravel().numpy(), b.ravel().numpy())[0, 1]
    assert abs(r) < Z_999 / math.sqrt(n)
    # and the small keys of real runs (shard 0, sequence 0, t = 0, 1, 2, ...) are all different
    small = position_keys("train", 0, [0], 4096, torch.device("cpu")).reshape(-1, 4)
    assert torch.unique(uniforms(0, small, 4)).numel() == 4096 * 4


def test_uniforms_are_a_pure_function_of_seed_key_and_draw_index() -> None:
    keys = random_keys(64)
    full = uniforms(5, keys, 16)
    assert torch.equal(uniforms(5, keys[10:11], 16), full[10:11])  # alone or in a batch
    assert torch.equal(uniforms(5, keys, 4), full[:, :4])  # draw j does not depend on N
    assert torch.equal(uniforms(5, keys.flip(0), 16), full.flip(0))
    assert not torch.equal(uniforms(6, keys, 16), full)  # the seed matters
    assert not torch.equal(uniforms(5 + (1 << 32), keys, 16), full)  # all 64 bits of it
    keys_eval = keys.clone()
    keys_eval[:, 0] = 1
    assert not (uniforms(5, keys_eval, 16) == full).any()


def test_position_keys_name_split_shard_sequence_and_position() -> None:
    keys = position_keys("eval", 7, [4, 5], 3, torch.device("cpu"))  # (2, 3, 4)
    assert keys.shape == (2, 3, 4) and keys.dtype == torch.int64
    assert keys[1, 2].tolist() == [1, 7, 5, 2]
    assert keys[0, 0].tolist() == [1, 7, 4, 0]


def test_draw_frequencies_match_the_softmax() -> None:
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -1.5, 0.3, 0.7, -0.2, 1.2])
    probs = torch.softmax(logits.double(), 0).numpy()
    positions, n = 4000, 32
    logprobs = torch.log_softmax(logits, 0).expand(positions, -1).contiguous()  # (P, V)
    cdf = torch.empty(logprobs.shape, dtype=torch.float64)
    ids = draw(logprobs, uniforms(11, random_keys(positions, seed=2), n), cdf)  # (P, N)
    observed = np.bincount(ids.ravel().numpy(), minlength=len(logits))
    statistic = chi2(observed, probs * positions * n)
    assert statistic < chi2_critical(len(logits) - 1), (statistic, observed)


def test_zero_probability_ids_are_never_drawn() -> None:
    vocab = 50
    logits = torch.randn(300, vocab, generator=torch.Generator().manual_seed(4))
    banned = torch.zeros(vocab, dtype=torch.bool)
    banned[[0, 1, 17, 18, 19, vocab - 2, vocab - 1]] = True  # first, inner runs, last
    logits[:, banned] = float("-inf")
    logits[:5, :] = float("-inf")
    logits[:5, 25] = 0.0  # a row with one possible id
    logprobs = torch.log_softmax(logits, -1)
    ids = draw(logprobs, uniforms(0, random_keys(300), 256), torch.empty(300, vocab).double())
    assert not banned[ids].any()
    assert (ids[:5] == 25).all()
    # u at the very ends of [0, 1) still lands on possible ids
    extremes = torch.tensor([[0.0, 1 - 2.0**-53]], dtype=torch.float64).expand(300, -1)
    ends = draw(logprobs, extremes, torch.empty(300, vocab).double())
    assert not banned[ends].any()


def test_distinct_counts_equal_numpy_unique() -> None:
    ids = torch.randint(0, 9, (200, 32), generator=torch.Generator().manual_seed(5))
    distinct, unique, counts = distinct_counts(ids)
    assert (counts.sum(-1) == 32).all()
    for row in range(200):
        values, expected = np.unique(ids[row].numpy(), return_counts=True)
        d = int(distinct[row])
        assert d == len(values)
        assert unique[row, :d].tolist() == values.tolist()
        assert counts[row, :d].tolist() == expected.tolist()
        assert (counts[row, d:] == 0).all()


def _ragged(out) -> list[tuple[list[int], list[int], list[float]]]:
    """Per row: (ids, counts, logprobs) from the ragged buffers."""
    offsets = np.concatenate([[0], np.cumsum(out.sampled_distinct.numpy())])
    return [
        (
            out.sampled_ids[lo:hi].tolist(),
            out.sampled_counts[lo:hi].tolist(),
            out.sampled_logprobs[lo:hi].tolist(),
        )
        for lo, hi in zip(offsets[:-1], offsets[1:], strict=True)
    ]


def test_chunked_samples_do_not_depend_on_the_chunking() -> None:
    logits = torch.randn(37, 64, generator=torch.Generator().manual_seed(6)) * 3  # (R, V)
    keys = random_keys(37, seed=3)
    spec = TargetSpec(top_k=4, samples=16, seed=9)
    runs = [chunked_targets(logits, lambda x: x, spec, chunk, keys=keys) for chunk in (1, 5, 37)]
    reference = _ragged(runs[0])
    full = torch.log_softmax(logits, -1)
    for row, (ids, counts, lps) in enumerate(reference):
        assert sum(counts) == 16 and ids == sorted(set(ids))
        assert lps == full[row, ids].tolist()  # the log-softmax's own values, bit for bit
    for out in runs[1:]:
        assert _ragged(out) == reference
        assert torch.equal(out.topk_ids, runs[0].topk_ids)
        assert torch.equal(out.topk_tail_logprob, runs[0].topk_tail_logprob)
    assert int(runs[0].filled) == int(runs[0].sampled_distinct.sum())


def test_tail_logprob_is_the_exact_mass_outside_the_top_k() -> None:
    g = torch.Generator().manual_seed(7)
    logits = torch.randn(20, 300, generator=g) * 4  # (R, V)
    logits[0, :8] = 60.0  # a tail of ~1e-23: log(1 - sum exp(top-k)) would give log(0)
    logits[1, 100:] = float("-inf")  # ids of probability 0 are in no mass
    out = chunked_targets(logits, lambda x: x, TargetSpec(top_k=8), 6)
    full = torch.log_softmax(logits.double(), -1)  # (R, V) float64
    outside = full.scatter(-1, out.topk_ids.long(), float("-inf"))
    expected = torch.logsumexp(outside, -1)  # (R,)
    torch.testing.assert_close(out.topk_tail_logprob.double(), expected, atol=2e-5, rtol=1e-6)
    assert out.topk_tail_logprob[0] < -40
    everything = chunked_targets(logits, lambda x: x, TargetSpec(top_k=300), 6)
    assert torch.isneginf(everything.topk_tail_logprob).all()


def test_the_chunk_budget_counts_the_float64_cdf_and_the_draws() -> None:
    plain = default_chunk_tokens(32000)
    assert default_chunk_tokens(32000, cdf=True) == plain // 2  # 8 -> 16 bytes per entry
    assert default_chunk_tokens(32000, cdf=True, row_bytes=96 * 65535) < plain // 3
