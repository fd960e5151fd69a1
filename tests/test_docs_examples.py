"""Every Python example of docs/training-stack.md runs, in order, in one namespace — against a
store the tests build, with fewer steps."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_synthetic_store

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "training-stack.md"
LENGTHS = {"train": [[24] * 6, [24] * 5, [24] * 6], "eval": [[24] * 4, [24] * 3 + [11]]}


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_training_stack_page_has_its_examples() -> None:
    blocks = python_blocks(PAGE.read_text())
    assert len(blocks) >= 4
    assert 'STORE = "artifacts/store"' in blocks[0] and "STEPS = 200" in blocks[0]


@pytest.mark.slow
def test_every_example_of_the_training_stack_page_runs(
    tmp_path: Path, tiny_tokenizer_dir: Path
) -> None:
    store = write_synthetic_store(
        str(tmp_path / "store"), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir
    )
    program = "\n".join(python_blocks(PAGE.read_text()))
    program = program.replace('STORE = "artifacts/store"', f"STORE = {store!r}")
    program = program.replace("STEPS = 200", "STEPS = 3")
    (tmp_path / "examples.py").write_text(program)
    run = subprocess.run(
        [sys.executable, "examples.py"], cwd=tmp_path, capture_output=True, text=True,
        timeout=300, env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                          "WANDB_MODE": "disabled", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]
    assert "step 3: loss" in run.stdout
    assert "eval_cross_entropy" in run.stdout
    assert (tmp_path / "runs" / "hf").is_dir() and (tmp_path / "runs" / "lora").is_dir()
