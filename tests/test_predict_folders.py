"""`predict` on a folder that holds several runs (a compare run, a `--seeds` run) names them."""

import json
import shutil

import pytest
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    res = runner.invoke(app, ["train", "--data", str(prepared), *TINY_TRAIN, "--stages", "all",
                              "--epochs", "1", "--runs", str(runs), "--name", "t"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return runs / "t"


@pytest.mark.slow
def test_predict_on_a_compare_folder_names_its_formulations(trained, prepared, tmp_path):
    cmp = tmp_path / "demo-compare"
    for form in ("single", "multilabel", "multiclass"):
        shutil.copytree(trained, cmp / form)
    (cmp / "compare.json").write_text(json.dumps({"formulations": ["single", "multilabel",
                                                                   "multiclass"]}))  # fmt: skip
    image = next((prepared / "images").rglob("*.png"))
    res = runner.invoke(app, ["predict", str(cmp), str(image), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert "is a compare run of 3 trained runs (multiclass, multilabel, single)" in msg
    assert f"fastcxr predict {cmp / 'multiclass'}" in msg
    assert not (tmp_path / "p.csv").exists()
    # the formulation run it points to predicts
    res = runner.invoke(app, ["predict", str(cmp / "multiclass"), str(image), "--out",
                              str(tmp_path / "p.csv")])  # fmt: skip
    assert res.exit_code == 0, res.output


def test_predict_on_a_seeds_folder_names_its_seeds(trained, prepared, tmp_path):
    seeds = tmp_path / "s01"
    for k in (0, 1):
        shutil.copytree(trained, seeds / f"seed-{k}" / "multilabel")
    (seeds / "seed-1" / "broken").mkdir()  # an unfinished run is not offered
    image = next((prepared / "images").rglob("*.png"))
    res = runner.invoke(app, ["predict", str(seeds), str(image), "--out", str(tmp_path / "p.csv")])
    assert res.exit_code == 2
    msg = " ".join(res.stderr.split())
    assert "is a folder of 2 trained runs (seed-0/multilabel, seed-1/multilabel)" in msg


def test_predict_on_an_empty_folder_says_it_is_not_a_run(prepared, tmp_path):
    image = next((prepared / "images").rglob("*.png"))
    res = runner.invoke(app, ["predict", str(tmp_path), str(image), "--out", str(tmp_path / "p")])
    assert res.exit_code == 2 and "not a complete run" in " ".join(res.stderr.split())
