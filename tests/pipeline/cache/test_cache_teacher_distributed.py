"""Real processes: 2-rank torchrun gives the 1-process store; kill -9 then rerun gives it too —
top-k, its tail and the sampled draws, byte for byte."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kdcache.storage import open_store, verify_store

pytestmark = pytest.mark.slow

# --codec raw: the float16 log-probs as computed, so runs that round differently (a tensor
# split's all-reduce, test_cache_teacher_offload.py) compare within float16's step, not a grid's
ARGS = ["--top-k", "8", "--seq-len", "32", "--batch-size", "2", "--shard-tokens", "128",
        "--eval-fraction", "0.2", "--max-tokens", "3000", "--codec", "raw",
        "--targets", "topk+sampled", "--samples", "16", "--sample-seed", "3"]  # fmt: skip
FIELDS = ("tokens", "topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_distinct",
          "sampled_ids", "sampled_counts", "sampled_logprobs", "seq_offsets")  # fmt: skip


def env() -> dict[str, str]:
    # one thread per process: the same float reductions in every run, so content is bit-equal
    return {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def command(teacher: Path | str, corpus: Path, out: Path) -> list[str]:
    return [
        "cache-teacher",
        "--teacher",
        str(teacher),
        "--corpus",
        str(corpus),
        "--out",
        str(out),
        *ARGS,
    ]


def single(teacher: Path, corpus: Path, out: Path, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "kdcache.pipeline", *command(teacher, corpus, out), *extra],
        env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def kill_9_after_the_first_commit(process: subprocess.Popen[bytes], out: Path) -> int:
    """SIGKILL ``process`` once a shard of ``out`` is committed; returns the shards committed."""
    deadline = time.monotonic() + 120
    while not list((out / "shards").glob("[!.]*.json")) if (out / "shards").exists() else True:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert verify_store(str(out)) == []
    return len(open_store(str(out)).shards)


def assert_same_store(a: Path, b: Path) -> None:
    store_a, store_b = open_store(str(a)), open_store(str(b))
    assert [r.name for r in store_a.shards] == [r.name for r in store_b.shards]
    for ra, rb in zip(store_a.shards, store_b.shards, strict=True):
        assert (ra.num_sequences, ra.num_tokens, ra.corpus_range) == (
            rb.num_sequences,
            rb.num_tokens,
            rb.corpus_range,
        )
        x, y = store_a.read_shard(ra), store_b.read_shard(rb)
        for field in FIELDS:
            a, b = getattr(x, field), getattr(y, field)
            assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), (ra.name, field)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_teacher_dir: Path, small_corpus_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("reference") / "store"
    process = single(tiny_teacher_dir, small_corpus_dir, out)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err.decode()[-2000:]
    assert len(open_store(str(out)).shards) >= 6
    return out


def test_two_ranks_with_torchrun_write_the_same_store(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    out = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29500 + os.getpid() % 1000),
         "-m", "kdcache.pipeline", *command(tiny_teacher_dir, small_corpus_dir, out)],
        env=env(), capture_output=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr.decode()[-3000:]
    summaries = [
        line for line in result.stdout.decode().splitlines() if line.startswith("cache-teacher:")
    ]
    assert len(summaries) == 1  # only the main process reports
    assert verify_store(str(out)) == []
    assert_same_store(reference, out)


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_store(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    out = tmp_path / "store"
    committed = kill_9_after_the_first_commit(single(tiny_teacher_dir, small_corpus_dir, out), out)
    assert 1 <= committed < len(open_store(str(reference)).shards)

    rerun = single(tiny_teacher_dir, small_corpus_dir, out)
    stdout, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err.decode()[-2000:]
    assert f"{committed} already there" in stdout.decode()
    assert verify_store(str(out)) == []
    assert_same_store(reference, out)


def test_a_cached_hub_id_works_offline(
    reference: Path, tmp_path: Path, tiny_teacher_dir: Path, small_corpus_dir: Path
) -> None:
    """--teacher org/name resolves from the Hugging Face cache with the Hub unreachable, gives
    the local directory's store, and records the cached commit as the teacher's revision."""
    import shutil

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--kdcache-test--tiny-teacher"
    shutil.copytree(tiny_teacher_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    hub_env = {**env(), "HF_HUB_CACHE": str(tmp_path / "hub")}

    def run_with(teacher: str, out: Path) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "kdcache.pipeline", *command(teacher, small_corpus_dir, out)]
        return subprocess.run(argv, env=hub_env, capture_output=True, text=True, timeout=300)

    done = run_with("kdcache-test/tiny-teacher", tmp_path / "store")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_same_store(reference, tmp_path / "store")
    teacher = open_store(str(tmp_path / "store")).manifest["teacher"]
    assert teacher["name_or_path"] == "kdcache-test/tiny-teacher"
    assert teacher["revision"] == commit

    # HF_HUB_OFFLINE unset, the Hub refusing connections: one probe, no per-file retries
    del hub_env["HF_HUB_OFFLINE"], hub_env["TRANSFORMERS_OFFLINE"]  # conftest sets both
    hub_env["HF_ENDPOINT"] = "http://127.0.0.1:9"
    done = run_with("kdcache-test/tiny-teacher", tmp_path / "unreachable")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Hub is unreachable" in done.stderr and "Retry" not in done.stderr
    assert_same_store(reference, tmp_path / "unreachable")

    missing = run_with("kdcache-test/not-cached", tmp_path / "other")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    errors = [line for line in missing.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "cannot load teacher, kdcache-test/not-cached" in errors[0]
    assert not (tmp_path / "other").exists()


def test_two_ranks_write_the_same_chat_store_with_masks_and_padding(tmp_path: Path) -> None:
    """Chat records packed one per sequence (right-padded batches, targets only at the
    assistant's positions): 2 torchrun ranks write the 1-process store byte for byte."""
    import json

    from chat_tokenizers import family
    from conftest import save_tiny_model

    family("qwen").save_pretrained(tmp_path / "tokenizer")
    teacher = save_tiny_model("llama", tmp_path / "tokenizer", tmp_path / "teacher")
    corpus = tmp_path / "chat.jsonl"
    with corpus.open("w") as f:
        for i in range(60):
            turns = [{"role": "user", "content": f"question {i} " * (1 + i % 7)},
                     {"role": "assistant", "content": f"answer {i} " * (1 + i % 5)}]  # fmt: skip
            f.write(json.dumps({"messages": turns}) + "\n")
    args = [*command(teacher, corpus, tmp_path / "one"), "--seq-len", "128", "--batch-size", "3",
            "--shard-tokens", "768"]  # fmt: skip
    one = subprocess.run(
        [sys.executable, "-m", "kdcache.pipeline", *args], env=env(), capture_output=True,
        timeout=300,
    )  # fmt: skip
    assert one.returncode == 0, one.stderr.decode()[-3000:]
    args[args.index(str(tmp_path / "one"))] = str(tmp_path / "two")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
         "--master_port", str(29700 + os.getpid() % 1000), "-m", "kdcache.pipeline", *args],
        env=env(), capture_output=True, timeout=300,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr.decode()[-3000:]
    store = open_store(str(tmp_path / "one"))
    assert store.has_loss_mask and len(store.shards) >= 3 and store.num_trained < store.num_tokens
    assert_same_store(tmp_path / "one", tmp_path / "two")
    x = store.read_shard(store.shards[0])
    y = open_store(str(tmp_path / "two")).read_shard(store.shards[0])
    assert x.loss_mask.tobytes() == y.loss_mask.tobytes()
