"""The live teacher: chunked full-vocabulary log-probs equal its own forward; exact KL and the
online losses equal their textbook definitions."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.distill.live_teacher import LiveTeacher, exact_kl, full_kd_per_token

VOCAB = 200


def tiny_model(model_type: str, **overrides: object) -> torch.nn.Module:
    config = AutoConfig.for_model(
        model_type,
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        **overrides,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # sharp logits, so a missing soft-cap would be visible
        model.get_output_embeddings().weight.mul_(100.0)
    return model


@pytest.mark.parametrize(
    "model_type, overrides",
    [("llama", {}), ("gemma2", {"final_logit_softcapping": 2.0, "head_dim": 16})],
)
def test_chunked_logprobs_equal_the_models_own_forward(model_type: str, overrides: dict) -> None:
    model = tiny_model(model_type, **overrides)
    teacher = LiveTeacher(model)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(3))
    assert teacher.self_check(ids[:1]) is None and not teacher.use_model_forward
    hidden = teacher.hidden(ids, torch.ones_like(ids))  # (2, 12, H)
    rows = hidden.reshape(-1, hidden.shape[-1])
    chunks = torch.cat([teacher.logprobs(rows[i : i + 5], 2.0) for i in range(0, len(rows), 5)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float().reshape(-1, VOCAB)
    torch.testing.assert_close(chunks, torch.log_softmax(logits / 2.0, -1), atol=1e-4, rtol=0)


def test_a_head_that_disagrees_falls_back_to_the_models_forward() -> None:
    model = tiny_model("llama")
    teacher = LiveTeacher(model)
    teacher.head.logit_multiplier = 3.0  # a transform the model does not apply
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    note = teacher.self_check(ids)
    assert note and "differs" in note and teacher.use_model_forward
    out = teacher.logprobs(teacher.hidden(ids, torch.ones_like(ids))[0])
    with torch.no_grad():
        expected = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize(
    ("model_type", "overrides", "field", "wrong"),
    [
        ("gemma2", {"final_logit_softcapping": 30.0, "head_dim": 16}, "softcap", 30.03),
        ("granite", {"logits_scaling": 2.0}, "logit_divisor", 2.002),
    ],
)
def test_a_bfloat16_head_wrong_by_a_twentieth_of_a_nat_falls_back(
    model_type: str, overrides: dict, field: str, wrong: float
) -> None:
    model = tiny_model(model_type, **overrides)
    with torch.no_grad():  # logits near ±30: a bfloat16 rounding step of 0.125
        model.get_output_embeddings().weight.mul_(2.0)
    ids = torch.randint(0, VOCAB, (1, 16), generator=torch.Generator().manual_seed(2))
    right = LiveTeacher(model, vocab=VOCAB - 8)  # a padded head: log-probs over 192 ids
    off = LiveTeacher(model, vocab=VOCAB - 8)
    setattr(off.head, field, wrong)
    with torch.no_grad():  # the premise, in float32: logits near 30, log-probs moved >= 0.05
        hidden = right.hidden(ids, torch.ones_like(ids))[0]  # (P, H)
        logits = right.head(hidden)  # (P, V)
        moved = off.logprobs(hidden) - right.logprobs(hidden)
    assert float(logits.abs().max()) > 25 and 0.05 <= float(moved.abs().max()) < 0.1

    model.to(torch.bfloat16)
    assert right.self_check(ids) is None and not right.use_model_forward
    note = off.self_check(ids)  # within bfloat16 rounding of the whole path, not of the head's
    assert note is not None and "final-logit transform" in note and off.use_model_forward


def test_online_losses_are_the_full_vocabulary_divergences() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher_logits = torch.randn(6, 50, generator=g), torch.randn(6, 50, generator=g)
    for t in (1.0, 2.5):
        log_p = torch.log_softmax(teacher_logits / t, -1)
        log_q = torch.log_softmax(student / t, -1)
        forward = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1) * t * t
        reverse = F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1) * t * t
        torch.testing.assert_close(full_kd_per_token(student, log_p, "kl", t), forward)
        torch.testing.assert_close(full_kd_per_token(student, log_p, "reverse-kl", t), reverse)
    own = torch.log_softmax(teacher_logits, -1)
    assert float(exact_kl(teacher_logits, own).abs().max()) < 1e-6  # the teacher against itself
    with pytest.raises(ValueError, match="online loss"):
        full_kd_per_token(student, own, "ghost", 1.0)


def test_a_teacher_probability_of_zero_costs_nothing() -> None:
    teacher = torch.full((1, 4), float("-inf"))
    teacher[0, 0] = 0.0  # all mass on id 0
    student = torch.tensor([[2.0, 0.0, -1.0, 0.5]])
    expected = -torch.log_softmax(student, -1)[0, 0]
    torch.testing.assert_close(full_kd_per_token(student, teacher, "kl", 1.0)[0], expected)
