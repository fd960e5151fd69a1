"""The measured processes of ``bench/student_memory.py``: a training step two ways, the bare loop.

- ``head``: what train-student does — the model's forward up to its final hidden states
  (``student_head``), then ``batch_loss`` turns a chunk of rows at a time into logits and takes
  its loss and gradient at once (``fused_chunks.py``); no [B, L, V] tensor exists.
- ``whole``: the plain computation a user would write — the model's (B, L, V) logits, the loss
  of every row at once (``kd_per_token`` + ``F.cross_entropy``), ordinary autograd.

Both then clip the gradients and take an AdamW step, as ``trainee.train_step`` does.
``measure_step``, ``interleaved_times`` and ``bare_loop`` each run in a fresh subprocess.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import re
import resource
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdcache.pipeline.distill.batches import batch_to_device
from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    batch_loss,
    kd_per_token,
    next_token_labels,
    trained_mask,
)
from kdcache.pipeline.distill.student_head import student_head

PATHS = ("head", "whole")
TOPK_FIELDS = ("topk_ids", "topk_logprobs", "topk_tail_logprob")
# the bench student: Llama-style, tied embeddings; the vocabulary dominates its parameters
STUDENT = {
    "hidden_size": 256,
    "intermediate_size": 768,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}


def build_model(vocab: int, seq_len: int, seed: int = 0) -> torch.nn.Module:
    """The bench student (``STUDENT``) over ``vocab`` ids, float32, random weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, max_position_embeddings=seq_len, **STUDENT
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).float().train()


def make_optimizer(model: torch.nn.Module, lr: float = 1e-4) -> torch.optim.Optimizer:
    """AdamW as ``trainee.make_trainee`` sets it up (no decay on norms and biases)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95))


def synthetic_batch(
    vocab: int, sequences: int, seq_len: int, top_k: int, seed: int = 0
) -> dict[str, torch.Tensor]:
    """A loader-like batch of random tokens and top-k rows, widened as ``batch_to_device`` does.

    Returns ``input_ids``/``labels``/``attention_mask``/``loss_mask`` (B, L), ``topk_ids``
    (B, L, k) distinct ids per row, ``topk_logprobs`` (B, L, k) float16 sorted descending and
    ``topk_tail_logprob`` (B, L): the mass outside the top-k.
    """
    g = torch.Generator().manual_seed(seed)
    b, length = sequences, seq_len
    ids = torch.randint(0, vocab, (b, length), generator=g)
    labels = ids.clone()  # (B, L) Hugging Face labels: unshifted, position 0 not predicted
    labels[:, 0] = IGNORE_INDEX
    ones = torch.ones(b, length, dtype=torch.int64)
    # distinct ids per row: a random offset plus distinct steps, wrapped around the vocabulary
    steps = torch.randperm(vocab // 2, generator=g)[:top_k] * 2 + 1  # (k,) odd, distinct
    start = torch.randint(0, vocab, (b, length, 1), generator=g)
    topk_ids = ((start + steps) % vocab).to(torch.int32)  # (B, L, k)
    scores = torch.randn(b, length, top_k + 1, generator=g) * 2.0  # k ids and the tail
    logprobs = torch.log_softmax(scores, -1)
    top, _ = logprobs[..., :top_k].sort(-1, descending=True)  # (B, L, k)
    batch = {
        "input_ids": ids,
        "labels": labels,
        "attention_mask": ones,
        "loss_mask": ones.clone(),
        "topk_ids": topk_ids,
        "topk_logprobs": top.half(),
        "topk_tail_logprob": logprobs[..., top_k],  # (B, L)
    }
    return batch_to_device(batch, "cpu")


def whole_logits_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: str, alpha: float
) -> torch.Tensor:
    """alpha · KD mean + (1 − alpha) · CE mean from the model's whole (B, L, V) logits."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    flat = logits.reshape(-1, logits.shape[-1])  # (B·L, V)
    labels = next_token_labels(batch["labels"]).reshape(-1)  # (B·L,)
    ce = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX)
    if loss == "ce":
        return ce
    b, length = batch["labels"].shape
    targets = {n: batch[n].reshape(b * length, *batch[n].shape[2:]) for n in TOPK_FIELDS}
    mask = trained_mask(batch).reshape(-1).float()  # (B·L,)
    kd = (kd_per_token(flat, targets, loss) * mask).sum() / mask.sum()
    return alpha * kd + (1 - alpha) * ce


def head_loss(
    model: torch.nn.Module, batch: dict[str, torch.Tensor], loss: str, alpha: float
) -> torch.Tensor:
    """The same loss as train-student computes it: hidden states, the head per chunk."""
    head = student_head(model, None)
    return batch_loss(head.rows(model, batch), batch, head=head, loss=loss, alpha=alpha).total


def train_step(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    loss: str = "ghost",
    alpha: float = 0.5,
) -> float:
    """One optimizer step (forward, backward, clip, AdamW) by ``path``; returns the loss."""
    compute = head_loss if path == "head" else whole_logits_loss
    total = compute(model, batch, loss, alpha)
    total.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(total.detach())


def _libc() -> Any:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")


def release_free_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so the resident size
    is what is live."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing kept to release
        _libc().malloc_trim(0)


def status_kib(field: str) -> int:
    """A ``/proc/self/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    text = Path("/proc/self/status").read_text()
    match = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    assert match, field
    return int(match.group(1))


def reset_peak() -> bool:
    """Reset the process's resident high-water mark (VmHWM) to its current size; True if the
    kernel did (Linux ``/proc/self/clear_refs``, "5")."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return status_kib("VmHWM") <= status_kib("VmRSS") + 1024


# --- the measured processes (each runs alone in a fresh subprocess) ------------------------------


def measure_step(
    vocab: int,
    rows: int,
    seq_len: int,
    path: str,
    loss: str,
    allocator: str,
    cap_gb: float,
    top_k: int = 64,
) -> dict[str, Any]:
    """Peak memory and wall time of one full-size step in this (fresh) process.

    The optimizer state is allocated by a 16-token step first; freed heap is then handed back,
    so the resident size just before the step is what is live, and the step's peak is the
    growth of the resident high-water mark above it. ``allocator`` "kept": train-student's
    ``keep_freed_memory`` (freed blocks stay in the heap for reuse); "default": glibc's, which
    unmaps every block of 32 MiB or more on ``free``. The step may map at most ``cap_gb`` more
    address space (``RLIMIT_AS``): beyond it an allocation fails and the step is reported as
    stopped, so a wrong estimate never takes the machine's memory from its other users.
    """
    from kdcache.pipeline.host_memory import keep_freed_memory

    model = build_model(vocab, seq_len)
    optimizer = make_optimizer(model)
    train_step(path, model, optimizer, synthetic_batch(vocab, 1, 16, top_k), loss)
    if allocator == "kept":
        keep_freed_memory(torch.device("cpu"))
    batch = synthetic_batch(vocab, rows // seq_len, seq_len, top_k)
    release_free_memory()
    before = status_kib("VmRSS")
    cap = (status_kib("VmSize") << 10) + int(cap_gb * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    reset = reset_peak()
    started = time.perf_counter()
    try:
        value = train_step(path, model, optimizer, batch, loss)
    except (RuntimeError, MemoryError) as e:  # torch: "DefaultCPUAllocator: can't allocate"
        return {"stopped": f"stopped at the {cap_gb:.0f} GB cap ({type(e).__name__})"}
    seconds = time.perf_counter() - started
    peak = status_kib("VmHWM")
    return {
        "before_gb": before / 2**20,
        "peak_rss_gb": peak / 2**20,
        "growth_gb": (peak - before) / 2**20,
        "seconds": seconds,
        "loss_value": value,
        "peak_reset": reset,
    }


def interleaved_times(
    vocab: int, rows: int, seq_len: int, rounds: int, loss: str = "ghost", top_k: int = 64
) -> dict[str, Any]:
    """Step seconds of both paths in one process, ``rounds`` rounds in alternating order.

    Each path trains its own copy of the same student (same initial weights, same batch), with
    train-student's allocator setting; one untimed step each first (it also checks that both
    paths give the same loss).
    """
    from kdcache.pipeline.host_memory import keep_freed_memory

    keep_freed_memory(torch.device("cpu"))
    batch = synthetic_batch(vocab, rows // seq_len, seq_len, top_k)
    students = {}
    for path in PATHS:
        model = build_model(vocab, seq_len)
        students[path] = (model, make_optimizer(model))
    first = {path: train_step(path, *students[path], batch, loss) for path in PATHS}
    times: dict[str, list[float]] = {path: [] for path in PATHS}
    for round_ in range(rounds):
        for path in PATHS if round_ % 2 == 0 else PATHS[::-1]:
            started = time.perf_counter()
            train_step(path, *students[path], batch, loss)
            times[path].append(time.perf_counter() - started)
    return {"times": times, "first_loss": first}


def bare_loop(
    store_url: str, student: str, batch: int, steps: int, workers: int, seed: int = 0
) -> dict[str, Any]:
    """The minimal training loop over ``steps`` batches of a store, read beforehand.

    The same student, batches, loss and AdamW as ``train-student --loss ghost``: batches
    pre-read from the same loader into a list, then per batch: widen it, forward
    (``student_head`` + ``batch_loss``), backward, clip, AdamW step, zero_grad. Returns each
    step's end time (seconds from the first step's start) and tokens.
    """
    from kdcache.pipeline.distill.loader import DistillDataset, TeacherLoader
    from kdcache.pipeline.distill.student import build_student, load_store_tokenizer
    from kdcache.pipeline.host_memory import keep_freed_memory
    from kdcache.storage import open_store

    store = open_store(store_url)
    tokenizer = load_store_tokenizer(store)
    vocab = store.tokenizer_size
    model, _ = build_student(
        student, vocab, tokenizer=tokenizer, seed=seed, max_positions=max(2048, store.seq_len)
    )
    keep_freed_memory(torch.device("cpu"))  # as train-student does
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    dataset = DistillDataset(store, "train", batch_size=batch, seed=seed, pad_id=pad_id)
    loader = TeacherLoader(dataset, num_workers=workers)
    batches = [next(loader) for _ in range(steps)]
    loader.close()
    optimizer = make_optimizer(model, lr=1e-3)  # train-student's default --lr
    head = student_head(model, vocab)
    model.train()
    ends, tokens = [], []
    started = time.perf_counter()
    for compact in batches:
        b = batch_to_device(compact, "cpu")
        terms = batch_loss(head.rows(model, b), b, head=head, loss="ghost", alpha=0.5)
        terms.total.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(time.perf_counter() - started)
        tokens.append(int(b["attention_mask"].sum()))
    return {"ends": ends, "tokens": tokens}
