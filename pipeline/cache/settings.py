"""What ``kdcache cache-teacher`` is asked to do, checked before anything is touched.

``CacheSettings`` holds every option; ``check_settings`` validates what needs no teacher (and
opens a Hugging Face dataset corpus, ``hf_corpus``), ``corpus_facts`` reads the corpus far enough
to fingerprint it for the manifest, and ``check_token_ids`` keeps ids the model does not embed
away from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from kdcache.pipeline.cache.corpus import (
    STDLIB_CHAT,
    CorpusError,
    CorpusStats,
    iter_documents,
    resolve_corpus,
)
from kdcache.pipeline.cache.hf_corpus import DatasetCorpus, DatasetOptions, open_dataset
from kdcache.pipeline.errors import UserError
from kdcache.storage.manifest import (  # MAX_SAMPLES: what uint16 counts hold
    CODECS,
    DEFAULT_CODEC,
    MAX_SAMPLES,
    TARGETS,
)

FORMATS = ("zarr", "arrow")
PACKINGS = ("auto", "concat", "separate")  # auto: separate for chat corpora, concat for text
TRAIN_ON = ("assistant", "all")
DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
PROBE_TEXT = "def probe(x):\n    return x * 2  # The quick brown fox jumps over the lazy dog.\n"


@dataclass
class CacheSettings:
    """Every option of ``kdcache cache-teacher`` (see ``--help``)."""

    teacher: str
    corpus: str
    out: str
    top_k: int = 64
    seq_len: int = 1024
    batch_size: int = 8
    format: str = "zarr"
    shard_tokens: int = 1 << 19
    dtype: str = "auto"
    eval_fraction: float = 0.02
    max_tokens: int | None = None
    text_field: str = "text"  # also the text column of a dataset corpus
    dataset_split: str | None = None  # a dataset corpus' split; None: train, or its only split
    dataset_config: str | None = None
    messages_column: str = "messages"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    trust_remote_code: bool = False
    targets: str = "topk"
    samples: int = 32
    sample_seed: int = 0
    sample_temperature: float = 1.0  # draws from the teacher's p^(1/T), normalized
    packing: str = "auto"
    train_on: str = "assistant"
    codec: str = DEFAULT_CODEC  # how the store keeps log-probs and ids (storage/_codec.py)
    devices_per_teacher: int = 1  # processes (one device each) per teacher replica
    split: str = "pipeline"  # how a replica spans its devices (placement.py)
    max_memory: str | None = None  # SIZE[,cpu=SIZE]: weights per device (placement.py)
    offload_dir: str | None = None  # where offloaded weights of non-safetensors checkpoints go
    chunk_tokens: int | None = None  # rows of vocab-wide floats at a time; None = 128 MiB worth
    storage_options: dict[str, Any] | None = None  # fsspec options of --out (--storage-options)
    # options given on the command line (not defaults): top_k, samples, sample_seed,
    # sample_temperature, train_on
    explicit: frozenset[str] = frozenset()

    def resolved_packing(self, kind: str) -> str:
        """concat or separate for a corpus of ``kind`` (text, chat or prompt)."""
        if self.packing != "auto":
            return self.packing
        return "concat" if kind == "text" else "separate"

    @property
    def dataset_options(self) -> DatasetOptions:
        """The options that choose what of a Hugging Face dataset corpus is read."""
        return DatasetOptions(
            self.dataset_split,
            self.dataset_config,
            self.text_field,
            self.messages_column,
            self.prompt_column,
            self.completion_column,
        )

    @property
    def wants_topk(self) -> bool:
        return "topk" in self.targets.split("+")

    @property
    def wants_samples(self) -> bool:
        return "sampled" in self.targets.split("+")

    @property
    def stored_top_k(self) -> int:
        """k of the stored top-k; 0 for sampled-only targets (the manifest's ``top_k``)."""
        return self.top_k if self.wants_topk else 0

    @property
    def stored_samples(self) -> int:
        """Draws per position; 0 for top-k-only targets (the manifest's ``samples``)."""
        return self.samples if self.wants_samples else 0

    @property
    def target_facts(self) -> dict[str, Any]:
        """The manifest facts of the targets these settings store, and of their codec."""
        return {
            "targets": self.targets,
            "top_k": self.stored_top_k,
            "samples": self.stored_samples,
            "sample_seed": self.sample_seed if self.wants_samples else None,
            "sample_temperature": self.sample_temperature,  # null in the manifest without samples
            "codec": self.codec,
        }


codec_option = click.option(
    "--codec",
    default=DEFAULT_CODEC,
    show_default=True,
    help="How the store keeps log-probs and ids: gaps (int16 levels, finest near log-prob 0, at "
    "most 1/16 nat off; ~40% smaller, students train as from raw) or raw (the float16 log-probs "
    "as computed); docs/architecture.md §3.",
)


def dataset_corpus_options(command: Any) -> Any:
    """The options of a Hugging Face dataset corpus: its split, config and columns."""
    options = (
        click.option(
            "--dataset-split",
            default=None,
            help="Split of a dataset corpus.  [default: train, or its only split]",
        ),
        click.option("--dataset-config", default=None, help="Config of a dataset repository."),
        click.option(
            "--messages-column",
            default="messages",
            show_default=True,
            help="Column of a dataset corpus holding chat messages (lists of role/content).",
        ),
        click.option(
            "--prompt-column",
            default="prompt",
            show_default=True,
            help="Column of a dataset corpus holding prompts.",
        ),
        click.option(
            "--completion-column",
            default="completion",
            show_default=True,
            help="Column of a dataset corpus holding completions.",
        ),
    )
    for option in reversed(options):
        command = option(command)
    return command


def check_settings(s: CacheSettings) -> list[Path]:
    """Validate what can be validated without the teacher; returns the corpus files."""
    if s.format not in FORMATS:
        raise UserError(f"unknown --format, {s.format}, use one of {', '.join(FORMATS)}")
    if s.dtype not in DTYPE_CHOICES:
        raise UserError(f"unknown --dtype, {s.dtype}, use one of {', '.join(DTYPE_CHOICES)}")
    if s.seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {s.seq_len}, pass a larger value")
    if s.packing not in PACKINGS:
        raise UserError(f"unknown --packing, {s.packing}, use one of {', '.join(PACKINGS)}")
    if s.train_on not in TRAIN_ON:
        raise UserError(f"unknown --train-on, {s.train_on}, use one of {', '.join(TRAIN_ON)}")
    if s.codec not in CODECS:
        raise UserError(f"unknown --codec, {s.codec}, use one of {', '.join(CODECS)}")
    check_targets(s)
    check_placement(s)
    for name, value in (("--batch-size", s.batch_size), ("--shard-tokens", s.shard_tokens)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}, pass a positive value")
    if s.max_tokens is not None and s.max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {s.max_tokens}, or leave it out")
    if not 0.0 <= s.eval_fraction < 1.0:
        raise UserError(f"--eval-fraction must be in [0, 1), got {s.eval_fraction}, e.g. 0.02")
    if "://" not in s.out:
        out = Path(s.out).expanduser()
        if out.exists() and not out.is_dir():
            raise UserError(f"output path is a file, {s.out}, give a directory for the store")
        if out.is_dir() and any(out.iterdir()) and not (out / "manifest.json").exists():
            raise UserError(
                f"output directory is not empty and not a kdcache store, {s.out}, "
                "give a new or empty directory"
            )
    try:
        dataset = open_dataset(s.corpus, s.dataset_options)
        if dataset is not None:
            return [dataset]
        files = resolve_corpus(s.corpus)
    except CorpusError as e:
        raise UserError(str(e)) from e
    given = s.dataset_options
    for name, value, default in (
        ("--dataset-split", given.split, None),
        ("--dataset-config", given.config, None),
        *((f"--{f}-column", given.columns()[f], f) for f in ("messages", "prompt", "completion")),
    ):
        if value != default:
            raise UserError(
                f"{name} applies to Hugging Face dataset corpora, {s.corpus} is not one, leave "
                "it out or give a dataset (hf:DIR reads a folder of data files as one)"
            )
    return files


def check_placement(s: CacheSettings) -> None:
    """--devices-per-teacher, --split, --max-memory and --offload-dir (made if missing)."""
    from kdcache.pipeline.cache.placement import (
        check_offload_dir,
        check_placement_options,
        parse_max_memory,
    )

    check_placement_options(s.devices_per_teacher, s.split)
    budget = parse_max_memory(s.max_memory)
    if s.split == "tensor" and (budget.given or s.offload_dir is not None):
        raise UserError(
            "--split tensor keeps every weight on its device, got --max-memory/--offload-dir, "
            "leave them out or use --split pipeline"
        )
    check_offload_dir(s.offload_dir)


def check_targets(s: CacheSettings) -> None:
    """--targets and the options that belong to it: --top-k, --samples, --sample-seed,
    --sample-temperature."""
    if s.targets not in TARGETS:
        raise UserError(f"unknown --targets, {s.targets}, use one of {', '.join(TARGETS)}")
    if not s.wants_topk and "top_k" in s.explicit:
        raise UserError(
            f"--top-k does not apply to --targets {s.targets}, got --top-k {s.top_k}, "
            "leave it out or use --targets topk+sampled"
        )
    for name, option, value in (
        ("samples", "--samples", s.samples),
        ("sample_seed", "--sample-seed", s.sample_seed),
        ("sample_temperature", "--sample-temperature", s.sample_temperature),
    ):
        if not s.wants_samples and name in s.explicit:
            raise UserError(
                f"{option} does not apply to --targets {s.targets}, got {option} {value}, "
                "leave it out or use --targets sampled or topk+sampled"
            )
    if s.wants_topk and s.top_k < 1:
        raise UserError(f"--top-k must be at least 1, got {s.top_k}, pass a positive value")
    if s.wants_samples:
        if s.samples < 1:
            raise UserError(f"--samples must be at least 1, got {s.samples}, pass a positive value")
        if s.samples > MAX_SAMPLES:
            raise UserError(
                f"--samples exceeds {MAX_SAMPLES}, the largest count the store's uint16 counts "
                f"hold, got {s.samples}, pass at most {MAX_SAMPLES}"
            )
        if not 0 <= s.sample_seed < 1 << 64:
            raise UserError(
                f"--sample-seed must be in [0, 2**64), got {s.sample_seed}, pass a non-negative "
                "integer"
            )
        if not (math.isfinite(s.sample_temperature) and s.sample_temperature > 0):
            raise UserError(
                f"--sample-temperature must be a positive number, got {s.sample_temperature}, "
                "pass the temperature the students will train at, e.g. 1.0"
            )


def corpus_facts(s: CacheSettings, files: list[Path]) -> tuple[dict[str, Any], int]:
    """The manifest's ``corpus`` entry, and an estimate of the corpus' size in bytes.

    Raises:
        UserError: every document is empty.
    """
    from kdcache.pipeline.cache.corpus import (
        STDLIB,
        check_parquet_columns,
        corpus_fingerprint,
        corpus_kind,
    )

    dataset = files[0] if isinstance(files[0], DatasetCorpus) else None
    stats = CorpusStats()
    try:
        kind = dataset.kind if dataset else corpus_kind(files, s.text_field)
        if kind == "text" and not dataset:
            check_parquet_columns(files, s.text_field)
        next(iter_documents(files, stats, s.text_field))
    except StopIteration:
        raise UserError(
            f"corpus has no non-empty documents ({stats.summary()}), {s.corpus}, "
            f"give files with text (field/column {s.text_field!r} for .jsonl/.parquet)"
        ) from None
    except CorpusError as e:
        raise UserError(str(e)) from e
    if kind == "text" and "train_on" in s.explicit:
        raise UserError(
            f"--train-on applies to chat and prompt/completion records, {s.corpus} holds "
            "plain text (every token is trained), leave it out"
        )
    builtin = s.corpus in (STDLIB, STDLIB_CHAT)
    spec = s.corpus if builtin else str(Path(s.corpus).expanduser().absolute())
    facts = {
        "spec": dataset.spec if dataset else spec,
        "fingerprint": dataset.fingerprint() if dataset else corpus_fingerprint(s.corpus, files),
        "files": dataset.num_files if dataset else len(files),
        "eval_fraction": s.eval_fraction,
        "text_field": s.text_field,
        "max_tokens": s.max_tokens,
        "kind": kind,  # text, chat or prompt (docs/architecture.md §4)
        "packing": s.resolved_packing(kind),
        "train_on": "all" if kind == "text" else s.train_on,
    }
    if dataset:  # source, config, split, columns (docs/architecture.md §4)
        return facts | {"dataset": dataset.facts}, dataset.num_bytes()
    return facts, sum(p.stat().st_size for p in files)


def check_token_ids(tokens: Any, vocab_size: int, teacher: str) -> None:
    """The tokenizer may know more tokens than the model embeds; such an id must not reach it."""
    highest = int(tokens.max())
    if highest >= vocab_size:
        raise UserError(
            f"the teacher's tokenizer produced token id {highest}, outside the model's vocabulary "
            f"of {vocab_size}, {teacher}, use the tokenizer the model was trained with"
        )
