"""Two writers of one shard (a resubmitted job, a pod not yet dead) race: exactly one commits,
the committed data is the winner's and stays whole, the loser raises ShardExists and leaves
nothing behind — locally and on a real S3 API (moto's server), over many rounds; stale attempts
are cleaned, live and committed ones never (docs/architecture.md §3)."""

from __future__ import annotations

import os
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
from test_store import make_sequence

from kdcache.storage import ShardExists, create_store, make_manifest, open_store
from kdcache.storage._base import STALE_ATTEMPT_SECONDS, data_name
from kdcache.storage._fs import StoreFS

VOCAB = 1000
# rounds stop by themselves: at ROUNDS, or after SECONDS (KDCACHE_RACE_SECONDS raises it for a
# long soak, e.g. 600: thousands of rounds)
ROUNDS = 5000
SECONDS = float(os.environ.get("KDCACHE_RACE_SECONDS", "8"))
# at least this many rounds whatever the time takes (a loaded machine runs fewer per second)
MIN_ROUNDS = {"local": 50, "s3": 10}


def manifest(backend: str) -> dict:
    return make_manifest(
        backend=backend, teacher={"name": "t"}, tokenizer={}, vocab_size=VOCAB, top_k=8,
        seq_len=32, corpus={}, shard_tokens=10_000,
    )  # fmt: skip


def race(url: str, backend: str, index: int, seed: int) -> tuple[int, list[BaseException]]:
    """Two writers of shard ``train-<index>`` commit at once (after both checked that no record
    exists): (which one committed, the errors raised)."""
    barrier = threading.Barrier(2)
    errors: list[BaseException] = []
    won: list[int] = []

    def write(who: int) -> None:
        rng = np.random.default_rng(seed * 2 + who)
        writer = create_store(url, manifest(backend))  # the store exists: opened to append
        shard = writer.open_shard("train", index)
        for n in (3 + who, 5):
            shard.append(*make_sequence(rng, n, VOCAB))
        barrier.wait()
        try:
            shard.commit()
            won.append(who)
        except BaseException as e:  # noqa: BLE001 - collected for the assertions
            errors.append(e)

    threads = [threading.Thread(target=write, args=(who,)) for who in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1, (won, errors)
    return won[0], errors


def check_round(url: str, index: int, seed: int, winner: int, errors: list[BaseException]) -> None:
    assert len(errors) == 1 and isinstance(errors[0], ShardExists), errors
    store = open_store(url)
    record = store.shards_of("train")[-1]
    assert record.name == f"train-{index:05d}"
    arrays = store.read_shard(record)  # checksums verified: whole, and the winner's
    rng = np.random.default_rng(seed * 2 + winner)
    want = [make_sequence(rng, n, VOCAB) for n in (3 + winner, 5)]
    assert [s.tokens.tolist() for s in arrays] == [w[0].tolist() for w in want]
    left = [
        e for e in StoreFS(url).list_names("shards")
        if (found := data_name(e)) and found[0] == record.name and f"shards/{e}" != record.path
    ]  # fmt: skip
    assert left == [], "the loser's attempt was left behind"


@pytest.mark.parametrize("backend", ["zarr", "arrow"])
def test_two_writers_racing_on_the_same_shards_locally(tmp_path: Path, backend: str) -> None:
    url = str(tmp_path / "store")
    create_store(url, manifest(backend))
    deadline, rounds = time.monotonic() + SECONDS, 0
    while rounds < MIN_ROUNDS["local"] or (rounds < ROUNDS and time.monotonic() < deadline):
        winner, errors = race(url, backend, rounds, rounds)
        check_round(url, rounds, rounds, winner, errors)
        rounds += 1
    assert len(open_store(url).shards) == rounds


def test_two_writers_racing_on_the_same_shards_on_s3(s3_bucket: str) -> None:
    url = f"{s3_bucket}/store-{uuid.uuid4().hex[:6]}"
    create_store(url, manifest("zarr"))
    deadline, rounds = time.monotonic() + SECONDS, 0
    while rounds < MIN_ROUNDS["s3"] or (rounds < ROUNDS and time.monotonic() < deadline):
        winner, errors = race(url, "zarr", rounds, rounds)
        check_round(url, rounds, rounds, winner, errors)
        rounds += 1


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_commit_record_is_created_only_if_absent(
    where: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = str(tmp_path / "fs") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/x"
    fs = StoreFS(url)
    assert fs.create_exclusive("shards/train-00000.json", b"first")
    assert not fs.create_exclusive("shards/train-00000.json", b"second")
    assert fs.read("shards/train-00000.json") == b"first"


def test_stale_attempts_are_cleaned_live_and_committed_ones_never(tmp_path: Path) -> None:
    url = str(tmp_path / "store")
    writer = create_store(url, manifest("zarr"))
    rng = np.random.default_rng(0)
    with writer.open_shard("train", 0) as shard:
        shard.append(*make_sequence(rng, 4, VOCAB))
    committed = open_store(url).shards[0].path
    fs = StoreFS(url)
    old = f"{int(time.time()) - STALE_ATTEMPT_SECONDS - 60:08x}{uuid.uuid4().hex[:8]}"
    live = f"{int(time.time()):08x}{uuid.uuid4().hex[:8]}"
    for attempt in (old, live):  # a dead writer's, and one a live writer may commit any moment
        fs.write_tree(f"shards/train-00001.{attempt}.zarr", {"zarr.json": b"{}"})
    fs.write_tree(f"shards/train-00000.{old}.zarr", {"zarr.json": b"{}"})  # a loser's, then died
    writer.open_shard("train", 1).abort()  # opening a shard cleans its stale attempts only
    names = set(fs.list_names("shards"))
    assert f"train-00001.{old}.zarr" not in names and f"train-00001.{live}.zarr" in names
    assert committed.rsplit("/", 1)[-1] in names
    # the one-writer maintenance: also every attempt a record does not name
    assert writer.clean_temporaries() == 1 + 0  # the dead loser's attempt of train-00000
    names = set(fs.list_names("shards"))
    assert f"train-00000.{old}.zarr" not in names and committed.rsplit("/", 1)[-1] in names
    assert open_store(url).read_shard(open_store(url).shards[0]).num_sequences == 1


def test_only_the_servers_412_answer_reads_as_a_lost_race() -> None:
    from botocore.exceptions import ClientError

    from kdcache.storage._remote import precondition_failed

    def answer(code: str, status: int) -> ClientError:
        error = {
            "Error": {"Code": code, "Message": "m"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        }
        return ClientError(error, "PutObject")  # type: ignore[arg-type]

    lost = answer("PreconditionFailed", 412)
    try:  # as s3fs raises it: an OSError made from the server's answer
        raise OSError("shards/train-00000.json") from lost
    except OSError as wrapped:
        assert precondition_failed(wrapped)
    # a key with 412 in it, in another error, is not a lost race
    other = OSError("cannot write shards/train-00412.json: connection reset (412 bytes sent)")
    assert not precondition_failed(other)
    assert not precondition_failed(answer("SlowDown", 503))
