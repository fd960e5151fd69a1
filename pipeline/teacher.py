"""Load a Hugging Face teacher (a local directory or a hub id) and fingerprint it.

The fingerprints go into the store manifest, so a rerun with another teacher, another revision,
another dtype or another tokenizer is refused instead of silently mixing two teachers' targets.
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.precision import teacher_dtype

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
HUB_PROBE_SECONDS = 5.0
_HASH_BLOCK = 1 << 22


@dataclass
class TeacherSource:
    """Where a teacher comes from, before its weights are loaded.

    Attributes:
        name_or_path: what the user passed to ``--teacher``.
        config: the model config (``transformers.PretrainedConfig``).
        tokenizer: the teacher's tokenizer.
        local_dir: directory holding the files (the hub cache snapshot for a hub id).
        revision: the hub commit, or ``None`` for a plain local directory.
        load_options: ``from_pretrained`` options for a hub id (see ``hub_options``).
    """

    name_or_path: str
    config: Any
    tokenizer: Any
    local_dir: Path | None
    revision: str | None
    load_options: dict[str, Any] = field(default_factory=dict)

    @property
    def hub_unreachable(self) -> bool:
        """A hub id read from the local cache because the Hub did not answer."""
        from huggingface_hub import constants

        return bool(self.load_options.get("local_files_only")) and not constants.HF_HUB_OFFLINE

    @property
    def vocab_size(self) -> int:
        return int(self.config.get_text_config().vocab_size)

    @property
    def tokenizer_size(self) -> int:
        """Ids the tokenizer can produce (``len(tokenizer)``), at most the embedding's rows.

        Smaller than ``vocab_size`` when the embedding is padded (Qwen2.5: 151,665 ids on
        151,936 or 152,064 rows); the padded rows are no token and get no probability.
        """
        return min(len(self.tokenizer), self.vocab_size)

    @property
    def architecture(self) -> str:
        names = getattr(self.config, "architectures", None) or [self.config.model_type]
        return str(names[0])

    @property
    def eos_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        if eos is None:
            eos = self.config.get_text_config().eos_token_id
        if isinstance(eos, list):
            eos = eos[0] if eos else None
        if eos is None:
            raise UserError(
                f"the teacher's tokenizer has no EOS token, {self.name_or_path}, "
                "set eos_token in its tokenizer_config.json (documents are joined with EOS)"
            )
        return int(eos)


def hub_options(name_or_path: str) -> dict[str, Any]:
    """``from_pretrained`` options for ``name_or_path``: ``local_files_only`` for a hub id when the
    Hub cannot be reached. One quick probe (proxies honoured) instead of huggingface_hub's retries,
    which take minutes per file on a machine without internet even when the model is cached."""
    if Path(name_or_path).expanduser().exists():
        return {}
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if constants.HF_HUB_OFFLINE:
        return {"local_files_only": True}
    try:
        get_session().head(constants.ENDPOINT, timeout=HUB_PROBE_SECONDS)
    except Exception:  # any network failure (DNS, refused, timeout, proxy, TLS): offline
        return {"local_files_only": True}
    return {}


def _hub_snapshot(name: str) -> tuple[Path | None, str | None]:
    """The cached snapshot directory and commit of a hub model, when it is in the local cache."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers depends on huggingface_hub
        return None, None
    cached = try_to_load_from_cache(name, "config.json")
    if not isinstance(cached, str):
        return None, None
    snapshot = Path(cached).parent
    return snapshot, snapshot.name


def open_teacher(name_or_path: str, *, trust_remote_code: bool = False) -> TeacherSource:
    """Read a teacher's config and tokenizer (cheap: no weights), so options can be checked first.

    Raises:
        UserError: the teacher cannot be found or has no usable tokenizer.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(name_or_path).expanduser()
    looks_local = (
        path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    )
    if looks_local and not path.is_dir():
        what = "is a file, not a model directory" if path.exists() else "does not exist"
        raise UserError(
            f"teacher {what}, {name_or_path}, give a Hugging Face model directory or a hub id"
        )
    load_options = hub_options(name_or_path)
    options = {"trust_remote_code": trust_remote_code, **load_options}
    try:
        config = AutoConfig.from_pretrained(name_or_path, **options)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        hint = (
            "pass --trust-remote-code if you trust its code"
            if "trust_remote_code" in str(e)
            else "give a model directory, or a hub id that is cached or reachable"
        )
        raise UserError(f"cannot load teacher, {name_or_path}, {hint} ({reason})") from e
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, **options)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise UserError(
            f"teacher has no usable tokenizer, {name_or_path}, save the tokenizer beside the "
            "model (tokenizer.save_pretrained(DIR))"
        ) from e
    if isinstance(tokenizer, bool) or not callable(tokenizer):
        raise UserError(
            f"teacher has no usable tokenizer, {name_or_path}, save the tokenizer beside the "
            "model (tokenizer.save_pretrained(DIR))"
        )
    if path.is_dir():
        return TeacherSource(name_or_path, config, tokenizer, path, None)
    snapshot, revision = _hub_snapshot(name_or_path)
    return TeacherSource(name_or_path, config, tokenizer, snapshot, revision, load_options)


def resolve_dtype(name: str, config: Any, device: torch.device) -> torch.dtype:
    """``auto`` = the config's dtype where ``device`` runs it natively, float32 on the CPU
    (``precision.teacher_dtype``)."""
    if name != "auto":
        return DTYPES[name]
    wanted = getattr(config.get_text_config(), "dtype", None) or getattr(config, "dtype", None)
    if isinstance(wanted, str):
        wanted = DTYPES.get(wanted)
    return teacher_dtype(wanted, device)


def pretrained_target(source: TeacherSource) -> tuple[str, dict[str, Any]]:
    """What to pass ``from_pretrained``: the local files, or the hub id and its options."""
    if source.local_dir is not None:
        return str(source.local_dir), {}
    return source.name_or_path, source.load_options  # a hub id not (fully) in the cache


def load_model(
    source: TeacherSource,
    dtype: torch.dtype,
    device: torch.device | None,
    *,
    trust_remote_code: bool,
    **placement: Any,
) -> Any:
    """The teacher in ``eval()`` mode on ``device``, gradients off.

    Args:
        device: where the whole model goes; None when ``placement`` (``device_map`` and
            ``offload_folder``, or ``distributed_config``) places it instead.
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    target, options = pretrained_target(source)
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # the run has one progress bar: ours
    # "parameters are on the meta device because they were offloaded": our own note says where
    dispatch_log = logging.getLogger("accelerate.big_modeling")
    level = dispatch_log.level
    dispatch_log.setLevel(logging.ERROR)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            target, dtype=dtype, trust_remote_code=trust_remote_code, **options, **placement
        )
    except (OSError, ValueError, RuntimeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"cannot load the teacher's weights, {source.name_or_path}, check that it is a "
            f"causal language model with its weight files ({reason})"
        ) from e
    finally:
        dispatch_log.setLevel(level)
        if shown:
            hf_logging.enable_progress_bar()
    if device is not None:
        model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(directory: Path) -> str:
    """sha256 over the sorted (name, sha256) of every weight file in ``directory``."""
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)
    )
    if not files:
        raise UserError(
            f"teacher directory has no weight files, {directory}, save the model with "
            "save_pretrained (*.safetensors or *.bin)"
        )
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.name}\0{_sha256_file(path)}\n".encode())
    return digest.hexdigest()


def teacher_fingerprint(source: TeacherSource, dtype: torch.dtype) -> dict[str, Any]:
    """The manifest's ``teacher`` entry: name, revision or weights sha256, dtype, architecture."""
    facts: dict[str, Any] = {"name_or_path": source.name_or_path}
    if source.revision is not None:
        facts["revision"] = source.revision
    elif source.local_dir is not None:
        facts["weights_sha256"] = weights_sha256(source.local_dir)
    facts["dtype"] = str(dtype).removeprefix("torch.")
    facts["architecture"] = source.architecture
    return facts


TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def tokenizer_files(source: TeacherSource) -> dict[str, bytes]:
    """The tokenizer's files, name -> bytes: what the store carries and what is fingerprinted.

    The teacher's own files are used as shipped (``save_pretrained`` output is not stable: it
    records load-time options such as ``local_files_only``). They are checked by loading them
    back and comparing an encoding; when they are incomplete, the saved tokenizer is used.
    """
    from transformers import AutoTokenizer

    tokenizer = source.tokenizer
    files: dict[str, bytes] = {}
    if source.local_dir is not None:
        names = {*TOKENIZER_FILES, *getattr(tokenizer, "vocab_files_names", {}).values()}
        files = {
            p.name: p.read_bytes()
            for p in sorted(source.local_dir.iterdir())
            if p.is_file() and p.name in names
        }
        config = files.get("tokenizer_config.json", b"")
        if b'"tokenizer_class"' not in config and (source.local_dir / "config.json").is_file():
            files["config.json"] = (source.local_dir / "config.json").read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        for name, data in files.items():
            (Path(tmp) / name).write_bytes(data)
        try:
            reloaded = AutoTokenizer.from_pretrained(tmp) if files else None
        except (OSError, ValueError, TypeError, KeyError):
            reloaded = None
        probe = "def f(x):\n    return x  # caf\u00e9 \u2603\n"
        if reloaded is not None and reloaded(probe)["input_ids"] == tokenizer(probe)["input_ids"]:
            return files
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_bytes() for p in sorted(Path(tmp).iterdir()) if p.is_file()}


def tokenizer_fingerprint(files: dict[str, bytes], size: int | None = None) -> dict[str, Any]:
    """The manifest's ``tokenizer`` entry: sha256 over the files, each file's sha256, and the
    number of ids it produces (``size``, when given)."""
    hashes = {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())}
    digest = hashlib.sha256()
    for name, sha in hashes.items():
        digest.update(f"{name}\0{sha}\n".encode())
    facts: dict[str, Any] = {"sha256": digest.hexdigest(), "files": hashes}
    if size is not None:
        facts["size"] = size
    return facts
