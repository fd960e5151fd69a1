from pathlib import Path

import pytest

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.search.leaderboard import best_per_size_class, pareto_front, size_class
from kdcache.pipeline.search.sweep_config import load_sweep_config


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(text)
    return path


def test_grid_expands_to_every_combination_with_baseline(tmp_path):
    config = load_sweep_config(
        write(
            tmp_path,
            """
base: tiny
seed: 3
budget: {steps: 20}
alpha: 0.5
search:
  hidden_size: [32, 64]
  num_hidden_layers: [1, 2, 3]
  temperature: [1.0, 2.0]
baseline: true
""",
        )
    )
    assert config.budget_steps == 20 and config.budget_tokens is None and config.seed == 3
    assert len(config.candidates) == 2 * 3 * 2 + 1
    first = config.candidates[0]
    assert first.architecture == {"hidden_size": 32, "num_hidden_layers": 1}
    assert (first.loss, first.temperature, first.alpha) == ("auto", 1.0, 0.5)  # from the store
    assert first.name == "h32-l1-T1"
    baseline = config.candidates[-1]
    assert (baseline.name, baseline.loss, baseline.alpha) == ("baseline-ce", "ce", 0.0)
    assert len({c.name for c in config.candidates}) == len(config.candidates)


def test_explicit_candidates_and_token_budget(tmp_path):
    config = load_sweep_config(
        write(
            tmp_path,
            """
budget: {tokens: 5000}
candidates:
  - {hidden_size: 64, num_attention_heads: 4, loss: ghost}
  - {hidden_size: 64, num_attention_heads: 2, loss: reverse-kl}
""",
        )
    )
    assert config.budget_tokens == 5000 and config.budget_steps is None
    assert [c.loss for c in config.candidates] == ["ghost", "reverse-kl"]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("budget: {steps: 5}\nsearch: {hidden_size: [32]}\nlerning_rate: 1\n", "lerning_rate"),
        ("budget: {steps: 5}\nsearch: {hidden_sise: [32]}\n", "hidden_sise"),
        ("budget: {steps: 5}\nsearch: {hidden_size: []}\n", "empty search space"),
        ("budget: {steps: 5}\n", "empty search space"),
        ("budget: {steps: 0}\nsearch: {hidden_size: [32]}\n", "budget steps must be"),
        ("budget: {epochs: 1}\nsearch: {hidden_size: [32]}\n", "epochs"),
        ("search: {hidden_size: [32]}\n", "budget must be"),
        (
            "budget: {steps: 5}\nsearch: {hidden_size: [30], num_attention_heads: [4]}\n",
            "divisible",
        ),
        ("budget: {steps: 5}\nsearch: {loss: [mse]}\n", "unknown loss"),
        ("budget: {steps: 5}\nsearch: {alpha: [1.5]}\n", "alpha must be"),
        ("budget: [steps\n", "not valid YAML"),
        ("- just\n- a list\n", "must be a mapping"),
    ],
)
def test_bad_configs_are_one_line_user_errors(tmp_path, text, message):
    with pytest.raises(UserError) as error:
        load_sweep_config(write(tmp_path, text))
    assert message in error.value.message
    assert "\n" not in error.value.message


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="cannot read sweep config"):
        load_sweep_config(tmp_path / "absent.yaml")


def test_pareto_front_and_size_classes():
    rows = [
        {"candidate": "a", "parameters": 50_000, "eval_cross_entropy": 3.0},
        {"candidate": "b", "parameters": 80_000, "eval_cross_entropy": 3.5},  # dominated by a
        {"candidate": "c", "parameters": 400_000, "eval_cross_entropy": 2.5},
        {"candidate": "d", "parameters": 900_000, "eval_cross_entropy": 2.6},  # dominated by c
        {"candidate": "e", "parameters": 2_000_000, "eval_cross_entropy": 2.0},
    ]
    assert [r["candidate"] for r in pareto_front(rows)] == ["a", "c", "e"]
    assert size_class(400_000) == "100K-1M"
    best = best_per_size_class(rows, size_key="parameters")
    assert {label: r["candidate"] for label, r in best.items()} == {
        "10K-100K": "a",
        "100K-1M": "c",
        "1M-10M": "e",
    }
    for row, non_embedding in zip(rows, (5_000, 60_000, 20_000, 150_000, 900_000), strict=True):
        row["non_embedding_parameters"] = non_embedding
    best = best_per_size_class(rows)  # by non-embedding parameters
    assert {label: r["candidate"] for label, r in best.items()} == {
        "1K-10K": "a",
        "10K-100K": "c",
        "100K-1M": "e",
    }


def test_the_default_config_is_the_shipped_example() -> None:
    """`kdcache sweep` without --config reads pipeline/configs/sweep.yaml, which must exist."""
    from kdcache.pipeline.search.sweep import DEFAULT_CONFIG

    assert DEFAULT_CONFIG.is_file(), DEFAULT_CONFIG
    assert DEFAULT_CONFIG.parent.name == "configs" and DEFAULT_CONFIG.parent.parent.name in (
        "pipeline",
        "kdcache",
    )
