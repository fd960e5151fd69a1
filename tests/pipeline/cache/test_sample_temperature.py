"""`kdcache cache-teacher --sample-temperature T`: the draws come from the teacher's
``p_T ∝ p^(1/T)``, the manifest records T (a store without the fact reads as 1.0), a rerun with
another T is refused, and a T that is not positive is one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache_teacher import assert_stored, cache_args, run, tree
from test_cache_teacher_sampled import sampled_args
from test_sampling import chi2, chi2_critical, random_keys
from transformers import AutoModelForCausalLM

from kdcache.pipeline.cache.sampling import distinct_counts, draw, position_keys, uniforms
from kdcache.storage import (
    StoreCorrupt,
    StoreIncompatible,
    create_store,
    make_manifest,
    open_store,
    sample_temperature,
    verify_store,
)

V = 40_000
K = 64


def teacher_row(seed: int) -> torch.Tensor:
    """(V,) float32 log-softmax: a Zipf head of K ids with 96% of the mass, a log-normal tail."""
    g = torch.Generator().manual_seed(seed)
    head = 1.0 / torch.arange(1, K + 1, dtype=torch.float64)
    tail = (2.0 * torch.randn(V - K, generator=g, dtype=torch.float64)).exp()
    probs = torch.cat([head / head.sum() * 0.96, tail / tail.sum() * 0.04])
    return probs[torch.randperm(V, generator=g)].log().float()


def equal_mass_bins(probs: np.ndarray, bins: int) -> np.ndarray:
    """A bin per id such that every bin holds about 1/bins of ``probs`` (an id heavier than
    that is a bin alone): enough expected draws in each bin for a chi-square test."""
    order = np.argsort(-probs)
    middle = np.cumsum(probs[order]) - probs[order] / 2
    out = np.empty(len(probs), dtype=np.int64)
    out[order] = np.minimum((middle * bins).astype(np.int64), bins - 1)
    return np.unique(out, return_inverse=True)[1]


@pytest.mark.parametrize("t", [0.5, 2.0])
def test_draws_at_t_follow_the_tempered_teacher_on_a_40k_vocabulary(t: float) -> None:
    rows, n = 200, 500  # 100,000 draws
    logprobs = teacher_row(seed=int(t * 10)).expand(rows, V)  # (rows, V)
    cdf = torch.empty(rows, V, dtype=torch.float64)
    u = uniforms(3, random_keys(rows, seed=4), n)  # (rows, N)
    drawn = draw(logprobs, u, cdf, temperature=t).ravel().numpy()
    for at, should_fit in ((t, True), (1.0, False)):
        probs = torch.softmax(logprobs[0].double() / at, -1).numpy()  # p_at over the vocabulary
        bins = equal_mass_bins(probs, 40)
        observed = np.bincount(bins[drawn], minlength=bins.max() + 1)
        expected = np.bincount(bins, weights=probs) * rows * n
        statistic, critical = chi2(observed, expected), chi2_critical(len(expected) - 1)
        assert (statistic < critical) == should_fit, (at, statistic, critical)


def test_a_tiny_temperature_draws_the_most_likely_id_without_underflow() -> None:
    """exp(l / T) of every id underflows to 0 for l = −7, T = 0.001: the draws subtract the
    row's largest log-prob first."""
    logits = torch.zeros(4, 1000)
    logits[:, 17] = 0.5
    logprobs = torch.log_softmax(logits, -1)  # all near −6.9
    cdf = torch.empty(4, 1000, dtype=torch.float64)
    ids = draw(logprobs, uniforms(0, random_keys(4), 64), cdf, temperature=1e-3)
    assert (ids == 17).all()


@pytest.fixture(scope="module")
def drawn_at_2(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("sample-temperature") / "store"
    args = sampled_args(tiny_teacher_dir, small_corpus_dir, out, "topk+sampled")
    assert run(*args, "--sample-temperature", "2") == 0
    return out


def test_the_store_holds_draws_from_the_tempered_teacher_and_its_log_probs_at_1(
    drawn_at_2: Path, tiny_teacher_dir: Path, capsys
) -> None:
    manifest = json.loads((drawn_at_2 / "manifest.json").read_text())
    assert manifest["sample_temperature"] == 2.0 and verify_store(str(drawn_at_2)) == []
    store = open_store(str(drawn_at_2))
    assert sample_temperature(store.manifest) == 2.0
    assert run("inspect", str(drawn_at_2), "--json") == 0
    assert json.loads(capsys.readouterr().out)["sample_temperature"] == 2.0
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    samples, seed = manifest["samples"], manifest["sample_seed"]
    checked = 0
    for record in store.shards[:2]:
        arrays = store.read_shard(record)
        for s in range(min(3, len(arrays.seq_offsets) - 1)):
            lo, hi = arrays.seq_offsets[s], arrays.seq_offsets[s + 1]
            tokens = torch.from_numpy(arrays.tokens[lo:hi].astype(np.int64))[None]
            with torch.inference_mode():
                full = torch.log_softmax(model(input_ids=tokens).logits[0].float(), -1)  # (L, V)
            keys = position_keys(record.split, record.index, [s], len(tokens[0]), full.device)[0]
            cdf = torch.empty(full.shape, dtype=torch.float64)
            u = uniforms(seed, keys, samples)
            distinct, ids, counts = distinct_counts(draw(full, u, cdf, temperature=2.0))
            offsets = arrays.sampled_offsets  # over target rows: rows lo..hi are this sequence's
            for t in range(hi - lo):
                at = slice(offsets[lo + t], offsets[lo + t + 1])
                d = int(distinct[t])
                assert arrays.sampled_ids[at].tolist() == ids[t, :d].tolist()
                assert arrays.sampled_counts[at].tolist() == counts[t, :d].tolist()
                exact = full[t, ids[t, :d]].double().numpy()  # the teacher's at T = 1
                assert_stored(arrays.sampled_logprobs[at], exact, manifest["codec"])
                checked += 1
    assert checked > 50


def test_a_rerun_with_another_sample_temperature_is_refused(
    drawn_at_2: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    before = tree(drawn_at_2)
    args = sampled_args(tiny_teacher_dir, small_corpus_dir, drawn_at_2, "topk+sampled")
    for extra, difference in (
        (["--sample-temperature", "1.5"], "sample_temperature: store has 2.0, this run asks 1.5"),
        ([], "sample_temperature: store has 2.0, this run asks 1.0"),  # the default
    ):
        assert run(*args, *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and difference in err[0], err
    assert tree(drawn_at_2) == before


def manifest_of(targets: str, **facts) -> dict:
    return make_manifest(
        backend="zarr",
        teacher={"name": "t"},
        tokenizer={"sha256": "ab" * 32},
        vocab_size=V,
        top_k=0 if targets == "sampled" else 4,
        seq_len=8,
        corpus={"spec": "x"},
        shard_tokens=64,
        targets=targets,
        samples=0 if targets == "topk" else 16,
        sample_seed=None if targets == "topk" else 0,
        **facts,
    )


def test_the_manifest_fact_round_trips_and_an_older_store_reads_as_drawn_at_1(
    tmp_path: Path,
) -> None:
    url = str(tmp_path / "t3")
    create_store(url, manifest_of("sampled", sample_temperature=3.0)).mark_finished({})
    assert sample_temperature(open_store(url).manifest) == 3.0
    assert json.loads(Path(url, "manifest.json").read_text())["sample_temperature"] == 3.0
    older = manifest_of("topk+sampled")
    del older["sample_temperature"]  # as a kdcache without the fact wrote it
    url = str(tmp_path / "older")
    create_store(url, older).mark_finished({})
    assert "sample_temperature" not in json.loads(Path(url, "manifest.json").read_text())
    assert open_store(url).manifest["sample_temperature"] == 1.0
    create_store(url, manifest_of("topk+sampled"))  # resumes: 1.0 is what it means
    with pytest.raises(StoreIncompatible) as refused:
        create_store(url, manifest_of("topk+sampled", sample_temperature=2.0))
    assert refused.value.differences == ["sample_temperature: store has 1.0, this run asks 2.0"]
    assert sample_temperature(manifest_of("topk", sample_temperature=2.0)) is None  # no draws
    for targets, value, message in (
        ("sampled", 0, "sample_temperature must be a positive number"),
        ("sampled", -1.0, "sample_temperature must be a positive number"),
        ("sampled", "hot", "sample_temperature must be a positive number"),
        ("sampled", True, "sample_temperature must be a positive number"),
        ("topk", 2.0, "sample_temperature must be null for topk targets"),
    ):
        facts = {**manifest_of(targets), "sample_temperature": value}
        Path(url, "manifest.json").write_text(json.dumps(facts))
        with pytest.raises(StoreCorrupt, match=message):
            open_store(url)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_sample_temperature_that_is_not_positive_is_one_line_and_exit_2(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys, value: str
) -> None:
    out = tmp_path / "out"
    sampled = sampled_args(tiny_teacher_dir, small_corpus_dir, out, "sampled")
    topk = cache_args(tiny_teacher_dir, small_corpus_dir, out)
    for args, message in (
        (sampled, "--sample-temperature must be a positive number, got"),
        (topk, "--sample-temperature does not apply to --targets topk"),
    ):
        assert run(*args, f"--sample-temperature={value}") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and message in err[0], err
        assert not out.exists()
