"""`init: teacher`: students pruned from the teacher by measured importance, and in the sweep."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from conftest import cache_small_store, run_cli, save_tiny_model
from transformers import AutoModelForCausalLM

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.sweep_config import load_sweep_config
from kdcache.pipeline.search.teacher_init import TeacherPruner, calibration_batch, keep_heads
from kdcache.storage import open_store

D = 16  # the tiny teachers' head_dim: 64 wide, 4 heads (2 KV groups), 128 MLP channels
DROPPED_HIDDEN = [7, 20, 33, 50]
DROPPED_CHANNELS = [5, 17]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir, corpus_texts) -> Path:
    return cache_small_store(tmp_path_factory, tiny_teacher_dir, corpus_texts)


@pytest.fixture(scope="module")
def calibration(store) -> dict[str, torch.Tensor]:
    return calibration_batch(open_store(str(store)), 8, pad_id=0)


@pytest.fixture(scope="module")
def pruner(tiny_teacher_dir, calibration) -> TeacherPruner:
    return TeacherPruner(tiny_teacher_dir, calibration)


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, tiny_tokenizer_dir, calibration):
    """A 4-layer teacher with units made useless (importance 0): layer 1 a no-op (o_proj and
    down_proj zero), layer 0's KV group 1 silent (its v_proj rows zero), two MLP channels of
    layer 2 off (gate rows zero), four hidden channels normed to zero in every norm."""
    path = save_tiny_model(
        "llama", tiny_tokenizer_dir, tmp_path_factory.mktemp("damaged"), num_hidden_layers=4
    )
    model = AutoModelForCausalLM.from_pretrained(path)
    layers = model.model.layers
    with torch.no_grad():
        layers[1].self_attn.o_proj.weight.zero_()
        layers[1].mlp.down_proj.weight.zero_()
        layers[0].self_attn.v_proj.weight[D : 2 * D].zero_()
        layers[2].mlp.gate_proj.weight[DROPPED_CHANNELS] = 0.0
        for layer in layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[DROPPED_HIDDEN] = 0.0
        model.model.norm.weight[DROPPED_HIDDEN] = 0.0
    model.save_pretrained(path)
    return model, TeacherPruner(path, calibration)


def without(count: int, dropped: list[int]) -> list[int]:
    return [i for i in range(count) if i not in dropped]


def test_calibration_is_one_batch_of_the_stores_tokens(calibration, store):
    assert set(calibration) == {"input_ids", "attention_mask"}
    first = next(open_store(str(store)).iter_sequences("train"))
    n = len(first.tokens)
    assert calibration["input_ids"].shape[0] == 8
    assert calibration["input_ids"][0, :n].tolist() == [int(t) for t in first.tokens]


@pytest.fixture(scope="module")
def tied_biased(tmp_path_factory, tiny_tokenizer_dir, calibration) -> TeacherPruner:
    """A teacher with tied embeddings and biases in every projection."""
    path = save_tiny_model(
        "llama",
        tiny_tokenizer_dir,
        tmp_path_factory.mktemp("tied"),
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
    )
    return TeacherPruner(path, calibration)


@pytest.mark.parametrize("which", ["plain", "tied_biased"])
def test_the_teachers_own_shape_computes_what_the_teacher_computes(which, request, calibration):
    pruner = request.getfixturevalue("pruner" if which == "plain" else which)
    student = pruner.student({})
    with torch.no_grad():
        want = pruner.model(**calibration).logits
        got = student(**calibration).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    assert (
        student.model.embed_tokens.weight.data_ptr()
        != pruner.model.model.embed_tokens.weight.data_ptr()
    )


@pytest.mark.parametrize("which", ["plain", "tied_biased"])
def test_a_pruned_student_runs_and_trains_without_touching_the_teacher(which, request, calibration):
    pruner = request.getfixturevalue("pruner" if which == "plain" else which)
    shape = {
        "hidden_size": 48,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "intermediate_size": 64,
    }
    student = pruner.student(shape)
    assert {k: getattr(student.config, k) for k in shape} == shape
    assert student.config.head_dim == D  # 48 / 2 would be 24
    teacher_q = pruner.model.model.layers[0].self_attn.q_proj.weight.clone()
    optimizer = torch.optim.SGD(student.parameters(), lr=1.0)
    out = student(**calibration, labels=calibration["input_ids"])
    out.loss.backward()
    optimizer.step()
    assert torch.isfinite(out.loss)
    tied = student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()
    assert tied == (which == "tied_biased")
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.equal(pruner.model.model.layers[0].self_attn.q_proj.weight, teacher_q)


def test_depth_pruning_drops_the_no_op_layer_and_keeps_the_order(damaged):
    teacher, pruner = damaged
    assert pruner.importance.layers[1] < 1e-6 < pruner.importance.layers[[0, 2, 3]].min()
    student = pruner.student({"num_hidden_layers": 3})
    for new, old in enumerate([0, 2, 3]):
        got = student.model.layers[new].mlp.up_proj.weight
        assert torch.equal(got, teacher.model.layers[old].mlp.up_proj.weight)


def test_head_pruning_keeps_whole_kv_groups_by_their_importance(damaged):
    teacher, pruner = damaged
    assert pruner.importance.heads[0, 2:].max() == 0 < pruner.importance.heads[0, :2].min()
    student = pruner.student({"num_attention_heads": 2, "num_key_value_heads": 1})
    got, want = student.model.layers[0].self_attn, teacher.model.layers[0].self_attn
    assert torch.equal(got.q_proj.weight, want.q_proj.weight[: 2 * D])  # query heads 0, 1
    assert torch.equal(got.k_proj.weight, want.k_proj.weight[:D])  # their group, 0
    assert torch.equal(got.v_proj.weight, want.v_proj.weight[:D])
    assert torch.equal(got.o_proj.weight, want.o_proj.weight[:, : 2 * D])


def test_query_heads_within_a_group_and_groups_are_ranked_by_importance():
    scores = torch.tensor([0.1, 0.9, 0.5, 0.4, 0.3, 0.2])  # 3 groups of 2: sums 1.0, 0.9, 0.5
    queries, groups = keep_heads(scores, kv_heads=3, heads=2, kv=2)
    assert groups.tolist() == [0, 1] and queries.tolist() == [1, 2]
    queries, groups = keep_heads(scores, kv_heads=3, heads=4, kv=2)
    assert groups.tolist() == [0, 1] and queries.tolist() == [0, 1, 2, 3]


def test_mlp_and_hidden_pruning_drop_the_units_without_activation(damaged):
    teacher, pruner = damaged
    student = pruner.student({"intermediate_size": 128 - len(DROPPED_CHANNELS)})
    kept = without(128, DROPPED_CHANNELS)
    got, want = student.model.layers[2].mlp, teacher.model.layers[2].mlp
    assert torch.equal(got.gate_proj.weight, want.gate_proj.weight[kept])
    assert torch.equal(got.down_proj.weight, want.down_proj.weight[:, kept])

    student = pruner.student({"hidden_size": 64 - len(DROPPED_HIDDEN)})
    kept = without(64, DROPPED_HIDDEN)
    assert torch.equal(
        student.model.embed_tokens.weight, teacher.model.embed_tokens.weight[:, kept]
    )
    assert torch.equal(student.lm_head.weight, teacher.lm_head.weight[:, kept])
    got, want = student.model.layers[3], teacher.model.layers[3]
    assert torch.equal(got.self_attn.o_proj.weight, want.self_attn.o_proj.weight[kept])
    assert torch.equal(got.input_layernorm.weight, want.input_layernorm.weight[kept])


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ({"num_hidden_layers": 3}, "cannot give num_hidden_layers 3, the teacher has 2"),
        ({"num_attention_heads": 8}, "cannot give num_attention_heads 8, the teacher has 4"),
        ({"num_key_value_heads": 4}, "cannot give num_key_value_heads 4, the teacher has 2"),
        ({"intermediate_size": 129}, "cannot give intermediate_size 129, the teacher has 128"),
        ({"hidden_size": 128}, "cannot give hidden_size 128, the teacher has 64"),
        ({"num_attention_heads": 3}, "a multiple of num_key_value_heads, got 3 and 2"),
        ({"num_attention_heads": 4, "num_key_value_heads": 1}, "4 query heads per key-value"),
        ({"hidden_size": 50}, "hidden_size divisible by num_attention_heads, got 50 and 4"),
    ],
)
def test_shapes_the_teacher_cannot_give_are_one_line(pruner, shape, message):
    with pytest.raises(UserError) as error:
        pruner.student(shape)
    assert message in error.value.message and "\n" not in error.value.message


def test_teachers_that_are_not_llama_style_or_not_models_are_one_line(
    tmp_path, tiny_tokenizer_dir, calibration
):
    gpt2 = save_tiny_model("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    (tmp_path / "empty").mkdir()
    for path, message in (
        (gpt2, "init: teacher supports Llama-style models, gpt2 is not"),
        (tmp_path / "empty", "cannot load the teacher for init: teacher"),
    ):
        with pytest.raises(UserError) as error:
            TeacherPruner(path, calibration)
        assert message in error.value.message and "\n" not in error.value.message


def write(folder: Path, text: str) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(text)
    return path


def test_the_config_takes_init_beside_the_other_keys(tmp_path, tiny_teacher_dir):
    (tmp_path / "teacher").symlink_to(tiny_teacher_dir)
    config = load_sweep_config(
        write(
            tmp_path,
            "teacher: teacher\nbudget: {steps: 2}\nsearch: {hidden_size: [32], init: [random, teacher]}\n"
            "candidates:\n  - {num_hidden_layers: 1, init: teacher}\n  - {num_hidden_layers: 1}\n",
        )
    )
    assert [(c.name, c.init) for c in config.candidates] == [
        ("h32-init-random", "random"),
        ("h32-init-teacher", "teacher"),
        ("l1-init-teacher", "teacher"),
        ("l1", "random"),
    ]
    assert config.teacher == str((tmp_path / "teacher").resolve())
    assert config.candidates[1].settings()["init"] == "teacher"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("init: teacher\n", "init: teacher needs a teacher, in"),
        ("teacher: teacher\ninit: scratch\n", "unknown init 'scratch'"),
        ("teacher: nowhere\ninit: teacher\n", "teacher 'nowhere' is not a model directory"),
        ("teacher: teacher\ninit: teacher\ntokenizer: tok\n", "set `tokenizer: store`"),
    ],
)
def test_bad_init_settings_are_one_line(tmp_path, tiny_teacher_dir, text, message):
    (tmp_path / "teacher").symlink_to(tiny_teacher_dir)
    (tmp_path / "tok").symlink_to(tiny_teacher_dir)  # a tokenizer directory
    with pytest.raises(UserError) as error:
        load_sweep_config(
            write(tmp_path, text + "budget: {steps: 2}\nsearch: {hidden_size: [32]}\n")
        )
    assert message in error.value.message and "\n" not in error.value.message


def sweep(store: Path, config: Path, out: Path, capsys) -> tuple[int, str, str]:
    argv = ["sweep", "--store", str(store), "--config", str(config), "--out", str(out)]
    return run_cli([*argv, "--threads", "1"], capsys)


@pytest.mark.parametrize(
    ("teacher", "search", "message"),
    [
        ("llama", "{num_attention_heads: [8]}", "cannot give num_attention_heads 8"),
        ("gpt2", "{num_hidden_layers: [1]}", "supports Llama-style models, gpt2 is not"),
    ],
)
def test_a_sweep_with_a_shape_the_teacher_cannot_give_exits_2_before_training(
    store, tmp_path, capsys, tiny_teacher_dir, tiny_tokenizer_dir, teacher, search, message
):
    path = tiny_teacher_dir
    if teacher == "gpt2":
        path = save_tiny_model("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    text = f"teacher: {path}\ninit: teacher\nbudget: {{steps: 2}}\nsearch: {search}\n"
    code, _, err = sweep(store, write(tmp_path, text), tmp_path / "out", capsys)
    assert code == 2 and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_sweep_trains_random_and_teacher_initialized_students(
    store, tmp_path, capsys, tiny_teacher_dir
):
    # alpha 1: the loss is the KD term alone (the untrained tiny teacher's CE is ~log V for any
    # student, and its noise would hide where each student starts)
    text = (
        f"base: tiny\nteacher: {tiny_teacher_dir}\nbudget: {{steps: 3}}\nbatch_size: 4\n"
        "alpha: 1.0\neval_batches: 1\nsearch:\n  num_hidden_layers: [1]\n  init: [random, teacher]\n"
    )
    out = tmp_path / "out"
    code, _, err = sweep(store, write(tmp_path, text), out, capsys)
    assert code == 0, err
    with (out / "leaderboard.csv").open() as f:
        rows = {r["candidate"]: r for r in csv.DictReader(f)}
    assert {name: r["init"] for name, r in rows.items()} == {
        "l1-init-random": "random",
        "l1-init-teacher": "teacher",
    }
    first = {}
    for name in rows:
        with (out / "candidates" / name / "log.csv").open() as f:
            first[name] = float(next(csv.DictReader(f))["loss"])
    assert first["l1-init-teacher"] < 0.5 * first["l1-init-random"], first
