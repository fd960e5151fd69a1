"""kdcache.storage — the logit store: a versioned, crash-safe, verifiable Zarr or Arrow format.

Public API (see docs/architecture.md §3 and §8)::

    from kdcache.storage import open_store
    store = open_store("/data/store")          # or "memory://s", "s3://bucket/s"
    store.targets, store.has_topk, store.has_samples   # "topk" | "sampled" | "topk+sampled"
    store.has_loss_mask, store.tokenizer_size         # v3: targets at trained positions only
    store.read_shard(store.shards[0])              # a ShardArrays; sequences=[...]: only those
    for seq in store.iter_sequences(split="train"):
        seq.tokens, seq.loss_mask                     # (L,) int32, (L,) uint8 or None
        seq.trained_positions                         # (T,) int64: position of each target row
        seq.topk_ids, seq.topk_logprobs               # (T, k), (T, k); T = L without a mask
        seq.topk_tail_logprob                         # (T,) log of the mass outside the top-k
        seq.sampled_distinct, seq.sampled_offsets     # (T,), (T+1,): target row r owns entries
        seq.sampled_ids, seq.sampled_counts, seq.sampled_logprobs  # (M,) [off[r]:off[r+1]]
        # a field the store lacks is None

    from kdcache.storage import create_store, make_manifest
    manifest = make_manifest(backend="zarr", teacher={...}, tokenizer={...}, vocab_size=32000,
                             top_k=64, seq_len=1024, corpus={...}, shard_tokens=1 << 20,
                             targets="topk+sampled", samples=64, sample_seed=0,
                             loss_mask=True)
    with create_store("/data/store", manifest) as writer:   # resumes if the manifest agrees
        writer.append("train", tokens, topk_ids, topk_logprobs,   # rolls over at shard_tokens
                      topk_tail_logprob=tail, sampled_distinct=distinct, sampled_ids=ids,
                      sampled_counts=counts, sampled_logprobs=logprobs,
                      loss_mask=mask)   # (L,) 0/1; the targets' T rows are mask's 1s, in order

Layout: ``manifest.json``; one write attempt's shard data at
``shards/<split>-<index:05d>.<attempt>.zarr|.arrow`` (``<split>-<index:05d>.zarr|.arrow`` before
format 7); the commit record ``shards/<split>-<index:05d>.json`` that names it (written last;
only shards with a record exist for readers). This kdcache writes format_version 7 (codec
``raw`` or ``gaps``, ``make_manifest(codec=...)``;
``next_token_logprob=True, text=True`` for per-position next-token log-probs and the text with
each token's span: ``seq.next_token_logprob`` (L,), ``seq.text`` (B,) uint8, ``seq.token_ends``
(L,) int64, None without them; ``require_text`` refuses a store that lacks them) and reads 1 to
7 (docs/architecture.md §3).
"""

from ._arrays import ShardArrays, TeacherSequence
from ._base import ShardRecord
from ._shard_writer import ShardWriter
from ._text import require_text
from .errors import (
    BucketNotFound,
    ShardExists,
    StoreAccessDenied,
    StoreCorrupt,
    StoreError,
    StoreIncompatible,
    StoreNotFound,
    StoreUnavailable,
    StoreUnreachable,
    UnsupportedFormat,
)
from .manifest import make_manifest, manifest_differences, sample_temperature, tokenizer_size
from .reader import Store, open_store, verify_store
from .writer import StoreWriter, create_store

__all__ = [
    "BucketNotFound",
    "ShardArrays",
    "ShardExists",
    "ShardRecord",
    "ShardWriter",
    "Store",
    "StoreCorrupt",
    "StoreError",
    "StoreIncompatible",
    "StoreNotFound",
    "StoreAccessDenied",
    "StoreUnavailable",
    "StoreUnreachable",
    "StoreWriter",
    "TeacherSequence",
    "UnsupportedFormat",
    "create_store",
    "make_manifest",
    "manifest_differences",
    "open_store",
    "require_text",
    "sample_temperature",
    "tokenizer_size",
    "verify_store",
]
