"""A torch older than transformers will use is refused in one line by the model commands; the
store commands, which need no torch, still run."""

from __future__ import annotations

import pytest
from conftest import run_cli

import kdcache.pipeline.cli as cli


@pytest.mark.parametrize("found", ["2.5.1", "2.4.0+cu121"])
def test_a_torch_below_2_6_is_one_line_and_exit_2(
    found: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path
) -> None:
    monkeypatch.setattr(cli, "version", lambda name: found)
    code, _, err = run_cli(["train-student", "--store", str(tmp_path), "--out", "x"], capsys)
    assert code == 2
    assert err.strip().splitlines() == [
        f"Error: torch 2.6 or later is needed (transformers turns PyTorch off below it), found "
        f"torch {found}, pip install 'torch>=2.6'"
    ]
    code, _, err = run_cli(["verify", str(tmp_path / "none")], capsys)
    assert code == 2 and "no logit store" in err  # verify got as far as the store


def test_the_installed_torch_passes() -> None:
    cli.check_torch()
