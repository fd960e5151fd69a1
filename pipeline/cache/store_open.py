"""Open the store on every rank: rank 0 creates or reopens it (checked against this run's
manifest) and writes the tokenizer, then the others join; a failure is one line from rank 0."""

from __future__ import annotations

from typing import Any

from kdcache.pipeline.cache.settings import CacheSettings
from kdcache.pipeline.errors import UserError


def open_store_on_all_ranks(
    accelerator: Any,
    s: CacheSettings,
    manifest: dict[str, Any],
    tokenizer: dict[str, bytes],
    *,
    create: bool = True,
) -> Any:
    """Rank 0 creates (or reopens) the store and writes the tokenizer; then the others join.

    With ``create=False`` only a store that already exists is reopened (and checked against
    ``manifest``); returns None when there is none yet, having written nothing.
    """
    from accelerate.utils import broadcast_object_list

    from kdcache.storage import (
        StoreIncompatible,
        StoreNotFound,
        StoreUnavailable,
        create_store,
        open_store,
    )

    writer, failure, exists = None, [None], True
    if accelerator.is_main_process:
        try:
            if not create:
                try:
                    open_store(s.out, storage_options=s.storage_options)
                except StoreNotFound:
                    exists = False
            if exists:
                writer = create_store(s.out, manifest, storage_options=s.storage_options)
                writer.write_tokenizer(tokenizer)
        except StoreIncompatible as e:
            lines = "; ".join(e.differences) or str(e)
            failure[0] = (
                f"the store at {s.out} was made with other settings ({lines}), rerun with its "
                "settings to resume, or give a new --out"
            )
        except StoreUnavailable as e:
            failure[0] = str(e)
        except (OSError, ValueError) as e:
            failure[0] = f"cannot create the store, {s.out}, ({e})"
    if accelerator.num_processes > 1:
        broadcast_object_list(failure, from_process=0)
    if failure[0] is not None:
        if not accelerator.is_main_process:
            raise SystemExit(2)  # rank 0 prints the one error line
        raise UserError(failure[0])
    if not _agree_on_all_ranks(accelerator, exists):
        return None  # no store yet, nothing written
    if writer is None:
        writer = create_store(s.out, manifest, storage_options=s.storage_options)
    return writer


def _agree_on_all_ranks(accelerator: Any, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (each rank calls this once at the same point)."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes > 1:
        box = [value]
        broadcast_object_list(box, from_process=0)
        value = box[0]
    return value
