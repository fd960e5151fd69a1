"""The loss mask in stage two, on hand-made sequences: collation scatters a masked sequence's
target rows to its trained positions, and every loss and metric on a masked batch equals the
same loss or metric on the trained positions alone (docs/architecture.md §5)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.distill.batches import SEQUENCE_FIELDS, batch_to_device, collate
from kdcache.pipeline.distill.evaluation import evaluate
from kdcache.pipeline.distill.live_teacher import LiveTeacher, exact_kl
from kdcache.pipeline.distill.losses import (
    IGNORE_INDEX,
    distillation_loss,
    loss_sums,
    next_token_labels,
)

V, K, N = 40, 5, 12  # vocabulary, top-k, draws per position
LENGTHS = (9, 6, 9)  # the second sequence is padded in the batch
TOPK = ("topk_ids", "topk_logprobs", "topk_tail_logprob")
SAMPLED = ("sampled_ids", "sampled_counts", "sampled_logprobs")


def full_sequence(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """A topk+sampled sequence of n positions in a store's dtypes, targets at every position."""
    logits = 2.0 * rng.normal(size=(n, V))
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))  # (n, V)
    ids = np.argsort(-logprobs, axis=-1, kind="stable")[:, :K]  # (n, K)
    outside = np.exp(logprobs)
    np.put_along_axis(outside, ids, 0.0, axis=-1)
    drawn = rng.multinomial(N, np.exp(logprobs) / np.exp(logprobs).sum(-1, keepdims=True))
    rows, cols = np.nonzero(drawn)  # ids ascending per position
    return {
        "tokens": rng.integers(0, V, n).astype(np.int32),
        "topk_ids": ids.astype(np.uint16),
        "topk_logprobs": np.take_along_axis(logprobs, ids, -1).astype(np.float16),
        "topk_tail_logprob": np.log(outside.sum(-1)).astype(np.float32),
        "sampled_distinct": (drawn > 0).sum(-1).astype(np.uint8),
        "sampled_ids": cols.astype(np.uint16),
        "sampled_counts": drawn[rows, cols].astype(np.uint8),
        "sampled_logprobs": logprobs[rows, cols].astype(np.float16),
    }


def masked(sequence: dict[str, np.ndarray], mask: np.ndarray) -> dict[str, np.ndarray]:
    """What a masked store holds for ``sequence``: its loss mask, target rows at the 1s only."""
    keep = mask.astype(bool)
    out = {"tokens": sequence["tokens"], "loss_mask": mask.astype(np.uint8)}
    out |= {name: sequence[name][keep] for name in (*TOPK, "sampled_distinct")}
    entries = np.repeat(keep, sequence["sampled_distinct"])  # (M,) the entries that stay
    return out | {name: sequence[name][entries] for name in SAMPLED}


def sequences(seed: int = 0) -> tuple[list[dict], list[dict], list[np.ndarray]]:
    """Full sequences, their masked versions and the masks (a prompt-like untrained prefix,
    holes, the last position trained in one and not in another)."""
    rng = np.random.default_rng(seed)
    full = [full_sequence(rng, n) for n in LENGTHS]
    masks = [
        np.array([0, 0, 0, 1, 1, 0, 1, 1, 1]),
        np.array([1, 0, 1, 1, 0, 0]),
        np.array([0, 1, 1, 1, 1, 1, 1, 1, 0]),
    ]
    return full, [masked(s, m) for s, m in zip(full, masks, strict=True)], masks


def trained_only(full_batch: dict, keep: torch.Tensor, logits: torch.Tensor) -> tuple:
    """The reference: the unmasked batch's rows at the trained positions, as one sequence
    (1, T + 1) with no mask at all (the extra last position is padding, there to carry the
    label of the T-th), and the logits of those positions (1, T + 1, V)."""
    shifted = next_token_labels(full_batch["labels"])[keep]  # (T,) the token each predicts

    def padded(t: torch.Tensor) -> torch.Tensor:  # (T, ...) → (1, T + 1, ...), last row zero
        return torch.cat([t, t.new_zeros(1, *t.shape[1:])])[None]

    batch = {name: padded(t[keep]) for name, t in full_batch.items() if name != "loss_mask"}
    batch["attention_mask"] = padded(torch.ones_like(full_batch["attention_mask"][keep]))
    batch["labels"] = torch.cat([shifted.new_full((1,), IGNORE_INDEX), shifted])[None]
    return batch, padded(logits[keep])


def test_collate_places_each_target_row_at_its_trained_position() -> None:
    full, masked_seqs, masks = sequences()
    assert "loss_mask" in SEQUENCE_FIELDS
    batch = collate(masked_seqs, pad_id=7)
    reference = collate(full, pad_id=7)  # the same sequences with targets everywhere
    b, length = batch["input_ids"].shape
    assert batch["loss_mask"].dtype == torch.int64 and batch["loss_mask"].shape == (b, length)
    wide, ref = batch_to_device(batch, "cpu"), batch_to_device(reference, "cpu")
    for i, mask in enumerate(masks):
        n = len(mask)
        trained = torch.zeros(length, dtype=torch.bool)
        trained[:n] = torch.from_numpy(mask.astype(bool))
        assert batch["loss_mask"][i].tolist() == trained.long().tolist()
        assert torch.equal(batch["attention_mask"][i], reference["attention_mask"][i])
        assert torch.equal(batch["input_ids"][i], reference["input_ids"][i])
        # Hugging Face labels: token t + 1 where position t is trained, -100 elsewhere
        predicted = torch.nn.functional.pad(trained[:-1], (1, 0))  # (L,) token t is predicted
        want = torch.where(predicted, reference["labels"][i], IGNORE_INDEX)
        assert torch.equal(batch["labels"][i], want)
        for name in (*TOPK, *SAMPLED):
            got, expected = wide[name][i], ref[name][i]
            if name in SAMPLED:  # the masked batch may have fewer entry columns (m)
                m = got.shape[-1]
                assert (expected[trained][:, m:] == 0).all()
                expected = expected[:, :m]
            assert torch.equal(got[trained], expected[trained].to(got.dtype)), name
            assert (got[~trained] == 0).all(), name  # nothing at untrained positions
        counts = wide["sampled_counts"][i].sum(-1)  # (L,)
        assert (counts[trained] == N).all() and (counts[~trained] == 0).all()


def test_an_all_ones_mask_gives_the_batch_without_a_mask() -> None:
    full, _, _ = sequences(1)
    ones = [masked(s, np.ones(len(s["tokens"]), dtype=np.uint8)) for s in full]
    with_mask, without = collate(ones), collate(full)
    assert with_mask.keys() == without.keys()
    for name in without:
        assert torch.equal(with_mask[name], without[name]), name
    assert torch.equal(without["loss_mask"], without["attention_mask"])


def test_target_rows_that_do_not_fit_the_mask_are_refused() -> None:
    full, masked_seqs, _ = sequences()
    bad = dict(masked_seqs[0])
    bad["topk_ids"] = full[0]["topk_ids"]  # every position's rows, not the trained ones'
    with pytest.raises(ValueError, match="trains 5 positions but has 9 rows of topk_ids"):
        collate([bad])


@pytest.mark.parametrize("loss", ["kl", "ghost", "reverse-kl", "sampled-kl", "ce"])
def test_each_loss_on_a_masked_batch_is_the_loss_of_the_trained_positions(loss: str) -> None:
    full, masked_seqs, _ = sequences(2)
    batch = batch_to_device(collate(masked_seqs), "cpu")
    keep = batch["loss_mask"].bool()  # (B, L)
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, V, generator=g, requires_grad=True)
    ref_batch, ref_logits = trained_only(batch_to_device(collate(full), "cpu"), keep, logits)
    kw = {"loss": loss, "temperature": 2.0, "alpha": 0.4}
    ours = distillation_loss(logits, batch, chunk_tokens=5, **kw)
    (grad,) = torch.autograd.grad(ours, logits)
    want = distillation_loss(ref_logits, ref_batch, **kw)
    (ref_grad,) = torch.autograd.grad(want, logits)
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad, ref_grad, atol=1e-7, rtol=1e-5)
    assert grad[~keep].abs().sum() == 0  # untrained positions get no gradient at all
    sums, ref_sums = (
        loss_sums(logits, batch, loss=loss),
        loss_sums(ref_logits, ref_batch, loss=loss),
    )
    assert (sums.kd_tokens, sums.ce_tokens) == (ref_sums.kd_tokens, ref_sums.ce_tokens)
    if loss != "ce":
        assert sums.kd_tokens == int(keep.sum()) == 5 + 3 + 7


class FixedLogits(torch.nn.Module):
    """A "model" returning preset logits, one tensor per batch."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.logits = list(logits)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.logits.pop(0))


def test_every_metric_on_a_masked_batch_is_the_metric_of_the_trained_positions() -> None:
    full, masked_seqs, _ = sequences(3)
    batch = collate(masked_seqs)
    keep = batch["loss_mask"].bool()
    g = torch.Generator().manual_seed(1)
    logits = 2 * torch.randn(*batch["input_ids"].shape, V, generator=g)
    ref_batch, ref_logits = trained_only(collate(full), keep, logits)
    got = evaluate(FixedLogits([logits]), [batch], chunk_tokens=4)
    want = evaluate(FixedLogits([ref_logits]), [ref_batch])
    assert set(got) == set(want) and got["tokens"] == 5 + 3 + 6  # trained, with a next token
    for name in want:
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-7), name
    # the unmasked batch measures something else
    unmasked = evaluate(FixedLogits([logits]), [collate(full)])
    assert unmasked["tokens"] == sum(LENGTHS) - 3 and unmasked["ece"] != got["ece"]


def tiny_teacher() -> LiveTeacher:
    config = AutoConfig.for_model(
        "llama", vocab_size=V, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32,
    )  # fmt: skip
    torch.manual_seed(0)
    return LiveTeacher(AutoModelForCausalLM.from_config(config).eval())


@pytest.mark.parametrize("loss", ["kl", "reverse-kl"])
def test_online_kd_and_the_exact_kl_count_the_trained_positions_only(loss: str) -> None:
    full, masked_seqs, _ = sequences(4)
    teacher = tiny_teacher()
    batch = batch_to_device(collate(masked_seqs), "cpu")
    keep = batch["loss_mask"].bool()
    batch["teacher_hidden"] = teacher.hidden(batch["input_ids"], batch["attention_mask"])
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(*keep.shape, V, generator=g)
    ref_batch, ref_logits = trained_only(batch_to_device(collate(full), "cpu"), keep, logits)
    hidden = batch["teacher_hidden"][keep]  # (T, H); the reference's padding row: zeros
    ref_batch["teacher_hidden"] = torch.cat([hidden, hidden.new_zeros(1, hidden.shape[1])])[None]
    ours = loss_sums(logits, batch, loss=loss, temperature=1.5, chunk_tokens=4, teacher=teacher)
    want = loss_sums(ref_logits, ref_batch, loss=loss, temperature=1.5, teacher=teacher)
    torch.testing.assert_close(ours.kd_sum, want.kd_sum, atol=1e-6, rtol=1e-5)
    assert ours.kd_tokens == want.kd_tokens == int(keep.sum())
    # evaluate's exact KL to the teacher: the mean over the trained positions
    metrics = evaluate(FixedLogits([logits]), [batch], teacher=teacher)
    rows = teacher.logprobs(batch["teacher_hidden"][keep])  # (T, V)
    exact = float(exact_kl(logits[keep], rows).double().mean())
    assert metrics["kl_to_teacher"] == pytest.approx(exact, rel=1e-5)
