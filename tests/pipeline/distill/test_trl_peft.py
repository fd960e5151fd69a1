"""The store in TRL's SFTTrainer (``DistillSFTTrainer``, trl_recipe.py) and PEFT LoRA students:
the same steps as ``DistillTrainer``, the SFT settings that cannot apply refused, only the
adapter trained, its first loss the plain whole-logits loss, the adapter saved and reloaded."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from conftest import write_synthetic_store
from transformers import TrainingArguments

from kdcache.pipeline.distill import (
    DistillLoss,
    load_store_tokenizer,
    make_optimizer,
    next_token_labels,
    student_head,
)
from kdcache.pipeline.distill.losses import IGNORE_INDEX, kd_per_token, trained_mask
from kdcache.pipeline.distill.student import build_student
from kdcache.pipeline.errors import UserError
from kdcache.storage import open_store

peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

# train-student --steps 4 --batch-size 4 --grad-accum 2 --lr 3e-3 --warmup 1 --eval-every 2
RUN = dict(per_device_train_batch_size=4, gradient_accumulation_steps=2, logging_steps=1,
           report_to="none", use_cpu=True, save_strategy="no", max_grad_norm=1.0, seed=0)  # fmt: skip
LORA = dict(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    url = str(tmp_path_factory.mktemp("trl") / "store")
    lengths = {"train": [[24] * 6, [24] * 5, [24] * 6], "eval": [[24] * 4, [24] * 3 + [11]]}
    return write_synthetic_store(url, lengths=lengths, tokenizer_dir=tiny_tokenizer_dir)


def student(store: str) -> torch.nn.Module:
    opened = open_store(store)
    model, _ = build_student(
        "tiny", opened.tokenizer_size, tokenizer=load_store_tokenizer(opened), seed=0
    )
    return model


def logged(trainer: Any, key: str = "loss") -> list[float]:
    """``key`` of every training step's log row."""
    return [row[key] for row in trainer.state.log_history if "loss" in row]


def test_sft_trainer_takes_the_steps_of_distill_trainer(store: str, tmp_path: Path) -> None:
    from kdcache.pipeline.distill import DistillSFTTrainer, DistillTrainer

    runs = []
    for name, config in (("hf", TrainingArguments), ("sft", trl.SFTConfig)):
        model = student(store)
        extra = {"bf16": False} if name == "sft" else {}  # SFTConfig defaults to bf16 autocast
        args = config(output_dir=str(tmp_path / name), max_steps=4, eval_strategy="steps",
                      eval_steps=2, **RUN, **extra)  # fmt: skip
        optimizers = make_optimizer(model, lr=3e-3, steps=4, warmup=1)
        if name == "hf":
            tokenizer = load_store_tokenizer(open_store(store))
            trainer = DistillTrainer(model, args, store=store, processing_class=tokenizer,
                                     optimizers=optimizers)  # fmt: skip
        else:  # the store's tokenizer by default
            trainer = DistillSFTTrainer(model, args, store=store, optimizers=optimizers)
        trainer.train()
        evals = [r for r in trainer.state.log_history if "eval_cross_entropy" in r]
        steps = logged(trainer) + logged(trainer, "grad_norm")
        runs.append((steps, evals, trainer.evaluate()))
    (hf_steps, hf_evals, hf_final), (sft_steps, sft_evals, sft_final) = runs
    assert len(hf_steps) == 8 and len(hf_evals) == 2
    assert sft_steps == pytest.approx(hf_steps, rel=1e-5)  # loss and gradient norm per step
    for ours, want in zip(sft_evals + [sft_final], hf_evals + [hf_final], strict=True):
        assert ours.keys() == want.keys()
        assert ours == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    ("setting", "words"),
    [
        ({"packing": True}, "packing=False"),
        ({"padding_free": True}, "padding_free=False"),
        ({"completion_only_loss": True}, "loss_mask"),
        ({"train_dataset": [{"input_ids": [1, 2]}]}, "drop train_dataset="),
    ],
)
def test_sft_settings_that_cannot_apply_are_refused(
    store: str, tmp_path: Path, setting: dict[str, Any], words: str
) -> None:
    from kdcache.pipeline.distill import DistillSFTTrainer

    options = {k: v for k, v in setting.items() if k != "train_dataset"}
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=1, bf16=False, **options)
    extra = {"train_dataset": setting["train_dataset"]} if "train_dataset" in setting else {}
    with pytest.raises(UserError) as raised:
        DistillSFTTrainer(student(store), args, store=store, **extra)
    message = raised.value.message
    assert words in message and "\n" not in message


def reference_step_loss(model: Any, batches: list[dict], loss: DistillLoss) -> torch.Tensor:
    """The plain computation over a whole step: the model's whole logits of every micro-batch,
    KD averaged over the step's trained positions, CE over its labelled next tokens."""
    vocab = loss.vocab
    flat, labels, mask, targets = [], [], [], {}
    for b in batches:
        rows = b["input_ids"].numel()
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        flat.append(logits[..., :vocab].reshape(rows, vocab))  # (B·L, V)
        labels.append(next_token_labels(b["labels"]).reshape(rows))
        mask.append(trained_mask(b).reshape(rows).float())
        for n in b:
            if n.startswith(("topk_", "sampled_")):
                targets.setdefault(n, []).append(b[n].reshape(rows, *b[n].shape[2:]))
    logits = torch.cat(flat)
    ce = F.cross_entropy(logits, torch.cat(labels), ignore_index=IGNORE_INDEX)
    fields = {n: torch.cat(v) for n, v in targets.items()}
    weights = torch.cat(mask)
    kd = (kd_per_token(logits, fields, loss.loss, loss.temperature) * weights).sum() / weights.sum()
    return loss.alpha * kd + (1 - loss.alpha) * ce


def lora_parts(model: Any) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(frozen base weights, trainable LoRA weights), copied."""
    named = [(n, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()]
    return ({n: p for n, p, grad in named if not grad}, {n: p for n, p, grad in named if grad})


def test_a_lora_student_trains_its_adapter_only(store: str, tmp_path: Path) -> None:
    from kdcache.pipeline.distill import DistillTrainer

    torch.manual_seed(0)
    model = peft.get_peft_model(student(store), peft.LoraConfig(**LORA))
    vocab = open_store(store).tokenizer_size
    head = student_head(model, vocab)  # the split head works through PEFT's wrapper
    assert not head.whole_logits, head.note
    before = copy.deepcopy(model)
    frozen, adapter = lora_parts(model)
    assert adapter and all("lora_" in n for n in adapter)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, **RUN)
    trainer = DistillTrainer(model, args, store=store,
                             optimizers=make_optimizer(model, lr=3e-3, steps=3, warmup=1))  # fmt: skip
    seen: list[dict[str, torch.Tensor]] = []
    compute_loss = trainer.compute_loss

    def recording(model: Any, inputs: dict[str, torch.Tensor], *a: Any, **k: Any) -> Any:
        seen.append({n: v.clone() for n, v in inputs.items()})
        return compute_loss(model, inputs, *a, **k)

    trainer.compute_loss = recording
    trainer.train()

    steps = logged(trainer)
    assert steps[-1] < steps[0]
    with torch.no_grad():
        want = reference_step_loss(before, seen[:2], trainer.distill_loss)  # the first step
    assert steps[0] == pytest.approx(float(want), rel=1e-5)
    now_frozen, now_adapter = lora_parts(model)
    assert all(torch.equal(now_frozen[n], p) for n, p in frozen.items())  # bitwise
    assert all(not torch.equal(now_adapter[n], p) for n, p in adapter.items())

    trainer.save_model(str(tmp_path / "adapter"))
    reloaded = peft.PeftModel.from_pretrained(student(store), str(tmp_path / "adapter"))
    for (n, p), (m, q) in zip(model.named_parameters(), reloaded.named_parameters(), strict=True):
        assert n == m and torch.equal(p, q), n


def test_sft_trainer_wraps_the_student_with_a_peft_config(store: str, tmp_path: Path) -> None:
    from kdcache.pipeline.distill import DistillSFTTrainer

    model = student(store)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    # gradient checkpointing: SFTConfig's default (with PEFT, SFTTrainer enables input gradients)
    args = trl.SFTConfig(
        output_dir=str(tmp_path), max_steps=3, learning_rate=3e-3, bf16=False, **RUN
    )
    trainer = DistillSFTTrainer(model, args, store=store, peft_config=peft.LoraConfig(**LORA))
    assert isinstance(trainer.model, peft.PeftModel) and args.gradient_checkpointing
    trainer.train()
    steps = logged(trainer)
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(steps)))
    adapter = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert adapter and all("lora_" in n for n in adapter)
    for n, p in trainer.model.get_base_model().named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert all(p.abs().sum() > 0 for p in lora_b)  # LoRA B starts at zero: it was trained
