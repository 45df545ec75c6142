"""Issue 20, item 11: the README's way to read a `--track mlflow` run, run as a user would.

`fastcxr[tracking]` installs mlflow-skinny: its client and command line read the file store
in RUN/tracking/mlruns, but it has no UI server (`mlflow ui` needs the full `mlflow`
package), and MLflow 3 reads a file store only with MLFLOW_ALLOW_FILE_STORE=true. Each read
below runs in a fresh process whose environment holds only what the README tells the user to
set; the values are compared with history.csv and metrics.json read with pandas and json."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app

runner = CliRunner()
MLFLOW_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_EXPERIMENT_ID",
               "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_DISABLE_TELEMETRY")  # fmt: skip
# The README's Python read path (RUN: the run folder; NET: the network's metric prefix).
README_PYTHON = """
import json, sys
from mlflow import MlflowClient

run_dir = sys.argv[1]
client = MlflowClient(tracking_uri=f"file:{run_dir}/tracking/mlruns")
exp = client.get_experiment_by_name("fastcxr")
for r in client.search_runs([exp.experiment_id]):
    valid = client.get_metric_history(r.info.run_id, sys.argv[2] + "/valid_loss")
    print(json.dumps({"name": r.info.run_name, "status": r.info.status,
                      "metrics": r.data.metrics, "params": r.data.params,
                      "valid_loss": [(m.step, m.value) for m in valid]}))
"""


@pytest.fixture(scope="module")
def tracked(prepared, tmp_path_factory):
    """`fastcxr train --track mlflow` (2 epochs), no MLflow variable set beforehand."""
    runs = tmp_path_factory.mktemp("read-runs")
    with pytest.MonkeyPatch.context() as mp:
        for var in MLFLOW_VARS:  # set, then removed: whatever the run sets is undone after it
            mp.setenv(var, "")
            mp.delenv(var)
        res = runner.invoke(app, ["train", "--data", str(prepared), *TINY_TRAIN, "--epochs", "2",
                                  "--stages", "all", "--no-pretrained", "--runs", str(runs),
                                  "--name", "m", "--track", "mlflow"])  # fmt: skip
    assert res.exit_code == 0, res.output
    said = " ".join(res.stderr.split())  # as wrapped at the console's width
    assert "(read it with MLFLOW_ALLOW_FILE_STORE=true)" in said  # the run says how
    return runs


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FASTCXR_"))}
    return {**env, "MLFLOW_DISABLE_TELEMETRY": "true", **extra}


def _run(cmd, cwd, **extra) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(**extra), capture_output=True, text=True,
                          timeout=120)  # fmt: skip


@pytest.mark.slow
def test_the_readme_python_read_path(tracked):
    net = "edema-pleural_effusion"  # fastcxr.runtime.tracking.metric_name("edema+pleural_effusion")
    py = [sys.executable, "-c", README_PYTHON, "runs/m", net]
    cwd = tracked.parent  # the README's relative path: runs/m/tracking/mlruns
    (cwd / "runs").mkdir(exist_ok=True)
    link = cwd / "runs" / "m"
    if not link.exists():
        link.symlink_to(tracked / "m")
    refused = _run(py, cwd)  # MLflow 3 without the opt-in: the file store is refused
    assert refused.returncode != 0 and "MLFLOW_ALLOW_FILE_STORE=true" in refused.stderr
    ok = _run(py, cwd, MLFLOW_ALLOW_FILE_STORE="true")
    assert ok.returncode == 0, ok.stderr
    (run,) = [json.loads(line) for line in ok.stdout.splitlines()]
    assert run["name"] == "m" and run["status"] == "FINISHED"
    h = pd.read_csv(tracked / "m" / "history.csv", float_precision="round_trip")
    assert run["valid_loss"] == [[i + 1, v] for i, v in enumerate(h["valid_loss"])]
    metrics = json.loads((tracked / "m" / "metrics.json").read_text())["findings"]
    for f, m in metrics.items():
        assert run["metrics"][f"test/{f}/auc"] == m["auc"]
    assert run["params"]["formulation"] == "multilabel"


@pytest.mark.slow
def test_the_readme_command_line_read_path(tracked):
    uri = {"MLFLOW_TRACKING_URI": f"file:{tracked / 'm'}/tracking/mlruns",
           "MLFLOW_ALLOW_FILE_STORE": "true"}  # fmt: skip
    mlflow = [str(Path(sys.executable).parent / "mlflow")]  # the command mlflow-skinny installs
    exps = _run([*mlflow, "experiments", "search"], tracked, **uri)
    assert exps.returncode == 0, exps.stderr
    line = next(ln for ln in exps.stdout.splitlines() if ln.split()[1:2] == ["fastcxr"])
    runs = _run([*mlflow, "runs", "list", "--experiment-id", line.split()[0]], tracked, **uri)
    assert runs.returncode == 0, runs.stderr
    ids = json.loads((tracked / "m" / "tracking" / "runs.json").read_text())
    run_id = ids["mlflow"]["."]["run_id"]
    assert run_id in runs.stdout and " m " in f" {runs.stdout} "
    about = _run([*mlflow, "runs", "describe", "--run-id", run_id], tracked, **uri)
    assert about.returncode == 0, about.stderr
    data = json.loads(about.stdout)["data"]
    metrics = json.loads((tracked / "m" / "metrics.json").read_text())["findings"]
    assert data["metrics"]["test/Edema/auc"] == metrics["Edema"]["auc"]
