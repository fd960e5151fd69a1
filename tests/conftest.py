"""Shared fixtures: a tokenizer trained on the fly and tiny teachers built from configs.

Nothing here downloads anything: the Hugging Face Hub is unreachable in tests.
"""

from __future__ import annotations

import importlib
import os
import tempfile
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# remote stores read in tests cache their shards here, never in the user's ~/.cache
os.environ.setdefault("KDCACHE_CACHE_DIR", tempfile.mkdtemp(prefix="kdcache-test-shards-"))

TINY_VOCAB = 512


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Run the kdcache CLI in this process: (exit code, stdout, stderr)."""
    from kdcache.pipeline.cli import main

    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="session")
def corpus_texts() -> list[str]:
    """~60 standard-library sources: real code text, the same on every machine with this Python."""
    from kdcache.pipeline.cache.corpus import stdlib_files

    files = stdlib_files()[:60]
    return [f.read_text(encoding="utf-8", errors="replace") for f in files]


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, corpus_texts: list[str]) -> Path:
    from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tokenizer")
    train_bpe_tokenizer(corpus_texts, vocab_size=TINY_VOCAB).save_pretrained(path)
    return path


def save_tiny_model(model_type: str, tokenizer_dir: Path, path: Path, **overrides: object) -> Path:
    """Build a 2-layer, 64-wide causal LM of ``model_type`` from its config and save it with the tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    sizes: dict[str, object] = {
        "vocab_size": len(tokenizer),
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if model_type == "gpt2":
        sizes = {
            "vocab_size": len(tokenizer),
            "n_embd": 64,
            "n_layer": 2,
            "n_head": 4,
            "n_positions": 512,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    sizes.update(overrides)
    config = AutoConfig.for_model(model_type, **sizes)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A tiny Llama teacher directory (weights + tokenizer), loadable with from_pretrained."""
    return save_tiny_model("llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("teacher"))


@pytest.fixture(scope="session")
def small_corpus_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A handful of small stdlib sources plus one file with invalid UTF-8 and one empty file."""
    from kdcache.pipeline.cache.corpus import stdlib_files

    path = tmp_path_factory.mktemp("small_corpus")
    small = [f for f in stdlib_files() if 1_000 < f.stat().st_size < 4_000][:8]
    for i, source in enumerate(small):
        (path / f"f{i:02d}_{source.name}").write_bytes(source.read_bytes())
    # sorted first, so even a --max-tokens run reads them
    (path / "a_latin1.txt").write_bytes(b"caf\xe9 cr\xe8me br\xfbl\xe9e, " * 20)
    (path / "a_empty.md").write_text("\n\n")
    return path


def write_synthetic_store(
    url: str,
    *,
    vocab_size: int = TINY_VOCAB,
    top_k: int = 8,
    lengths: dict[str, list[list[int]]],
    backend: str = "zarr",
    tokenizer_dir: Path | None = None,
    seed: int = 0,
    targets: str = "topk",
    samples: int = 32,
    sample_temperature: float = 1.0,
    logprob_dtype: str = "float16",
    finished: bool = True,
    codec: str | None = None,
    loss_mask: bool = False,
) -> str:
    """A valid store from synthetic teacher rows: ``lengths[split]`` lists shards of sequence lengths.

    Tokens follow a simple rule (next = (3 · token + 1) mod vocab, with noise) and the teacher's
    distribution puts most mass on that next token, so a student can learn something. Top-k rows
    are a real full-vocabulary log-softmax's top-k, sorted descending, with the exact tail mass;
    sampled targets (``targets`` "sampled" or "topk+sampled") are ``samples`` draws from that
    softmax at ``sample_temperature`` with their exact log-probs at T = 1 (``top_k`` is ignored
    for "sampled"). Sequence s of split
    ``x`` starts with token ``s`` mod vocab, so tests can recognise sequences by their first
    token and shard. ``finished``: marked finished, as cache-teacher leaves a complete store
    (False: as a killed or running cache-teacher leaves it; train-student needs
    --allow-unfinished). ``codec``: "raw" or "gaps" (None: the default); ``loss_mask``: every
    third position untrained (targets at the others only), as chat data leaves a store.
    """
    import numpy as np

    from kdcache.storage import create_store, make_manifest

    rng = np.random.default_rng(seed)
    seq_len = max(n for shards in lengths.values() for shard in shards for n in shard)
    with_topk, with_samples = "topk" in targets.split("+"), "sampled" in targets.split("+")
    manifest = make_manifest(
        backend=backend,
        teacher={
            "name": "synthetic",
            "sha256": "0" * 64,
            "dtype": "float32",
            "architecture": "none",
        },
        tokenizer={"name": "tiny-bpe"},
        vocab_size=vocab_size,
        top_k=top_k if with_topk else 0,
        seq_len=seq_len,
        corpus={"spec": "synthetic", "fingerprint": str(seed), "eval_fraction": 0.0},
        shard_tokens=10_000,
        logprob_dtype=logprob_dtype,
        targets=targets,
        samples=samples if with_samples else 0,
        sample_seed=seed if with_samples else None,
        sample_temperature=sample_temperature,
        loss_mask=loss_mask,
        **({} if codec is None else {"codec": codec}),
    )
    writer = create_store(url, manifest)
    if tokenizer_dir is not None:
        writer.write_tokenizer(
            {p.name: p.read_bytes() for p in Path(tokenizer_dir).iterdir() if p.is_file()}
        )
    for split, shards in lengths.items():
        counter = 0
        for index, shard in enumerate(shards):
            with writer.open_shard(split, index) as shard_writer:
                for n in shard:
                    tokens = np.empty(n, dtype=np.int64)
                    tokens[0] = counter % vocab_size
                    for t in range(1, n):
                        noise = rng.random() < 0.2
                        nxt = (3 * tokens[t - 1] + 1) % vocab_size
                        tokens[t] = rng.integers(vocab_size) if noise else nxt
                    logits = rng.normal(0.0, 1.0, size=(n, vocab_size))
                    logits[np.arange(n), (3 * tokens + 1) % vocab_size] += 6.0
                    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (n, V)
                    arrays: dict[str, np.ndarray] = {}
                    if loss_mask:
                        mask = (np.arange(n) % 3 != 0).astype(np.uint8)  # (n,)
                        logprobs = logprobs[mask.astype(bool)]  # (T, V): trained rows only
                        arrays["loss_mask"] = mask
                    if with_topk:
                        ids = np.argsort(-logprobs, axis=-1, kind="stable")[:, :top_k]
                        outside = np.exp(logprobs)
                        np.put_along_axis(outside, ids, 0.0, axis=-1)
                        with np.errstate(divide="ignore"):
                            tail = np.log(outside.sum(-1))  # -inf when k = vocab
                        arrays.update(
                            topk_ids=ids,
                            topk_logprobs=np.take_along_axis(logprobs, ids, -1),
                            topk_tail_logprob=tail,
                        )
                    if with_samples:
                        probs = np.exp(logprobs / sample_temperature)
                        drawn = rng.multinomial(samples, probs / probs.sum(-1, keepdims=True))
                        rows, cols = np.nonzero(drawn)  # (M,) each; ids ascending per row
                        arrays.update(
                            sampled_distinct=(drawn > 0).sum(-1),
                            sampled_ids=cols,
                            sampled_counts=drawn[rows, cols],
                            sampled_logprobs=logprobs[rows, cols],
                        )
                    shard_writer.append(tokens, **arrays)
                    counter += 1
    if finished:
        writer.mark_finished({"synthetic": True})
    return url


def write_damaged_parquet(path: Path, texts: list[str], rows_per_group: int) -> Path:
    """A parquet file of ``texts`` whose third row group is garbled (zstd pages), footer intact:
    it opens and its schema reads fine; reading that row group fails."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(
        pa.table({"text": texts}), path, compression="zstd", row_group_size=rows_per_group
    )
    column = pq.ParquetFile(path).metadata.row_group(2).column(0)
    start = column.dictionary_page_offset or column.data_page_offset
    data = bytearray(path.read_bytes())
    for i in range(start + 30, start + column.total_compressed_size - 10):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))
    return path


# -- a real S3 API on 127.0.0.1 (moto's server) for the object-store tests --------------------


def s3_environment(endpoint: str) -> dict[str, str]:
    """The AWS variables that point botocore at ``endpoint`` with test credentials — and at
    nothing else: no instance metadata, no ~/.aws files. For a subprocess:
    ``{**os.environ, **s3_environment(endpoint)}``."""
    return {
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


def needed(module: str, extra: str = "dev") -> types.ModuleType:
    """Import a test dependency of ``[dev]`` (moto, s3fs) or another ``extra`` (``docs``:
    mkdocs): skipped without it on a developer's machine, a failure under ``CI=true`` (a broken
    install must not remove a whole area of coverage without a word)."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        try:
            return importlib.import_module(module)
        except ImportError as e:
            pytest.fail(f"{module} is missing under CI=true ({e}); install '.[{extra}]'")
    reason = f"{module} is not installed: pip install -e '.[{extra}]'"
    return pytest.importorskip(module, reason=reason)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """moto's S3 server on 127.0.0.1 (a free port) for the session; yields its endpoint URL.
    Skips when moto or s3fs is not installed (`pip install -e '.[dev]'`), fails under CI=true."""
    moto_server = needed("moto.server")
    needed("s3fs")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access-log line per request
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def create_bucket(endpoint: str) -> str:
    """A new, empty bucket on the test server; returns ``s3://<name>``."""
    import uuid

    import s3fs

    env = s3_environment(endpoint)
    # fsspec's cached instance for these arguments: one botocore client (~0.3 s) per session
    admin = s3fs.S3FileSystem(
        endpoint_url=endpoint, key=env["AWS_ACCESS_KEY_ID"], secret=env["AWS_SECRET_ACCESS_KEY"]
    )
    name = f"kdcache-{uuid.uuid4().hex[:12]}"
    admin.mkdir(name)
    return f"s3://{name}"


@pytest.fixture
def s3_bucket(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket on the test S3 server, with the AWS environment pointed at the server for
    this test only (other AWS_* variables removed); returns ``s3://<bucket>``, e.g.
    ``open_store(f"{s3_bucket}/store")`` or ``main(["verify", f"{s3_bucket}/store"])``.
    Module-scoped users: ``with pytest.MonkeyPatch.context() as mp`` and ``s3_environment``."""
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    for key, value in s3_environment(s3_server).items():
        monkeypatch.setenv(key, value)
    return create_bucket(s3_server)


def cache_small_store(
    tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path, corpus_texts: list[str]
) -> Path:
    """A small top-8 store with an eval split, cached by ``teacher_dir`` from 8 documents."""
    from kdcache.pipeline.cli import main

    corpus = tmp_path_factory.mktemp("corpus")
    for i, text in enumerate(corpus_texts[:8]):
        (corpus / f"doc{i:02d}.txt").write_text(text[:2000], encoding="utf-8")
    out = tmp_path_factory.mktemp("stores") / "store"
    try:
        main([
            "cache-teacher", "--teacher", str(teacher_dir), "--corpus", str(corpus),
            "--out", str(out), "--top-k", "8", "--seq-len", "32", "--eval-fraction", "0.3",
            "--shard-tokens", "2048",
        ])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None)
    return out
