"""The store loader: exact partition over ranks × workers, seeded shuffles, batches, resume.

The balanced global order over ranks × workers and elastic resume: test_balanced_order.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_synthetic_store

from kdcache.pipeline.distill.batches import batch_layout, batch_to_device, layout_of
from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.storage import open_store

# five train shards (one with a short last sequence), one eval shard
LENGTHS = {"train": [[16] * 5, [16] * 4, [16] * 6 + [9], [16] * 3, [16] * 5], "eval": [[16] * 4]}
N_TRAIN = 24


@pytest.fixture(scope="module")
def store_url(tmp_path_factory: pytest.TempPathFactory) -> str:
    return write_synthetic_store(str(tmp_path_factory.mktemp("loader") / "s"), lengths=LENGTHS)


def _keys(batch: dict[str, torch.Tensor]) -> list[int]:
    """Sequences are numbered by their first token (see write_synthetic_store)."""
    return batch["input_ids"][:, 0].tolist()


def _all_keys(loader: TeacherLoader) -> list[int]:
    return [key for batch in loader for key in _keys(batch)]


@pytest.mark.parametrize("lengths", [LENGTHS, {"train": [[16] * 11, [16] * 13]}])
def test_two_ranks_times_two_workers_partition_the_split(tmp_path: Path, lengths: dict) -> None:
    # 5 shards ≥ 4 slots: shards are dealt out; 2 shards < 4 slots: sequences are strided
    url = write_synthetic_store(str(tmp_path / "s"), lengths=lengths)
    keys: list[int] = []
    for rank in range(2):
        dataset = DistillDataset(url, batch_size=3, seed=5, infinite=False, rank=rank, world_size=2)
        keys += _all_keys(TeacherLoader(dataset, num_workers=2))
    assert Counter(keys) == Counter(range(sum(map(len, lengths["train"]))))


def test_batches_hold_the_stored_sequences_with_hugging_face_labels(store_url: str) -> None:
    store = open_store(store_url)
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    dataset = DistillDataset(store, batch_size=4, seed=1, buffer_size=8, infinite=False)
    seen = 0
    for batch in TeacherLoader(dataset):
        b, length = batch["input_ids"].shape
        k = store.top_k
        # the store's compact dtypes: uint16 ids, float16 log-probs
        assert batch["topk_ids"].shape == (b, length, k) and batch["topk_ids"].dtype == torch.uint16
        assert batch["topk_logprobs"].dtype == torch.float16
        assert batch["topk_tail_logprob"].shape == (b, length)
        assert batch["topk_tail_logprob"].dtype == torch.float32
        assert batch["labels"].dtype == torch.int64 and batch["attention_mask"].shape == (b, length)
        assert not any(name.startswith("sampled") for name in batch)  # a top-k store
        wide = batch_to_device(batch, "cpu")
        assert (
            wide["topk_ids"].dtype == torch.int64 and wide["topk_logprobs"].dtype == torch.float16
        )
        for i, key in enumerate(_keys(batch)):
            seq = by_key[key]
            n = len(seq.tokens)
            np.testing.assert_array_equal(batch["input_ids"][i, :n], seq.tokens)
            # Hugging Face labels: the tokens themselves; position 0 and padding not predicted
            np.testing.assert_array_equal(batch["labels"][i, 1:n], seq.tokens[1:])
            assert batch["labels"][i, 0] == -100 and (batch["labels"][i, n:] == -100).all()
            assert batch["attention_mask"][i].sum() == n
            np.testing.assert_array_equal(wide["topk_ids"][i, :n], seq.topk_ids.astype(np.int64))
            np.testing.assert_array_equal(batch["topk_logprobs"][i, :n], seq.topk_logprobs)
            assert (batch["topk_logprobs"][i, n:] == 0).all()
            np.testing.assert_array_equal(batch["topk_tail_logprob"][i, :n], seq.topk_tail_logprob)
            seen += 1
    assert seen == N_TRAIN


def test_shuffle_is_seeded_and_changes_every_epoch(store_url: str) -> None:
    def first_epochs(seed: int) -> list[int]:
        loader = TeacherLoader(DistillDataset(store_url, batch_size=4, seed=seed, buffer_size=6))
        return [k for _ in range(N_TRAIN // 4 * 2) for k in _keys(next(loader))]

    a, again, other = first_epochs(0), first_epochs(0), first_epochs(1)
    assert a == again and a != other
    epoch1, epoch2 = a[:N_TRAIN], a[N_TRAIN:]
    assert sorted(epoch1) == sorted(epoch2) == list(range(N_TRAIN))  # each epoch exactly once
    assert epoch1 != epoch2
    ordered = DistillDataset(store_url, batch_size=4, shuffle=False, infinite=False)
    assert _all_keys(TeacherLoader(ordered)) == list(range(N_TRAIN))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_with_the_same_batches(store_url: str, workers: int) -> None:
    def loader() -> TeacherLoader:
        dataset = DistillDataset(store_url, batch_size=5, seed=3, buffer_size=7)
        return TeacherLoader(dataset, num_workers=workers)

    reference = loader()
    first = [_keys(next(reference)) for _ in range(5)]  # ends mid-epoch, mid-worker-cycle
    state = reference.state_dict()
    expected = [_keys(next(reference)) for _ in range(8)]  # crosses into the next epoch
    resumed = loader()
    resumed.load_state_dict(state)
    assert [_keys(next(resumed)) for _ in range(8)] == expected
    assert first != expected[:5]


def test_resume_refuses_another_order_but_not_another_worker_count(store_url: str) -> None:
    one = TeacherLoader(DistillDataset(store_url, batch_size=5), num_workers=0)
    next(one)
    TeacherLoader(DistillDataset(store_url, batch_size=5), num_workers=2).load_state_dict(
        one.state_dict()
    )  # the position is global: any number of workers continues it
    for other in (DistillDataset(store_url, batch_size=4), DistillDataset(store_url, seed=1)):
        with pytest.raises(ValueError, match="batch_size|seed"):
            TeacherLoader(other).load_state_dict(one.state_dict())
    old = {"dataset": {"positions": {"0": [0, 5]}}, "next_worker": 0}  # a version-1 state
    with pytest.raises(ValueError, match="older kdcache"):
        TeacherLoader(DistillDataset(store_url, batch_size=5)).load_state_dict(old)


@pytest.mark.parametrize("targets", ["topk", "sampled"])
def test_memory_url_works_with_workers(tmp_path: Path, targets: str) -> None:
    url = write_synthetic_store(
        f"memory://loader-test-{targets}/s", lengths={"train": [[8] * 3, [8] * 2]}, targets=targets
    )
    loader = TeacherLoader(DistillDataset(url, batch_size=2, infinite=False), num_workers=2)
    assert sorted(_all_keys(loader)) == list(range(5))


def test_held_batches_stay_intact_while_workers_reuse_their_buffers(store_url: str) -> None:
    # holding every batch of 3 epochs (more than the ring has slots) forces one-off buffers;
    # dropping them lets the workers reuse slots — no batch may ever change under its holder
    store = open_store(store_url)
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    loader = TeacherLoader(DistillDataset(store, batch_size=2, seed=4), num_workers=2)
    held = [next(loader) for _ in range(3 * N_TRAIN // 2)]
    snapshot = [{name: t.clone() for name, t in b.items()} for b in held]
    for _ in range(20):  # keep reading while the held batches still exist
        next(loader)
    for batch, copy in zip(held, snapshot, strict=True):
        for name in batch:
            assert torch.equal(batch[name], copy[name]), name
        for i, key in enumerate(_keys(batch)):
            n = len(by_key[key].tokens)
            np.testing.assert_array_equal(batch["topk_ids"][i, :n].long(), by_key[key].topk_ids)
    del held, snapshot, batch, copy
    for _ in range(30):  # dropped batches: slots come back into use, contents stay right
        batch = next(loader)
        seq = by_key[_keys(batch)[0]]
        np.testing.assert_array_equal(
            batch["topk_logprobs"][0, : len(seq.tokens)], seq.topk_logprobs
        )
    loader.close()


def test_large_vocabularies_travel_as_int32_ids(tmp_path: Path) -> None:
    url = write_synthetic_store(
        str(tmp_path / "s"), vocab_size=70_000, top_k=4, lengths={"train": [[6, 6]]}
    )
    store = open_store(url)
    stored = np.concatenate([s.topk_ids for s in store.iter_sequences("train")])
    assert stored.dtype == np.uint32 and stored.max() >= 65_536  # ids above the uint16 range
    for workers in (0, 1):
        dataset = DistillDataset(store, batch_size=2, shuffle=False, infinite=False)
        batch = next(iter(TeacherLoader(dataset, num_workers=workers)))
        assert batch["topk_ids"].dtype == torch.int32
        wide = batch_to_device(batch, "cpu")["topk_ids"]
        np.testing.assert_array_equal(wide.reshape(-1, 4).numpy(), stored)


def _assert_samples(batch: dict[str, torch.Tensor], i: int, seq) -> None:
    """Row i of a batch holds ``seq``'s sampled entries position by position, then padding 0."""
    wide = batch_to_device(batch, "cpu")
    n, off = len(seq.tokens), seq.sampled_offsets
    for t in range(batch["input_ids"].shape[1]):
        d = int(off[t + 1] - off[t]) if t < n else 0
        entries = slice(int(off[t]), int(off[t]) + d) if t < n else slice(0, 0)
        for name, stored in (("sampled_ids", seq.sampled_ids), ("sampled_counts", seq.sampled_counts),
                             ("sampled_logprobs", seq.sampled_logprobs)):  # fmt: skip
            got = (wide if name != "sampled_logprobs" else batch)[name][i, t].numpy()
            np.testing.assert_array_equal(got[:d], stored[entries], err_msg=f"{name} {t}")
            assert (got[d:] == 0).all(), (name, t)


@pytest.mark.parametrize("targets", ["sampled", "topk+sampled"])
@pytest.mark.parametrize("workers", [0, 2])
def test_sampled_batches_hold_every_drawn_id_per_position(
    tmp_path: Path, targets: str, workers: int
) -> None:
    lengths = {"train": [[12] * 4, [12] * 3 + [5]]}
    url = write_synthetic_store(str(tmp_path / "s"), lengths=lengths, targets=targets, samples=20)
    store = open_store(url)
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    dataset = DistillDataset(store, batch_size=3, seed=2, infinite=False)
    seen = 0
    for batch in TeacherLoader(dataset, num_workers=workers):
        b, length = batch["input_ids"].shape
        m = batch["sampled_ids"].shape[-1]
        keys = _keys(batch)
        # m is the most distinct ids any position of this batch drew
        assert m == max(int(by_key[k].sampled_distinct.max()) for k in keys)
        assert m <= 20  # at most the store's samples per position
        assert batch["sampled_ids"].dtype == torch.uint16
        assert batch["sampled_counts"].dtype == torch.uint8
        assert batch["sampled_logprobs"].dtype == torch.float16
        assert {f.shape for n, f in batch.items() if n.startswith("sampled")} == {(b, length, m)}
        assert ("topk_ids" in batch) == (targets == "topk+sampled")
        assert ("topk_tail_logprob" in batch) == (targets == "topk+sampled")
        wide = batch_to_device(batch, "cpu")
        assert wide["sampled_ids"].dtype == wide["sampled_counts"].dtype == torch.int64
        # every real position's counts sum to N; padding positions hold nothing
        sums = wide["sampled_counts"].sum(-1)
        assert (sums[batch["attention_mask"].bool()] == 20).all()
        assert (sums[~batch["attention_mask"].bool()] == 0).all()
        for i, key in enumerate(keys):
            _assert_samples(batch, i, by_key[key])
            seen += 1
    assert seen == 8


def test_counts_over_255_travel_as_uint16(tmp_path: Path) -> None:
    url = write_synthetic_store(
        str(tmp_path / "s"), lengths={"train": [[6, 6]]}, targets="sampled", samples=300
    )
    store = open_store(url)
    for workers in (0, 1):
        dataset = DistillDataset(store, batch_size=2, shuffle=False, infinite=False)
        batch = next(iter(TeacherLoader(dataset, num_workers=workers)))
        assert batch["sampled_counts"].dtype == torch.uint16
        for i, seq in enumerate(store.iter_sequences("train")):
            _assert_samples(batch, i, seq)
        counts = batch_to_device(batch, "cpu")["sampled_counts"].sum(-1)  # (B, L)
        assert (counts[batch["attention_mask"].bool()] == 300).all()


def test_held_sampled_batches_stay_intact_while_workers_reuse_their_buffers(
    tmp_path: Path,
) -> None:
    # batches of different m share ring slots: a held batch must never change, and slots that
    # come back into use must hold the right contents
    lengths = {"train": [[10] * 5, [10] * 4, [7] * 3]}
    url = write_synthetic_store(str(tmp_path / "s"), lengths=lengths, targets="sampled", samples=40)
    store = open_store(url)
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    loader = TeacherLoader(DistillDataset(store, batch_size=2, seed=4), num_workers=2)
    held = [next(loader) for _ in range(12)]
    snapshot = [{name: t.clone() for name, t in b.items()} for b in held]
    for _ in range(10):
        next(loader)
    for batch, copy in zip(held, snapshot, strict=True):
        assert all(torch.equal(batch[name], copy[name]) for name in batch)
    del held, snapshot, batch, copy
    for _ in range(16):
        batch = next(loader)
        for i, key in enumerate(_keys(batch)):
            _assert_samples(batch, i, by_key[key])
    loader.close()


def test_a_topk_batch_has_no_sampled_fields(store_url: str) -> None:
    batch = next(DistillDataset(store_url, batch_size=4, infinite=False).batches())
    layout = layout_of([{"tokens": np.zeros(3, np.int32), "topk_ids": np.zeros((3, 8), np.uint16),
                         "topk_logprobs": np.zeros((3, 8), np.float16),
                         "topk_tail_logprob": np.zeros(3, np.float32)}])  # fmt: skip
    names = [name for name, *_ in batch_layout(layout)[0]]
    assert names == list(batch) == ["input_ids", "labels", "attention_mask", "loss_mask",
                                    "topk_logprobs", "topk_ids", "topk_tail_logprob"]  # fmt: skip


def _rows_of_ranks(store, ranks: int, **kw):
    """(batch, row, key) of every row of one epoch of each of ``ranks`` ranks' loaders."""
    for rank in range(ranks):
        dataset = DistillDataset(store, infinite=False, rank=rank, world_size=ranks, **kw)
        for batch in TeacherLoader(dataset, num_workers=2):
            for i, key in enumerate(_keys(batch)):
                yield batch, i, key


@pytest.mark.parametrize("targets", ["topk", "sampled"])
def test_each_rank_decodes_only_its_sequences_and_gets_them_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, targets: str
) -> None:
    # 3 ranks: each reads a third of every shard's sequences and decodes only those
    lengths = {"train": [[12] * 9, [12] * 7 + [5], [12] * 8]}
    url = write_synthetic_store(str(tmp_path / "s"), lengths=lengths, targets=targets, samples=20)
    store = open_store(url)
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    picked: list[int] = []
    read = store.read_shard
    monkeypatch.setattr(
        store,
        "read_shard",
        lambda r, sequences=None, **kw: (
            picked.append(r.num_sequences if sequences is None else len(sequences))
            or read(r, sequences=sequences, **kw)
        ),
    )
    seen: list[int] = []
    for batch, i, key in _rows_of_ranks(store, 3, batch_size=6, seed=3, buffer_size=10):
        seq = by_key[key]
        n = len(seq.tokens)
        np.testing.assert_array_equal(batch["input_ids"][i, :n], seq.tokens)
        if targets == "topk":
            np.testing.assert_array_equal(batch["topk_logprobs"][i, :n], seq.topk_logprobs)
            np.testing.assert_array_equal(batch["topk_ids"][i, :n].long(), seq.topk_ids)
        else:
            _assert_samples(batch, i, seq)
        seen.append(key)
    assert sorted(seen) == sorted(by_key)  # every sequence once over the ranks
    assert sum(picked) == len(by_key) and max(picked) < 9  # each rank decoded only its share


def test_ranks_of_a_masked_store_get_their_sequences_whole(tmp_path: Path) -> None:
    from kdcache.storage import create_store, make_manifest

    rng = np.random.default_rng(5)
    manifest = make_manifest(
        backend="arrow", teacher={"name": "t"}, tokenizer={"name": "t"}, vocab_size=500, top_k=4,
        seq_len=16, corpus={"spec": "chat"}, shard_tokens=60, loss_mask=True,
    )  # fmt: skip
    url = str(tmp_path / "masked")
    with create_store(url, manifest) as writer:
        for key in range(20):
            n = int(rng.integers(4, 17))
            mask = rng.random(n) < 0.5
            mask[-1] = True
            t = int(mask.sum())
            ids = np.stack([rng.choice(500, 4, replace=False) for _ in range(t)])
            logprobs = -np.sort(rng.uniform(0.1, 4.0, (t, 4)), axis=1)
            tokens = np.concatenate([[key], rng.integers(0, 500, n - 1)])
            writer.append("train", tokens, ids, logprobs, loss_mask=mask)
    store = open_store(url)
    assert len(store.shards) > 2
    by_key = {int(s.tokens[0]): s for s in store.iter_sequences("train")}
    seen = []
    for batch, i, key in _rows_of_ranks(store, 2, batch_size=4, seed=1, buffer_size=5):
        seq = by_key[key]
        positions = seq.trained_positions
        assert batch["loss_mask"][i].nonzero().flatten().tolist() == positions.tolist()
        np.testing.assert_array_equal(batch["topk_logprobs"][i, positions], seq.topk_logprobs)
        np.testing.assert_array_equal(batch["topk_ids"][i, positions].long(), seq.topk_ids)
        seen.append(key)
    assert sorted(seen) == list(range(20))


@pytest.mark.parametrize("deal", ["rows", "batches"])
def test_a_finite_loader_gives_a_whole_pass_every_time_it_is_iterated(
    store_url: str, deal: str
) -> None:
    # 24 sequences in micro-batches of 5: the last micro-batch of a pass is short
    dataset = DistillDataset(
        open_store(store_url), "train", batch_size=5, shuffle=False, infinite=False, deal=deal
    )
    loader = TeacherLoader(dataset)
    first, second = _all_keys(loader), _all_keys(loader)
    assert sorted(first) == sorted(second) and len(first) == N_TRAIN == len(set(first))
    # next(): a pass ends with one StopIteration, then the next pass begins
    taken = []
    for _ in range(2):
        while True:
            try:
                taken += _keys(next(loader))
            except StopIteration:
                break
    assert sorted(taken) == sorted(first + second)


@pytest.mark.parametrize("workers", [1, 3])
def test_a_shard_that_fails_to_read_reaches_the_caller_and_the_next_call_retries_it(
    store_url: str, workers: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    def clean() -> list[list[int]]:
        loader = TeacherLoader(
            DistillDataset(open_store(store_url), "train", batch_size=4, seed=3),
            num_workers=workers,
        )
        return [_keys(next(loader)) for _ in range(12)]  # two epochs

    want = clean()
    store = open_store(store_url)
    original = type(store).read_shard
    failures = {"left": 2}  # the third shard read fails once, then the fifth

    def flaky(self, record, **kwargs):
        if (
            record.index in (2, 4)
            and failures["left"]
            and failures.setdefault(record.index, 0) == 0
        ):
            failures[record.index] = 1
            failures["left"] -= 1
            raise OSError(f"cannot read {record.name}: connection reset")
        return original(self, record, **kwargs)

    monkeypatch.setattr(type(store), "read_shard", flaky)
    loader = TeacherLoader(
        DistillDataset(store, "train", batch_size=4, seed=3), num_workers=workers
    )
    got, errors = [], []
    while len(got) < 12:
        try:
            got.append(_keys(next(loader)))
        except OSError as e:  # the error itself, not a quiet StopIteration
            errors.append(str(e))
    # each failure surfaces, unless a failure read ahead was dropped with its pass and the
    # shard read again afterwards
    assert 1 <= len(errors) <= 2 and all("connection reset" in e for e in errors)
    assert got == want  # the batch that failed, and every one after it, as in a clean run
