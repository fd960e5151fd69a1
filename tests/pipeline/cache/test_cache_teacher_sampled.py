"""`kdcache cache-teacher --targets sampled|topk+sampled` end to end: exact content, determinism
across batch sizes, refusals and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_cache_teacher import assert_stored, cache_args, run, tree
from transformers import AutoModelForCausalLM

from kdcache.storage import open_store, verify_store

SAMPLES = 16
FIELDS = ("tokens", "topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct",
          "sampled_ids", "sampled_counts", "sampled_logprobs", "seq_offsets")  # fmt: skip


def sampled_args(teacher: Path, corpus: Path, out: Path, targets: str, *extra: str) -> list[str]:
    args = cache_args(teacher, corpus, out, "--targets", targets, *extra)
    if targets == "sampled":  # --top-k does not apply
        at = args.index("--top-k")
        del args[at : at + 2]
    return [*args, "--samples", str(SAMPLES), "--sample-seed", "5"]


def shard_arrays(url: Path) -> dict[str, dict[str, np.ndarray]]:
    store = open_store(str(url))
    content = {}
    for record in store.shards:
        arrays = store.read_shard(record)
        content[record.name] = {
            name: getattr(arrays, name) for name in FIELDS if getattr(arrays, name) is not None
        }
    return content


def assert_same_arrays(a: dict, b: dict, fields: tuple[str, ...] = FIELDS) -> None:
    assert a.keys() == b.keys()
    for name in a:
        for field in fields:
            if field in a[name] or field in b[name]:
                x, y = a[name][field], b[name][field]
                assert x.dtype == y.dtype and x.tobytes() == y.tobytes(), (name, field)


@pytest.fixture(scope="module")
def both(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("both") / "store"
    assert run(*sampled_args(tiny_teacher_dir, small_corpus_dir, out, "topk+sampled")) == 0
    return out


def test_topk_plus_sampled_holds_both_exactly(both: Path, tiny_teacher_dir: Path, capsys) -> None:
    store = open_store(str(both))
    manifest = json.loads((both / "manifest.json").read_text())
    assert (manifest["targets"], manifest["top_k"], manifest["samples"]) == ("topk+sampled", 8, 16)
    assert manifest["sample_seed"] == 5 and manifest["count_dtype"] == "uint8"
    stats = manifest["stats"]
    assert 1 <= stats["sampled_distinct_per_position"] <= SAMPLES and stats["samples"] == SAMPLES
    assert verify_store(str(both)) == []
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for checked, sequence in enumerate(store.iter_sequences()):
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(sequence.tokens.astype(np.int64))[None])
        full = torch.log_softmax(logits.logits[0].float(), dim=-1).double().numpy()  # (L, V)
        ids = sequence.topk_ids.astype(np.int64)
        codec = manifest["codec"]
        assert_stored(sequence.topk_logprobs, np.take_along_axis(full, ids, -1), codec)
        outside = full.copy()
        np.put_along_axis(outside, ids, -np.inf, -1)
        tail = np.log(np.exp(outside).sum(-1))  # the true tail in float64
        assert_stored(sequence.topk_tail_logprob, tail, codec, tol=1e-5)
        offsets = np.concatenate([[0], np.cumsum(sequence.sampled_distinct, dtype=np.int64)])
        for t in range(len(sequence.tokens)):
            at = slice(offsets[t], offsets[t + 1])
            drawn = sequence.sampled_ids[at].astype(np.int64)
            assert (np.diff(drawn) > 0).all() and int(sequence.sampled_counts[at].sum()) == 16
            assert_stored(sequence.sampled_logprobs[at], full[t, drawn], codec)
        if checked == 8:
            break


def test_the_draws_do_not_depend_on_the_batch_size_or_the_top_k(
    both: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    """Batch size 1 instead of 3, and sampled targets alone: byte-identical sampled arrays."""
    out = tmp_path / "sampled"
    args = sampled_args(tiny_teacher_dir, small_corpus_dir, out, "sampled", "--batch-size", "1")
    assert run(*args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["targets"], manifest["top_k"], manifest["samples"]) == ("sampled", 0, 16)
    alone, together = shard_arrays(out), shard_arrays(both)
    assert all("topk_ids" not in fields for fields in alone.values())
    sampled = tuple(f for f in FIELDS if not f.startswith("topk"))
    assert_same_arrays(alone, together, sampled)


def test_a_rerun_with_other_sampling_settings_is_refused(
    both: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    before = tree(both)
    for option, value, difference in (
        ("--samples", "8", "samples"),
        ("--sample-seed", "6", "sample_seed"),
        ("--targets", "sampled", "targets"),
    ):
        args = sampled_args(tiny_teacher_dir, small_corpus_dir, both, "topk+sampled")
        args[args.index(option) + 1] = value
        if value == "sampled":
            at = args.index("--top-k")
            del args[at : at + 2]
        assert run(*args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("Error: ") and difference in err[0], err
    assert tree(both) == before


def test_bad_sampling_options_are_one_line_and_exit_2(
    tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path, capsys
) -> None:
    out = tmp_path / "out"
    topk = cache_args(tiny_teacher_dir, small_corpus_dir, out)  # --top-k given explicitly
    sampled = sampled_args(tiny_teacher_dir, small_corpus_dir, out, "sampled")
    cases = {
        "samples 0": ([*sampled, "--samples", "0"], "--samples must be at least 1, got 0"),
        "samples < 0": ([*sampled, "--samples", "-3"], "--samples must be at least 1, got -3"),
        "samples > uint16": ([*sampled, "--samples", "65536"], "uint16"),
        "unknown targets": ([*topk, "--targets", "logits"], "unknown --targets, logits"),
        "top-k with sampled": ([*sampled, "--top-k", "8"], "--top-k does not apply"),
        "samples with topk": ([*topk, "--samples", "8"], "--samples does not apply"),
        "seed with topk": ([*topk, "--sample-seed", "1"], "--sample-seed does not apply"),
        "negative seed": ([*sampled, "--sample-seed", "-1"], "--sample-seed must be in"),
    }
    for name, (args, message) in cases.items():
        assert run(*args) == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, (name, err)
        assert err[0].startswith("Error: ") and message in err[0], (name, err)
        assert not out.exists(), name
    # the defaults of the options that do not apply are no error
    assert run(*sampled_args(tiny_teacher_dir, small_corpus_dir, out, "sampled")) == 0
