"""Output directories, and small files that must never be seen half-written (run records,
metrics, leaderboards)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

from kdcache.pipeline.errors import UserError


def create_out_dir(path: Path) -> None:
    """Create the ``--out`` directory (and its parents), or fail with one line."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create --out, {path} ({e.strerror}), give a writable directory"
        ) from e


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader (or a kill -9) sees the old file or the new one,
    never a part: a temporary file beside it, flushed to disk, then renamed over it."""
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex}-{path.name}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
