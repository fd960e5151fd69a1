"""Sampled teacher targets: N draws per position from the full-vocabulary softmax at the store's
sample temperature, kept as distinct ids with counts (an unbiased estimate of that tempered
teacher; docs/architecture.md §3).

Draws are deterministic per position. Draw j of the position with key (split, shard index,
sequence index in the shard, t) uses a uniform number that is a counter-based hash of
(seed, key, j): murmur3's 32-bit finalizer on int64 tensors, with every 32x32-bit multiply split
into 16-bit halves so that no int64 product overflows. The same integer ops run on any device,
so the numbers are the same on CPU and CUDA, for any batch, any number of processes, and after a
kill and resume. Inverse-CDF sampling over a float64 cumulative sum then turns them into ids.

Everything runs on the device, vectorized over rows: no Python loop over rows, no host sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

SPLIT_CODES = {"train": 0, "eval": 1}
_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # added between rounds: no all-zero fixed point
_STREAMS = (0x243F6A88, 0x85A308D3)  # two independent hash chains -> 2 x 32 bits per draw
_BYTES_PER_DRAW = 96  # peak (C, N) scratch per draw: hash words, uniforms, ids, sort, runs


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for 32-bit values in int64 lanes, without int64 overflow."""
    low, high = constant & 0xFFFF, constant >> 16
    # x * high < 2**48; only its low 16 bits survive the shift by 16 modulo 2**32
    return (x * low + ((x * high) & 0xFFFF) * 0x10000) & _MASK32


def fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finalizer: a bijection on 32-bit values with full avalanche (int64 lanes)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def _absorb(h: torch.Tensor, word: torch.Tensor | int) -> torch.Tensor:
    """One round of the hash chain: the state (32-bit, int64 lanes) takes in a 32-bit word."""
    return fmix32(((h ^ word) + _GOLDEN) & _MASK32)


def position_states(seed: int, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two hash chains' states after (seed, key) for every row.

    Args:
        seed: 0 <= seed < 2**64.
        keys: (C, 4) int64 position keys (split code, shard index, sequence in shard, t), each
            word in [0, 2**32).

    Returns:
        two (C,) int64 tensors of 32-bit states.
    """
    states = []
    for stream in _STREAMS:
        h = torch.full(keys.shape[:1], stream, dtype=torch.int64, device=keys.device)  # (C,)
        h = _absorb(_absorb(h, seed & _MASK32), (seed >> 32) & _MASK32)
        for word in keys.unbind(-1):  # 4 x (C,); masked: a larger word must not overflow
            h = _absorb(h, word & _MASK32)
        states.append(h)
    return states[0], states[1]


def uniforms(seed: int, keys: torch.Tensor, samples: int) -> torch.Tensor:
    """Uniform numbers in [0, 1) for draws j = 0..N-1 of each row: a pure function of
    (seed, key, j), identical on every device.

    Args:
        seed: 0 <= seed < 2**64.
        keys: (C, 4) int64 position keys (see ``position_states``).
        samples: N.

    Returns:
        (C, N) float64, multiples of 2**-53.
    """
    first, second = position_states(seed, keys)  # (C,) each
    j = torch.arange(samples, dtype=torch.int64, device=keys.device)  # (N,)
    high = _absorb(first[:, None], j) >> 5  # (C, N) 27 bits
    low = _absorb(second[:, None], j) >> 6  # (C, N) 26 bits
    return (high * (1 << 26) + low).to(torch.float64) * 2.0**-53  # exact: < 2**53


def position_keys(
    split: str, shard: int, sequences: Sequence[int], seq_len: int, device: torch.device
) -> torch.Tensor:
    """Keys of a batch of sequences of one shard: (B, S, 4) int64 (split code, shard index,
    sequence index in the shard, position t); ``sequences`` are the B indices in the shard."""
    keys = torch.empty((len(sequences), seq_len, 4), dtype=torch.int64, device=device)
    keys[..., 0] = SPLIT_CODES[split]
    keys[..., 1] = shard
    keys[..., 2] = torch.tensor(list(sequences), dtype=torch.int64, device=device)[:, None]
    keys[..., 3] = torch.arange(seq_len, device=device)
    return keys


def draw(
    logprobs: torch.Tensor, u: torch.Tensor, cdf: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Inverse-CDF sampling: the first id whose cumulative probability exceeds u * total.

    Args:
        logprobs: (C, V) float32 log-softmax rows.
        u: (C, N) float64 uniforms in [0, 1).
        cdf: (C, V) float64 scratch, overwritten with the rows' cumulative probabilities.
        temperature: T > 0: draw from ``p^(1/T)``, normalized (the tempered teacher).

    Returns:
        (C, N) int64 ids. An id of probability 0 is never drawn: its cdf equals the one before.
    """
    cdf.copy_(logprobs)  # (C, V), in place from here on: no vocab-wide temporary
    if temperature != 1.0:  # exp((l − max l) / T): the total cannot underflow, even for small T
        cdf.sub_(cdf.amax(-1, keepdim=True)).div_(temperature)
    cdf.exp_().cumsum_(-1)
    threshold = u * cdf[:, -1:]  # (C, N) in [0, total): u < 1 and float64 rounding keeps it below
    ids = torch.searchsorted(cdf, threshold, right=True)  # (C, N)
    return ids.clamp_(max=cdf.shape[-1] - 1)


def distinct_counts(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's distinct ids (ascending) and how often each occurs, left-aligned.

    Args:
        ids: (C, N) int64 draws.

    Returns:
        distinct (C,) int64; unique (C, N) int64 and counts (C, N) int64 whose first
        ``distinct[c]`` entries of row c hold the distinct ids and their counts, the rest 0.
    """
    ordered = ids.sort(dim=-1).values  # (C, N)
    starts = torch.ones_like(ordered, dtype=torch.bool)  # (C, N) first draw of each run
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    run = starts.long().cumsum_(-1) - 1  # (C, N) which distinct id a draw belongs to
    unique = torch.zeros_like(ordered).scatter_(-1, run, ordered)  # a run writes one value
    counts = torch.zeros_like(ordered).scatter_add_(-1, run, torch.ones_like(ordered))
    return run[:, -1] + 1, unique, counts


def scratch_bytes_per_row(samples: int) -> int:
    """Bytes of (C, N) scratch one row's draws take (for the chunk budget)."""
    return samples * _BYTES_PER_DRAW
