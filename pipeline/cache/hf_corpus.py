"""Hugging Face ``datasets`` as corpora, read from local disk only, never the network.

A corpus spec is a dataset when it is

- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``
  (``state.json`` + ``dataset_info.json``, or ``dataset_dict.json``): ``load_from_disk``,
  memory-mapped;
- a directory whose ``README.md`` has a YAML header with ``configs`` or ``dataset_info`` (a
  dataset repository as downloaded), or any directory given as ``hf:DIR``: read as
  ``load_dataset(DIR, name=config, split=split, streaming=True)`` reads it;
- ``hf:NAME`` or ``hf:NAME@REVISION`` (``org/name``, not a local directory): that repository's
  snapshot in the local hub cache (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``), read as a folder.

One split of one config is the corpus; its rows are streamed in order, so every rank reads the
same documents. Columns decide the kind, as a parquet file's do: ``messages`` (chat), ``prompt``
and ``completion``, or the text column; each can be renamed by an option. ``DatasetCorpus`` is
the corpus' one entry; ``corpus.iter_documents`` reads it through its ``documents`` method.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdcache.pipeline.cache.corpus import CorpusError, CorpusStats, Document, record_document

HF_PREFIX = "hf:"
BATCH_ROWS = 1024
_HUB_NAME = re.compile(r"[\w.-]+(/[\w.-]+)?(@[\w./-]+)?")
_KINDS = (("chat", ("messages",)), ("prompt", ("prompt", "completion")), ("text", ("text",)))


@dataclass(frozen=True)
class DatasetOptions:
    """Which part of a dataset is the corpus: its config, its split (None: ``train``, or the only
    split) and the column of each field of a record."""

    split: str | None = None
    config: str | None = None
    text: str = "text"
    messages: str = "messages"
    prompt: str = "prompt"
    completion: str = "completion"

    def columns(self) -> dict[str, str]:
        """Record field → the column it is read from."""
        return {k: getattr(self, k) for k in ("messages", "prompt", "completion", "text")}


class DatasetCorpus(type(Path())):  # type: ignore[misc]
    """A dataset as the corpus' one entry: a ``Path`` (its directory; for ``hf:NAME`` the
    snapshot) that reads its own rows; ``open_dataset`` sets the attributes."""

    spec: str  # what the manifest records
    label: str  # the spec and split, in messages
    kind: str
    facts: dict[str, Any]  # the manifest's corpus.dataset: source, config, split, columns, …
    data_files: list[Path]  # what the split is read from
    dataset: Any  # the split's Dataset or IterableDataset, its record columns only

    @property
    def num_files(self) -> int:
        return len(self.data_files)

    def documents(self, stats: CorpusStats) -> Iterator[Document]:
        """The rows as documents, in order, ``BATCH_ROWS`` Arrow rows at a time."""
        columns = self.facts["columns"]
        row = 0
        try:
            for table in self.dataset.with_format("arrow").iter(batch_size=BATCH_ROWS):
                for values in table.to_pylist():
                    row += 1
                    record = {field: values[column] for field, column in columns.items()}
                    if self.kind != "prompt" and None in record.values():  # an empty document
                        record = {"messages": []} if self.kind == "chat" else {"text": ""}
                    document = record_document(record, "text", f"{self.label}:{row}")
                    if document is None:
                        stats.unparseable_skipped += 1
                        continue
                    yield document
        except CorpusError:
            raise
        except Exception as e:  # datasets, pyarrow and fsspec raise many types for a bad file
            raise CorpusError(
                f"cannot read dataset, {self.label}, after row {row} ({_line(e)})"
            ) from e

    def fingerprint(self) -> str:
        """sha256 over the source, config and split, and each data file's name and size, with
        its blob name (hub snapshots: a content hash) or, in a folder, its mtime."""
        facts = self.facts
        content = facts.get("revision") or facts.get("fingerprint")  # hub commit, saved dataset's
        digest = hashlib.sha256(
            f"{facts['source']} {content} {facts.get('config')} {facts['split']}\n".encode()
        )
        for path in self.data_files:
            stat, name = path.stat(), os.path.relpath(path, self)
            identity = (
                os.path.basename(os.readlink(path)) if path.is_symlink() else stat.st_mtime_ns
            )
            identity = "" if facts["source"] == "saved" else identity
            digest.update(f"{name}\0{stat.st_size}\0{identity}\n".encode())
        return digest.hexdigest()

    def num_bytes(self) -> int:
        """The corpus' size: a saved dataset's record columns, a folder's data files."""
        if self.facts["source"] == "saved":
            return int(self.dataset.data.nbytes)
        return sum(p.stat().st_size for p in self.data_files)


def open_dataset(spec: str, options: DatasetOptions) -> DatasetCorpus | None:
    """The dataset ``spec`` names, opened and checked (config, split, columns), or ``None`` when
    ``spec`` is not a dataset (files, a glob or a built-in corpus).

    Raises:
        CorpusError: ``datasets`` is missing; the dataset, its config, split or a column is not
            there; ``hf:NAME`` is not in the local cache.
    """
    given = spec[len(HF_PREFIX) :] if spec.startswith(HF_PREFIX) else None
    path = Path(spec if given is None else given).expanduser()
    if path.is_dir():
        local = f"{HF_PREFIX if given is not None else ''}{path.absolute()}"
        if is_saved_dataset(path):
            return _entry(path, spec, local, options, *_open_saved(path, spec, options))
        if given is not None or has_dataset_card(path):
            opened = _open_folder(path, spec, options, {"source": "folder"})
            return _entry(path, spec, local, options, *opened)
        return None
    if given is None:
        return None
    if not _HUB_NAME.fullmatch(given):
        raise CorpusError(
            f"not a dataset directory nor a Hugging Face dataset name, {spec}, "
            "give hf:org/name, hf:org/name@revision or hf:DIR"
        )
    snapshot, facts = _snapshot(given, spec)
    return _entry(snapshot, spec, spec, options, *_open_folder(snapshot, spec, options, facts))


def is_saved_dataset(path: Path) -> bool:
    """A directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    dataset = (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    return dataset or (path / "dataset_dict.json").is_file()


def has_dataset_card(path: Path) -> bool:
    """``README.md`` starts with a YAML header that has ``configs`` or ``dataset_info``."""
    import yaml

    try:
        text = (path / "README.md").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    header = re.match(r"---\r?\n(.*?)\r?\n---\s*(\n|$)", text, re.DOTALL)
    try:
        card = yaml.safe_load(header.group(1)) if header else None
    except yaml.YAMLError:
        return False
    return isinstance(card, dict) and bool({"configs", "dataset_info"} & set(card))


_Opened = tuple[dict[str, Any], Any, list[str], list[Path]]  # facts, dataset, columns, files


def _open_saved(path: Path, spec: str, o: DatasetOptions) -> _Opened:
    datasets = _datasets()
    if o.config is not None:
        raise CorpusError(
            f"--dataset-config applies to dataset repositories, {spec} is a dataset saved with "
            "save_to_disk, leave it out"
        )
    with _quiet_offline():
        try:
            loaded = datasets.load_from_disk(str(path))
        except Exception as e:  # a damaged state.json or Arrow file
            raise CorpusError(f"cannot read the saved dataset, {spec} ({_line(e)})") from e
    if isinstance(loaded, datasets.DatasetDict):
        split = _choose_split(list(loaded), o.split, spec)
        dataset = loaded[split]
    else:
        dataset, split = loaded, None if loaded.split is None else str(loaded.split)
        if o.split is not None and o.split != split:
            raise CorpusError(
                f"{spec} is one saved Dataset (split {split or 'not named'}), got --dataset-split "
                f"{o.split}, leave it out"
            )
    facts = {"source": "saved", "fingerprint": dataset._fingerprint, "split": split}
    files = [Path(f["filename"]) for f in dataset.cache_files]
    return facts, dataset, dataset.column_names, files


def _open_folder(path: Path, spec: str, o: DatasetOptions, facts: dict[str, Any]) -> _Opened:
    """A dataset repository folder, as ``load_dataset(path, name, split=..., streaming=True)``
    reads it (that call is a ``load_dataset_builder`` and its ``as_streaming_dataset``)."""
    datasets = _datasets()
    with _quiet_offline():
        try:
            builder = datasets.load_dataset_builder(
                str(path), name=o.config, cache_dir=str(_hf_home("HF_DATASETS_CACHE", "datasets"))
            )
        except Exception as e:  # a missing or ambiguous config, no data files, a bad card
            raise _folder_error(datasets, path, spec, o, e) from e
        splits = {
            str(k): [Path(f) for f in v] for k, v in (builder.config.data_files or {}).items()
        }
        split = _choose_split(list(splits), o.split, spec)
        stream = builder.as_streaming_dataset(split=split)
        names = stream.column_names
        if names is None:  # features unknown until a row is read
            first = next(iter(stream), None)
            names = [] if first is None else list(first)
    return {**facts, "config": builder.config.name, "split": split}, stream, names, splits[split]


def _snapshot(name: str, spec: str) -> tuple[Path, dict[str, Any]]:
    """The snapshot directory of ``org/name[@revision]`` in the local hub cache, and its facts."""
    from huggingface_hub import snapshot_download

    _datasets()
    repo, _, revision = name.partition("@")
    cache = _hf_home("HF_HUB_CACHE", "hub")
    with _quiet_offline():
        try:
            folder = snapshot_download(
                repo,
                repo_type="dataset",
                revision=revision or None,
                cache_dir=str(cache),
                local_files_only=True,
            )
        except Exception as e:  # LocalEntryNotFoundError; others for a damaged cache
            which = f"{repo} revision {revision}" if revision else repo
            raise CorpusError(
                f"dataset {which} is not in the local Hugging Face cache ({cache}), {spec}, "
                f"download it where there is network (hf download {repo} --repo-type dataset) "
                "and copy the cache there (HF_HOME or HF_HUB_CACHE), or pass a folder"
            ) from e
    return Path(folder), {"source": "hub", "repo": repo, "revision": Path(folder).name}


def _entry(path: Path, spec: str, local: str, o: DatasetOptions, *opened: Any) -> DatasetCorpus:
    facts, dataset, names, files = opened
    split = facts["split"]
    label = spec if split is None else f"{spec}[{split}]"
    kind, columns = _columns(names, o, label)
    entry = DatasetCorpus(path)
    entry.spec, entry.label, entry.kind, entry.data_files = local, label, kind, files
    entry.facts = {**facts, "columns": columns}
    entry.dataset = dataset.select_columns(list(dict.fromkeys(columns.values())))
    return entry


def _columns(names: list[str], o: DatasetOptions, label: str) -> tuple[str, dict[str, str]]:
    """The kind of record and its field → column map: the first kind whose columns were named by
    an option, else the first whose columns the dataset has (messages, prompt + completion,
    text)."""
    given = o.columns()
    named = {field for field, column in given.items() if column != field}
    for kind, fields in _KINDS:
        if (named & set(fields)) or (not named and all(given[f] in names for f in fields)):
            for field in fields:
                if given[field] not in names:
                    raise CorpusError(
                        f"dataset has no column {given[field]!r} ({_option(field)}), {label}, "
                        f"its columns are {', '.join(names) or 'none'}"
                    )
            return kind, {field: given[field] for field in fields}
    raise CorpusError(
        f"dataset has no column {o.text!r} (nor messages, nor prompt and completion), {label}, "
        f"its columns are {', '.join(names) or 'none'}, name one with --text-field, "
        "--messages-column or --prompt-column and --completion-column"
    )


def _option(field: str) -> str:
    return "--text-field" if field == "text" else f"--{field}-column"


def _choose_split(splits: list[str], wanted: str | None, spec: str) -> str:
    """``wanted``; without it ``train``, or the only split."""
    if wanted is None and ("train" in splits or len(splits) == 1):
        return "train" if "train" in splits else splits[0]
    if wanted in splits:
        return wanted
    what = f"no split {wanted!r}" if wanted else "several splits and none is 'train'"
    raise CorpusError(
        f"dataset has {what}, {spec}, its splits are {', '.join(splits) or 'none'}, pass one "
        "with --dataset-split"
    )


def _folder_error(
    datasets: Any, path: Path, spec: str, o: DatasetOptions, e: Exception
) -> CorpusError:
    try:
        configs = datasets.get_dataset_config_names(str(path))
    except Exception:  # the folder itself cannot be read: say why below
        configs = []
    if (o.config is None and len(configs) > 1) or (configs and o.config not in (None, *configs)):
        what = f"no config {o.config!r}" if o.config else "several configs"
        return CorpusError(
            f"dataset has {what}, {spec}, its configs are {', '.join(configs)}, pass one with "
            "--dataset-config"
        )
    return CorpusError(
        f"cannot read the dataset folder, {spec} ({_line(e)}), give a dataset saved with "
        "save_to_disk or a folder of data files that datasets.load_dataset reads"
    )


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise CorpusError(
            "reading a Hugging Face dataset needs the datasets package, pip install 'kdcache[hf]'"
        ) from e
    return datasets


def _hf_home(variable: str, name: str) -> Path:
    """``$variable``, else ``$HF_HOME/name`` (``~/.cache/huggingface/name``), read now: the
    libraries read them once, at import."""
    legacy = os.environ.get("HUGGINGFACE_HUB_CACHE") if name == "hub" else None
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface"
    )
    chosen = os.environ.get(variable) or legacy or os.path.join(home, name)
    return Path(os.path.expandvars(chosen)).expanduser()


@contextmanager
def _quiet_offline() -> Iterator[None]:
    """huggingface_hub and datasets offline (flags they read from the environment at import, set
    here for the call), without progress bars or warnings: an error is one line."""
    import datasets
    import huggingface_hub.constants as hub
    from datasets.utils import logging

    saved = hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE, logging.get_verbosity()
    bars = not datasets.are_progress_bars_disabled()
    hub.HF_HUB_OFFLINE = datasets.config.HF_HUB_OFFLINE = True
    logging.set_verbosity_error()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        hub.HF_HUB_OFFLINE, datasets.config.HF_HUB_OFFLINE = saved[:2]
        logging.set_verbosity(saved[2])
        if bars:
            datasets.enable_progress_bars()


def _line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
