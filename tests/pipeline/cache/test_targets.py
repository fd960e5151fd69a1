"""The chunked targets equal each model's own log_softmax(logits): the top-k, its tail mass and
the log-probs of the sampled ids."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.cache.sampling import position_keys
from kdcache.pipeline.cache.targets import TeacherTargets, chunked_topk
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


def keys_for(batch: int, seq_len: int) -> torch.Tensor:
    return position_keys("train", 0, range(batch), seq_len, torch.device("cpu"))  # (B, S, 4)


def topk_of(out, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, S, k) ids and log-probs from the B * S rows."""
    b, s = input_ids.shape
    return out.topk_ids.view(b, s, -1), out.topk_logprobs.view(b, s, -1)


def reference_topk(model: torch.nn.Module, input_ids: torch.Tensor, k: int):
    with torch.inference_mode():
        logprobs = torch.log_softmax(model(input_ids=input_ids).logits.float(), dim=-1)
    return logprobs, logprobs.topk(k, dim=-1)  # (B, S, V), ((B, S, k), (B, S, k))


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_chunked_targets_equal_the_models_own_forward(model_type: str) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type])
    input_ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(1))
    targets = TeacherTargets(model, TOP_K, chunk_tokens=7)  # chunks straddle rows
    assert targets.self_check(input_ids[:1]) is None
    assert not targets.use_model_forward
    ids, logprobs = topk_of(targets(input_ids), input_ids)
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
    targets = TeacherTargets(model, TOP_K, chunk_tokens=5)
    targets.head.softcap = None  # as if we did not know this architecture's soft-capping
    input_ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    message = targets.self_check(input_ids[:1])
    assert message is not None and "own forward" in message
    assert targets.use_model_forward
    ids, logprobs = topk_of(targets(input_ids), input_ids)
    full, (ref_values, _) = reference_topk(model, input_ids, TOP_K)
    torch.testing.assert_close(logprobs, ref_values, atol=1e-4, rtol=0)
    torch.testing.assert_close(full.gather(-1, ids.long()), ref_values, atol=1e-4, rtol=0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2", "phi"])
def test_bfloat16_targets_equal_the_models_own_forward(model_type: str) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type]).to(torch.bfloat16)
    input_ids = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(4))
    targets = TeacherTargets(model, TOP_K, chunk_tokens=6)
    assert targets.self_check(input_ids[:1]) is None
    ids, logprobs = topk_of(targets(input_ids), input_ids)
    full, (ref_values, _) = reference_topk(model, input_ids, TOP_K)
    # the same bfloat16 logits, upcast, then the same float32 log_softmax
    torch.testing.assert_close(logprobs, ref_values, atol=1e-5, rtol=0)
    torch.testing.assert_close(full.gather(-1, ids.long()), ref_values, atol=1e-5, rtol=0)


# a head transform set slightly wrong: (model_type, config, LogitHead field, wrong value); each
# moves log-probs by 0.05-0.1 nats, far below a bfloat16 teacher's rounding at logits near 30
WRONG_BY_A_TWENTIETH = [
    ("gemma2", {"final_logit_softcapping": 30.0, "head_dim": 16}, "softcap", 30.03),
    ("granite", {"logits_scaling": 4.0}, "logit_divisor", 4.004),
    ("cohere", {"logit_scale": 0.25}, "logit_multiplier", 0.2502),
]


@pytest.mark.parametrize(("model_type", "config", "field", "wrong"), WRONG_BY_A_TWENTIETH)
def test_a_bfloat16_head_wrong_by_a_twentieth_of_a_nat_is_refused(
    model_type: str, config: dict[str, object], field: str, wrong: float
) -> None:
    model = tiny_model(model_type, **config)
    with torch.no_grad():  # logits near ±30: a bfloat16 rounding step of 0.125
        model.get_output_embeddings().weight.mul_(3.0 if model_type == "gemma2" else 1.0)
    input_ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    right = logit_head(model)
    off = replace(right, **{field: wrong})
    with torch.no_grad():  # the premise, in float32: how far the wrong transform moves log-probs
        hidden = model.base_model(input_ids=input_ids).last_hidden_state[0]  # (P, H)
        logits = right(hidden)  # (P, V)
        moved = torch.log_softmax(off(hidden), -1) - torch.log_softmax(logits, -1)
    assert 0.05 <= float(moved.abs().max()) < 0.1 and float(logits.abs().max()) > 29

    model = model.to(torch.bfloat16)
    assert TeacherTargets(model, TOP_K, chunk_tokens=7).self_check(input_ids) is None
    targets = TeacherTargets(model, TOP_K, chunk_tokens=7)
    setattr(targets.head, field, wrong)
    message = targets.self_check(input_ids)
    # the whole path, within bfloat16 rounding (~0.9 nats here), lets it through; the head
    # compared in float32 does not
    assert message is not None and "final-logit transform" in message, message
    assert targets.use_model_forward


def test_buffers_are_reused_from_batch_to_batch() -> None:
    model = tiny_model("llama")
    targets = TeacherTargets(model, TOP_K, chunk_tokens=8)
    targets(torch.randint(0, VOCAB, (2, 12)))
    buffers = {name: b.data_ptr() for name, b in targets.scratch._buffers.items()}
    assert set(buffers) == {"logits", "logprobs"}  # float32 model: no float32 copy needed
    targets(torch.randint(0, VOCAB, (3, 12)))
    assert {name: b.data_ptr() for name, b in targets.scratch._buffers.items()} == buffers

    sampling = TeacherTargets(model, TOP_K, samples=8, chunk_tokens=8)
    sampling(torch.randint(0, VOCAB, (2, 12)), keys_for(2, 12))
    buffers = {name: b.data_ptr() for name, b in sampling.scratch._buffers.items()}
    assert set(buffers) == {"logits", "logprobs", "cdf"}  # the float64 cdf is reused too
    sampling(torch.randint(0, VOCAB, (3, 12)), keys_for(3, 12))
    assert {name: b.data_ptr() for name, b in sampling.scratch._buffers.items()} == buffers


def test_chunked_topk_matches_log_softmax_for_any_chunk_size() -> None:
    logits = torch.randn(23, 50, generator=torch.Generator().manual_seed(3)) * 5  # (N, V)
    expected = torch.log_softmax(logits, dim=-1).topk(8, dim=-1)
    for chunk in (1, 4, 23, 100):
        ids, logprobs = chunked_topk(logits, lambda x: x, 8, chunk)
        torch.testing.assert_close(logprobs, expected.values, atol=1e-5, rtol=0)
        assert torch.equal(ids.long(), expected.indices)


def test_full_vocab_top_k_sums_to_one() -> None:
    model = tiny_model("llama")
    out = TeacherTargets(model, VOCAB, chunk_tokens=4)(torch.arange(10)[None])
    ids, logprobs = out.topk_ids, out.topk_logprobs  # (10, V)
    torch.testing.assert_close(logprobs.exp().sum(-1), torch.ones(10), atol=1e-5, rtol=0)
    assert torch.equal(ids.sort(-1).values[0].long(), torch.arange(VOCAB))
    assert torch.isneginf(out.topk_tail_logprob).all()


def sampled_rows(
    out, rows: int, samples: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per row (ids, counts, logprobs) of the ragged buffers, checking the layout on the way."""
    distinct = out.sampled_distinct.long()
    assert distinct.shape == (rows,) and (distinct >= 1).all()
    offsets = [0, *distinct.cumsum(0).tolist()]
    result = []
    for lo, hi in zip(offsets[:-1], offsets[1:], strict=True):
        ids, counts = out.sampled_ids[lo:hi].long(), out.sampled_counts[lo:hi]
        assert int(counts.sum()) == samples and (counts >= 1).all()
        assert (ids[1:] > ids[:-1]).all()  # distinct, ascending
        result.append((ids, counts, out.sampled_logprobs[lo:hi]))
    return result


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
@pytest.mark.parametrize("use_model_forward", [False, True])
def test_sampled_logprobs_equal_the_models_own_forward(
    model_type: str, use_model_forward: bool
) -> None:
    model = tiny_model(model_type, **ARCHITECTURES[model_type])
    input_ids = torch.randint(0, VOCAB, (3, 20), generator=torch.Generator().manual_seed(8))
    targets = TeacherTargets(model, TOP_K, samples=24, seed=3, chunk_tokens=7)
    if use_model_forward:  # the fallback samples too
        targets.head.softcap = None if model_type == "gemma2" else 3.0  # a wrong transform
        assert targets.self_check(input_ids[:1]) is not None
        assert targets.use_model_forward
    else:
        assert targets.self_check(input_ids[:1]) is None
    out = targets(input_ids, keys_for(3, 20))
    full, _ = reference_topk(model, input_ids, TOP_K)
    full = full.reshape(60, VOCAB)  # (B * S, V)
    for row, (ids, _, logprobs) in enumerate(sampled_rows(out, 60, 24)):
        torch.testing.assert_close(logprobs, full[row, ids], atol=1e-4, rtol=0)
    # the tail of the same forward: the mass outside the top-k, in float64
    outside = full.double().scatter(-1, out.topk_ids.long(), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(out.topk_tail_logprob.double(), outside, atol=1e-4, rtol=0)

    sampled_only = TeacherTargets(model, 0, samples=24, seed=3, chunk_tokens=11)
    sampled_only.use_model_forward = use_model_forward
    again = sampled_only(input_ids, keys_for(3, 20))
    assert again.topk_ids is None and again.topk_tail_logprob is None
    if not use_model_forward:  # the same draws whatever else is computed, whatever the chunks
        m = int(out.sampled_distinct.sum())
        assert torch.equal(again.sampled_distinct, out.sampled_distinct)
        assert torch.equal(again.sampled_ids[:m], out.sampled_ids[:m])
        assert torch.equal(again.sampled_counts[:m], out.sampled_counts[:m])


def test_a_sharp_teacher_gives_few_distinct_ids_a_flat_one_many() -> None:
    """Sanity of the estimate: the distinct ids track the teacher's entropy."""
    sharp = tiny_model("llama")
    flat = tiny_model("llama")
    with torch.no_grad():
        flat.get_output_embeddings().weight.div_(1e4)  # almost uniform over 300 ids
    input_ids = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(9))
    mean = {}
    for name, model in (("sharp", sharp), ("flat", flat)):
        out = TeacherTargets(model, 0, samples=64, chunk_tokens=9)(input_ids, keys_for(2, 16))
        mean[name] = float(out.sampled_distinct.float().mean())
    # 64 draws from a uniform 300: 300 * (1 - (299/300)**64) ~ 57.6 distinct expected
    assert 52 < mean["flat"] <= 64 and mean["sharp"] < 40, mean


@pytest.mark.parametrize("own_forward", [False, True])
def test_selected_rows_equal_the_same_rows_of_the_whole_batch(own_forward: bool) -> None:
    """Only the trained positions are computed: their targets (top-k, tail, samples) are those
    rows of the full computation, on the chunked path and the model-forward fallback alike."""
    model = tiny_model("llama")
    input_ids = torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(2))
    rows = torch.rand(3, 12, generator=torch.Generator().manual_seed(3)) < 0.4  # (B, S)
    targets = TeacherTargets(model, TOP_K, samples=8, seed=5, chunk_tokens=5)
    targets.use_model_forward = own_forward
    keys = keys_for(3, 12)
    full = targets(input_ids, keys)
    part = targets(input_ids, keys, rows)
    flat = rows.reshape(-1)
    torch.testing.assert_close(part.topk_logprobs, full.topk_logprobs[flat], atol=1e-4, rtol=0)
    assert torch.equal(part.topk_ids, full.topk_ids[flat])
    torch.testing.assert_close(
        part.topk_tail_logprob, full.topk_tail_logprob[flat], atol=1e-4, rtol=0
    )
    assert torch.equal(part.sampled_distinct, full.sampled_distinct[flat])
    starts = torch.cat([torch.zeros(1, dtype=torch.int64), full.sampled_distinct.cumsum(0)])
    wanted = torch.cat([full.sampled_ids[starts[r] : starts[r + 1]] for r in flat.nonzero()[:, 0]])
    assert torch.equal(part.sampled_ids[: int(part.filled)], wanted)


@pytest.mark.parametrize("own_forward", [False, True])
def test_padded_embedding_rows_get_no_probability(own_forward: bool) -> None:
    """A teacher whose embedding is padded beyond its tokenizer (Qwen2.5: 151,665 ids, 151,936
    rows): the padded rows are masked out of the softmax, so the targets are the softmax over
    the real ids — never a padded id in the top-k or the draws."""
    model = tiny_model("llama")
    real = VOCAB - 40
    with torch.no_grad():  # make the padded rows likely, so a missing mask would show
        model.get_output_embeddings().weight[real:] *= 3.0
    input_ids = torch.randint(0, real, (2, 16), generator=torch.Generator().manual_seed(4))
    targets = TeacherTargets(model, TOP_K, samples=64, seed=1, chunk_tokens=9, real_vocab=real)
    assert targets.self_check(input_ids[:1]) is None
    targets.use_model_forward = own_forward
    out = targets(input_ids, keys_for(2, 16))
    with torch.inference_mode():
        logits = model(input_ids=input_ids).logits.float().reshape(-1, VOCAB)
    expected = torch.log_softmax(logits[:, :real], dim=-1)  # (B*S, real)
    torch.testing.assert_close(out.topk_logprobs, expected.topk(TOP_K).values, atol=1e-4, rtol=0)
    assert int(out.topk_ids.max()) < real
    assert int(out.sampled_ids[: int(out.filled)].max()) < real
    outside = expected.scatter(-1, out.topk_ids.long(), float("-inf")).logsumexp(-1)
    torch.testing.assert_close(out.topk_tail_logprob, outside, atol=1e-4, rtol=0)
