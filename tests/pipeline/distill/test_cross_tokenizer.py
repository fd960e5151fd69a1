"""A student with another tokenizer: the collator's chunks and labels, and the chunk likelihood
matching loss equal to its plain autograd computation from whole logits, in value and gradient."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from kdcache.pipeline.cache.tokenizer import train_bpe_tokenizer
from kdcache.pipeline.distill.alignment import NO_CHUNK, retokenize
from kdcache.pipeline.distill.cross_tokenizer import (
    CrossTokenizerCollator,
    chunk_distance,
    cross_batch_loss,
)
from kdcache.pipeline.distill.exact_matches import QUANTUM
from kdcache.pipeline.distill.losses import IGNORE_INDEX, next_token_labels
from kdcache.pipeline.distill.student_head import student_head

TEXTS = ["def add(a, b):\n    return a + b  # café ✓\n", "x = [1, 2, 3]\nprint(sum(x))\n"]


@pytest.fixture(scope="module")
def tokenizers(corpus_texts: list[str]):
    texts = [t[:4000] for t in corpus_texts[:40]] + TEXTS
    return train_bpe_tokenizer(texts, vocab_size=700), train_bpe_tokenizer(texts, vocab_size=350)


def store_sequence(teacher, text: str, seed: int, masked: bool = False) -> dict:
    """A sequence as a format-6 store gives it: the teacher's tokens (BOS first), the text, each
    token's end byte, made-up log-probs of the realized next tokens, optionally a loss mask."""
    data = text.encode()
    tokens = retokenize(teacher, data)
    rng = np.random.default_rng(seed)
    n = tokens.ids.size + 1
    realized = -rng.random(n).astype(np.float32) * 4
    realized[-1] = np.nan
    sequence = {
        "tokens": np.concatenate([[teacher.bos_token_id or 0], tokens.ids]).astype(np.int32),
        "text": data,
        "token_ends": np.concatenate([[0], tokens.ends]).astype(np.int32),
        "next_token_logprob": realized,
    }
    if masked:  # train only the second half of the text
        mask = np.zeros(n, np.uint8)
        mask[n // 2 :] = 1
        sequence["loss_mask"] = mask
    return sequence


def test_the_collator_gives_the_student_tokens_and_the_teachers_chunk_likelihoods(tokenizers):
    teacher, student = tokenizers
    sequence = store_sequence(teacher, TEXTS[0], seed=1)
    collator = CrossTokenizerCollator(student)
    row = collator.sequence(sequence)
    own = retokenize(student, sequence["text"])
    assert row["input_ids"][1:].tolist() == own.ids.tolist()  # the student's BOS, then its tokens
    assert row["token_bytes"].sum() == len(sequence["text"])
    # a chunk's teacher log-likelihood: the stored log-probs of the teacher tokens spelling it
    ends = sequence["token_ends"].astype(np.int64)
    student_ends = np.concatenate([[0], own.ends])
    shared = np.intersect1d(ends, student_ends)
    bounds = np.concatenate([[0], shared[shared > 0]])
    for c in range(bounds.size - 1):
        inside = [k for k in range(1, ends.size) if bounds[c] < ends[k] <= bounds[c + 1]
                  and ends[k] > ends[k - 1]]  # fmt: skip
        want = sum(float(sequence["next_token_logprob"][k - 1]) for k in inside)
        assert row["chunk_teacher_logprob"][c] == pytest.approx(min(want, 0.0), rel=1e-6)
    assert row["chunk_mask"].sum() == bounds.size - 1  # every chunk predicted (BOS on both)
    batch = collator([sequence, store_sequence(teacher, TEXTS[1], seed=2)])
    assert batch["input_ids"].shape == batch["chunk_ids"].shape == batch["labels"].shape
    assert (batch["labels"][:, 0] == IGNORE_INDEX).all()
    assert (batch["chunk_ids"][batch["attention_mask"] == 0] == NO_CHUNK).all()


def test_a_masked_store_trains_only_the_chunks_its_mask_trains(tokenizers) -> None:
    teacher, student = tokenizers
    sequence = store_sequence(teacher, TEXTS[0], seed=3, masked=True)
    row = CrossTokenizerCollator(student).sequence(sequence)
    trained = row["chunk_mask"].astype(bool)
    assert 0 < trained.sum() < trained.size
    # untrained chunks carry no student labels either
    untrained_tokens = np.isin(row["chunk_ids"], np.flatnonzero(~trained))
    assert (row["labels"][untrained_tokens] == IGNORE_INDEX).all()


def test_a_store_without_text_is_refused(tokenizers) -> None:
    teacher, student = tokenizers
    sequence = store_sequence(teacher, TEXTS[0], seed=1)
    del sequence["text"]
    with pytest.raises(ValueError, match="format 6"):
        CrossTokenizerCollator(student).sequence(sequence)


def reference(model, batch, alpha: float, temperature: float) -> torch.Tensor:
    """The plain computation: whole logits, per-chunk sums, autograd."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    b, length, _ = logits.shape
    log_p = torch.log_softmax(logits.float(), -1)
    ids = next_token_labels(batch["input_ids"], fill=0)
    nll = -log_p.gather(-1, ids[..., None])[..., 0]  # (B, L)
    chunk = next_token_labels(batch["chunk_ids"], fill=NO_CHUNK)  # (B, L)
    chunks = batch["chunk_mask"].shape[1]
    student_ll = torch.zeros(b, chunks)
    for i in range(b):
        for t in range(length):
            if chunk[i, t] >= 0:
                student_ll[i, chunk[i, t]] = student_ll[i, chunk[i, t]] - nll[i, t]
    distance = chunk_distance(student_ll, batch["chunk_teacher_logprob"], temperature)
    kd = distance * batch["chunk_mask"]
    kd = kd.sum() / batch["chunk_mask"].sum()
    labels = next_token_labels(batch["labels"])
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(b * length, -1), labels.reshape(-1), ignore_index=IGNORE_INDEX
    )
    return alpha * kd + (1 - alpha) * ce


@pytest.mark.parametrize("masked", [False, True])
def test_the_loss_and_its_gradients_equal_the_whole_logits_computation(tokenizers, masked) -> None:
    teacher, student = tokenizers
    batch = CrossTokenizerCollator(student)(
        [store_sequence(teacher, text, seed=i, masked=masked) for i, text in enumerate(TEXTS)]
    )
    config = AutoConfig.for_model(
        "llama", vocab_size=len(student), hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    want = reference(model, batch, alpha=0.6, temperature=1.5)
    want.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    head = student_head(model, len(student))
    terms = cross_batch_loss(
        head.rows(model, batch), batch, head, temperature=1.5, alpha=0.6, chunk_tokens=7
    )
    terms.total.backward()
    torch.testing.assert_close(terms.total, want, rtol=1e-5, atol=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


# --- end to end: cache-teacher (format 6) → train-student with the student's own tokenizer -----


@pytest.fixture(scope="module")
def text_store(tmp_path_factory, tiny_teacher_dir, corpus_texts) -> Path:
    from conftest import cache_small_store

    return cache_small_store(tmp_path_factory, tiny_teacher_dir, corpus_texts)


@pytest.fixture(scope="module")
def own_student(tmp_path_factory, tokenizers) -> Path:
    """A student config whose `tokenizer:` is a BPE of another vocabulary size."""
    folder = tmp_path_factory.mktemp("own-student")
    tokenizers[1].save_pretrained(folder / "tokenizer")
    config = folder / "student.yaml"
    config.write_text(
        "tokenizer: tokenizer\nhidden_size: 32\nintermediate_size: 64\nnum_hidden_layers: 1\n"
        "num_attention_heads: 2\nnum_key_value_heads: 1\ntie_word_embeddings: true\n"
    )
    return config


def _train(store: Path, student: Path, out: Path, capsys, *extra: str) -> tuple[int, str]:
    from kdcache.pipeline.cli import main

    argv = ["train-student", "--store", str(store), "--student", str(student), "--out", str(out),
            "--steps", "3", "--batch-size", "2", "--threads", "1", *extra]  # fmt: skip
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    return code, capsys.readouterr().err


def test_a_student_with_its_own_tokenizer_trains_from_the_store(
    text_store, own_student, tmp_path, capsys, tokenizers
) -> None:
    import json

    code, err = _train(text_store, own_student, tmp_path / "kd", capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert metrics["settings"]["loss"] == "alm"  # auto on a top-k store: chunk likelihoods
    final = metrics["final"]
    assert final["bits_per_byte"] > 0 and final["bits_per_char"] >= final["bits_per_byte"]
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "kd")  # the student's own, saved beside it
    assert saved.get_vocab() == tokenizers[1].get_vocab()
    # its CE-only twin trains on the same re-tokenized text
    code, err = _train(text_store, own_student, tmp_path / "ce", capsys, "--loss", "ce")
    assert code == 0, err
    twin = json.loads((tmp_path / "ce" / "metrics.json").read_text())["final"]
    assert twin["tokens"] == final["tokens"]  # the same eval tokens, in the student's tokens


def test_compare_reads_the_eval_text_in_each_students_own_tokens(
    text_store, own_student, tiny_teacher_dir, tmp_path, capsys
) -> None:
    import json

    from kdcache.pipeline.cli import main

    for name, extra in (("kd", ()), ("ce", ("--loss", "ce"))):
        code, err = _train(text_store, own_student, tmp_path / name, capsys, *extra)
        assert code == 0, err
    facts = tmp_path / "compare.json"
    argv = ["compare", "--teacher", str(tiny_teacher_dir), "--store", str(text_store),
            "--kd", str(tmp_path / "kd"), "--ce", str(tmp_path / "ce"), "--json", str(facts)]  # fmt: skip
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    out = capsys.readouterr().out
    rows = json.loads(facts.read_text())
    assert rows["teacher"]["kl_to_teacher"] == pytest.approx(0.0, abs=1e-6)
    for name, row in (
        ("kd", rows["students"]["KD student"]),
        ("ce", rows["students"]["CE-only student"]),
    ):
        trained = json.loads((tmp_path / name / "metrics.json").read_text())["final"]
        # the same pass train-student evaluated on: its own tokens, the same figures
        assert row["tokens"] == trained["tokens"] != rows["teacher"]["tokens"]
        assert row["bits_per_byte"] == pytest.approx(trained["bits_per_byte"], rel=1e-4)
        assert "kl_to_teacher" not in row  # no KL across vocabularies
    assert "bits per byte" in out.splitlines()[-2]  # the verdict on the scale both share


def test_cross_tokenizer_refusals_are_one_line(text_store, own_student, tmp_path, capsys):
    code, err = _train(text_store, own_student, tmp_path / "a", capsys, "--loss", "ghost")
    assert code == 2 and "--loss alm" in err and len(err.strip().splitlines()) == 1
    code, err = _train(text_store, "tiny", tmp_path / "b", capsys, "--loss", "alm")
    assert code == 2 and "is for a student with its own tokenizer" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_store_without_text_or_a_tokenizer_full_of_unknowns_is_refused(
    text_store, own_student, tmp_path, capsys, tiny_tokenizer_dir, corpus_texts
) -> None:
    from conftest import write_synthetic_store
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import PreTrainedTokenizerFast

    old = write_synthetic_store(  # no text spans (what a format-5 store gives)
        str(tmp_path / "old"), lengths={"train": [[24] * 4]}, tokenizer_dir=tiny_tokenizer_dir
    )
    code, err = _train(Path(old), own_student, tmp_path / "a", capsys)
    assert code == 2 and "holds no text spans" in err and len(err.strip().splitlines()) == 1
    # a WordPiece tokenizer that knows only letters: code punctuation is all [UNK]
    wordpiece = BertWordPieceTokenizer(lowercase=True)
    wordpiece.train_from_iterator(["abc def ghi jkl mno pqr stu vwx yz"], vocab_size=60)
    folder = tmp_path / "letters"
    PreTrainedTokenizerFast(
        tokenizer_object=wordpiece._tokenizer, unk_token="[UNK]", pad_token="[PAD]"
    ).save_pretrained(folder / "tokenizer")
    config = folder / "student.yaml"
    config.write_text(own_student.read_text())
    code, err = _train(text_store, config, tmp_path / "b", capsys)
    assert code == 2 and "cannot encode the stored text" in err and "unknown token" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_teachers_draws_reach_the_student_where_both_vocabularies_hold_the_token(tokenizers):
    from kdcache.pipeline.distill.exact_matches import vocabulary_map

    teacher, student = tokenizers
    sequence = store_sequence(teacher, TEXTS[0], seed=4)
    n = sequence["tokens"].size
    rng = np.random.default_rng(0)
    draws = [np.sort(rng.choice(len(teacher), 5, replace=False)) for _ in range(n)]
    sequence |= {
        "sampled_distinct": np.full(n, 5, np.uint8),
        "sampled_ids": np.concatenate(draws).astype(np.uint16),
        "sampled_counts": np.full(5 * n, 2, np.uint8),
        "sampled_logprobs": -rng.random(5 * n).astype(np.float16),
    }
    mapping = vocabulary_map(teacher, student)
    # byte-level BPEs share their alphabet: every ordinary teacher entry begins with a student one
    assert (mapping >= 0).sum() >= len(teacher) - len(teacher.all_special_tokens)
    shared = [t for t in teacher.get_vocab() if t in student.get_vocab()]
    assert all(mapping[teacher.get_vocab()[t]] == student.get_vocab()[t] for t in shared)
    collator = CrossTokenizerCollator(student, teacher_tokenizer=teacher)
    batch = collator([sequence])
    rows = batch["loss_mask"][0].nonzero()[:, 0].tolist()
    # student positions m − 1 whose token m starts where a teacher token k ≥ 1 starts
    t_ends = sequence["token_ends"].astype(np.int64)
    t_starts = {int(b) for b, e in zip(np.r_[0, t_ends[:-1]][1:], t_ends[1:], strict=True) if e > b}
    own = retokenize(student, sequence["text"])
    s_starts = np.r_[0, own.ends[:-1]]  # where each of the student's own tokens starts
    first = 1 if collator.bos is not None else 0  # the index of its first text token
    # own token j is token j + first of the batch row, predicted at position j + first − 1
    aligned = [j + first - 1 for j, b in enumerate(s_starts.tolist()) if b in t_starts]
    aligned = [p for p in aligned if p >= 0]
    assert aligned, "no aligned position"
    counts = batch["sampled_counts"][0].long()  # (L, m) uint16 widened
    kept = counts > 0
    # the drawn entries, and the realized ones (counted by their exact stored probability)
    entries = {int(i) for i in np.concatenate([*draws, sequence["tokens"]])}
    begins = {int(mapping[i]) for i in entries}
    continuing = set()  # a piece of an entry's split, after its start
    for teacher_id in entries:
        entry = collator.splits.entry(teacher_id)
        continuing |= set(entry[1].values()) if entry else set()
    one_hot = 0
    for position in rows:
        ids = batch["sampled_ids"][0, position][kept[position]].long().tolist()
        assert ids == sorted(ids) and ids
        # the weights, in units of 1/QUANTUM: one row's sum to it, up to rounding
        assert abs(int(counts[position].sum()) - QUANTUM) <= len(ids)
        if position in aligned:
            assert set(ids) <= begins | continuing
        elif ids == [int(batch["input_ids"][0, position + 1])]:  # the data's token, one-hot
            assert float(batch["sampled_logprobs"][0, position][kept[position]][0]) == 0.0
            one_hot += 1
        else:  # continuations of the teacher token holding this position
            assert set(ids) <= continuing
    assert one_hot, "random draws rarely continue the text: most inside positions are one-hot"
    # every trained position has a row (the rest keep their full CE weight in the loss)
    assert rows == (next_token_labels(batch["labels"])[0] != IGNORE_INDEX).nonzero()[:, 0].tolist()
    assert set(rows) - set(aligned), "no position inside a teacher token"


def test_on_a_sampled_store_the_student_learns_from_the_matched_draws(
    tmp_path_factory, tiny_teacher_dir, corpus_texts, own_student, tmp_path, capsys
) -> None:
    import json

    from kdcache.pipeline.cli import main

    corpus = tmp_path_factory.mktemp("sampled-corpus")
    for i, text in enumerate(corpus_texts[:6]):
        (corpus / f"doc{i}.txt").write_text(text[:2000], encoding="utf-8")
    store = tmp_path / "sampled"
    try:
        main(["cache-teacher", "--teacher", str(tiny_teacher_dir), "--corpus", str(corpus),
              "--out", str(store), "--targets", "sampled", "--samples", "16", "--seq-len", "32",
              "--eval-fraction", "0.3"])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None)
    code, err = _train(store, own_student, tmp_path / "kd", capsys, "--loss", "sampled-kl")
    assert code == 0, err
    metrics = json.loads((tmp_path / "kd" / "metrics.json").read_text())
    assert metrics["settings"]["loss"] == "sampled-kl"
    assert metrics["final"]["bits_per_byte"] > 0
    assert "sampled_kl_to_teacher" not in metrics["final"]  # no KL estimate across tokenizers
    assert metrics["train"]["trained_tokens"] > 0  # the aligned positions with matched draws


def test_a_sweep_trains_candidates_with_their_own_tokenizers_and_ranks_by_bits_per_byte(
    text_store, own_student, tmp_path, capsys
) -> None:
    import csv
    import json

    from kdcache.pipeline.cli import main

    own = own_student.parent / "tokenizer"
    config = tmp_path / "sweep.yaml"
    config.write_text(
        "base: tiny\nseed: 0\nbudget: {steps: 3}\nbatch_size: 2\neval_batches: 2\n"
        f"search:\n  hidden_size: [32]\n  num_hidden_layers: [1]\n  tokenizer: [store, {own}]\n"
        "baseline: true\ntokenizer: " + str(own) + "\n"
    )
    try:
        main(["sweep", "--store", str(text_store), "--config", str(config), "--out",
              str(tmp_path / "out"), "--threads", "1", "--together", "4"])  # fmt: skip
    except SystemExit as e:
        assert e.code in (0, None), capsys.readouterr().err
    with (tmp_path / "out" / "leaderboard.csv").open() as f:
        board = {row["candidate"]: row for row in csv.DictReader(f)}
    assert set(board) == {"h32-l1-tok-store", "h32-l1-tok-tokenizer", "baseline-ce"}
    ours, theirs = board["h32-l1-tok-tokenizer"], board["h32-l1-tok-store"]
    assert ours["tokenizer"] == board["baseline-ce"]["tokenizer"] == "tokenizer"
    assert theirs["tokenizer"] == "store"
    assert ours["loss"] == "alm" and theirs["loss"] != "alm"
    assert board["baseline-ce"]["loss"] == "ce"
    # ranked by bits per byte: the scale students with different tokenizers share
    ranked = sorted(board.values(), key=lambda row: float(row["eval_bits_per_byte"]))
    assert [row["candidate"] for row in ranked] == list(board)  # the leaderboard's order
    assert "bits" in (tmp_path / "out" / "leaderboard.md").read_text()
    # each candidate saved with the tokenizer it reads, its eval in its own tokens
    from transformers import AutoTokenizer

    saved = AutoTokenizer.from_pretrained(tmp_path / "out" / "candidates" / "h32-l1-tok-tokenizer")
    assert len(saved) == len(AutoTokenizer.from_pretrained(own))
    facts = {
        name: json.loads((tmp_path / "out" / "candidates" / name / "metrics.json").read_text())
        for name in board
    }
    assert (
        facts["h32-l1-tok-tokenizer"]["eval"]["tokens"]
        != facts["h32-l1-tok-store"]["eval"]["tokens"]
    )


def test_the_hf_trainer_trains_a_student_with_its_own_tokenizer_as_train_student_does(
    text_store, own_student, tmp_path, capsys
) -> None:
    import csv
    import json

    from transformers import AutoTokenizer, TrainingArguments

    from kdcache.pipeline.distill import DistillTrainer, make_optimizer
    from kdcache.pipeline.distill.student import build_student
    from kdcache.storage import open_store

    code, err = _train(text_store, own_student, tmp_path / "cli", capsys, "--steps", "4",
                       "--grad-accum", "2", "--lr", "3e-3", "--warmup", "1")  # fmt: skip
    assert code == 0, err
    cli = json.loads((tmp_path / "cli" / "metrics.json").read_text())
    with (tmp_path / "cli" / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    st = open_store(str(text_store))
    tokenizer = AutoTokenizer.from_pretrained(own_student.parent / "tokenizer")
    model, _ = build_student(str(own_student), len(tokenizer), tokenizer=tokenizer, seed=0,
                             max_positions=max(2048, st.seq_len))  # fmt: skip
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=4, per_device_train_batch_size=2, per_device_eval_batch_size=2,
        gradient_accumulation_steps=2, logging_steps=1, report_to="none", use_cpu=True,
        save_strategy="no", seed=0, max_grad_norm=1.0, disable_tqdm=True,
    )  # fmt: skip
    trainer = DistillTrainer(
        model, args, store=st, processing_class=tokenizer, eval_batches=20,
        optimizers=make_optimizer(model, lr=3e-3, steps=4, warmup=1),
    )  # fmt: skip
    assert trainer.distill_loss.loss == "alm"  # auto, for a student with its own tokenizer
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == pytest.approx([float(r["loss"]) for r in rows], rel=1e-5)
    final = trainer.evaluate()
    for name in ("cross_entropy", "bits_per_byte", "tokens"):
        assert final[f"eval_{name}"] == pytest.approx(cli["final"][name], rel=1e-5), name


def test_auto_takes_the_matched_draws_only_where_the_tokens_mostly_start_together(
    tokenizers, corpus_texts
) -> None:
    from types import SimpleNamespace

    from kdcache.pipeline.distill.student_tokenizer import MATCHED_SHARE, cross_loss

    teacher, bpe = tokenizers
    texts = [t[:4000] for t in corpus_texts[:40]] + TEXTS
    byte_level = train_bpe_tokenizer(texts, vocab_size=1)  # the byte alphabet, no merges
    shares = {}
    for name, student in (("bpe", bpe), ("bytes", byte_level)):
        collator = CrossTokenizerCollator(student)
        for seed, text in enumerate(TEXTS + [t[:1500] for t in corpus_texts[:4]]):
            collator.sequence(store_sequence(teacher, text, seed=seed))
        shares[name] = collator.stats.aligned_share
        sampled, topk = SimpleNamespace(has_samples=True), SimpleNamespace(has_samples=False)
        want = "sampled-kl" if shares[name] >= MATCHED_SHARE else "alm"
        assert cross_loss("auto", sampled, collator) == want
        assert cross_loss("auto", topk, collator) == "alm"  # draws need a store with samples
        assert cross_loss("ce", sampled, collator) == "ce"
    # a BPE of half the size, trained on the same text, splits the teacher's tokens: it starts
    # nearly every token where the teacher does; bytes start mostly inside teacher tokens
    assert shares["bpe"] >= MATCHED_SHARE > shares["bytes"]


def _student_piece_at(student, text: str, cut: int) -> int | None:
    """The student token starting at byte ``cut`` of ``text`` split alone, if one does."""
    encoded = student(text, add_special_tokens=False, return_offsets_mapping=True)
    for piece, (start, _) in zip(encoded["input_ids"], encoded["offset_mapping"], strict=True):
        if len(text[:start].encode()) == cut:
            return piece
    return None


def _continuing_entry(teacher, student, seen: bytes, exclude: int) -> tuple[int, int] | None:
    """A teacher entry (not ``exclude``) that begins with ``seen``, goes on, and is split by the
    student with a boundary after it: (its id, the student piece starting there)."""
    for teacher_id in range(len(teacher)):
        if teacher_id == exclude or teacher_id in teacher.all_special_ids:
            continue
        text = teacher.decode([teacher_id])
        data = text.encode()
        if len(data) > len(seen) and data.startswith(seen) and "\ufffd" not in text:
            piece = _student_piece_at(student, text, len(seen))
            if piece is not None:
                return teacher_id, piece
    return None


def _row_weights(batch: dict, position: int) -> dict[int, float]:
    """{student token: target weight} of the first row's sampled row at ``position``."""
    counts = batch["sampled_counts"][0, position].long()
    ids = batch["sampled_ids"][0, position].long()[counts > 0].tolist()
    return dict(zip(ids, (counts[counts > 0] / QUANTUM).tolist(), strict=True))


def _with_draws(sequence: dict, rows: dict[int, list[tuple[int, int]]]) -> dict:
    """``sequence`` with made-up draws: {teacher position: [(id, count)]}, one draw of id 0
    elsewhere (no byte continues anything with it: a special token)."""
    n = sequence["tokens"].size
    ids, counts, distinct = [], [], []
    for position in range(n):
        drawn = rows.get(position, [(0, 1)])
        distinct.append(len(drawn))
        ids += [i for i, _ in drawn]
        counts += [c for _, c in drawn]
    return sequence | {
        "sampled_distinct": np.asarray(distinct, np.uint8),
        "sampled_ids": np.asarray(ids, np.uint16),
        "sampled_counts": np.asarray(counts, np.uint8),
        "sampled_logprobs": np.full(len(ids), -1.0, np.float16),
    }


def _draw_case(tokenizers, seed: int):
    """A stored sequence, its text and teacher token ends, the student's own tokens, a collator
    with the teacher's tokenizer, and the index of the student's first text token."""
    teacher, student = tokenizers
    base = store_sequence(teacher, TEXTS[0], seed=seed)
    own = retokenize(student, base["text"])
    collator = CrossTokenizerCollator(student, teacher_tokenizer=teacher)
    first = 1 if collator.bos is not None else 0
    return base, base["text"], base["token_ends"].astype(np.int64), own, collator, first


def test_inside_a_teacher_token_the_draws_continue_the_text_seen(tokenizers) -> None:
    teacher, student = tokenizers
    base, text, ends, own, collator, first = _draw_case(tokenizers, seed=5)
    # a teacher token k the student splits, and a continuing entry of its first piece
    for j in range(own.ids.size):
        start = int(own.ends[j - 1]) if j else 0
        k = int(np.searchsorted(ends, start, side="right"))
        if k < ends.size and ends[k - 1] < start < ends[k]:
            seen = text[ends[k - 1] : start]
            realized = int(base["tokens"][k])
            other = _continuing_entry(teacher, student, seen, exclude=realized)
            if other is not None:
                break
    else:
        pytest.skip("no teacher token split by the student with a continuing entry")
    # the draws predicting token k: itself 3 times, the continuing entry once, a stranger 4;
    # the realized token k counts by its exact probability (stored), 0.25
    stranger = next(
        i for i in range(len(teacher)) if not teacher.decode([i]).encode().startswith(seen)
    )
    sequence = _with_draws(base, {k - 1: sorted([(realized, 3), (other[0], 1), (stranger, 4)])})
    sequence["next_token_logprob"][k - 1] = np.log(0.25)
    batch = collator([sequence])
    position = j + first - 1  # predicting own token j
    got = _row_weights(batch, position)
    want: dict[int, float] = {}
    piece = _student_piece_at(student, teacher.decode([realized]), len(seen))
    for token, share in ((int(own.ids[j]) if piece is None else piece, 2 / 3), (other[1], 1 / 3)):
        want[token] = want.get(token, 0.0) + share  # 0.25 : 1/8 of the draws
    assert got == pytest.approx(want, abs=1 / QUANTUM)


def test_where_both_start_a_token_the_teachers_boundary_is_mixed_with_going_on(tokenizers):
    teacher, student = tokenizers
    base, text, ends, own, collator, first = _draw_case(tokenizers, seed=6)
    starts = {int(b): k for k, b in enumerate(np.r_[0, ends[:-1]]) if k >= 2 and ends[k] > b}
    for j in range(1, own.ids.size):
        start = int(own.ends[j - 1])
        k = starts.get(start)
        if k is not None and ends[k - 1] > ends[k - 2]:  # token k − 1 spells text
            seen = text[ends[k - 2] : start]
            other = _continuing_entry(teacher, student, seen, exclude=int(base["tokens"][k - 1]))
            if other is not None:
                break
    else:
        pytest.skip("no aligned position whose previous teacher token has a continuing entry")
    nxt = int(base["tokens"][k])
    sequence = _with_draws(
        base, {k - 1: [(nxt, 4)], k - 2: sorted([(int(base["tokens"][k - 1]), 2), (other[0], 2)])}
    )
    sequence["next_token_logprob"][k - 2] = np.log(0.5)  # P(the token before ends here)
    sequence["next_token_logprob"][k - 1] = np.log(0.5)  # P(token k), exact
    batch = collator([sequence])
    position = j + first - 1
    got = _row_weights(batch, position)
    # ended 0.5 × the teacher here (token k's first piece, at its exact 0.5) + going on: the
    # continuing entry's share of the draws before, 2 of 4
    mapping = collator.mapping
    want: dict[int, float] = {int(mapping[nxt]): 0.25 / 0.75}
    want[other[1]] = want.get(other[1], 0.0) + 0.5 / 0.75
    assert got == pytest.approx(want, abs=1 / QUANTUM)


def test_with_a_loss_mask_the_matched_draws_train_only_what_the_mask_trains(tokenizers) -> None:
    teacher, student = tokenizers
    sequence = store_sequence(teacher, TEXTS[0], seed=7, masked=True)
    trained = np.flatnonzero(sequence["loss_mask"])  # (T,) teacher positions with target rows
    rng = np.random.default_rng(1)
    rows = [np.sort(rng.choice(len(teacher), 3, replace=False)) for _ in trained]
    sequence |= {
        "sampled_distinct": np.full(trained.size, 3, np.uint8),
        "sampled_ids": np.concatenate(rows).astype(np.uint16),
        "sampled_counts": np.full(3 * trained.size, 1, np.uint8),
        "sampled_logprobs": np.full(3 * trained.size, -2.0, np.float16),
    }
    batch = CrossTokenizerCollator(student, teacher_tokenizer=teacher)([sequence])
    labelled = (next_token_labels(batch["labels"])[0] != IGNORE_INDEX).nonzero()[:, 0].tolist()
    with_rows = batch["loss_mask"][0].nonzero()[:, 0].tolist()
    assert with_rows == labelled and 0 < len(labelled) < batch["input_ids"].shape[1] - 1
    # the text the untrained teacher positions predict is in no trained student position
    ends = sequence["token_ends"].astype(np.int64)
    untrained_text_end = int(ends[trained[0]])  # the teacher's first trained row predicts after
    s_ends = batch["token_bytes"][0].cumsum(0)  # (L_s,) where each student token ends
    for position in with_rows:
        assert int(s_ends[position + 1]) > untrained_text_end


def test_a_sweep_tokenizer_that_is_not_a_tokenizer_directory_is_one_line(
    text_store, tmp_path, capsys
) -> None:
    from kdcache.pipeline.cli import main

    config = tmp_path / "sweep.yaml"
    config.write_text("base: tiny\nbudget: {steps: 2}\nsearch:\n  tokenizer: [store, nowhere]\n")
    with pytest.raises(SystemExit) as e:
        main(["sweep", "--store", str(text_store), "--config", str(config), "--out",
              str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert e.value.code == 2 and "tokenizer 'nowhere' is not a tokenizer directory" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("where", ["missing", "empty"])
def test_a_student_config_whose_tokenizer_is_not_one_is_one_line(
    text_store, tmp_path, capsys, where: str
) -> None:
    folder = tmp_path / "student"
    folder.mkdir()
    if where == "empty":  # a directory, but no tokenizer files in it
        (folder / "tokenizer").mkdir()
    config = folder / "student.yaml"
    config.write_text("tokenizer: tokenizer\nhidden_size: 32\nnum_hidden_layers: 1\n")
    code, err = _train(text_store, config, tmp_path / "out", capsys)
    want = "is not a directory" if where == "missing" else "holds no tokenizer files"
    assert code == 2 and want in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()
