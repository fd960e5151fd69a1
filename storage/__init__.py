"""kdcache.storage — the logit store: a versioned, crash-safe, verifiable Zarr or Arrow format.

Public API (see ../shared/DESIGN.md §2 and §5)::

    from kdcache.storage import open_store
    store = open_store("/data/store")          # or "memory://s", "s3://bucket/s"
    for seq in store.iter_sequences(split="train"):
        seq.tokens, seq.topk_ids, seq.topk_logprobs   # numpy: (L,), (L, k), (L, k)
"""

from kdcache.storage.errors import (
    ShardExists,
    StoreCorrupt,
    StoreError,
    StoreIncompatible,
    StoreNotFound,
    UnsupportedFormat,
)

__all__ = [
    "ShardExists",
    "StoreCorrupt",
    "StoreError",
    "StoreIncompatible",
    "StoreNotFound",
    "UnsupportedFormat",
]
