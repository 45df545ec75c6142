"""Two processes on the CPU (gloo), launched the standard way (torchrun)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from tiny import TINY_TRAIN

pytest.importorskip("accelerate")

ARGS = [
    *TINY_TRAIN,
    "--stages",
    "all",
    "--epochs",
    "2",
    "--formulation",
    "multilabel",
    "--json",
]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["datablock", "fast"])
def test_two_processes_on_cpu(prepared, tmp_path, loader):
    """Both loaders: fastai's `DistributedDL` shards the fast `CacheDL` as it does a TfmdDL."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [
        torchrun or "torchrun",
        "--nproc_per_node",
        "2",
        "-m",
        "fastcxr",
        "train",
        "--data",
        str(prepared),
        *ARGS,
        "--loader",
        loader,
        "--runs",
        str(tmp_path),
        "--name",
        "ddp",
    ]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout)  # exactly one JSON document: only rank 0 reports
    one = subprocess.run(
        [
            sys.executable,
            "-m",
            "fastcxr",
            "train",
            "--data",
            str(prepared),
            *ARGS,
            "--runs",
            str(tmp_path),
            "--name",
            "single",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads(one.stdout)
    assert two.keys() == single.keys() and two["findings"].keys() == single["findings"].keys()
    run = tmp_path / "ddp"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["processes"] == 2 and cfg["speed"]["loader"] == loader
    preds = pd.read_csv(run / "predictions.csv")
    manifest = pd.read_csv(prepared / "manifest.csv")
    test = preds[preds["split"] == "test"]
    # metrics on the whole test set: every test image once, none duplicated by a gather
    assert test["image"].is_unique
    assert set(test["image"]) == set(
        pd.read_csv(tmp_path / "single" / "predictions.csv").query("split == 'test'")["image"]
    )
    assert set(test["image"]) <= set(manifest["image"])
    assert test["p_Edema"].between(0, 1).all()
    assert json.loads((run / "record.json").read_text())["complete"]
