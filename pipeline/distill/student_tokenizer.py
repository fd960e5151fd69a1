"""Which tokenizer a student reads: the store's (the teacher's), or its own.

A student has its own tokenizer when ``--student`` is a model directory holding tokenizer files
(``tokenizer.json`` / ``tokenizer_config.json``, as ``save_pretrained`` writes them) or a config
file whose ``tokenizer`` entry names a tokenizer directory (relative to the file). If that
tokenizer maps every token to the id the store's tokenizer gives it, the student is an ordinary
one; otherwise it is a cross-tokenizer student (``cross_tokenizer.py``): the store must give
the text and its spans (format 6 and later); it learns from the teacher's draws mapped to its
own tokens (``sampled-kl``, ``exact_matches.py``, a store with samples) or by chunk likelihood
matching (``alm``); ``auto`` picks by how many of its tokens start where the teacher's do
(``cross_loss``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kdcache.pipeline.distill.cross_tokenizer import CROSS_LOSS, CrossTokenizerCollator
from kdcache.pipeline.errors import UserError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
CROSS_LOSSES = ("auto", CROSS_LOSS, "sampled-kl", "ce")  # what a cross-tokenizer student takes
UNKNOWN_LIMIT = 0.01  # the share of the student's tokens that may be its unknown token
PROBE_SEQUENCES = 64  # stored sequences re-tokenized before training to count unknown tokens
MATCHED_SHARE = 0.6  # auto: the matched draws when this share of student tokens is aligned
# (measured: 0.89 (bpe-4k) beat the CE-only twin, 0.31 (bytes) lost to it; 0.6 lies between)


def tokenizer_dir(spec: str) -> Path | None:
    """The directory of the student's own tokenizer named by ``spec``, if it has one."""
    path = Path(spec)
    if path.is_dir():
        return path if any((path / name).is_file() for name in TOKENIZER_FILES) else None
    if path.suffix in (".json", ".yaml", ".yml") and path.is_file():
        try:
            fields = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            return None  # build_student reports the unreadable config
        entry = fields.get("tokenizer") if isinstance(fields, dict) else None
        if entry is None:
            return None
        found = (path.parent / str(entry)).resolve()
        if not found.is_dir():
            raise UserError(
                f"the student config's tokenizer is not a directory, {found}, name a directory "
                "written by tokenizer.save_pretrained (relative to the config file)"
            )
        return found
    return None


def own_tokenizer(spec: str) -> Any | None:
    """The student's own tokenizer (``AutoTokenizer``), or None: it reads the store's.

    Raises:
        UserError: the tokenizer cannot be loaded, or is not a fast tokenizer.
    """
    found = tokenizer_dir(spec)
    if found is None:
        return None
    from transformers import AutoTokenizer

    if not any((found / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(
            f"the student's tokenizer directory holds no tokenizer files ({', '.join(TOKENIZER_FILES)}), "
            f"{found}, save the tokenizer there with save_pretrained"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(found)
    except (OSError, ValueError) as e:
        reason = " ".join(str(e).split())  # transformers' messages span lines
        raise UserError(f"cannot load the student's tokenizer, {found} ({reason})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the student's tokenizer is not a fast tokenizer, {found}: cross-tokenizer "
            "alignment needs its offsets; save it with a tokenizer.json"
        )
    return tokenizer


def cross_student(spec: str, store: Any, loss: str, online: bool) -> CrossTokenizerCollator | None:
    """The collator of a student whose tokenizer is not the store's; None for an ordinary one
    (the store's tokenizer is read only for a student that brings its own).

    Raises:
        UserError: a loss other than auto/alm/ce, online KD, or a store without text spans.
    """
    from kdcache.pipeline.distill.student import load_store_tokenizer

    tokenizer = own_tokenizer(spec)
    same = tokenizer is None or tokenizer.get_vocab() == load_store_tokenizer(store).get_vocab()
    if same:
        if loss == CROSS_LOSS:
            raise UserError(
                f"--loss {CROSS_LOSS} is for a student with its own tokenizer, {spec} reads the "
                "store's; use --loss auto"
            )
        return None
    if loss not in CROSS_LOSSES:
        raise UserError(
            f"the student's tokenizer is not the store's ({spec}): it learns from the teacher's "
            f"matched draws (--loss sampled-kl, a store with samples) or by chunk likelihood "
            f"matching (--loss {CROSS_LOSS}); auto picks; ce is its CE-only twin; not --loss {loss}"
        )
    if loss == "sampled-kl" and not store.has_samples:
        raise UserError(
            f"--loss sampled-kl needs a store with samples, {store.url} holds "
            f"{store.manifest.get('targets', 'topk')} targets; use --loss {CROSS_LOSS} (or auto)"
        )
    if online:
        raise UserError(
            "a student with its own tokenizer learns from the store's text and log-probs; "
            "drop --teacher"
        )
    return cross_collator(store, tokenizer)


def cross_collator(store: Any, tokenizer: Any) -> CrossTokenizerCollator | None:
    """The batches of a student with its own ``tokenizer`` (None: no tokenizer given), with the
    teacher's matched draws when the store has samples.

    Raises:
        UserError: the store holds no text spans and realized-token log-probs (format < 6).
    """
    from kdcache.pipeline.distill.student import load_store_tokenizer

    if tokenizer is None:
        return None
    first = store.read_shard(store.shards_of("train")[0], sequences=[0]).sequence(0)
    if getattr(first, "text", None) is None or getattr(first, "next_token_logprob", None) is None:
        raise UserError(
            f"the store holds no text spans and realized-token log-probs (format "
            f"{store.manifest.get('format_version')}), {store.url}: a student with its own "
            "tokenizer needs them; re-cache the store with this kdcache"
        )
    teacher = load_store_tokenizer(store) if store.has_samples else None
    return CrossTokenizerCollator(tokenizer, teacher_tokenizer=teacher)


def cross_loss(loss: str, store: Any, collator: CrossTokenizerCollator) -> str:
    """``auto`` for a cross-tokenizer student, measured (bench/results/cross_tokenizer.md): the
    teacher's matched draws (``sampled-kl``) on a store with samples when at least
    ``MATCHED_SHARE`` of the student's tokens start where a teacher token does (a BPE of another
    size: there they beat the CE-only twin), else chunk likelihood matching (``alm``, never worse
    than the twin; a byte-level student, whose tokens mostly start inside teacher tokens, is
    taught the teacher's token-start bias by the draws). ``collator.stats`` must hold a probe
    (``check_encodes``)."""
    if loss != "auto":
        return loss
    if store.has_samples and collator.stats.aligned_share >= MATCHED_SHARE:
        return "sampled-kl"
    return CROSS_LOSS


def check_encodes(store: Any, collator: CrossTokenizerCollator) -> str | None:
    """Re-tokenize the first stored sequences: a note with the unknown tokens found.

    Raises:
        UserError: more than ``UNKNOWN_LIMIT`` of the student's tokens are unknown.
    """
    from kdcache.pipeline.distill.batches import sequence_fields

    record = store.shards_of("train")[0]
    count = min(record.num_sequences, PROBE_SEQUENCES)
    arrays = store.read_shard(record, sequences=list(range(count)))
    for i in range(count):
        collator.sequence(sequence_fields(arrays.sequence(i)))
    stats = collator.stats
    share = stats.unknown_tokens / max(stats.student_tokens, 1)
    if share > UNKNOWN_LIMIT:
        raise UserError(
            f"the student's tokenizer cannot encode the stored text: {stats.unknown_tokens:,} of "
            f"{stats.student_tokens:,} tokens ({share:.1%}) of {count} sequences are its unknown "
            "token; train the student's tokenizer on text like the corpus (byte fallback helps)"
        )
    if stats.unknown_tokens:
        return (
            f"{stats.unknown_tokens:,} of {stats.student_tokens:,} student tokens of the first "
            f"{count} stored sequences are its unknown token ({share:.2%})"
        )
    return None
