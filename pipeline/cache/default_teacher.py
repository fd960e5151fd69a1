"""The embedded default teacher: a BPE tokenizer and a small Llama trained briefly on a corpus.

``kdcache build-teacher`` (``make teacher``) makes a teacher without internet or GPU so the
whole pipeline can be tried on a laptop. The result is an ordinary Hugging Face model
directory (``save_pretrained`` + tokenizer), so stage one loads it exactly like any teacher
from the Hub. The recipe reads top to bottom: documents → tokenizer → packed sequences →
model → training loop → held-out evaluation → atomic save.

Held-out documents are chosen with the same content hash as ``cache-teacher``
(``is_eval_document``), so with the same ``--eval-fraction`` the teacher never trains on
the documents that later make up the store's ``eval`` split.

The teacher trains on plain text (EOS between documents, no BOS: its tokenizer adds no special
tokens). Its tokenizer carries a chat template that renders a conversation as Python (a user turn
as a signature line, an assistant turn as the docstring that follows), so the ``stdlib-chat``
corpus is meaningful to it. ``--from DIR`` adapts a built teacher to a corpus' training split
instead (``teacher_finetune``: ``make cache-teacher CORPUS=stdlib-chat`` tunes the default on the
records' completions).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F

from kdcache.pipeline.cache.corpus import (
    CorpusError,
    CorpusStats,
    is_eval_document,
    iter_documents,
    resolve_corpus,
)
from kdcache.pipeline.cache.packing import pack_sequences
from kdcache.pipeline.cache.teacher_finetune import finetune_teacher
from kdcache.pipeline.cache.teacher_training import (
    METADATA_FILE,
    check_out,
    make_optimizer,
    save_teacher_dir,
)
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.host_memory import keep_freed_memory
from kdcache.pipeline.precision import native_bf16
from kdcache.pipeline.progress import progress

__all__ = ["METADATA_FILE", "build_teacher", "command", "evaluate_perplexity"]

MIN_VOCAB = 300  # 256 byte symbols + 4 specials + a few merges


def _check_settings(s: dict[str, Any]) -> None:
    """Reject impossible settings before any work, one line each."""
    positive = ("steps", "batch_size", "hidden_size", "layers", "heads", "kv_heads")
    for name in positive:
        if s[name] < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, got {s[name]}, pass a positive number")
    if s["vocab_size"] < MIN_VOCAB:
        raise UserError(
            f"--vocab-size is too small for a byte-level BPE, got {s['vocab_size']}, "
            f"use at least {MIN_VOCAB}"
        )
    if s["seq_len"] < 2:
        raise UserError(f"--seq-len must be at least 2, got {s['seq_len']}, use e.g. 256")
    if s["hidden_size"] % s["heads"] or (s["hidden_size"] // s["heads"]) % 2:
        raise UserError(
            f"--hidden-size must be an even multiple of --heads, got {s['hidden_size']} and "
            f"{s['heads']}, e.g. --hidden-size 256 --heads 4"
        )
    if s["heads"] % s["kv_heads"]:
        raise UserError(
            f"--heads must be a multiple of --kv-heads, got {s['heads']} and {s['kv_heads']}, "
            "e.g. --heads 4 --kv-heads 2"
        )
    if not 0.0 < s["eval_fraction"] < 1.0:
        raise UserError(
            f"--eval-fraction must be between 0 and 1 (exclusive), got {s['eval_fraction']}, "
            "use e.g. 0.02"
        )
    if s["lr"] <= 0 or not math.isfinite(s["lr"]):
        raise UserError(f"--lr must be a positive number, got {s['lr']}, use e.g. 3e-3")


def _read_split(
    corpus: str, eval_fraction: float, text_field: str
) -> tuple[list[str], list[str], CorpusStats]:
    """Documents of ``corpus`` split into (train, held-out) by content hash."""
    try:
        files = resolve_corpus(corpus)
        stats = CorpusStats()
        train, held_out = [], []
        for document in iter_documents(files, stats, text_field=text_field):
            if document.kind != "text":
                raise UserError(
                    f"build-teacher trains on plain text, {corpus} holds {document.kind} "
                    f"records ({document.source}), give a text corpus such as `stdlib`, or "
                    "tune a built teacher on them with --from"
                )
            (held_out if is_eval_document(document.text, eval_fraction) else train).append(
                document.text
            )
    except CorpusError as e:
        raise UserError(str(e)) from e
    if not train or not held_out:
        which = "training" if not train else "held-out"
        raise UserError(
            f"the corpus yields no {which} documents, {corpus} ({stats.documents} documents), "
            "give a larger corpus or change --eval-fraction"
        )
    return train, held_out, stats


def _pack(tokenizer: Any, texts: list[str], seq_len: int) -> list[np.ndarray]:
    """Tokenize ``texts`` and pack them with EOS into sequences of ``seq_len`` tokens (last may be short)."""
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return list(pack_sequences(ids, seq_len, tokenizer.eos_token_id))


def _build_model(s: dict[str, Any], tokenizer: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=s["hidden_size"],
        intermediate_size=s["intermediate_size"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"],
        # longer than the training sequences so stage one may use a larger --seq-len
        max_position_embeddings=max(2048, s["seq_len"]),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(s["seed"])
    return AutoModelForCausalLM.from_config(config)


@torch.inference_mode()
def evaluate_perplexity(
    model: torch.nn.Module, sequences: list[np.ndarray], batch_size: int, device: torch.device
) -> tuple[float, int]:
    """Token-weighted next-token cross-entropy (nats) of ``model`` over ``sequences``.

    Sequences of equal length are batched together; each predicts tokens 1..L-1 from 0..L-2.

    Returns:
        (cross_entropy, number of predicted tokens).
    """
    model.eval()
    by_length: dict[int, list[np.ndarray]] = {}
    for sequence in sequences:
        if len(sequence) >= 2:
            by_length.setdefault(len(sequence), []).append(sequence)
    total, count = 0.0, 0
    for group in by_length.values():
        for start in range(0, len(group), batch_size):
            x = torch.from_numpy(np.stack(group[start : start + batch_size])).long().to(device)
            logits = model(input_ids=x).logits.float()  # (B, L, V)
            total += F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]),  # (B*(L-1), V)
                x[:, 1:].reshape(-1),  # (B*(L-1),)
                reduction="sum",
            ).item()
            count += x.shape[0] * (x.shape[1] - 1)
    model.train()
    return total / count, count


def build_teacher(s: dict[str, Any]) -> dict[str, Any]:
    """Train the tokenizer and the teacher described by ``s`` and save both under ``s['out']``.

    Returns:
        The metadata written to ``OUT/kdcache_teacher.json`` (settings and measured figures).
    """
    _check_settings(s)
    out = Path(s["out"])
    check_out(out, s["force"])
    if s["threads"] > 0:
        torch.set_num_threads(s["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    # 1. documents and tokenizer (trained on the training documents only); its chat template
    # renders a conversation as Python (a signature, then its docstring: the stdlib-chat corpus)
    from kdcache.pipeline.cache.tokenizer import PYTHON_CHAT_TEMPLATE, train_bpe_tokenizer

    train_texts, held_out_texts, stats = _read_split(
        s["corpus"], s["eval_fraction"], s["text_field"]
    )
    click.echo(f"corpus {s['corpus']}: {stats.summary()}; {len(held_out_texts)} held out", err=True)
    tokenizer = train_bpe_tokenizer(train_texts, vocab_size=s["vocab_size"])
    tokenizer.chat_template = PYTHON_CHAT_TEMPLATE
    train_sequences = [
        q for q in _pack(tokenizer, train_texts, s["seq_len"]) if len(q) == s["seq_len"]
    ]
    eval_sequences = _pack(tokenizer, held_out_texts, s["seq_len"])[: s["eval_sequences"]]
    if not train_sequences:
        raise UserError(
            f"the corpus is shorter than one training sequence, {s['corpus']}, "
            "give a larger corpus or a smaller --seq-len"
        )
    data = torch.from_numpy(np.stack(train_sequences)).long()  # (N, L)
    click.echo(
        f"tokenizer: {len(tokenizer)} tokens; {data.numel():,} training tokens in "
        f"{len(data)} sequences of {s['seq_len']}",
        err=True,
    )

    # 2. model and optimizer
    model = _build_model(s, tokenizer).to(device)
    keep_freed_memory(device)  # CPU only: no page-fault storm per vocab-wide tensor
    model.train()
    num_params = sum(p.numel() for p in model.parameters())
    optimizer, scheduler = make_optimizer(model, s["lr"], s["warmup"], s["steps"], device)
    use_bf16 = native_bf16(device)  # not the emulated bfloat16 of a T4 or V100

    # 3. the training loop: seeded shuffles of the packed sequences, epoch after epoch
    generator = torch.Generator().manual_seed(s["seed"])
    order = torch.randperm(len(data), generator=generator)
    cursor, tokens_seen, loss_value = 0, 0, float("nan")
    train_started = time.perf_counter()
    bar = progress(range(s["steps"]), desc="teacher", unit="step", dynamic_ncols=True)
    for _step in bar:
        if cursor + s["batch_size"] > len(order):
            order, cursor = torch.randperm(len(data), generator=generator), 0
        batch_size = min(s["batch_size"], len(order))
        x = data[order[cursor : cursor + batch_size]].to(device, non_blocking=True)  # (B, L)
        cursor += batch_size
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        tokens_seen += x.numel()
        loss_value = loss.item()
        elapsed = time.perf_counter() - train_started
        bar.set_postfix(
            loss=f"{loss_value:.3f}", tok_s=f"{tokens_seen / elapsed:,.0f}", refresh=False
        )
    bar.close()
    train_seconds = time.perf_counter() - train_started

    # 4. held-out evaluation
    eval_ce, eval_tokens = evaluate_perplexity(model, eval_sequences, s["batch_size"], device)
    wall = time.perf_counter() - started
    metadata = {
        "settings": {k: v for k, v in s.items() if k not in ("force",)},
        "vocab_size": len(tokenizer),
        "parameters": num_params,
        "train_tokens": tokens_seen,
        "train_sequences_available": len(data),
        "final_train_loss": loss_value,
        "eval_cross_entropy": eval_ce,
        "eval_perplexity": math.exp(eval_ce),
        "eval_tokens": eval_tokens,
        "eval_documents": len(held_out_texts),
        "train_seconds": train_seconds,
        "wall_seconds": wall,
        "device": device.type,
        "torch_version": torch.__version__,
    }

    # 5. save atomically: a half-written directory never looks like a teacher
    save_teacher_dir(out, model, tokenizer.save_pretrained, metadata)
    click.echo(
        f"teacher: {num_params / 1e6:.1f}M parameters, {tokens_seen:,} tokens in "
        f"{train_seconds:.0f}s ({tokens_seen / train_seconds:,.0f} tokens/s), held-out "
        f"perplexity {math.exp(eval_ce):.2f} over {eval_tokens:,} tokens, wall {wall:.0f}s "
        f"-> {out}"
    )
    return metadata


# the options whose default depends on the mode: (from scratch, with --from)
MODE_DEFAULTS = {
    "steps": (150, 75),
    "lr": (3e-3, 1e-3),
    "warmup": (15, 10),
    "eval_sequences": (64, None),
}
# what --from's teacher fixes: refused with --from
ARCHITECTURE = ("vocab_size", "hidden_size", "intermediate_size", "layers", "heads", "kv_heads")


@click.command("build-teacher")
@click.option(
    "--corpus",
    default="stdlib",
    show_default=True,
    help="Corpus spec: dir, file, glob, `stdlib` or (with --from) `stdlib-chat`.",
)
@click.option(
    "--out",
    default="artifacts/teacher",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Output HF model directory.",
)
@click.option(
    "--from",
    "base",
    default=None,
    type=click.Path(file_okay=False),
    help="Fine-tune this teacher directory (its tokenizer and sizes kept) on the training split "
    "of --corpus (text, or chat and prompt/completion records rendered and masked as "
    "cache-teacher does) instead of training a new one.",
)
@click.option("--vocab-size", default=8192, show_default=True, help="BPE vocabulary size.")
@click.option("--hidden-size", default=256, show_default=True)
@click.option("--intermediate-size", default=704, show_default=True)
@click.option("--layers", default=4, show_default=True, help="Decoder layers.")
@click.option("--heads", default=4, show_default=True, help="Attention heads.")
@click.option(
    "--kv-heads", default=2, show_default=True, help="Key/value heads (grouped-query attention)."
)
@click.option(
    "--seq-len",
    default=256,
    show_default=True,
    help="Training sequence length (with --from: records longer are skipped, as by "
    "cache-teacher --seq-len).",
)
@click.option("--batch-size", default=16, show_default=True, help="Sequences per step.")
@click.option(
    "--steps", type=int, default=None, help="Optimizer steps.  [default: 150; with --from: 75]"
)
@click.option(
    "--lr",
    type=float,
    default=None,
    help="Peak learning rate (AdamW).  [default: 0.003; with --from: 0.001]",
)
@click.option(
    "--warmup", type=int, default=None, help="Warmup steps.  [default: 15; with --from: 10]"
)
@click.option(
    "--eval-fraction",
    default=0.02,
    show_default=True,
    help="Share of documents held out (same hash split as cache-teacher).",
)
@click.option(
    "--eval-sequences",
    type=int,
    default=None,
    help="At most this many held-out sequences are evaluated.  [default: 64; with --from: all]",
)
@click.option(
    "--text-field", default="text", show_default=True, help="Text field of .jsonl/.parquet corpora."
)
@click.option("--seed", default=0, show_default=True)
@click.option(
    "--threads", default=0, show_default=True, help="CPU threads for torch (0 = torch's default)."
)
@click.option("--force", is_flag=True, help="Replace an existing --out directory.")
def command(base: str | None, **settings: Any) -> None:
    """Train the default teacher, or tune a teacher on a corpus' training split (--from).

    The default teacher is a BPE tokenizer and a small Llama, saved as a Hugging Face model
    directory. With --from, the teacher's tokenizer and sizes are kept and only the trained
    positions of the training split (a record's completion) carry the loss; the held-out
    documents (--eval-fraction, cache-teacher's split) are only evaluated.
    """
    from click.core import ParameterSource

    mode = int(base is not None)
    for name, defaults in MODE_DEFAULTS.items():
        if settings[name] is None:
            settings[name] = defaults[mode]
    if base is None:
        build_teacher(settings)
        return
    ctx = click.get_current_context()
    for name in ARCHITECTURE:
        if ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT, None):
            flag = "--" + name.replace("_", "-")
            raise UserError(
                f"{flag} is the --from teacher's, got {flag} {settings[name]}, leave it out"
            )
    kept = {k: v for k, v in settings.items() if k not in ARCHITECTURE}
    finetune_teacher({"base": base, **kept})
