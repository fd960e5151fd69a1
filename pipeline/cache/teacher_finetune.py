"""``build-teacher --from``: a teacher adapted to a corpus' training split by a short fine-tune.

The recipe reads top to bottom: load the teacher (its tokenizer files kept byte for byte, so a
store cached from the result has the same tokenizer fingerprint) → read the corpus exactly as
``cache-teacher`` reads it (same documents, BOS/EOS conventions, chat template, label mask, skips
and content-hash split: ``packing.tokenize_documents``) → held-out cross-entropy before → the
training loop on the training split only, the loss on the trained positions only (a record's
completion, as the store's loss mask) → held-out cross-entropy after → atomic save, with what it
was tuned from in ``kdcache_teacher.json``.

The training split is packed end to end (EOS between examples, as the teacher was pretrained), so
no step computes padding; the held-out split is laid out as cache-teacher lays it (one record per
sequence for chat and prompt/completion records), so the figure after the fine-tune is the
teacher's eval CE on the store's eval split.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F

from kdcache.pipeline.cache.chat import conventions
from kdcache.pipeline.cache.corpus import (
    CorpusError,
    CorpusStats,
    corpus_kind,
    iter_documents,
    resolve_corpus,
)
from kdcache.pipeline.cache.packing import TokenizedDocument, plan_shards, tokenize_documents
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

# a sequence and its trained positions: (L,) int32 tokens, (L,) bool (position t predicts t+1)
Sequence = tuple[np.ndarray, np.ndarray]


def _check_settings(s: dict[str, Any]) -> None:
    """Reject impossible settings before any work, one line each."""
    for name in ("steps", "batch_size"):
        if s[name] < 1:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"{flag} must be at least 1, got {s[name]}, pass a positive number")
    if s["warmup"] < 0:
        raise UserError(f"--warmup must be 0 or more, got {s['warmup']}, use e.g. 10")
    if s["seq_len"] < 2:
        raise UserError(f"--seq-len must be at least 2, got {s['seq_len']}, use e.g. 256")
    if not 0.0 < s["eval_fraction"] < 1.0:
        raise UserError(
            f"--eval-fraction must be between 0 and 1 (exclusive), got {s['eval_fraction']}, "
            "use the value cache-teacher will use, e.g. 0.02"
        )
    if s["lr"] <= 0 or not math.isfinite(s["lr"]):
        raise UserError(f"--lr must be a positive number, got {s['lr']}, use e.g. 1e-3")
    if s["eval_sequences"] is not None and s["eval_sequences"] < 1:
        raise UserError(
            f"--eval-sequences must be at least 1, got {s['eval_sequences']}, or leave it out"
        )
    base, out = Path(s["base"]), Path(s["out"])
    if not (base / "config.json").is_file():
        what = "does not exist" if not base.exists() else "holds no config.json"
        raise UserError(
            f"--from is not a teacher directory ({what}), {base}, give a model directory such "
            "as the one `make teacher` builds (artifacts/teacher)"
        )
    if out.resolve() == base.resolve():
        raise UserError(f"--out is the --from teacher, {out}, write the tuned teacher elsewhere")


def load_base(path: str) -> tuple[torch.nn.Module, Any, dict[str, bytes], dict[str, Any] | None]:
    """The teacher at ``path``: (model in float32, its ``TeacherSource``, its tokenizer files as
    shipped, its ``kdcache_teacher.json`` or None).

    Raises:
        UserError: no loadable tokenizer or causal LM there.
    """
    from transformers import AutoModelForCausalLM

    from kdcache.pipeline.teacher import open_teacher, tokenizer_files

    source = open_teacher(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, KeyError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(
            f"--from holds no loadable causal LM, {path}, give a teacher directory ({reason})"
        ) from e
    metadata_file = Path(path) / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else None
    return model, source, tokenizer_files(source), metadata


def split_examples(
    s: dict[str, Any], tokenizer: Any, eos_id: int | None
) -> tuple[list[Sequence], list[Sequence], dict[str, Any]]:
    """The corpus' (training, held-out) sequences with their trained positions, read as
    cache-teacher reads it with the same ``--seq-len`` and ``--eval-fraction``.

    Returns:
        (train packed end to end, held-out as cache-teacher packs it, facts about the split).
    """
    try:
        files = resolve_corpus(s["corpus"])
        kind = corpus_kind(files, s["text_field"])
        packing = "concat" if kind == "text" else "separate"  # cache-teacher's --packing auto
        rules = conventions(tokenizer, eos_id)
        stats = CorpusStats()
        documents = list(
            tokenize_documents(
                iter_documents(files, stats, s["text_field"]),
                tokenizer,
                eval_fraction=s["eval_fraction"],
                seq_len=s["seq_len"],
                packing=packing,
                stats=stats,
                tokenizer_conventions=rules,
            )
        )
    except CorpusError as e:
        raise UserError(str(e)) from e
    by_split: dict[str, list[TokenizedDocument]] = {"train": [], "eval": []}
    for document in documents:
        by_split[document.split].append(document)

    def packed(split: str, how: str) -> list[Sequence]:
        shards = plan_shards(
            by_split[split],
            seq_len=s["seq_len"],
            sequences_per_shard=1 << 30,
            packing=how,
            bos_id=rules.bos_id,
            masked=True,
        )
        sequences: list[Sequence] = []
        for shard in shards:
            assert shard.loss_masks is not None  # masked=True
            sequences += zip(shard.sequences, shard.loss_masks, strict=True)
        return sequences

    train, held_out = packed("train", "concat"), packed("eval", packing)
    if not train or not held_out:
        which = "training" if not train else "held-out"
        raise UserError(
            f"the corpus yields no {which} examples, {s['corpus']} ({stats.summary()}), "
            "give a larger corpus or change --eval-fraction"
        )
    facts = {
        "kind": kind,
        "summary": stats.summary(),
        "train_documents": len(by_split["train"]),
        "eval_documents": len(by_split["eval"]),
    }
    return train, held_out[: s["eval_sequences"]], facts


def _batch(sequences: list[Sequence], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (B, L) and the trained positions that predict a real token (B, L-1)."""
    length = max(len(q) for q, _ in sequences)
    ids = np.zeros((len(sequences), length), np.int64)  # padding: causal attention ignores it
    trained = np.zeros((len(sequences), length - 1), bool)
    for i, (q, m) in enumerate(sequences):
        ids[i, : len(q)] = q
        trained[i, : len(q) - 1] = m[:-1]  # the last position's next token is not in q
    return torch.from_numpy(ids).to(device), torch.from_numpy(trained).to(device)


def masked_loss(model: torch.nn.Module, ids: torch.Tensor, trained: torch.Tensor) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) over the trained positions of ids (B, L)."""
    logits = model(input_ids=ids).logits[:, :-1]  # (B, L-1, V)
    return F.cross_entropy(logits[trained].float(), ids[:, 1:][trained], reduction="sum")


@torch.inference_mode()
def held_out_cross_entropy(
    model: torch.nn.Module, sequences: list[Sequence], batch_size: int, device: torch.device
) -> tuple[float, int]:
    """Token-weighted cross-entropy (nats) over the trained positions of ``sequences``.

    Returns:
        (cross_entropy, number of trained positions).
    """
    model.eval()
    ordered = sorted(sequences, key=lambda qm: -len(qm[0]))  # little padding per batch
    total, count = 0.0, 0
    for start in range(0, len(ordered), batch_size):
        ids, trained = _batch(ordered[start : start + batch_size], device)
        total += masked_loss(model, ids, trained).item()
        count += int(trained.sum())
    model.train()
    return total / max(count, 1), count


def finetune_teacher(s: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune the teacher at ``s['base']`` on ``s['corpus']``'s training split into ``s['out']``.

    Returns:
        The metadata written to ``OUT/kdcache_teacher.json``.
    """
    _check_settings(s)
    out = Path(s["out"])
    check_out(out, s["force"])
    if s["threads"] > 0:
        torch.set_num_threads(s["threads"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()

    # 1. the teacher and the corpus, split and rendered as cache-teacher will
    model, source, files, base_metadata = load_base(s["base"])
    tokenizer = source.tokenizer
    context = getattr(model.config, "max_position_embeddings", None)
    if isinstance(context, int) and s["seq_len"] > context:
        raise UserError(
            f"--seq-len exceeds the --from teacher's context of {context} tokens, got "
            f"{s['seq_len']}, pass at most {context}"
        )
    train, held_out, facts = split_examples(s, tokenizer, source.eos_id)
    click.echo(
        f"corpus {s['corpus']}: {facts['summary']}; {facts['train_documents']} training and "
        f"{facts['eval_documents']} held-out {facts['kind']} documents",
        err=True,
    )
    model = model.to(device).train()
    keep_freed_memory(device)
    before, eval_tokens = held_out_cross_entropy(model, held_out, s["batch_size"], device)
    optimizer, scheduler = make_optimizer(model, s["lr"], s["warmup"], s["steps"], device)
    use_bf16 = native_bf16(device)

    # 2. the training loop: seeded shuffles of the training sequences, epoch after epoch
    generator = torch.Generator().manual_seed(s["seed"])
    order, cursor = torch.randperm(len(train), generator=generator).tolist(), 0
    positions_seen, loss_value = 0, float("nan")
    train_started = time.perf_counter()
    bar = progress(range(s["steps"]), desc="tune teacher", unit="step", dynamic_ncols=True)
    for _step in bar:
        if cursor + s["batch_size"] > len(order):
            order, cursor = torch.randperm(len(train), generator=generator).tolist(), 0
        chosen = order[cursor : cursor + s["batch_size"]]
        cursor += len(chosen)
        ids, trained = _batch([train[i] for i in chosen], device)
        count = int(trained.sum())
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            loss = masked_loss(model, ids, trained) / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        positions_seen += count
        loss_value = loss.item()
        bar.set_postfix(loss=f"{loss_value:.3f}", refresh=False)
    bar.close()
    train_seconds = time.perf_counter() - train_started

    # 3. held-out evaluation, then the atomic save
    after, _ = held_out_cross_entropy(model, held_out, s["batch_size"], device)
    metadata = {
        "tuned_from": str(Path(s["base"]).resolve()),
        "base": base_metadata,
        "settings": {k: v for k, v in s.items() if k != "force"},
        "vocab_size": len(tokenizer),
        "parameters": sum(p.numel() for p in model.parameters()),
        "corpus_kind": facts["kind"],
        "train_documents": facts["train_documents"],
        "eval_documents": facts["eval_documents"],
        "train_sequences_available": len(train),
        "trained_positions_seen": positions_seen,
        "final_train_loss": loss_value,
        "eval_cross_entropy_before": before,
        "eval_cross_entropy": after,
        "eval_perplexity": math.exp(after),
        "eval_tokens": eval_tokens,
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "device": device.type,
        "torch_version": torch.__version__,
    }
    tokenizer_only = {name: data for name, data in files.items() if name != "config.json"}

    def write_tokenizer(directory: Path) -> None:
        for name, data in tokenizer_only.items():
            (directory / name).write_bytes(data)

    save_teacher_dir(out, model, write_tokenizer, metadata)
    click.echo(
        f"tuned teacher: {positions_seen:,} trained positions in {train_seconds:.0f}s, held-out "
        f"cross-entropy {before:.4f} -> {after:.4f} nats over {eval_tokens:,} positions "
        f"({facts['eval_documents']} held-out documents untouched) -> {out}"
    )
    return metadata
