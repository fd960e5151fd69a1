"""The epoch order (a function of seed and epoch alone) and the deal of stream positions to ranks."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from kdcache.pipeline.distill.epoch_order import Deal, epoch_order

COUNTS = [7, 0, 3, 12, 5]  # uneven shards, one empty
N = sum(COUNTS)


def test_each_epoch_is_a_seeded_permutation_that_changes_every_epoch() -> None:
    orders = [epoch_order(COUNTS, seed=4, epoch=e, shuffle=True, window=6) for e in range(3)]
    for order in orders:
        assert order.dtype == np.int64 and sorted(order.tolist()) == list(range(N))
    assert orders[0].tolist() != orders[1].tolist() != orders[2].tolist()
    again = epoch_order(COUNTS, seed=4, epoch=1, shuffle=True, window=6)
    assert again.tolist() == orders[1].tolist()
    assert epoch_order(COUNTS, seed=5, epoch=1, shuffle=True, window=6).tolist() != again.tolist()
    stored = epoch_order(COUNTS, seed=4, epoch=1, shuffle=False, window=6)
    assert stored.tolist() == list(range(N))


def test_without_a_window_shards_stay_in_runs() -> None:
    # window 1: each shard's sequences are contiguous (what lets a reader decode a shard once)
    order = epoch_order(COUNTS, seed=0, epoch=0, shuffle=True, window=1)
    starts = np.cumsum([0, *COUNTS])
    shard = np.searchsorted(starts, order, side="right") - 1
    runs = [int(s) for i, s in enumerate(shard) if i == 0 or s != shard[i - 1]]
    assert sorted(runs) == [i for i, c in enumerate(COUNTS) if c]  # each shard one run


@pytest.mark.parametrize(("ranks", "batch"), [(1, 4), (2, 5), (3, 3), (4, 6), (2, 7)])
@pytest.mark.parametrize("rows", [True, False])
def test_ranks_partition_the_stream_from_any_start(ranks: int, batch: int, rows: bool) -> None:
    for start in (0, 2 * batch * ranks, 3 * batch * ranks + 1):  # resume points, one mid-batch
        first, stop = start, 5 * batch * ranks + 3
        owners: Counter[int] = Counter()
        for rank in range(ranks):
            deal = Deal(batch, rank, ranks, rows=rows)
            pos = deal.positions(first, stop)
            assert (np.diff(pos) > 0).all()
            owners.update(pos.tolist())
            # each rank reads its rows of its micro-batches only
            assert all(rows or (p // batch) % ranks == rank for p in pos.tolist())
            lo, hi = deal.span
            assert all(lo <= p % batch < hi for p in pos.tolist())
        assert owners == Counter(range(first, stop))  # every position once


def test_rows_split_every_micro_batch_and_need_a_row_per_rank() -> None:
    spans = [Deal(7, r, 3).span for r in range(3)]
    assert spans == [(0, 3), (3, 5), (5, 7)]  # the first 7 % 3 ranks one row more
    assert Deal(7, 1, 3).consumed_after(4) == 35
    assert Deal(7, 1, 3, rows=False).consumed_after(4) == 42  # the end of the round 3..5
    with pytest.raises(ValueError, match="cannot be split over 3 ranks"):
        Deal(2, 0, 3)
