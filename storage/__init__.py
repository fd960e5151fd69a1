"""kdcache.storage — the logit store: a versioned, crash-safe, verifiable Zarr or Arrow format.

Public API (see docs/architecture.md §3 and §8)::

    from kdcache.storage import open_store
    store = open_store("/data/store")          # or "memory://s", "s3://bucket/s"
    for seq in store.iter_sequences(split="train"):
        seq.tokens, seq.topk_ids, seq.topk_logprobs   # numpy: (L,), (L, k), (L, k)

    from kdcache.storage import create_store, make_manifest
    manifest = make_manifest(backend="zarr", teacher={...}, tokenizer={...}, vocab_size=32000,
                             top_k=64, seq_len=1024, corpus={...}, shard_tokens=1 << 20)
    with create_store("/data/store", manifest) as writer:   # resumes if the manifest agrees
        writer.append("train", tokens, topk_ids, topk_logprobs)  # rolls over at shard_tokens

Layout: ``manifest.json``, ``shards/<split>-<index:05d>.zarr|.arrow`` and the commit record
``shards/<split>-<index:05d>.json`` (written last; only shards with a record exist for readers).
"""

from ._base import ShardArrays, ShardRecord, TeacherSequence
from .errors import (
    ShardExists,
    StoreCorrupt,
    StoreError,
    StoreIncompatible,
    StoreNotFound,
    StoreUnavailable,
    UnsupportedFormat,
)
from .manifest import make_manifest, manifest_differences
from .reader import Store, open_store, verify_store
from .writer import ShardWriter, StoreWriter, create_store

__all__ = [
    "ShardArrays",
    "ShardExists",
    "ShardRecord",
    "ShardWriter",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreIncompatible",
    "StoreNotFound",
    "StoreUnavailable",
    "StoreWriter",
    "TeacherSequence",
    "UnsupportedFormat",
    "create_store",
    "make_manifest",
    "manifest_differences",
    "open_store",
    "verify_store",
]
