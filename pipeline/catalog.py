"""`kdcache ls ROOT`: the team's catalog — every logit store under a directory or an fsspec URL.

A store is a directory (an object-store prefix) holding a ``manifest.json`` that reads as a
kdcache manifest (docs/architecture.md §3). The search goes breadth first, a bounded number of
levels below ROOT, one ``ls`` per directory (one delimiter listing on an object store), and never
enters a store's own ``shards/`` or ``tokenizer/`` folders, where the many shard files are. Each
store found is opened through the storage API (manifest facts, committed shards' tokens and
bytes from their commit records); one that does not open is listed as damaged, with the reason.
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import click

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.store_commands import storage_options_option
from kdcache.storage import StoreError, open_store
from kdcache.storage._fs import TMP_PREFIX, StoreFS

MANIFEST = "manifest.json"
STORE_FOLDERS = ("shards", "tokenizer")  # a store's own folders: never searched
DEFAULT_DEPTH = 3
# any of these keys marks a JSON object as a kdcache manifest (a damaged one if it fails to parse)
MANIFEST_KEYS = ("format_version", "kdcache_version", "backend", "targets", "top_k")
OPEN_THREADS = 8  # stores opened at once: object stores answer slowly but in parallel
HEADER = (
    "path",
    "teacher",
    "tokenizer",
    "targets",
    "loss mask",
    "tokens",
    "bytes",
    "finished",
    "created (UTC)",
)
RIGHT = (5, 6)  # tokens and bytes: numbers, right-aligned


@dataclass
class Entry:
    """One row of the catalog: a store's facts, or (``problem`` set) why it could not be read."""

    path: str  # relative to ROOT, "." for ROOT itself
    url: str
    problem: str | None = None
    facts: dict[str, Any] = field(default_factory=dict)
    damaged: bool = True  # with a problem: a store that does not open (False: a folder unlisted)

    def as_json(self) -> dict[str, Any]:
        damaged = self.damaged and self.problem is not None
        return {"path": self.path, "url": self.url, "damaged": damaged, "problem": self.problem,
                **self.facts}  # fmt: skip


def open_root(root: str, options: dict[str, Any] | None) -> StoreFS:
    """ROOT's filesystem, checked to be a reachable directory (a UserError otherwise)."""
    try:
        fs = StoreFS(root, options)  # StoreUnavailable: unknown protocol, package not installed
    except TypeError as e:  # an option the filesystem does not take
        raise UserError(f"--storage-options not accepted for {root}, {e}, drop the option") from e
    try:
        is_dir = fs.isdir("")
        exists = is_dir or fs.exists("")
    except StoreError:  # the storage layer's own words: credentials, endpoint, bucket
        raise
    except Exception as e:  # every backend fails its own way: credentials, DNS, refused, ...
        raise UserError(
            f"cannot reach {root}, {type(e).__name__}: {e}, check the URL, the credentials "
            "and --storage-options"
        ) from e
    if not exists:
        raise UserError(f"no such directory, {root}, check the path or URL")
    if not is_dir:
        raise UserError(f"not a directory, {root}, give the folder or prefix holding the stores")
    return fs


def _base(name: str) -> str:
    return str(name).rstrip("/").rsplit("/", 1)[-1]


def find_stores(fs: StoreFS, depth: int) -> tuple[list[str], list[tuple[str, str]]]:
    """Directories holding a ``manifest.json`` (relative paths, "" = ROOT) down to ``depth``
    levels below ROOT, and [(directory, error)] for those that could not be listed."""
    found: list[str] = []
    unreadable: list[tuple[str, str]] = []
    level = [""]
    for d in range(depth + 1):
        below: list[str] = []
        for rel in level:
            try:
                entries = fs.fs.ls(fs.full(rel), detail=True)
            except FileNotFoundError:  # vanished while listing
                continue
            except Exception as e:  # permissions, a broken mount, the network: say so, go on
                unreadable.append((rel, f"{type(e).__name__}: {e}"))
                continue
            kinds = {_base(e["name"]): e.get("type") for e in entries}  # name -> file | directory
            is_store = kinds.get(MANIFEST) == "file"
            if is_store:
                found.append(rel)
            if d == depth:
                continue
            for name, kind in sorted(kinds.items()):
                hidden = name.startswith((".", TMP_PREFIX))  # .git, writers' temporaries
                if kind == "directory" and not hidden and not (is_store and name in STORE_FOLDERS):
                    below.append(f"{rel}/{name}" if rel else name)
        level = below
    return found, unreadable


def _is_kdcache_manifest(data: bytes) -> bool:
    """False for some other tool's JSON; unparseable bytes count as a damaged kdcache one."""
    try:
        value = json.loads(data)
    except ValueError:
        return True
    return isinstance(value, dict) and any(key in value for key in MANIFEST_KEYS)


def tokenizer_hash(tokenizer: dict[str, Any]) -> str:
    """The tokenizer's sha256 (as `kdcache inspect` shows it; a hash of the entry if absent)."""
    recorded = tokenizer.get("sha256")
    if isinstance(recorded, str):
        return recorded
    return hashlib.sha256(json.dumps(tokenizer, sort_keys=True).encode()).hexdigest()


def store_facts(url: str, options: dict[str, Any] | None) -> dict[str, Any]:
    """The catalog's facts of the store at ``url`` (``StoreError`` when it does not open)."""
    store = open_store(url, storage_options=options)
    m = store.manifest
    teacher = m["teacher"]
    return {
        "teacher": teacher.get("name_or_path", teacher.get("name")),
        "tokenizer_sha256": tokenizer_hash(m["tokenizer"]),
        "targets": store.targets,
        "top_k": store.top_k,
        "samples": store.samples,
        "loss_mask": store.has_loss_mask,
        "tokens": store.num_tokens,
        "trained_positions": store.num_trained if store.has_loss_mask else None,
        "sequences": store.num_sequences,
        "shards": len(store.shards),
        "bytes": store.nbytes,
        "finished": bool(m.get("finished", False)),
        "created_at": m.get("created_at"),
        "backend": store.backend,
        "format_version": m["format_version"],
    }


def _url(root: str, rel: str) -> str:
    """ROOT as the user gave it, joined with a relative path ("" = ROOT)."""
    return (root if root.endswith("/") else root + "/") + rel if rel else root


def _entry(fs: StoreFS, root: str, rel: str, options: dict[str, Any] | None) -> Entry | None:
    url = _url(root, rel)
    entry = Entry(path=rel or ".", url=url)
    try:
        if not _is_kdcache_manifest(fs.read(f"{rel}/{MANIFEST}" if rel else MANIFEST)):
            return None
        entry.facts = store_facts(url, options)
    except StoreError as e:  # a damaged or unsupported manifest, a damaged commit record
        entry.problem = str(e)
    except (OSError, ValueError, KeyError, TypeError) as e:  # unreadable files, odd values
        entry.problem = f"{type(e).__name__}: {e}"
    return entry


def catalog(
    root: str, *, depth: int = DEFAULT_DEPTH, storage_options: dict[str, Any] | None = None
) -> list[Entry]:
    """Every store under ``root`` (a path or fsspec URL), sorted by path; damaged ones included.

    Raises:
        UserError: ``root`` does not exist, cannot be reached, is not a directory, or holds no
            store down to ``depth`` levels.
    """
    fs = open_root(root, storage_options)
    found, unreadable = find_stores(fs, depth)
    if unreadable and unreadable[0][0] == "":
        raise UserError(f"cannot list {root}, {unreadable[0][1]}, check its permissions")
    with ThreadPoolExecutor(max_workers=OPEN_THREADS) as pool:
        opened = pool.map(lambda rel: _entry(fs, root, rel, storage_options), found)
        entries = [e for e in opened if e is not None]
    entries += [
        Entry(rel, _url(root, rel), problem=f"cannot list the folder ({why})", damaged=False)
        for rel, why in unreadable
    ]
    if not entries:
        raise UserError(
            f"no logit store under {root} (searched {depth} levels deep), give the folder that "
            "holds the stores or a larger --depth"
        )
    return sorted(entries, key=lambda e: e.path)


def _human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def _targets_cell(f: dict[str, Any]) -> str:
    parts = [f["targets"]]
    if f["top_k"]:
        parts.append(f"k={f['top_k']}")
    if f["samples"]:
        parts.append(f"n={f['samples']}")
    return " ".join(parts)


def _shorten(text: str, width: int = 40) -> str:
    """A long teacher path keeps its end (the model's name): ``...models/Qwen2.5-7B``."""
    return text if len(text) <= width else "..." + text[-(width - 3) :]


def row(entry: Entry) -> list[str]:
    """The table cells of ``entry`` (a damaged store: its path and the reason)."""
    if entry.problem is not None:
        return [entry.path, f"{'DAMAGED' if entry.damaged else 'UNREADABLE'}: {entry.problem}"]
    f = entry.facts
    created = str(f["created_at"] or "-").replace("T", " ")[:16]  # minutes, UTC
    return [
        entry.path,
        _shorten(str(f["teacher"])),
        f["tokenizer_sha256"][:12],
        _targets_cell(f),
        "yes" if f["loss_mask"] else "no",
        f"{f['tokens']:,}",
        _human_bytes(f["bytes"]),
        "yes" if f["finished"] else "no",
        created,
    ]


def table(entries: list[Entry]) -> str:
    """Aligned columns, one store per line; a damaged store's reason follows its path."""
    rows = [row(e) for e in entries]
    full = [list(HEADER), *(r for r in rows if len(r) == len(HEADER))]
    widths = [max(len(r[i]) for r in full) for i in range(len(HEADER))]
    widths[0] = max(len(r[0]) for r in (HEADER, *rows))
    lines = []
    for r in (list(HEADER), *rows):
        if len(r) == 2:  # damaged: path, reason
            lines.append(f"{r[0]:<{widths[0]}}  {r[1]}")
            continue
        cells = [
            c.rjust(w) if i in RIGHT else c.ljust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


@click.command(name="ls")
@click.argument("root")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list of objects, full values.")
@click.option(
    "--depth",
    type=click.IntRange(0, 10),
    default=DEFAULT_DEPTH,
    show_default=True,
    help="How many directory levels below ROOT to search for stores.",
)
@storage_options_option
def ls(root: str, as_json: bool, depth: int, storage_options: dict[str, Any] | None) -> None:
    """List the logit stores under ROOT (a directory or an fsspec URL such as s3://bucket/prefix):
    teacher, tokenizer, targets, loss mask, tokens, bytes, finished, created. Damaged stores are
    listed with the reason."""
    entries = catalog(root, depth=depth, storage_options=storage_options)
    if as_json:
        click.echo(json.dumps([e.as_json() for e in entries], indent=2))
    else:
        click.echo(table(entries))
