"""Students larger than one device: FSDP2 trains the DDP student through kdcache's loss; an
FSDP configuration for Accelerate on the CPU trains data-parallel with a note; gradient
checkpointing trains the same student, and a model without it is refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import run_cli, write_synthetic_store
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent
LENGTHS = {"train": [[24] * 6, [24] * 5, [24] * 6], "eval": [[24] * 4, [24] * 3 + [11]]}
ARGS = ["--steps", "6", "--batch-size", "4", "--lr", "3e-3", "--eval-every", "0",
        "--checkpoint-every", "3", "--threads", "1"]  # fmt: skip
FSDP_CONFIG = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
num_processes: 2
num_machines: 1
machine_rank: 0
use_cpu: true
mixed_precision: 'no'
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
"""


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    path = tmp_path_factory.mktemp("sharded") / "store"
    return write_synthetic_store(str(path), lengths=LENGTHS, tokenizer_dir=tiny_tokenizer_dir)


def env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip


def port(offset: int) -> str:
    return str(29500 + (os.getpid() * 7 + offset) % 400)


def test_fsdp2_trains_the_ddp_student_through_the_whole_logits_path(tmp_path: Path) -> None:
    result = tmp_path / "result.json"
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
            "--master_port", port(1), str(HERE / "fsdp_worker.py"), str(result)]  # fmt: skip
    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    found = json.loads(result.read_text())
    assert found["names"] and found["moved"] > 1e-3  # the same parameters, and they trained
    assert found["gap"] < 1e-5  # FSDP2's student is DDP's
    # DDP computes the head per chunk; FSDP2's head is a DTensor shard: whole logits, noted
    assert not found["ddp_whole_logits"] and found["fsdp_whole_logits"]


def test_an_fsdp_config_on_the_cpu_trains_the_ddp_student_with_a_note(
    store: str, tmp_path: Path
) -> None:
    config = tmp_path / "fsdp.yaml"
    config.write_text(FSDP_CONFIG)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
              "--main_process_port", port(2), "-m", "kdcache.pipeline", "train-student",
              "--store", store, "--out", str(tmp_path / "fsdp"), *ARGS]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "--master_port", port(3), "-m", "kdcache.pipeline", "train-student",
                "--store", store, "--out", str(tmp_path / "ddp"), *ARGS]  # fmt: skip
    runs = [subprocess.run(a, env=env(), capture_output=True, text=True, timeout=300)
            for a in (launch, torchrun)]  # fmt: skip
    for run in runs:
        assert run.returncode == 0, run.stderr[-2000:]
    assert "FSDP configuration is not applied on the cpu" in runs[0].stderr
    assert "FSDP" not in runs[1].stderr
    fsdp = load_file(tmp_path / "fsdp" / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "model.safetensors")
    assert fsdp.keys() == ddp.keys()
    for name in ddp:
        torch.testing.assert_close(fsdp[name], ddp[name], atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_trains_the_same_student(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    outs = [tmp_path / "plain", tmp_path / "checkpointed"]
    for out, extra in zip(outs, ([], ["--gradient-checkpointing"]), strict=True):
        code, _, err = run_cli(["train-student", "--store", store, "--out", str(out), *ARGS,
                                *extra], capsys)  # fmt: skip
        assert code == 0, err
    plain, checkpointed = (load_file(out / "model.safetensors") for out in outs)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)
    run = json.loads((outs[1] / "run.json").read_text())
    assert run["settings"]["gradient_checkpointing"] is True


def test_gradient_checkpointing_on_a_model_without_it_is_one_line_and_exit_2(
    store: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from transformers import LlamaPreTrainedModel

    monkeypatch.setattr(LlamaPreTrainedModel, "supports_gradient_checkpointing", False)
    out = tmp_path / "out"
    code, _, err = run_cli(["train-student", "--store", store, "--out", str(out), *ARGS,
                            "--gradient-checkpointing"], capsys)  # fmt: skip
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "does not support gradient checkpointing" in lines[0]
    assert "Traceback" not in err and not out.exists()
