"""The CLI in-process (typer's CliRunner) on a small synthetic dataset."""

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import torchvision
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app

runner = CliRunner()
TINY = [*TINY_TRAIN, "--epochs", "1", "--no-pretrained"]


def run(*args):
    res = runner.invoke(app, [str(a) for a in args])
    return res


@pytest.mark.slow
def test_compare_json_shape(prepared, tmp_path):
    res = run(
        "compare",
        "--data",
        prepared / "manifest.csv",
        *TINY,
        "--stages",
        "all",
        "--runs",
        tmp_path,
        "--name",
        "c",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert set(out["formulations"]) == {"single", "multilabel", "multiclass"}
    for name, f in out["formulations"].items():
        assert set(f["findings"]) == {"Edema", "Pleural Effusion"}
        for m in f["findings"].values():
            assert 0 <= m["accuracy"] <= 1 and (m["auc"] is None or 0 <= m["auc"] <= 1)
        assert f["epochs"] == (2 if name == "single" else 1)  # two binary nets counted together
        assert f["train_seconds"] == pytest.approx(f["seconds_per_epoch"] * f["epochs"])
    run_dir = tmp_path / "c"
    # --json is compare.json's keys in its order with its values (read into typed results
    # and written back), then what the command adds
    saved = json.loads((run_dir / "compare.json").read_text())
    assert list(out)[: len(saved)] == list(saved)
    assert json.dumps({k: out[k] for k in saved}) == json.dumps(saved)
    for name in out["formulations"]:
        preds = pd.read_csv(run_dir / name / "predictions.csv")
        assert {"image", "y_Edema", "p_Edema", "p_Pleural Effusion"} <= set(preds.columns)
        assert preds["p_Edema"].between(0, 1).all()
        assert json.loads((run_dir / name / "record.json").read_text())["complete"]
        cfg = json.loads((run_dir / name / "config.json").read_text())
        assert len(cfg["data"]["sha256"]) == 64 and cfg["environment"]["torch"]
    assert (run_dir / "single" / "model-edema.pth").exists()
    # a second call resumes: every formulation is complete, nothing is retrained
    again = run(
        "compare",
        "--data",
        prepared,
        *TINY,
        "--stages",
        "all",
        "--runs",
        tmp_path,
        "--name",
        "c",
        "--json",
    )
    assert (
        json.loads(again.stdout)["formulations"]["multiclass"]["train_seconds"]
        == out["formulations"]["multiclass"]["train_seconds"]
    )
    assert "skipped" in again.stderr
    # statistics: CIs per finding and DeLong's test for each pair of formulations, per finding
    assert len(out["pairs"]) == 3 * 2
    for p in out["pairs"]:
        assert {"a", "b", "finding", "auc_diff", "p_value"} <= set(p)
    for f in out["formulations"]["multilabel"]["findings"].values():
        assert f["auc"] is None or f["auc_ci"][0] <= f["auc"] <= f["auc_ci"][1]
    # the report, from the records only
    rep = run("report", run_dir, "--out", tmp_path / "fig")
    assert rep.exit_code == 0, rep.output
    pngs = {p.name for p in (tmp_path / "fig").glob("*.png")}
    assert {
        "confusion.png",
        "accuracy.png",
        "roc_edema.png",
        "calibration_pleural_effusion.png",
        "epochs_vs_seconds.png",
        "curves_single.png",
    } <= pngs
    md = (tmp_path / "fig" / "results.md").read_text()
    assert "Paired comparisons" in md and "uncertain=drop" in md


@pytest.mark.slow
def test_saved_weights_load_safely(prepared, tmp_path):
    import torch

    from fastcxr.models import build_model

    res = run(
        "train",
        "--formulation",
        "multiclass",
        "--data",
        prepared,
        *TINY,
        "--stages",
        "all",
        "--runs",
        tmp_path,
        "--name",
        "t",
        "--json",
    )
    assert res.exit_code == 0, res.output
    p = tmp_path / "t" / "model-edema+pleural_effusion.pth"
    side = json.loads(p.with_suffix(".json").read_text())
    assert side["n_out"] == 4 and side["formulation"] == "multiclass"
    m = build_model(side["arch"], side["n_out"])
    m.load_state_dict(torch.load(p, weights_only=True))


@pytest.mark.slow
def test_ablation_table_and_json(prepared, tmp_path):
    res = run(
        "unfreeze-ablation",
        "--data",
        prepared,
        *TINY,
        "--arch",
        "resnet22n",
        "--runs",
        tmp_path,
        "--name",
        "a",
        "--json",
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    names = [s["name"] for s in out["stages"]]
    assert names == ["head", "conv5_block3", "conv5", "conv4_last3"]
    assert out["best_stage"] in names
    params = [s["trainable_params"] for s in out["stages"]]
    assert params[0] < params[1] < params[2] < params[3]  # resnet22n: 3 blocks in conv5
    assert out["stages"][0]["unfrozen"] == ["head"]
    rep = run("report", tmp_path / "a", "--out", tmp_path / "fig")
    assert rep.exit_code == 0 and (tmp_path / "fig" / "ablation_a.png").exists(), rep.output
    table = run("unfreeze-ablation", "--data", prepared, *TINY, "--arch", "resnet22n", "--runs",
                tmp_path, "--name", "a2")  # fmt: skip
    assert table.exit_code == 0 and "★" in table.stdout and "SYNTHETIC" not in table.stdout


def test_paper_dry_run_parameter_differences_are_block_sizes():
    res = run("unfreeze-ablation", "--preset", "paper", "--dry-run", "--json")
    assert res.exit_code == 0, res.output
    st = json.loads(res.stdout)["stages"]
    tv = torchvision.models.resnet152()

    def n(m):
        return sum(p.numel() for p in m.parameters())

    diffs = [b["trainable_params"] - a["trainable_params"] for a, b in zip(st, st[1:])]
    assert diffs == [
        n(tv.layer4[2]),
        n(tv.layer4[0]) + n(tv.layer4[1]),
        sum(n(b) for b in tv.layer3[-3:]),
    ]
    assert st[1]["unfrozen"] == ["conv5_block3", "head"]


def test_clear_errors(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv")
    df.drop(columns="Edema").to_csv(tmp_path / "m.csv", index=False)
    res = run("train", "--data", tmp_path / "m.csv", *TINY, "--runs", tmp_path)
    assert res.exit_code == 2 and "Edema" in res.stderr
    df.assign(split="train").to_csv(tmp_path / "m2.csv", index=False)
    res = run("train", "--data", tmp_path / "m2.csv", *TINY, "--runs", tmp_path)
    assert res.exit_code == 2 and "'valid' split is empty" in res.stderr
    res = run("train", "--data", tmp_path / "nope.csv", *TINY)
    assert res.exit_code == 2 and "no manifest" in res.stderr
    res = run("train", "--formulation", "powerset", "--data", prepared, *TINY)
    assert res.exit_code == 2 and "unknown formulation" in res.stderr


def test_one_class_label_is_refused(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv")
    df.loc[df["split"] == "train", "Edema"] = 0.0
    df.to_csv(prepared / "one_class.csv", index=False)
    res = run("train", "--data", prepared / "one_class.csv", *TINY, "--runs", tmp_path)
    assert res.exit_code == 2 and "only class [0]" in res.stderr


def test_prepare_commands(tmp_path):
    res = run(
        "prepare",
        "synthetic",
        tmp_path / "raw",
        "--patients",
        "6",
        "--rows",
        "48",
        "--cols",
        "40",
        "--workers",
        "1",
    )
    assert res.exit_code == 0, res.output
    res = run(
        "prepare",
        "mimic",
        tmp_path / "raw",
        "--out",
        tmp_path / "prep",
        "--size",
        "16",
        "--workers",
        "1",
        "--json",
    )
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["images"] == len(pd.read_csv(tmp_path / "prep" / "manifest.csv")) > 0


def test_every_command_has_help_and_is_in_the_readme():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    commands = [c.name or c.callback.__name__ for c in app.registered_commands]
    assert {"compare", "train", "unfreeze-ablation"} <= set(commands)
    for c in commands + [f"prepare {d}" for d in ("synthetic", "mimic", "chexpert", "nih")]:
        res = runner.invoke(app, [*c.split(), "--help"])
        assert res.exit_code == 0 and len(res.stdout) > 100, c
        assert re.search(rf"fastcxr {c}\b", readme), f"README does not show `fastcxr {c}`"


def test_gpu_out_of_memory_is_a_clear_error(prepared, tmp_path, monkeypatch):
    import torch

    import fastcxr.study

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(fastcxr.study, "train_formulation", oom)
    res = runner.invoke(
        app, ["train", "--data", str(prepared), "--runs", str(tmp_path), "--batch-size", "512"]
    )
    assert res.exit_code == 2
    assert "ran out of memory" in res.stderr and "--batch-size" in res.stderr


@pytest.mark.slow
def test_single_ablation_records_each_networks_own_best_stage(prepared, tmp_path):
    res = runner.invoke(app, ["unfreeze-ablation", "--data", str(prepared), *TINY_TRAIN,
                              "--formulation", "single", "--stages", "head,all", "--epochs", "1",
                              "--no-pretrained", "--loader", "datablock", "--precision", "fp32",
                              "--runs", str(tmp_path), "--name", "s", "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    record = json.loads((tmp_path / "s" / "record.json").read_text())
    want = {}
    for net in record["networks"]:
        losses = [s["valid_loss"] for s in net["stages"]]
        want[net["network"]] = net["stages"][losses.index(min(losses))]["name"]
    assert len(want) == 2 and out["best_stage_by_network"] == want
    mean = [sum(n["stages"][i]["valid_loss"] for n in record["networks"]) / 2 for i in range(2)]
    assert out["best_stage"] == ["head", "all"][mean.index(min(mean))]
    assert out["best_stage_rule"] == "validation loss (the mean over the 2 networks)"
