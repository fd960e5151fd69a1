"""`kdcache cache-teacher` on chat and prompt/completion records, end to end: the template's
tokens, targets only at trained positions (exact, under padding), padded embeddings, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from chat_tokenizers import family, llama
from conftest import save_tiny_model
from test_cache_teacher import assert_stored
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache.pipeline.cli import main
from kdcache.storage import open_store, verify_store

pytestmark = pytest.mark.floors

TOP_K = 6
SEQ_LEN = 256

TOPICS = ["sorting", "files", "numbers", "strings", "dates", "paths", "sets", "json"]


def run(*args: str) -> int:
    try:
        main(list(args))
    except SystemExit as e:
        return int(e.code or 0)
    return 0


def conversations(n: int) -> list[dict]:
    records = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        messages = [
            {"role": "user", "content": f"How do I work with {topic} in Python? ({i})"},
            {"role": "assistant", "content": f"Use the standard library for {topic}: item {i}."},
        ]
        if i % 3 == 0:  # some have a second exchange
            messages += [
                {"role": "user", "content": "And faster?"},
                {"role": "assistant", "content": f"Batch the {topic} work {i % 5} times."},
            ]
        records.append({"messages": messages})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_teacher(tmp: Path, name: str, *, padding: int = 0) -> Path:
    """A tiny Llama on one of the test tokenizer families; ``padding`` extra embedding rows."""
    tokenizer_dir = tmp / f"{name}-tokenizer"
    family(name).save_pretrained(tokenizer_dir)
    size = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    return save_tiny_model(
        "llama", tokenizer_dir, tmp / f"{name}-teacher", vocab_size=size + padding
    )


def cache_args(teacher: Path, corpus: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cache-teacher", "--teacher", str(teacher), "--corpus", str(corpus), "--out", str(out),
        "--top-k", str(TOP_K), "--seq-len", str(SEQ_LEN), "--batch-size", "4",
        "--shard-tokens", "640", "--eval-fraction", "0.2", *extra,
    ]  # fmt: skip


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    tmp = tmp_path_factory.mktemp("chat")
    teacher = chat_teacher(tmp, "qwen")
    corpus = write_jsonl(tmp / "chat.jsonl", conversations(40))
    out = tmp / "store"
    assert run(*cache_args(teacher, corpus, out)) == 0
    return teacher, corpus, out


def test_a_chat_store_holds_each_conversation_as_its_template_renders_it(qwen_run) -> None:
    teacher, corpus, out = qwen_run
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    records = [json.loads(line) for line in corpus.read_text().splitlines()]
    rendered = {
        tuple(tokenizer(tokenizer.apply_chat_template(r["messages"], tokenize=False))["input_ids"])
        for r in records
    }  # ChatML adds no BOS: the template's text, tokenized as it is
    store = open_store(str(out))
    manifest = store.manifest
    assert manifest["loss_mask"] is True and manifest["format_version"] >= 3
    assert manifest["corpus"]["kind"] == "chat" and manifest["corpus"]["packing"] == "separate"
    assert manifest["tokenizer"]["size"] == len(tokenizer)
    sequences = list(store.iter_sequences())
    assert len(sequences) == len(records)  # one conversation per sequence, never mixed
    for sequence in sequences:
        tokens = tuple(sequence.tokens.tolist())
        assert tokens in rendered  # ChatML ends with <|im_end|> (EOS): nothing added
        # the template closes every turn with <|im_end|> (the EOS) and a newline: no EOS added
        assert tokens[-2] == tokenizer.eos_token_id and tokenizer.decode(tokens[-1:]) == "\n"
    assert verify_store(str(out)) == []


def test_targets_are_stored_at_the_assistants_positions_only_and_are_exact(qwen_run) -> None:
    """Position t is trained when the token after it is the assistant's (its reply and its
    <|im_end|>); those rows equal the model's own log-softmax, although the teacher ran them in
    right-padded batches."""
    teacher, _, out = qwen_run
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    store = open_store(str(out))
    start = tokenizer.convert_tokens_to_ids("<|im_start|>")
    trained_total = 0
    for sequence in store.iter_sequences():
        tokens, mask = sequence.tokens, sequence.loss_mask.astype(bool)
        assert not mask[-1]  # nothing follows the conversation
        # a trained position predicts an assistant token: never a turn opening
        assert not np.isin(tokens[1:][mask[:-1]], [start]).any()
        text = tokenizer.decode(tokens[1:][mask[:-1]])
        assert "Use the standard library" in text and "How do I" not in text
        with torch.inference_mode():
            logits = model(input_ids=torch.from_numpy(tokens.astype(np.int64))[None]).logits[0]
        full = torch.log_softmax(logits.float(), -1).numpy()[mask]  # (T, V)
        reference = -np.sort(-full)[:, :TOP_K]
        assert_stored(sequence.topk_logprobs, reference, store.manifest["codec"])
        trained_total += int(mask.sum())
    assert 0 < trained_total < store.num_tokens / 2
    assert store.num_trained == trained_total


def target_bytes(store) -> int:
    """Bytes of the target fields' chunks (Zarr: one directory per field)."""
    return sum(
        f["size"]
        for r in store.shards
        for key, f in r.files.items()
        if key.split("/")[2].startswith(("topk_", "sampled_")) and "/c/" in key
    )


def test_training_on_all_tokens_stores_every_position_and_costs_more_bytes(
    qwen_run, tmp_path: Path
) -> None:
    teacher, corpus, out = qwen_run
    everything = tmp_path / "all"
    assert run(*cache_args(teacher, corpus, everything, "--train-on", "all")) == 0
    masked, full = open_store(str(out)), open_store(str(everything))
    # separate packing still leaves each conversation's last position untrained
    assert full.num_trained == full.num_tokens - sum(r.num_sequences for r in full.shards)
    share = masked.num_trained / full.num_trained
    size = target_bytes(masked) / target_bytes(full)
    # the target bytes follow the trained positions (tiny shards: compression overheads)
    assert share < 0.5 and size < 0.6
    a, b = list(masked.iter_sequences()), list(full.iter_sequences())
    assert [s.tokens.tolist() for s in a] == [s.tokens.tolist() for s in b]


def test_a_rerun_resumes_the_same_store(qwen_run) -> None:
    teacher, corpus, out = qwen_run
    before = {r.name: r.content_files() for r in open_store(str(out)).shards}
    victim = sorted(before)[0]
    (out / "shards" / f"{victim}.json").unlink()  # as if killed before that commit
    assert run(*cache_args(teacher, corpus, out)) == 0
    assert {r.name: r.content_files() for r in open_store(str(out)).shards} == before


@pytest.mark.parametrize("name", ["llama", "gemma"])
def test_bos_tokenizers_start_every_teacher_input_with_one_bos(name: str, tmp_path: Path) -> None:
    teacher = chat_teacher(tmp_path, name)
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    records = [{"prompt": f"Q{i}: name a {t}.", "completion": f" A {t} {i}."} for i, t in
               enumerate(TOPICS * 2)]  # fmt: skip
    corpus = write_jsonl(tmp_path / "pc.jsonl", records)
    out = tmp_path / "store"
    assert run(*cache_args(teacher, corpus, out)) == 0
    store = open_store(str(out))
    assert store.manifest["corpus"]["kind"] == "prompt"
    for sequence in store.iter_sequences():
        tokens = sequence.tokens.tolist()
        assert tokens[0] == tokenizer.bos_token_id and tokens.count(tokenizer.bos_token_id) == 1
    # text packed end to end still starts every sequence with exactly one BOS
    text = tmp_path / "text.txt"
    text.write_text(
        "\n".join(f"line {i} of plain text about {t}" for i, t in enumerate(TOPICS * 30))
    )
    out = tmp_path / "text-store"
    assert run(*cache_args(teacher, text, out, "--eval-fraction", "0")) == 0
    for sequence in open_store(str(out)).iter_sequences():
        assert sequence.tokens[0] == tokenizer.bos_token_id
        assert sequence.tokens[1] != tokenizer.bos_token_id


def test_a_padded_teacher_embedding_gets_no_probability_and_the_student_trains(
    tmp_path: Path,
) -> None:
    """A teacher with 40 embedding rows beyond its tokenizer (Qwen2.5-style padding): every
    stored id is a real token, the manifest records the tokenizer's size, and a student on the
    tokenizer's size trains from the store."""
    teacher = chat_teacher(tmp_path, "qwen", padding=40)
    size = len(AutoTokenizer.from_pretrained(teacher))
    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():  # make the padded rows likely, so a missing mask would show
        model.get_output_embeddings().weight[size:] *= 50.0
    model.save_pretrained(teacher)
    corpus = write_jsonl(tmp_path / "chat.jsonl", conversations(12))
    out = tmp_path / "store"
    assert run(*cache_args(teacher, corpus, out, "--targets", "topk+sampled")) == 0
    store = open_store(str(out))
    assert store.vocab_size == size + 40 and store.tokenizer_size == size
    for sequence in store.iter_sequences():
        assert int(sequence.topk_ids.max()) < size and int(sequence.sampled_ids.max()) < size
    student = tmp_path / "student"
    code = run(
        "train-student", "--store", str(out), "--student", "tiny", "--steps", "3",
        "--batch-size", "2", "--out", str(student),
    )  # fmt: skip
    assert code == 0
    metrics = json.loads((student / "metrics.json").read_text())
    assert np.isfinite(metrics["final"]["cross_entropy"])


def error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line (after any progress-bar frames), checked to be the only one."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("Error")]
    assert len(lines) == 1, err
    return lines[0]


def test_bad_chat_input_is_one_line_and_exit_2(
    qwen_run, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    teacher, _, _ = qwen_run
    # found before anything is written: no store at all
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    write_jsonl(mixed / "a.jsonl", conversations(2))
    write_jsonl(mixed / "b.jsonl", [{"text": "plain"}])
    assert run(*cache_args(teacher, mixed, tmp_path / "out-mixed")) == 2
    assert "b.jsonl" in error_line(capsys) and not (tmp_path / "out-mixed").exists()
    # found while reading: one line, and the store keeps only whole, committed shards
    cases = {
        "unknown role": ([*conversations(2), {"messages": [{"role": "wizard", "content": "hi"}]}], "wizard"),
        "mixed in a file": ([*conversations(2), {"text": "plain"}], "text record"),
        "all too long": ([{"prompt": "x " * 400, "completion": "y"}], "longer than"),
    }  # fmt: skip
    for name, (records, words) in cases.items():
        corpus = write_jsonl(tmp_path / f"{name.replace(' ', '_')}.jsonl", records)
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        assert run(*cache_args(teacher, corpus, out)) == 2, name
        assert words in error_line(capsys), name
        if out.exists():
            assert verify_store(str(out)) == []
            assert not open_store(str(out)).manifest.get("finished")
    text = tmp_path / "plain.txt"
    text.write_text("plain text " * 50)
    assert run(*cache_args(teacher, text, tmp_path / "t", "--train-on", "assistant")) == 2
    assert "--train-on" in error_line(capsys)
    assert run(*cache_args(teacher, text, tmp_path / "p", "--packing", "zigzag")) == 2
    assert "--packing" in error_line(capsys)
    # a tokenizer without a chat template cannot render messages
    plain = tmp_path / "plain-teacher"
    tokenizer_dir = tmp_path / "plain-tokenizer"
    llama(eos="<|end_of_text|>", template=False).save_pretrained(tokenizer_dir)
    save_tiny_model("llama", tokenizer_dir, plain)
    corpus = write_jsonl(tmp_path / "chat.jsonl", conversations(3))
    assert run(*cache_args(plain, corpus, tmp_path / "no-template")) == 2
    assert "chat template" in error_line(capsys)
