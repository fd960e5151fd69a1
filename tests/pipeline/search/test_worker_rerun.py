"""A worker that has run out of candidates still takes the rerun of another worker's dead one.

Two real SearchWorkers share one journal study (in-process, so the interleaving is exact);
worker B takes a candidate and goes silent, worker A takes the other, finds nothing left to
ask, and must then pick up B's candidate once it is stale instead of waiting for it forever.
"""

from __future__ import annotations

import time
from pathlib import Path

from accelerate import Accelerator

from kdcache.pipeline.search.search_worker import SearchWorker
from kdcache.pipeline.search.sweep_config import load_sweep_config

SWEEP = """\
base: tiny
budget: {steps: 4}
batch_size: 2
search:
  hidden_size: [32, 48]
baseline: false
"""
STALE_AFTER = 0.6  # s


def test_a_worker_done_asking_reruns_a_stale_candidate(tmp_path: Path) -> None:
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    config = load_sweep_config(tmp_path / "sweep.yaml")
    assert len(config.candidates) == 2
    url = str(tmp_path / "study.journal")
    plan = {"steps": 4, "seq_len": 16}

    def worker(name: str) -> SearchWorker:
        out = tmp_path / name
        out.mkdir()
        accelerator = Accelerator(cpu=True)
        return SearchWorker(config, out, url, "s", plan, accelerator, STALE_AFTER, lambda c: c)

    def same(candidate: object) -> int:
        return 0  # one reading for all

    b, a = worker("b"), worker("a")
    try:
        (taken_by_b,) = b.next_group(1, same) or []
        b.heartbeat.close()  # B dies: its trial stops being stamped
        (taken_by_a,) = a.next_group(1, same) or []
        assert taken_by_a.name != taken_by_b.name
        assert a.next_group(1, same) == []  # nothing left to ask; B's still runs: wait
        assert a.done_asking
        time.sleep(2 * STALE_AFTER)
        rerun = a.next_group(1, same)
        assert rerun is not None and [c.name for c in rerun] == [taken_by_b.name]
    finally:
        a.close()
