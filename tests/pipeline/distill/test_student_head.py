"""The loss from the student's hidden states, its head applied per chunk (student_head.py,
fused_chunks.py): the same loss and gradients as the whole logits, on several architectures,
with no [B, L, V] tensor in the forward or the backward; heads that cannot be split are found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_masked_batches import V, sequences
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

from kdcache.pipeline.distill.batches import batch_to_device, collate
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    batch_loss,
    kd_per_token,
    next_token_labels,
    trained_mask,
)
from kdcache.pipeline.distill.student_head import StudentHead, student_head

LOSSES = ["kl", "ghost", "reverse-kl", "sampled-kl", "ce"]
SMALL = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=64)  # fmt: skip
# (model type, extra config): tied, soft-capped, scaled, with a head bias, padded rows
ARCHITECTURES = {
    "llama-tied": ("llama", {"tie_word_embeddings": True}),
    "gemma2-softcap": ("gemma2", {"final_logit_softcapping": 3.0, "head_dim": 8}),
    "granite-scaled": ("granite", {"logits_scaling": 4.0, "tie_word_embeddings": False}),
    "cohere-scale": ("cohere", {"logit_scale": 0.25}),
    "phi-bias": ("phi", {"partial_rotary_factor": 1.0}),
    "qwen2-padded": ("qwen2", {"tie_word_embeddings": False, "vocab_size": V + 9}),
}


def build(name: str, seed: int = 0) -> torch.nn.Module:
    model_type, extra = ARCHITECTURES[name]
    options = {"vocab_size": V, **SMALL, **extra}
    if model_type == "phi":
        options.pop("num_key_value_heads")
    config = AutoConfig.for_model(model_type, **options)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).float()
    with torch.no_grad():  # heads far from zero, so a wrong transform shows
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model


def batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return batch_to_device(collate(sequences(seed)[1]), "cpu")


def reference_loss(model: torch.nn.Module, b: dict, loss: str, alpha: float, t: float):
    """The plain computation: the model's whole logits, every row at once, autograd."""
    logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[..., :V]
    flat = logits.reshape(-1, V)  # (B·L, V)
    labels = next_token_labels(b["labels"]).reshape(-1)
    ce = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX)
    if loss == "ce":
        return ce
    b_, length = b["labels"].shape
    fields = ("topk_ids", "topk_logprobs", "topk_tail_logprob", "sampled_ids", "sampled_counts",
              "sampled_logprobs")  # fmt: skip
    targets = {n: b[n].reshape(b_ * length, *b[n].shape[2:]) for n in fields}
    mask = trained_mask(b).reshape(-1).float()
    kd = (kd_per_token(flat, targets, loss, t) * mask).sum() / mask.sum()
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
@pytest.mark.parametrize("loss", LOSSES)
def test_loss_and_gradients_equal_the_whole_logits(arch: str, loss: str) -> None:
    b = batch()
    ours_model, ref_model = build(arch), build(arch)
    head = student_head(ours_model, V)
    assert not head.whole_logits, head.note
    terms = batch_loss(head.rows(ours_model, b), b, head=head, loss=loss, alpha=0.3,
                       temperature=2.0, chunk_tokens=5)  # fmt: skip
    terms.total.backward()
    want = reference_loss(ref_model, b, loss, 0.3, 2.0)
    want.backward()
    torch.testing.assert_close(terms.total, want, atol=1e-5, rtol=1e-5)
    for (name, p), q in zip(ours_model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4, msg=name)
    if arch == "qwen2-padded":  # the padded rows take part in nothing
        assert ours_model.get_output_embeddings().weight.grad[V:].abs().max() == 0


class _Scaled(LlamaForCausalLM):
    """A model whose forward does something to its logits that no config field says."""

    def forward(self, *args, **kwargs):  # noqa: ANN002, ANN003
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 1.5 + 0.25
        return out


def test_a_head_that_cannot_be_split_is_found_and_trains_from_whole_logits() -> None:
    config = AutoConfig.for_model("llama", vocab_size=V, **SMALL)
    torch.manual_seed(0)
    odd, ref = _Scaled(config), _Scaled(config)
    ref.load_state_dict(odd.state_dict())
    head = StudentHead(odd, V)
    assert head.whole_logits and "whole logits" in head.note and "\n" not in head.note
    b = batch(1)
    terms = batch_loss(head.rows(odd, b), b, head=head, loss="ghost", alpha=0.5, chunk_tokens=4)
    terms.total.backward()
    want = reference_loss(ref, b, "ghost", 0.5, 1.0)
    want.backward()
    torch.testing.assert_close(terms.total, want, atol=1e-5, rtol=1e-5)
    for p, q in zip(odd.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=1e-5, rtol=1e-4)


class _LargestTensor(TorchDispatchMode):
    """Records the most elements of any tensor an op produces (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_tensor_of_batch_by_vocabulary_exists_in_the_forward_or_the_backward() -> None:
    vocab = 4096  # wide enough that [B·L, V] dwarfs every other tensor
    config = AutoConfig.for_model("llama", vocab_size=vocab, **SMALL, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (4, 32), generator=g)
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "labels": ids, "topk_ids": torch.randint(0, vocab, (4, 32, 8)),
         "topk_logprobs": torch.log_softmax(torch.randn(4, 32, 9), -1)[..., :8].sort(
             -1, descending=True).values}  # fmt: skip
    whole = 4 * 32 * vocab
    head = student_head(model, vocab)
    with _LargestTensor() as seen:
        batch_loss(
            head.rows(model, b), b, head=head, loss="ghost", chunk_tokens=16
        ).total.backward()
    assert seen.largest <= 16 * vocab < whole  # one chunk's logits at most
    with _LargestTensor() as seen_whole:  # the detector sees the whole logits when they exist
        model(input_ids=ids).logits.sum().backward()
    assert seen_whole.largest >= whole


def test_eval_from_hidden_states_equals_eval_from_whole_logits() -> None:
    model = build("gemma2-softcap")
    batches = [collate(sequences(seed)[1]) for seed in (0, 1)]
    ours = evaluate(model, batches, vocab=V, chunk_tokens=3)
    head = student_head(model, V)
    head.whole_logits = True  # the model's own logits, sliced
    try:
        theirs = evaluate(model, batches, vocab=V)
    finally:
        head.whole_logits = False
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert ours[name] == pytest.approx(theirs[name], rel=1e-5, abs=1e-6), name


def test_under_mixed_precision_the_head_runs_in_the_models_autocast() -> None:
    """As Accelerate wraps a model's forward in autocast: the probe passes (our head in the
    same bfloat16 as the model's own) and the loss is the whole logits' in that precision."""
    b = batch()
    ours_model, ref_model = build("gemma2-softcap"), build("gemma2-softcap")
    for model in (ours_model, ref_model):
        model.forward = torch.autocast("cpu", dtype=torch.bfloat16)(model.forward)
    head = StudentHead(ours_model, V)
    assert not head.whole_logits, head.note
    terms = batch_loss(head.rows(ours_model, b), b, head=head, loss="ghost", chunk_tokens=5)
    assert head.autocast == torch.bfloat16
    want = reference_loss(ref_model, b, "ghost", 0.5, 1.0)
    torch.testing.assert_close(terms.total, want, atol=1e-2, rtol=1e-2)
    terms.total.backward()
    want.backward()
    for p, q in zip(ours_model.parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, atol=2e-2, rtol=5e-2)
