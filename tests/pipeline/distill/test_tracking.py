"""`--report-to` and `curves.png`: tracking.py and run_plot.py, then real sweeps logging to
TensorBoard, wandb (offline) and MLflow (a file store in tmp), read back and compared with the
sweep's own log.csv. Nothing may leave 127.0.0.1 (checked in this process)."""

from __future__ import annotations

import csv
import glob
import ipaddress
import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import run_cli, write_synthetic_store

from kdcache.pipeline.distill import tracking
from kdcache.pipeline.distill.run_plot import write_curves, write_sweep_curves
from kdcache.pipeline.distill.trainee import LOG_FIELDS, make_accelerator
from kdcache.pipeline.errors import UserError

SWEEP = """
base: tiny
seed: 1
budget: {steps: 4}
batch_size: 4
lr: 0.003
eval_batches: 1
search:
  hidden_size: [32]
  num_hidden_layers: [1, 2]
"""
CANDIDATES = ("h32-l1", "h32-l2")
PNG = b"\x89PNG\r\n\x1a\n"
MISSING = "--report-to wandb needs the wandb package: pip install 'kdcache[track]'"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> str:
    return write_synthetic_store(
        str(tmp_path_factory.mktemp("tracking") / "store"),
        lengths={"train": [[24] * 10], "eval": [[24] * 4]},
        tokenizer_dir=tiny_tokenizer_dir,
    )


@pytest.fixture
def offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, int]]:
    """Trackers kept on this machine: wandb offline in tmp, MLflow's file store in tmp, no
    telemetry; returns the non-loopback addresses this process tried (refused, must stay [])."""
    (tmp_path / "wandb-dir").mkdir()
    env = {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path / "wandb-dir"),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_ERROR_REPORTING": "false",
        "MLFLOW_TRACKING_URI": (tmp_path / "mlruns").as_uri(),
        "MLFLOW_ALLOW_FILE_STORE": "true",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in ("WANDB_PROJECT", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "WANDB_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    tried: list[tuple[str, int]] = []
    connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

    def local(host: object) -> bool:
        try:
            return ipaddress.ip_address(str(host)).is_loopback
        except ValueError:
            return host in ("localhost", None, "")

    def guarded_connect(sock: socket.socket, address: object) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not local(address[0]):  # type: ignore[index]
            tried.append(address)  # type: ignore[arg-type]
            raise OSError("tests reach nothing beyond 127.0.0.1")
        return connect(sock, address)  # type: ignore[arg-type]

    def guarded_getaddrinfo(host: object, port: object, *args: object, **kwargs: object) -> object:
        if not local(host):
            tried.append((str(host), int(port or 0)))  # type: ignore[call-overload]
            raise socket.gaierror("tests reach nothing beyond 127.0.0.1")
        return getaddrinfo(host, port, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    return tried


def sweep(store: str, config: Path, out: Path, capsys: pytest.CaptureFixture[str], *extra: str):
    args = ["sweep", "--store", store, "--config", str(config), "--out", str(out)]
    return run_cli([*args, "--threads", "1", "--together", "1", *extra], capsys)


def log_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def wandb_history(path: str) -> list[dict[str, object]]:
    """The history rows of an offline ``run-*.wandb`` file (a LevelDB-style log of protobuf
    records: 7-byte header, then records of 32 KiB blocks, each chunk with a 7-byte header)."""
    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == kind == 0:
            break
        chunks, pos = chunks + data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in items}
                )
    return rows


# --- tracking.py -------------------------------------------------------------------------------


def test_report_to_names_are_checked():
    assert tracking.tracker_names("none") == []
    assert tracking.tracker_names(" TensorBoard,mlflow,tensorboard") == ["tensorboard", "mlflow"]
    for bad in ("tensorbord", "none,wandb", "", "tensorboard,", "all"):
        with pytest.raises(UserError) as refused:
            tracking.tracker_names(bad)
        assert refused.value.message == (
            f"--report-to takes tensorboard, wandb, mlflow (several comma-separated) or none, got "
            f"{bad!r}, use e.g. --report-to tensorboard"
        )
    assert tracking.accelerator_kwargs("none", None) == {}


def test_a_missing_tracker_package_is_one_line_before_anything_runs(
    store, tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(tracking, "_installed", lambda module: module != "wandb")
    with pytest.raises(UserError) as refused:
        tracking.tracker_names("tensorboard,wandb")
    assert refused.value.message == MISSING
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    code, _, err = sweep(
        store, config, tmp_path / "out", capsys, "--report-to", "tensorboard,wandb"
    )
    assert (code, err) == (2, f"Error: {MISSING}\n")
    args = ["train-student", "--store", store, "--out", str(tmp_path / "single")]
    assert run_cli([*args, "--report-to", "wandb"], capsys)[::2] == (2, f"Error: {MISSING}\n")
    assert not (tmp_path / "out").exists() and not (tmp_path / "single").exists()


def test_settings_are_flattened_to_values_every_tracker_takes():
    config = {
        "settings": {
            "lr": 1e-3,
            "steps": np.int64(6),
            "warmup": None,
            "gradient_checkpointing": False,
        },
        "config": {"search": {"hidden_size": [32, 64]}, "alpha": np.float32(0.5), "empty": {}},
        "store": Path("/data/store"),
        "odd key!": "kept",
    }
    assert tracking.flat_config(config) == {
        "settings.lr": 1e-3,
        "settings.steps": 6,
        "settings.warmup": "None",
        "settings.gradient_checkpointing": False,
        "config.search.hidden_size": "[32, 64]",
        "config.alpha": 0.5,
        "store": "/data/store",
        "odd key_": "kept",
    }
    flat = tracking.flat_config(config)
    assert all(type(v) in (str, int, float, bool) for v in flat.values())
    from torch.utils.tensorboard.summary import hparams

    hparams(flat, {})  # TensorBoard's hparams take them (it refuses None, lists, paths)


def test_the_train_student_path_logs_rows_and_evals_to_tensorboard(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_PROJECT", raising=False)  # the project names TensorBoard's folder
    assert make_accelerator(0, "no").log_with == []  # --report-to none: as before
    out = tmp_path / "run"
    accelerator = make_accelerator(0, "no", report_to="tensorboard", run_dir=out)
    out.mkdir()  # the recipe's prepare_out, before start
    run = {"settings": {"lr": 0.003, "warmup": None}, "command": ["kdcache", "train-student"]}
    tracking.start(accelerator, run)
    rows = [
        dict(
            zip(
                LOG_FIELDS,
                (step, 96, 90, 4 / step, 3 / step, 1 / step, 1e-3 * step, 0.5, step, 1e3),
                strict=True,
            )
        )
        for step in (1, 2, 3)
    ]
    for row in rows:
        tracking.log_train(accelerator, row)
    tracking.log_eval(
        accelerator, {"step": 3, "cross_entropy": 2.5, "ghost_kl_to_teacher": 0.25, "tokens": 80}, 3
    )  # an eval history entry as it is kept
    tracking.finish(accelerator)
    assert accelerator.trackers == []

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "kdcache"))
    events.Reload()
    for field in ("loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"):
        logged = [(e.step, e.value) for e in events.Scalars(field)]
        assert logged == [(r["step"], pytest.approx(r[field], rel=1e-6)) for r in rows]
    assert not {"step", "eval/step"} & set(events.Tags()["scalars"])
    assert [(e.step, e.value) for e in events.Scalars("eval/cross_entropy")] == [(3, 2.5)]
    assert [e.value for e in events.Scalars("eval/tokens")] == [80]
    (hparams_file,) = (out / "tensorboard" / "kdcache").glob("*/hparams.yml")
    assert yaml.safe_load(hparams_file.read_text()) == {
        "settings.lr": 0.003,
        "settings.warmup": "None",
        "command": '["kdcache", "train-student"]',
    }

    # resumed from a checkpoint at step 1: TensorBoard shows the new run's steps from 2 on
    accelerator = make_accelerator(0, "no", report_to="tensorboard", run_dir=out)
    tracking.start(accelerator, run, first_step=2)
    for row in rows[1:]:
        tracking.log_train(accelerator, {**row, "loss": row["loss"] + 10})
    tracking.finish(accelerator)
    events = EventAccumulator(str(out / "tensorboard" / "kdcache"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    assert logged == [(1, 4.0), (2, 12.0), (3, pytest.approx(4 / 3 + 10))]
    assert events.Scalars("eval/cross_entropy") == []  # step 3's eval was the killed run's


def test_a_tracker_that_cannot_start_is_one_line(tmp_path, offline, monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE")  # MLflow 3 refuses its file store without it
    accelerator = make_accelerator(0, "no", report_to="mlflow", run_dir=tmp_path)
    with pytest.raises(UserError) as refused:
        tracking.start(accelerator, {"lr": 1.0})
    message = refused.value.message
    assert message.startswith("--report-to mlflow could not start a run (MlflowException: ")
    assert "MLFLOW_ALLOW_FILE_STORE" in message and "\n" not in message
    assert message.endswith("fix the tracker's settings or pass --report-to none")
    tracking.finish(accelerator)


# --- run_plot.py -------------------------------------------------------------------------------


def test_curves_png_is_drawn_atomically_and_never_fails_a_run(tmp_path, capsys, monkeypatch):
    log = tmp_path / "log.csv"
    with log.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        for step in range(1, 41):
            writer.writerow(
                {"step": step, "loss": 5 / step, "kd": 3 / step, "ce": 2 / step, "lr": 1e-3}
            )
    history = [
        {
            "step": 20,
            "cross_entropy": 2.1,
            "ghost_kl_to_teacher": 0.4,
            "top1_agreement": 0.3,
            "ece": 0.1,
        },
        {
            "step": 40,
            "cross_entropy": 1.9,
            "ghost_kl_to_teacher": 0.3,
            "top1_agreement": 0.4,
            "ece": 0.1,
        },
    ]
    path = write_curves(tmp_path, log, history)
    assert path == tmp_path / "curves.png"
    assert png_size(path) == (1440, 360)  # three panels: training, eval in nats, eval shares
    assert 10_000 < path.stat().st_size < 500_000
    assert png_size(write_curves(tmp_path, log)) == (480, 360)  # at a checkpoint before any eval
    sweep_out = tmp_path / "sweep"
    sweep_out.mkdir()
    logs = {"a": log, "b": log, "unstarted": tmp_path / "nothing.csv"}
    assert png_size(write_sweep_curves(sweep_out, logs) or Path()) == (960, 360)
    assert write_curves(tmp_path, [], []) is None  # nothing to draw

    before = path.read_bytes()
    capsys.readouterr()
    damaged = sweep_out / "log.csv"  # a log an editor or a full disk left odd
    damaged.write_text("step,loss\n1,2.5\ntwo,2.4\n")
    assert write_curves(sweep_out, damaged, eval_history=history) is None
    err = capsys.readouterr().err
    assert (
        err == f"warning: could not draw {sweep_out / 'curves.png'} (ValueError: could not "
        "convert string to float: 'two'), training goes on\n"
    )

    def full_disk(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("matplotlib.figure.Figure.savefig", full_disk)
    assert write_curves(tmp_path, log, history) is None
    err = capsys.readouterr().err
    assert err.startswith(f"warning: could not draw {path} (OSError: ") and err.count("\n") == 1
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "log.csv", "sweep"]


# --- a real sweep --------------------------------------------------------------------------------


def test_a_sweep_reports_every_candidate_to_tensorboard_wandb_and_mlflow(
    store, tmp_path, capsys, offline
):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    out = tmp_path / "out"
    # --together 1: two groups, the second starting again at step 1
    code, _, err = sweep(store, config, out, capsys, "--report-to", "tensorboard,wandb,mlflow")
    assert code == 0, err
    assert offline == []
    logs = {name: log_rows(out / "candidates" / name / "log.csv") for name in CANDIDATES}
    for name, rows in logs.items():
        assert [int(r["step"]) for r in rows] == [1, 2, 3, 4] and list(rows[0]) == list(LOG_FIELDS)
        assert png_size(out / "candidates" / name / "curves.png")[0] == 1440
    assert png_size(out / "curves.png") == (960, 360)
    evals = {
        n: json.loads((out / "candidates" / n / "metrics.json").read_text())["eval"]
        for n in CANDIDATES
    }

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "kdcache"))
    events.Reload()
    for name, rows in logs.items():
        logged = [(e.step, e.value) for e in events.Scalars(f"{name}/loss")]
        assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]
        (final,) = events.Scalars(f"{name}/eval/cross_entropy")
        assert (final.step, final.value) == (
            4,
            pytest.approx(evals[name]["cross_entropy"], rel=1e-6),
        )

    (run_file,) = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    for name, rows in logs.items():
        logged = [(h[f"{name}/step"], h[f"{name}/loss"]) for h in history if f"{name}/loss" in h]
        assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]
        (final,) = [
            h[f"{name}/eval/cross_entropy"] for h in history if f"{name}/eval/cross_entropy" in h
        ]
        assert final == pytest.approx(evals[name]["cross_entropy"], rel=1e-6)

    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "kdcache"]
    (run,) = client.search_runs([experiment.experiment_id])
    assert (run.info.status, run.info.run_name) == ("FINISHED", "out")
    assert run.data.params["config.seed"] == "1" and run.data.params["steps"] == "4"
    for name, rows in logs.items():
        logged = [
            (m.step, m.value) for m in client.get_metric_history(run.info.run_id, f"{name}/loss")
        ]
        assert sorted(logged) == [
            (int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-9)) for r in rows
        ]


def test_a_resumed_sweep_keeps_one_log_row_per_step_and_redraws(store, tmp_path, capsys):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP)
    out = tmp_path / "out"
    assert (
        sweep(store, config, out, capsys, "--stop-after", "2", "--report-to", "tensorboard")[0] == 0
    )
    first = out / "candidates" / CANDIDATES[0]
    assert [r["step"] for r in log_rows(first / "log.csv")] == ["1", "2"]
    assert png_size(first / "curves.png")[0] == 480  # the checkpoint's: training only
    assert png_size(out / "curves.png")[0] == 960
    assert sweep(store, config, out, capsys, "--report-to", "tensorboard")[0] == 0
    for name in CANDIDATES:
        rows = log_rows(out / "candidates" / name / "log.csv")
        assert [r["step"] for r in rows] == ["1", "2", "3", "4"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard" / "kdcache"))
    events.Reload()  # both runs' files: one loss per step
    rows = log_rows(first / "log.csv")
    logged = [(e.step, e.value) for e in events.Scalars(f"{CANDIDATES[0]}/loss")]
    assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]


@pytest.mark.slow
def test_two_ranks_log_once_from_the_main_process_and_fail_together(store, tmp_path, offline):
    config = tmp_path / "sweep.yaml"
    config.write_text(SWEEP.replace("[1, 2]", "[1]"))
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}  # the offline fixture's variables too

    def torchrun(out: Path, report_to: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
             "--master_port", str(29800 + os.getpid() % 100), "-m", "kdcache.pipeline", "sweep",
             "--store", store, "--config", str(config), "--threads", "1", "--out", str(out),
             "--report-to", report_to],
            env=environment, capture_output=True, text=True, timeout=300,
        )  # fmt: skip

    two = torchrun(tmp_path / "two", "tensorboard")
    assert two.returncode == 0, two.stderr[-3000:]
    (events_file,) = (tmp_path / "two" / "tensorboard" / "kdcache").glob("events.out.tfevents.*")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(events_file))
    events.Reload()
    rows = log_rows(tmp_path / "two" / "candidates" / "h32-l1" / "log.csv")
    logged = [(e.step, e.value) for e in events.Scalars("h32-l1/loss")]
    assert logged == [(int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-6)) for r in rows]
    assert len(rows) == 4

    del environment["MLFLOW_ALLOW_FILE_STORE"]  # MLflow 3 refuses its file store: start fails
    failed = torchrun(tmp_path / "failed", "mlflow")
    assert failed.returncode != 0
    assert failed.stderr.count("Error: --report-to mlflow could not start a run") == 1
    assert not list((tmp_path / "failed" / "candidates").iterdir())  # before any training


def test_train_student_reports_to_wandb_offline_and_mlflow(store, tmp_path, offline, capsys):
    import wandb

    wandb.teardown()  # an earlier test's wandb singleton keeps its WANDB_DIR: a fresh one here
    out = tmp_path / "out"
    code, _, err = run_cli(
        ["train-student", "--store", store, "--out", str(out), "--steps", "4", "--batch-size",
         "4", "--eval-every", "2", "--threads", "1", "--report-to", "wandb,mlflow"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    rows = log_rows(out / "log.csv")
    evals = json.loads((out / "metrics.json").read_text())["eval_history"]
    (run_file,) = glob.glob(str(tmp_path / "wandb-dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    history = wandb_history(run_file)
    logged = [h["loss"] for h in history if "loss" in h]
    assert logged == [pytest.approx(float(r["loss"]), rel=1e-6) for r in rows]
    cross = [h["eval/cross_entropy"] for h in history if "eval/cross_entropy" in h]
    assert cross == [pytest.approx(e["cross_entropy"], rel=1e-6) for e in evals]
    from mlflow.tracking import MlflowClient

    client = MlflowClient((tmp_path / "mlruns").as_uri())
    (experiment,) = [e for e in client.search_experiments() if e.name == "kdcache"]
    (run,) = client.search_runs([experiment.experiment_id])
    metric = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, m.value) for m in metric) == [
        (int(r["step"]), pytest.approx(float(r["loss"]), rel=1e-9)) for r in rows
    ]
    assert offline == []  # nothing beyond the loopback
