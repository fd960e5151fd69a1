"""The vocabulary rule: a student or live teacher whose embedding is padded beyond the tokenizer
works, its padded rows get exactly zero probability; ids without a row are one-line errors."""

from __future__ import annotations

import pytest
import torch
from test_masked_batches import V, sequences
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.distill.batches import batch_to_device, collate
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.live_teacher import LiveTeacher
from kdcache.pipeline.distill.losses import batch_loss, distillation_loss, loss_sums
from kdcache.pipeline.distill.student_head import student_head
from kdcache.pipeline.distill.vocabulary import check_batch_ids, student_logits
from kdcache.pipeline.errors import UserError

PADDED = 48  # embedding rows of a padded model on the V = 40 id tokenizer


def tiny(vocab: int, seed: int = 0) -> torch.nn.Module:
    """A 1-layer Llama with tied embeddings (as the presets) and ``vocab`` rows."""
    config = AutoConfig.for_model(
        "llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config)


def sliced(padded: torch.nn.Module) -> torch.nn.Module:
    """The same model without its padded rows: V rows, the first V of each vocab-sized weight."""
    model = tiny(V)
    state = {
        name: t[:V] if t.shape[:1] == (PADDED,) else t for name, t in padded.state_dict().items()
    }
    model.load_state_dict(state)
    return model


def masked_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    return batch_to_device(collate(sequences(seed)[1]), "cpu")


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl", "sampled-kl", "ce"])
def test_padded_rows_of_the_student_get_no_probability_and_no_gradient(loss: str) -> None:
    batch = masked_batch()
    student = tiny(PADDED)
    logits = student_logits(student, batch, vocab=V)  # (B, L, V): the padded columns are gone
    assert logits.shape[-1] == V and logits.untyped_storage().nbytes() > logits.numel() * 4
    distillation_loss(logits, batch, loss=loss, temperature=2.0, alpha=0.5).backward()
    grad = student.get_output_embeddings().weight.grad  # (48, H), tied to the input embedding
    assert grad[V:].abs().max() == 0  # not merely small: exactly zero
    assert grad[:V].abs().sum() > 0
    # the losses are those of the same model without the padded rows
    reference = sliced(student)
    ref_logits = student_logits(reference, batch)
    torch.testing.assert_close(logits, ref_logits, atol=1e-6, rtol=1e-5)
    ours = loss_sums(logits, batch, loss=loss, temperature=2.0)
    want = loss_sums(ref_logits, batch, loss=loss, temperature=2.0)
    torch.testing.assert_close(ours.kd_sum, want.kd_sum, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.ce_sum, want.ce_sum, atol=1e-5, rtol=1e-5)


def test_metrics_of_a_padded_student_are_those_of_the_sliced_model() -> None:
    batches = [collate(sequences(seed)[1]) for seed in (0, 1)]
    student = tiny(PADDED, seed=3)
    with torch.no_grad():  # give the padded rows real mass, which slicing must take away
        student.get_output_embeddings().weight[V:] *= 20.0
    got = evaluate(student, batches, vocab=V, chunk_tokens=7)
    want = evaluate(sliced(student), batches)
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), name
    unsliced = evaluate(student, batches)  # the padded columns, if kept, take probability
    assert unsliced["cross_entropy"] > got["cross_entropy"] + 0.01


def test_ids_without_a_row_are_one_line_errors_naming_the_id_and_both_sizes() -> None:
    batch = masked_batch()
    small = tiny(30)  # ids up to 39 occur in the batch
    with pytest.raises(UserError, match=r"input_ids id 3\d while the student embeds 30 ids"):
        student_logits(small, batch)
    with pytest.raises(UserError, match=r"embeds 30 ids and the store's tokenizer has 40"):
        evaluate(small, [collate(sequences(0)[1])], vocab=V)  # not an IndexError
    # inputs fine, a target id beyond the student's logits: named with its field
    inputs_ok = {**batch, "input_ids": batch["input_ids"] % 30, "labels": batch["labels"] % 30}
    with pytest.raises(UserError, match=r"topk_ids id 3\d while") as info:
        student_logits(small, inputs_ok)
    assert "\n" not in info.value.format_message()
    # an id of a padded row (beyond the tokenizer, below the embedding) has no logit either
    beyond = {**batch, "topk_ids": batch["topk_ids"].clone()}
    beyond["topk_ids"][0, 3, -1] = 45
    with pytest.raises(UserError, match=r"topk_ids id 45 while the student embeds 48 ids and"):
        check_batch_ids(beyond, PADDED, V)
    with pytest.raises(UserError, match=r"topk_ids id 45 while the store's tokenizer has 40, "):
        check_batch_ids(beyond, None, V)  # a model that does not tell its embedding size
    check_batch_ids(batch, PADDED, V)  # every id in range: silent


@pytest.mark.parametrize("fallback", [False, True])
def test_a_padded_live_teacher_normalizes_over_the_tokenizer_ids(fallback: bool) -> None:
    model = tiny(PADDED, seed=5).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight[V:] *= 20.0
    teacher = LiveTeacher(model, vocab=V)
    ids = masked_batch()["input_ids"]
    assert teacher.self_check(ids[:1]) is None
    teacher.use_model_forward = fallback
    hidden = teacher.hidden(ids, torch.ones_like(ids))  # (B, L, H), or (B, L, 48) logits
    rows = hidden.reshape(-1, hidden.shape[-1])
    with torch.no_grad():
        logits = model(input_ids=ids).logits.reshape(-1, PADDED)
    expected = torch.log_softmax(logits[:, :V], -1)
    torch.testing.assert_close(teacher.logprobs(rows), expected, atol=1e-5, rtol=0)
    assert teacher.vocab_size == PADDED and teacher.logprobs(rows).shape[-1] == V


def test_online_kd_with_a_padded_teacher_and_a_padded_student() -> None:
    """Online kl against a padded teacher is the top-k kl with k = every tokenizer id."""
    batch = masked_batch(1)
    teacher = LiveTeacher(tiny(PADDED, seed=6).eval(), vocab=V)
    batch["teacher_hidden"] = teacher.hidden(batch["input_ids"], batch["attention_mask"])
    student = tiny(PADDED + 16, seed=7)  # padded differently from the teacher
    logits = student_logits(student, batch, vocab=V)
    online = loss_sums(logits, batch, loss="kl", temperature=2.0, chunk_tokens=5, teacher=teacher)
    full = teacher.logprobs(batch["teacher_hidden"].reshape(-1, 16)).reshape(*logits.shape)
    values, ids = full.sort(dim=-1, descending=True)  # k = V: the whole distribution
    offline = loss_sums(logits, {**batch, "topk_ids": ids, "topk_logprobs": values}, loss="kl",
                        temperature=2.0)  # fmt: skip
    torch.testing.assert_close(online.kd_sum, offline.kd_sum, rtol=1e-4, atol=1e-4)
    head = student_head(student, V)
    trained = batch_loss(head.rows(student, batch), batch, head=head, loss="kl", alpha=1.0,
                         temperature=2.0, chunk_tokens=5, teacher=teacher)  # fmt: skip
    torch.testing.assert_close(trained.kd_sum, offline.kd_sum, rtol=1e-4, atol=1e-4)
    trained.total.backward()
    assert student.get_output_embeddings().weight.grad[V:].abs().max() == 0
    metrics = evaluate(teacher.model, [collate(sequences(1)[1])], vocab=V, teacher=teacher)
    assert metrics["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)  # the teacher itself
