"""`predict --export DIR --format onnx`: one model.onnx per run (uint8 images in, per-finding
probabilities out) that gives fastcxr's own numbers in onnxruntime."""

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.export import export, load_exported
from fastcxr.models import build_model, load_state_dict
from fastcxr.predict import Predictor

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

runner = CliRunner()
FINDINGS = ("Edema", "Pleural Effusion")


@pytest.fixture(scope="module")
def multilabel(prepared, tmp_path_factory):
    """The one network this file trains: one epoch of a multilabel ResNet-10 at 32 px."""
    runs = tmp_path_factory.mktemp("runs")
    res = runner.invoke(
        app,
        ["train", "--formulation", "multilabel", "--data", str(prepared), *TINY_TRAIN,
         "--epochs", "1", "--stages", "all", "--runs", str(runs), "--name", "multilabel"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    return runs / "multilabel"


def _derived(trained: Path, form: str, out: Path) -> Path:
    """A run of another formulation made from the trained one's files, not trained: its
    network body with the head's last layer cut (single: one row per finding's network,
    listed in reverse order) or replaced by a seeded random one (multiclass: 4 classes)."""
    run = out / form
    shutil.copytree(trained, run)
    old = "edema+pleural_effusion"
    side = json.loads((run / f"model-{old}.json").read_text())
    sd = load_state_dict(run / f"model-{old}.pth")
    for p in run.glob(f"model-{old}.*"):
        p.unlink()
    (last,) = [
        k for k, v in build_model("resnet10", 4).state_dict().items() if v.shape != sd[k].shape
    ]
    nets = {}
    if form == "multiclass":
        w = torch.randn(4, sd[last].shape[1], generator=torch.Generator().manual_seed(0))
        nets[old] = ({**sd, last: w * sd[last].std() * 3}, {**side, "n_out": 4}, side["findings"])
    else:
        for i, f in reversed(list(enumerate(side["findings"]))):
            one = {**side, "n_out": 1, "thresholds": {f: side["thresholds"][f]}}
            cut = {**sd, last: sd[last][i : i + 1].clone()}
            nets[f.lower().replace(" ", "_")] = (cut, one, [f])
    for name, (weights, sidecar, findings) in nets.items():
        torch.save(weights, run / f"model-{name}.pth")
        sidecar = {**sidecar, "formulation": form, "findings": findings}
        (run / f"model-{name}.json").write_text(json.dumps(sidecar))
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "networks": list(nets)}))
    return run


@pytest.fixture(scope="module", params=["multilabel", "multiclass", "single"])
def exported(request, multilabel, prepared, tmp_path_factory):
    """A run of each formulation, exported as ONNX through the command line."""
    form = request.param
    tmp = tmp_path_factory.mktemp(f"onnx-{form}")
    run = multilabel if form == "multilabel" else _derived(multilabel, form, tmp)
    out = tmp / "onnx"
    one = prepared / pd.read_csv(prepared / "manifest.csv")["image"].iloc[0]
    res = runner.invoke(
        app,
        ["predict", str(run), str(one), "--out", str(tmp / "p.csv"), "--export", str(out),
         "--format", "onnx", "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    names = ["model.onnx", "preprocess.py", "export.json"]
    assert json.loads(res.stdout)["exported"] == [str(out / n) for n in names]
    return form, run, out


@pytest.mark.slow
def test_onnx_matches_the_predictor_on_the_runs_own_images(exported, multilabel, prepared):
    form, run, out = exported
    meta = json.loads((out / "export.json").read_text())
    pred = Predictor.load(run, device="cpu")
    assert pred.precision == "fp32"
    assert meta["model_format"] == "onnx" and meta["format"] == "fastcxr-export-1"
    assert meta["findings"] == list(pred.findings) == list(FINDINGS)
    assert meta["thresholds"] == pred.thresholds
    assert meta["preprocessing"]["size"] == pred.size == 32
    assert meta["preprocessing"]["mean"] == pred.preprocessing.mean
    spec = meta["onnx"]
    assert spec["opset"] >= 17 and spec["file"] == "model.onnx"
    assert spec["input"] == {"name": "image", "dtype": "uint8", "shape": ["batch", 1, 32, 32]}
    assert spec["output"]["dtype"] == "float32" and spec["output"]["shape"] == ["batch", 2]
    assert len(meta["networks"]) == (2 if form == "single" else 1)
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx", "preprocess.py"]

    sess = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,), (outp,) = sess.get_inputs(), sess.get_outputs()
    assert (inp.name, inp.type, outp.name) == ("image", "tensor(uint8)", "probabilities")
    manifest = pd.read_csv(prepared / "manifest.csv")
    imgs = np.stack([pred.load_image(prepared / p) for p in manifest["image"]])
    want = pred.probabilities(imgs)
    assert want.std(axis=0).min() > 0  # the images give different probabilities
    for batch in (imgs[:1], imgs[:7], imgs):  # the batch dimension is dynamic
        got = sess.run(["probabilities"], {"image": batch[:, None]})[0]
        assert got.shape == (len(batch), 2) and got.dtype == np.float32
        diff = np.abs(got - want[: len(batch)]).max()
        print(f"{form}: max |onnx - Predictor| = {diff:.2e} over {len(batch)} images")
        assert diff <= 1e-4
    if form == "multiclass":  # marginals of the label powerset: probabilities, not a softmax
        assert not np.allclose(got.sum(axis=1), 1)
    if form == "single":  # the multilabel network, cut in two: the same numbers, in order
        whole = Predictor.load(multilabel, device="cpu").probabilities(imgs)
        np.testing.assert_allclose(got, whole, atol=1e-6)
    # load_exported gives the same function for either format
    run_it = load_exported(out)
    np.testing.assert_allclose(run_it(imgs[:, None].astype(np.float32)), want, atol=1e-4)


def test_format_needs_export(tmp_path):
    res = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path), "--format", "onnx"])
    assert res.exit_code == 2
    assert "--format" in res.stderr and "--export" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_unknown_format_is_refused(tmp_path):
    res = runner.invoke(
        app, ["predict", str(tmp_path), str(tmp_path), "--export", str(tmp_path / "x"),
              "--format", "tflite"],
    )  # fmt: skip
    assert res.exit_code == 2 and "tflite" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("module", ["onnx", "onnxruntime", "onnxscript"])
def test_a_missing_onnx_package_names_the_extra(module, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, module, None)  # import raises ImportError
    res = runner.invoke(
        app, ["predict", str(tmp_path), str(tmp_path), "--export", str(tmp_path / "x"),
              "--format", "onnx"],
    )  # fmt: skip
    assert res.exit_code == 2, res.output
    assert module in res.stderr and "pip install 'fastcxr[onnx]'" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_torch_export_keeps_its_keys_and_says_its_format(multilabel, tmp_path):
    meta_keys = {"format", "findings", "networks", "input", "preprocessing", "thresholds"}
    export(Predictor.load(multilabel, device="cpu"), tmp_path)  # torch.export by default
    meta = json.loads((tmp_path / "export.json").read_text())
    assert set(meta) == meta_keys | {"model_format"} and meta["model_format"] == "torch"
    assert [n["file"] for n in meta["networks"]] == ["edema+pleural_effusion.pt2"]
