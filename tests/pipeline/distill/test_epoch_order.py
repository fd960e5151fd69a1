"""The epoch order: shuffle-buffer emission and per-slot plans that partition a split."""

from __future__ import annotations

import numpy as np

from kdcache.pipeline.distill.epoch_order import buffer_order, plan_slot


def test_buffer_order_and_plans_are_permutations() -> None:
    rng = np.random.default_rng(0)
    order = buffer_order(100, 10, rng)
    assert sorted(order.tolist()) == list(range(100)) and order.tolist() != list(range(100))
    assert buffer_order(5, 1, rng).tolist() == list(range(5))
    counts = [4, 0, 7, 3]
    items = set()
    for slot in range(3):
        plan = plan_slot(counts, seed=0, epoch=2, slot=slot, slots=3, shuffle=True, buffer_size=4)
        assert sorted(plan.order.tolist()) == list(range(len(plan.items)))
        items |= {(plan.shards[p], s) for p, s in plan.items.tolist()}
    assert items == {(shard, s) for shard, n in enumerate(counts) for s in range(n)}
