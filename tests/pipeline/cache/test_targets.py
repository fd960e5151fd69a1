"""The chunked top-k equals the top-k of each model's own log_softmax(logits)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.cache.targets import TopkTargets, chunked_topk
from kdcache.pipeline.logit_head import logit_head

VOCAB = 300
TOP_K = 16

# model_type -> config overrides that make the final-logit transform matter
ARCHITECTURES = {
    "llama": {},
    "gpt2": {},
    "gemma2": {"final_logit_softcapping": 2.0, "head_dim": 16},
    "granite": {"logits_scaling": 4.0},
    "cohere": {"logit_scale": 0.25},
    "phi": {},  # an lm_head with a bias
}


def tiny_model(model_type: str, **overrides: object) -> torch.nn.Module:
    if model_type == "gpt2":
        sizes: dict[str, object] = {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 128}
    else:
        sizes = {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
        }
    config = AutoConfig.for_model(model_type, vocab_size=VOCAB, **sizes, **overrides)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharp logits (|x| ~ 10), so a missing transform is visible
        model.get_output_embeddings().weight.mul_(200.0)
    return model


def reference_topk(model: torch.nn.Module, input_ids: torch.Tensor, k: int):
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)
    return logprobs, logprobs.topk(k, dim=-1)  # (B, S, V), ((B, S, k), (B, S, k))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_chunked_targets_equal_the_models_own_forward(model_type: str) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type])
    input_ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = TopkTargets(model, TOP_K, chunk_tokens=7)  # chunks straddle rows
    assert targets.self_check(input_ids[:1]) is None
    assert not targets.use_model_forward
    ids, logprobs = targets(input_ids)
    assert ids.shape == logprobs.shape == (3, 20, TOP_K)
    assert ids.dtype == torch.int32 and logprobs.dtype == torch.float32

    full, (ref_values, ref_ids) = reference_topk(model, input_ids, TOP_K)
    torch.testing.assert_close(logprobs, ref_values, atol=1e-4, rtol=0)
    # ids may differ only between tied values: compare the full distribution at our ids
    torch.testing.assert_close(full.gather(-1, ids.long()), ref_values, atol=1e-4, rtol=0)
    assert (logprobs[..., :-1] >= logprobs[..., 1:]).all()  # sorted descending
    assert (logprobs <= 0).all()


@pytest.mark.parametrize(
    ("model_type", "field"),
    [("gemma2", "softcap"), ("granite", "logit_divisor"), ("cohere", "logit_multiplier")],
)
def test_head_reads_the_transform_from_the_config(model_type: str, field: str) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type])
    expected = {"softcap": 2.0, "logit_divisor": 4.0, "logit_multiplier": 0.25}[field]
    assert getattr(logit_head(model), field) == expected


def test_self_check_falls_back_when_the_transform_is_unknown() -> None:
    model = tiny_model("gemma2", **ARCHITECTURES["gemma2"])
    targets = TopkTargets(model, TOP_K, chunk_tokens=5)
    targets.head.softcap = None  # as if we did not know this architecture's soft-capping
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    message = targets.self_check(input_ids[:1])
    assert message is not None and "own forward" in message
    assert targets.use_model_forward
    ids, logprobs = targets(input_ids)
    full, (ref_values, _) = reference_topk(model, input_ids, TOP_K)
    torch.testing.assert_close(logprobs, ref_values, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.gather(-1, ids.long()), ref_values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi"])
def test_bfloat16_targets_equal_the_models_own_forward(model_type: str) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type]).to(torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    targets = TopkTargets(model, TOP_K, chunk_tokens=6)
    assert targets.self_check(input_ids[:1]) is None
    ids, logprobs = targets(input_ids)
    full, (ref_values, _) = reference_topk(model, input_ids, TOP_K)
    # the same bfloat16 logits, upcast, then the same float32 log_softmax
    torch.testing.assert_close(logprobs, ref_values, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(-1, ids.long()), ref_values, atol=1e-5, rtol=0)


def test_buffers_are_reused_from_batch_to_batch() -> None:
    model = tiny_model("llama")
    targets = TopkTargets(model, TOP_K, chunk_tokens=8)
    targets(torch.randint(0, VOCAB, (2, 12)))
    buffers = {name: b.data_ptr() for name, b in targets.scratch._buffers.items()}
    assert set(buffers) == {"logits", "logprobs"}  # float32 model: no float32 copy needed
    targets(torch.randint(0, VOCAB, (3, 12)))
    assert {name: b.data_ptr() for name, b in targets.scratch._buffers.items()} == buffers


def test_chunked_topk_matches_log_softmax_for_any_chunk_size() -> None:
    logits = torch.randn(23, 50, generator=torch.Generator().manual_seed(3)) * 5  # (N, V)
    expected = torch.log_softmax(logits, dim=-1).topk(8, dim=-1)
    for chunk in (1, 4, 23, 100):
        ids, logprobs = chunked_topk(logits, lambda x: x, 8, chunk)
        torch.testing.assert_close(logprobs, expected.values, atol=1e-5, rtol=0)
        assert torch.equal(ids.long(), expected.indices)


def test_full_vocab_top_k_sums_to_one() -> None:
    model = tiny_model("llama")
    ids, logprobs = TopkTargets(model, VOCAB, chunk_tokens=4)(torch.arange(10)[None])
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(1, 10), atol=1e-5, rtol=0)
    assert torch.equal(ids.sort(-1).values[0, 0].long(), torch.arange(VOCAB))
