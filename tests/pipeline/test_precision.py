"""One precision rule (pipeline/precision.py): the device's own, the launcher's over it, an
explicit --precision over both; train-student, sweep and compare evaluate a student alike."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import cache_small_store, run_cli
from transformers import LlamaConfig

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.precision import (
    LAUNCHER_VARIABLE,
    compute_device,
    default_precision,
    eval_context,
    mixed_precision,
)
from kdcache.pipeline.teacher import resolve_dtype

BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
FIGURES = ("cross_entropy", "perplexity", "ghost_kl_to_teacher", "top1_agreement", "ece", "tokens")


@pytest.fixture(autouse=True)
def no_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(LAUNCHER_VARIABLE, raising=False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)


@pytest.fixture
def fresh_accelerate():
    """Accelerate keeps one mixed precision per process: a clean state, and again after."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()
    yield
    AcceleratorState._reset_state()


def fake_cuda(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> torch.device:
    """A CUDA GPU of this compute capability, as far as the rule asks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    # what torch says on a T4 or V100 too (emulated): the rule must not trust it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    return torch.device("cuda")


def teacher_dtypes(device: torch.device) -> list[torch.dtype]:
    """``--dtype auto`` for a config that says bfloat16, float16, float32, and nothing."""
    configs = [LlamaConfig(dtype=name) for name in ("bfloat16", "float16", "float32")]
    return [resolve_dtype("auto", config, device) for config in [*configs, LlamaConfig()]]


@pytest.mark.parametrize(
    ("capability", "precision", "dtypes"),
    [
        ((6, 0), "fp16", [F16, F16, F32, F16]),  # P100
        ((7, 0), "fp16", [F16, F16, F32, F16]),  # V100: bfloat16 emulated
        ((7, 5), "fp16", [F16, F16, F32, F16]),  # T4: bfloat16 emulated
        ((8, 0), "bf16", [BF16, F16, F32, BF16]),  # A100
        ((8, 9), "bf16", [BF16, F16, F32, BF16]),  # L4
        ((9, 0), "bf16", [BF16, F16, F32, BF16]),  # H100
    ],
)
def test_cuda_gets_bfloat16_only_from_compute_capability_8(
    monkeypatch: pytest.MonkeyPatch,
    capability: tuple[int, int],
    precision: str,
    dtypes: list[torch.dtype],
) -> None:
    cuda = fake_cuda(monkeypatch, capability)
    assert compute_device() == cuda
    assert default_precision(cuda) == precision == mixed_precision("auto", cuda)
    assert teacher_dtypes(cuda) == dtypes


@pytest.mark.parametrize(
    ("device", "xpu_bf16", "precision", "dtypes"),
    [
        ("xpu", True, "bf16", [BF16, F16, F32, BF16]),
        ("xpu", False, "no", [F16, F16, F32, F16]),
        ("mps", False, "no", [F32, F16, F32, F32]),
        ("cpu", False, "no", [F32, F32, F32, F32]),
    ],
)
def test_xpu_mps_and_cpu(
    monkeypatch: pytest.MonkeyPatch,
    device: str,
    xpu_bf16: bool,
    precision: str,
    dtypes: list[torch.dtype],
) -> None:
    monkeypatch.setattr(torch.xpu, "is_bf16_supported", lambda *args, **kwargs: xpu_bf16)
    where = torch.device(device)
    assert default_precision(where) == precision == mixed_precision("auto", where)
    assert teacher_dtypes(where) == dtypes


def test_the_launcher_wins_over_the_default_and_an_explicit_precision_over_both(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda = fake_cuda(monkeypatch, (8, 0))
    for launched in ("no", "fp16", "bf16", "fp8"):  # accelerate launch --mixed_precision X
        monkeypatch.setenv(LAUNCHER_VARIABLE, launched)
        assert mixed_precision("auto", cuda) == launched
        assert mixed_precision("no", cuda) == "no" and mixed_precision("fp16", cuda) == "fp16"
    monkeypatch.setenv(LAUNCHER_VARIABLE, "BF16 ")
    assert mixed_precision("auto", torch.device("cpu")) == "bf16"  # bf16 autocast on the CPU


@pytest.mark.parametrize(
    ("requested", "launched", "message"),
    [
        ("fp32", None, "--precision must be one of auto, no, bf16, fp16, got 'fp32'"),
        ("auto", "fp32", "ACCELERATE_MIXED_PRECISION must be one of no, fp16, bf16, fp8"),
        ("fp16", None, "fp16 needs a GPU (its loss scaling does not run on the CPU), got --pre"),
        ("auto", "fp16", "got ACCELERATE_MIXED_PRECISION fp16 on the CPU, use bf16 or no"),
    ],
)
def test_a_precision_that_cannot_run_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, requested: str, launched: str | None, message: str
) -> None:
    if launched:
        monkeypatch.setenv(LAUNCHER_VARIABLE, launched)
    with pytest.raises(UserError) as error:
        mixed_precision(requested, torch.device("cpu"))
    assert message in error.value.message and "\n" not in error.value.message


def test_the_gpu_torch_finds_is_used_not_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import accelerate

    from kdcache.pipeline.distill.trainee import make_accelerator

    made: list[dict[str, object]] = []

    class State:  # the device Accelerate would pick, without initializing anything
        def __init__(self, cpu: bool) -> None:
            self.device = torch.device("cpu" if cpu else compute_device().type)

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setattr(accelerate, "Accelerator", lambda **options: made.append(options))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.xpu, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    make_accelerator(0)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # accelerate launch --cpu
    make_accelerator(0)
    monkeypatch.delenv("ACCELERATE_USE_CPU")
    fake_cuda(monkeypatch, (7, 5))
    make_accelerator(0)
    assert made == [
        {"cpu": False, "mixed_precision": "no"},  # MPS: float32
        {"cpu": True, "mixed_precision": "no"},
        {"cpu": False, "mixed_precision": "fp16"},  # a T4: float16 with loss scaling
    ]


def test_bf16_on_the_cpu_when_asked(fresh_accelerate) -> None:
    from kdcache.pipeline.distill.trainee import make_accelerator

    accelerator = make_accelerator(0, "bf16")
    assert accelerator.device.type == "cpu" and accelerator.mixed_precision == "bf16"
    linear, x = torch.nn.Linear(4, 4), torch.ones(2, 4)
    with eval_context(accelerator.device, accelerator.mixed_precision):
        assert linear(x).dtype == BF16
    with eval_context(accelerator.device, "no"):
        assert linear(x).dtype == F32


@pytest.fixture(scope="module")
def store(
    tmp_path_factory: pytest.TempPathFactory, tiny_teacher_dir: Path, corpus_texts: list[str]
) -> Path:
    return cache_small_store(tmp_path_factory, tiny_teacher_dir, corpus_texts)


SWEEP = """
base: tiny
seed: 1
budget: {steps: 8}
batch_size: 4
lr: 0.02
eval_batches: 2
search:
  hidden_size: [32]
"""


def test_train_student_sweep_and_compare_give_a_student_the_same_figures(
    fresh_accelerate, store: Path, tiny_teacher_dir: Path, tmp_path: Path, capsys
) -> None:
    """bf16 autocast forced on the CPU: each student's eval figures are those compare gives it."""
    from accelerate.state import AcceleratorState

    trained, swept = tmp_path / "trained", tmp_path / "swept"
    code, _, err = run_cli(["train-student", "--store", str(store), "--out", str(trained),
                            "--steps", "8", "--lr", "0.02", "--batch-size", "4",
                            "--eval-every", "0", "--eval-batches", "2", "--threads", "1",
                            "--precision", "bf16"], capsys)  # fmt: skip
    assert code == 0, err
    AcceleratorState._reset_state()
    (tmp_path / "sweep.yaml").write_text(SWEEP)
    code, _, err = run_cli(["sweep", "--store", str(store), "--config",
                            str(tmp_path / "sweep.yaml"), "--out", str(swept), "--threads", "1",
                            "--precision", "bf16"], capsys)  # fmt: skip
    assert code == 0, err
    run = json.loads((trained / "run.json").read_text())
    assert run["mixed_precision"] == "bf16" and run["settings"]["precision"] == "bf16"
    candidate = json.loads((swept / "candidates" / "h32" / "metrics.json").read_text())
    assert candidate["mixed_precision"] == "bf16"

    figures = {}
    for precision in ("bf16", "no"):
        path = tmp_path / f"compare-{precision}.json"
        code, _, err = run_cli(["compare", "--teacher", str(tiny_teacher_dir), "--store",
                                str(store), "--student", f"trained={trained}", "--student",
                                f"swept={swept / 'candidates' / 'h32'}", "--batch-size", "4",
                                "--eval-batches", "2", "--precision", precision,
                                "--json", str(path)], capsys)  # fmt: skip
        assert code == 0, err
        figures[precision] = json.loads(path.read_text())["students"]
    own = {
        "trained": json.loads((trained / "metrics.json").read_text())["final"],
        "swept": candidate["eval"],
    }
    for name, metrics in own.items():
        for figure in FIGURES:
            assert figures["bf16"][name][figure] == pytest.approx(metrics[figure], rel=1e-9)
        # and the autocast matters: float32 gives other figures
        gap = abs(figures["no"][name]["cross_entropy"] - metrics["cross_entropy"])
        assert gap > 1e-5, (name, gap)


@pytest.mark.parametrize("command", ["train-student", "sweep", "compare"])
@pytest.mark.parametrize("how", ["option", "launcher"])
def test_an_unknown_precision_is_one_line_exit_2_and_writes_nothing(
    command: str,
    how: str,
    store: Path,
    tiny_teacher_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys,
) -> None:
    out = tmp_path / "out"
    compare = ["--teacher", str(tiny_teacher_dir), "--student", f"any={tiny_teacher_dir}"]
    args = {
        "train-student": ["--out", str(out), "--steps", "2"],
        "sweep": ["--out", str(out)],
        "compare": [*compare, "--json", str(out / "facts.json")],
    }[command]
    if how == "option":
        args += ["--precision", "fp32"]
    else:
        monkeypatch.setenv(LAUNCHER_VARIABLE, "fp32")
    code, stdout, err = run_cli([command, "--store", str(store), *args], capsys)
    assert code == 2 and err.count("\n") == 1 and err.startswith("Error: "), err
    assert "fp32" in err and ("--precision" in err or LAUNCHER_VARIABLE in err)
    assert not out.exists()
