"""`--track tensorboard|mlflow|wandb` (issue 14, item 5): the run record mirrored, offline.

Every store is read back with its own library's reader (TensorBoard's EventAccumulator,
MLflow's MlflowClient, W&B's protobuf records in the offline .wandb file) and compared with
history.csv / metrics.json read with pandas and json; no connection leaves the machine."""

import json
import os
import random
import socket
import struct
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN
from typer.testing import CliRunner

import fastcxr.cli.training as training_cli
from fastcxr.cli import app
from fastcxr.errors import FastcxrError, UsageError
from fastcxr.runtime.stopping import STOP, Interrupted
from fastcxr.runtime.tracking import Tracking, metric_name, require, tracked

runner = CliRunner()
KINDS = ("tensorboard", "mlflow", "wandb")
LOOPBACK = ("127.0.0.1", "::1", "localhost")


# -- offline, and provably so -------------------------------------------------------------------
@pytest.fixture(scope="module")
def offline(tmp_path_factory):
    """Local stores only: no MLflow server, W&B offline with its files in tmp; any Python
    connection or name lookup beyond the loopback fails, and is recorded."""
    home = tmp_path_factory.mktemp("wandb-home")
    attempts: list = []
    real_connect, real_lookup = socket.socket.connect, socket.getaddrinfo

    def connect(self, address):
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and host not in LOOPBACK:
            attempts.append(address)
            raise OSError(f"test: no network ({address})")
        return real_connect(self, address)

    def lookup(host, *args, **kwargs):
        if host not in (None, *LOOPBACK):
            attempts.append(host)
            raise socket.gaierror(f"test: no network ({host})")
        return real_lookup(host, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
                    "WANDB_MODE", "WANDB_DIR", "WANDB_PROJECT", "WANDB_API_KEY"):  # fmt: skip
            mp.delenv(var, raising=False)
        mp.setenv("WANDB_CONFIG_DIR", str(home / "config"))
        mp.setenv("WANDB_CACHE_DIR", str(home / "cache"))
        mp.setenv("WANDB_DATA_DIR", str(home / "data"))
        mp.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # were anything sent: nowhere
        for var in ("MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY", "WANDB_ERROR_REPORTING"):
            mp.setenv(var, "")  # fastcxr sets these: unset now, and unset again afterwards
            mp.delenv(var)
        mp.setattr(socket.socket, "connect", connect)
        mp.setattr(socket, "getaddrinfo", lookup)
        yield attempts
    assert attempts == [], attempts


# -- the stores, read back with the trackers' own readers ---------------------------------------
def tensorboard_scalars(folder) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def mlflow_run(store):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=store.resolve().as_uri())
    exp = client.get_experiment_by_name("fastcxr")
    return client, client.search_runs([exp.experiment_id])


def wandb_records(folder, timeout: float = 20) -> list:
    """Every record of every offline run segment under `folder`, in order (the .wandb file is
    a LevelDB-style log of 32 KiB blocks holding W&B's protobuf `Record`s). wandb-core writes
    it in its own process: a segment is read until its `exit` record is there."""
    out = []
    for path in sorted(folder.glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + timeout
        while True:
            records = _wandb_file(path)
            if records and records[-1].WhichOneof("record_type") == "exit":
                break
            assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
            time.sleep(0.1)
        out += records
    return out


def _wandb_file(path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, pending, out = path.read_bytes(), 7, 32768, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind == 0 or len(chunk) < n:  # the end, or a record still being written
            break
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL, LAST
            rec = pb.Record()
            rec.ParseFromString(pending)
            out.append(rec)
    return out


def wandb_history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in r.history.item})  # fmt: skip
    return rows


# -- without training: steps, names, resume, the RNG ------------------------------------------
def _row(stage, epoch, loss):
    return {"stage": stage, "epoch": epoch, "train_loss": loss, "valid_loss": loss + 0.5,
            "train_seconds": 0.1, "seconds": 0.2, "compile_seconds": 0.0}  # fmt: skip


ROWS = {
    "edema": [_row("head", 1, 0.9), _row("head", 2, 0.8), _row("all", 1, 0.7)],
    "edema+pleural_effusion": [_row("head", 1, 0.6), _row("all", 1, 0.5), _row("all", 2, 0.4)],
}
ABOUT = {"formulation": "single", "networks": list(ROWS),
         "stages": [{"name": "head", "unfreeze": "head"}, {"name": "all", "unfreeze": "all"}],
         "train": {"seed": 3, "findings": ["Edema"]}}  # fmt: skip
METRICS = {"findings": {"Edema": {"auc": 0.75, "accuracy": 0.5, "reason": None, "pr_auc": None}},
           "per_stage": {"head": {"Edema": {"auc": 0.625}}}}  # fmt: skip


def _rng_states() -> dict:
    return {"random": random.getstate(), "numpy": np.random.get_state()[1].tolist(),
            "torch": torch.get_rng_state().tolist()}  # fmt: skip


def _drawn(before: dict) -> list[str]:
    """The global generators whose state changed since `before`."""
    return [k for k, v in _rng_states().items() if v != before[k]]


@pytest.mark.parametrize("kind", KINDS)
def test_steps_names_and_a_resume_after_a_kill(kind, tmp_path, offline):
    """Two networks, two stages; the first session is killed between the checkpoint of the
    second network's 2nd epoch and its log; the resumed session brings every checkpointed row
    in exactly once, and nothing draws from an RNG."""
    root, run_dir = tmp_path / "cmp", tmp_path / "cmp" / "single"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    (run_dir / "history.csv").write_text("network\n")
    track = Tracking(kind, root)
    a, b = ROWS
    before = _rng_states()
    with pytest.raises(Interrupted), tracked(track, run_dir, ABOUT, resume=False) as t:
        t.network(a, [])
        for i in range(1, 4):
            t.epoch(a, ROWS[a][:i])
        t.network(b, [])
        t.epoch(b, ROWS[b][:1])
        raise Interrupted("killed after the checkpoint of b's 2nd epoch, before its log")
    with tracked(track, run_dir, ABOUT, resume=True) as t:
        t.network(a, ROWS[a])  # complete before the kill
        t.network(b, ROWS[b][:2])
        t.epoch(b, ROWS[b])
        t.finish(run_dir)
    assert _drawn(before) == []
    expected = {
        metric_name(net, col): [(off + i + 1, r[col]) for i, r in enumerate(ROWS[net])]
        for off, net in ((0, a), (3, b)) for col in ("train_loss", "valid_loss")
    }  # fmt: skip
    stage_b = [(4, 0.0), (5, 1.0), (6, 1.0)]  # head, all, all
    assert metric_name(b, "x") == "edema-pleural_effusion/x"  # MLflow refuses '+'
    got = _read_fake(kind, root, a, b)
    for key, want in expected.items():
        assert [s for s, _ in got[key]] == [s for s, _ in want], key  # each step once
        np.testing.assert_allclose([v for _, v in got[key]], [v for _, v in want], rtol=1e-6)
    assert got[metric_name(b, "stage_index")] == stage_b
    assert got["test/Edema/auc"][-1][1] == 0.75 and got["stage/head/Edema/auc"][-1][1] == 0.625
    assert not any("pr_auc" in k or "reason" in k for k in got)  # undefined: not logged


def test_an_mlflow_experiment_id_that_draws_leaves_the_generators_alone(tmp_path, offline,
                                                                        monkeypatch):  # fmt: skip
    """The CI flake: MLflow's file store makes an experiment id from a uuid and, when its digits
    start with 0 (one time in ten), pads it with `random.randint`, at the tracker's start-up,
    which the guard did not cover. Here the uuid always starts with zeros."""
    import types
    import uuid

    import mlflow.utils.name_utils as names

    fixed = uuid.UUID(int=7 * 10**18 + 5)  # its last 18 digits: 000000000000000005
    monkeypatch.setattr(names, "uuid", types.SimpleNamespace(uuid4=lambda: fixed))
    state = random.getstate()
    names._generate_unique_integer_id()
    assert random.getstate() != state  # the test bites: making the id draws
    root, run_dir = tmp_path / "cmp", tmp_path / "cmp" / "single"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps(METRICS))
    (run_dir / "history.csv").write_text("network\n")
    track = Tracking("mlflow", root)
    a, _ = ROWS
    before = _rng_states()
    with tracked(track, run_dir, ABOUT, resume=False) as t:
        t.network(a, [])
        t.epoch(a, ROWS[a][:1])
        t.finish(run_dir)
    assert _drawn(before) == []


def _read_fake(kind, root, a, b) -> dict[str, list[tuple[int, float]]]:
    folder = root / "tracking"
    if kind == "tensorboard":
        base = folder / "tensorboard" / "single"
        out = tensorboard_scalars(base)  # the record: test metrics
        for net in (a, b):
            out.update(tensorboard_scalars(base / metric_name(net)))
        return out
    if kind == "mlflow":
        client, runs = mlflow_run(folder / "mlruns")
        assert len(runs) == 1, "the resume continued the same MLflow run"
        run = runs[0]
        assert run.info.run_name == "cmp/single" and run.info.status == "FINISHED"
        assert run.data.params["train.seed"] == "3" and run.data.params["stages.1.name"] == "all"
        return {k: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, k)]
                for k in run.data.metrics}  # fmt: skip
    records = wandb_records(folder)
    runs = {r.run.run_id for r in records if r.WhichOneof("record_type") == "run"}
    assert len(runs) == 1 and len(list(folder.glob("wandb/offline-run-*"))) == 2  # 2 sessions
    out: dict[str, dict[int, set]] = {}
    for h in wandb_history(records):  # a continued W&B run may repeat its last row: same values
        for k, v in h.items():
            if not k.startswith("_"):
                out.setdefault(k, {}).setdefault(h["_step"], set()).add(v)
    assert all(len(vals) == 1 for by_step in out.values() for vals in by_step.values())
    got = {k: [(s, next(iter(v))) for s, v in sorted(d.items())] for k, d in out.items()}
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update({"/".join(u.nested_key) or u.key: json.loads(u.value_json)
                            for u in r.summary.update})  # fmt: skip
    got.update({k: [(0, v)] for k, v in summary.items() if k.startswith(("test/", "stage/"))})
    return got


def test_the_missing_extra_is_one_line_before_anything(tmp_path, monkeypatch):
    for kind, module in (("tensorboard", "tensorboard"), ("mlflow", "mlflow"), ("wandb", "wandb")):
        with monkeypatch.context() as mp:
            mp.setitem(sys.modules, module, None)  # what `import` sees when it is missing
            res = runner.invoke(app, ["train", "--track", kind, "--runs", str(tmp_path / "r"),
                                      "--data", str(tmp_path / "no-such-manifest")])  # fmt: skip
            assert res.exit_code == 2, res.output
            lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
            assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
            assert f"--track {kind}" in lines[0]
            assert "pip install 'fastcxr[tracking]'" in lines[0]
    assert not (tmp_path / "r").exists()  # refused before any data was read or folder written
    res = runner.invoke(app, ["train", "--track", "neptune", "--runs", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--track must be one of tensorboard, mlflow, wandb" in res.stderr
    with pytest.raises(UsageError, match="needs one of"):
        require(" , ")
    assert require("mlflow, tensorboard,mlflow") == ("mlflow", "tensorboard")


# -- a real run: started with two trackers, stopped, resumed with three ----------------------
@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory, offline):
    """multilabel, 2 epochs: stopped after epoch 1 (as SIGTERM does) while tracked by MLflow
    and TensorBoard, resumed tracked by all three (W&B starting at the resume)."""
    runs = tmp_path_factory.mktemp("tracked-runs")
    args = ["train", "--formulation", "multilabel", "--data", str(prepared), *TINY_TRAIN,
            "--epochs", "2", "--stages", "all", "--loader", "datablock", "--precision", "fp32",
            "--runs", str(runs), "--name", "t"]  # fmt: skip
    log = training_cli._log

    def stop_after_first_epoch(ev):
        log(ev)
        if ev.get("epoch") == 1:
            STOP.set()

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(training_cli, "_log", stop_after_first_epoch)
        first = runner.invoke(app, [*args, "--track", "mlflow,tensorboard"])
    assert first.exit_code == 143, first.output
    second = runner.invoke(app, [*args, "--resume", "--json", "--track", ",".join(KINDS)])
    assert second.exit_code == 0, second.output
    return runs / "t", second


def _history(run_dir):
    h = pd.read_csv(run_dir / "history.csv", float_precision="round_trip")
    return h, "edema+pleural_effusion"


@pytest.mark.slow
def test_tensorboard_holds_the_history(run):
    run_dir, _ = run
    h, net = _history(run_dir)
    got = tensorboard_scalars(run_dir / "tracking" / "tensorboard" / metric_name(net))
    for col in ("train_loss", "valid_loss"):
        steps, values = zip(*got[metric_name(net, col)])
        assert list(steps) == list(range(1, len(h) + 1))  # epoch 1 once, though logged twice
        np.testing.assert_allclose(values, h[col].to_numpy(), rtol=1e-6)  # stored as float32
    record = tensorboard_scalars(run_dir / "tracking" / "tensorboard")
    metrics = json.loads((run_dir / "metrics.json").read_text())["findings"]
    for f, m in metrics.items():
        assert record[f"test/{f}/auc"][-1] == (len(h), pytest.approx(m["auc"], rel=1e-6))


def test_mlflow_holds_the_history_config_metrics_and_record(run):
    run_dir, _ = run
    h, net = _history(run_dir)
    client, runs = mlflow_run(run_dir / "tracking" / "mlruns")
    assert len(runs) == 1  # the resume continued the run the first session started
    r = runs[0]
    assert r.info.status == "FINISHED" and r.info.run_name == "t"
    for col in ("train_loss", "valid_loss", "seconds"):
        hist = client.get_metric_history(r.info.run_id, metric_name(net, col))
        assert [m.step for m in hist] == list(range(1, len(h) + 1))
        assert [m.value for m in hist] == h[col].tolist()  # float64: exactly
    cfg = json.loads((run_dir / "config.json").read_text())
    assert r.data.params["train.seed"] == str(cfg["train"]["seed"])
    assert r.data.params["formulation"] == "multilabel"
    metrics = json.loads((run_dir / "metrics.json").read_text())["findings"]
    for f, m in metrics.items():
        assert r.data.metrics[f"test/{f}/auc"] == m["auc"]
        assert r.data.metrics[f"test/{f}/accuracy"] == m["accuracy"]
    files = {a.path for a in client.list_artifacts(r.info.run_id, "run_record")}
    want = {"config.json", "history.csv", "metrics.json", "predictions.csv", "record.json"}
    assert {f"run_record/{f}" for f in want} <= files
    assert r.info.artifact_uri.startswith((run_dir / "tracking").resolve().as_uri())


def test_wandb_started_at_the_resume_holds_every_epoch_offline(run):
    run_dir, _ = run
    h, net = _history(run_dir)
    folder = run_dir / "tracking"
    assert len(list(folder.glob("wandb/offline-run-*"))) == 1
    records = wandb_records(folder)
    rows = [r for r in wandb_history(records) if metric_name(net, "train_loss") in r]
    assert [r["_step"] for r in rows] == list(range(1, len(h) + 1))  # epoch 1 from the checkpoint
    assert [r[metric_name(net, "train_loss")] for r in rows] == h["train_loss"].tolist()
    assert [r[metric_name(net, "valid_loss")] for r in rows] == h["valid_loss"].tolist()
    kinds = [r.WhichOneof("record_type") for r in records]
    assert "artifact" in kinds and "summary" in kinds
    cfg = next(r.run.config for r in records if r.WhichOneof("record_type") == "run")
    assert {u.key for u in cfg.update} >= {"formulation", "train", "stages"}


def test_tracking_is_no_part_of_the_config(run):
    run_dir, second = run
    cfg = json.loads((run_dir / "config.json").read_text())
    assert "track" not in json.dumps(cfg["train"])
    assert json.loads(second.stdout)["epochs"] == 2
    assert "tracking: MLflow run" in second.stderr and "offline" in second.stderr
    # where the user configured nothing: MLflow's usage telemetry and W&B's error reports off
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["WANDB_ERROR_REPORTING"] == "false"


def test_mlflow_telemetry_is_off_with_a_server_too_unless_the_user_chose(monkeypatch):
    """Its config thread draws from Python's `random` at a moment no one controls."""
    from fastcxr.runtime.tracking import offline_defaults

    for var in ("MLFLOW_DISABLE_TELEMETRY", "MLFLOW_ALLOW_FILE_STORE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    offline_defaults("mlflow")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert "MLFLOW_ALLOW_FILE_STORE" not in os.environ  # a server: no file store
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "false")
    offline_defaults("mlflow")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "false"  # the user's choice stands


def test_a_tracker_failure_is_one_line(tmp_path, offline, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    def down(*args, **kwargs):
        raise MlflowException("API request to http://mlflow.example/api failed\nretries: 5")

    run_dir = tmp_path / "r"
    with tracked(Tracking("mlflow", run_dir), run_dir, ABOUT, resume=False) as t:
        monkeypatch.setattr(MlflowClient, "log_batch", down)
        with pytest.raises(FastcxrError) as e:
            t.epoch("edema", ROWS["edema"][:1])
    assert "\n" not in str(e.value)
    assert str(e.value).startswith("--track mlflow: API request to http://mlflow.example/api")
    assert "the run is checkpointed: add --resume" in str(e.value)


def test_an_unreachable_mlflow_server_is_refused_before_training(prepared, tmp_path, monkeypatch):
    """#22 item 20: an unreachable MLFLOW_TRACKING_URI failed after 255 s of silence and left
    an interrupted run."""
    pytest.importorskip("mlflow")
    with socket.socket() as s:  # a port nobody listens on: bind, then close
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    args = ["train", "--data", str(prepared), *TINY_TRAIN, "--epochs", "1", "--track", "mlflow"]
    res = runner.invoke(app, [*args, "--runs", str(tmp_path), "--name", "m"])
    assert res.exit_code == 2, res.output
    assert "tracking server" in res.stderr and "cannot be reached" in res.stderr
    assert not (tmp_path / "m").exists()
