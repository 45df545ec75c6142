"""Issue 20, item 10: `fastcxr report RUN` on a `--seeds` series reports across the seeds
(mean ± sd tables, one ROC curve per seed), and an unfinished series says what to do.

Expected numbers are computed here from each seed's own record.json / ablation.json and
predictions.csv, with numpy and sklearn, not read from seeds.json."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.evaluate.report import seed_curves

runner = CliRunner()
FINDINGS = ("Edema", "Pleural Effusion")


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


@pytest.fixture(scope="module")
def series(prepared, tmp_path_factory):
    """A train, an ablation and a compare series of two seeds each, one epoch per stage."""
    runs = tmp_path_factory.mktemp("seed-series")
    common = [*TINY_TRAIN, "--epochs", "1", "--no-pretrained", "--runs", runs, "--json"]
    _cli("train", "--data", prepared, "--seeds", "1,2", "--stages", "all", "--name", "t", *common)
    _cli("unfreeze-ablation", "--data", prepared, "--seeds", "3,4", "--stages", "head,all",
         "--name", "a", *common)  # fmt: skip
    _cli("compare", "--data", prepared, "--seeds", "5,6", "--stages", "all",
         "--formulations", "multilabel,multiclass", "--name", "c", *common)  # fmt: skip
    return runs


def _section(md: str, name: str) -> str:
    """The results.md section of the series `name`."""
    return md.split(f"## Across seeds — {name} (")[1].split("\n## ")[0]


def _row(md: str, first: str, finding: str) -> list[str]:
    rows = [ln for ln in md.splitlines() if ln.startswith(f"| {first} | {finding} |")]
    assert len(rows) == 1, (first, finding, md)
    return [c.strip() for c in rows[0].strip("|").split("|")]


def _expect(values) -> tuple[str, str]:
    v = np.array(values, float)
    return f"{v.mean():.3f} ± {v.std(ddof=1):.3f}", f"{v.min():.3f}–{v.max():.3f}"


@pytest.mark.slow
def test_report_across_seeds_of_train_ablation_and_compare(series, tmp_path):
    out = tmp_path / "fig"
    res = _cli("report", series / "t", series / "a", series / "c", "--out", out)
    md = (out / "results.md").read_text()
    assert "## Across seeds — t (seeds 1, 2; resnet10, 32px" in md
    cases = [  # (series, row, seeds, where each seed's record of that row is)
        ("t", "multilabel", (1, 2), lambda k: series / "t" / f"seed-{k}" / "record.json"),
        ("c", "multilabel", (5, 6), lambda k: series / "c" / f"seed-{k}" / "multilabel" /
         "record.json"),
        ("c", "multiclass", (5, 6), lambda k: series / "c" / f"seed-{k}" / "multiclass" /
         "record.json"),
    ]  # fmt: skip
    for name, row, seeds, rec in cases:
        for f in FINDINGS:
            per = [json.loads(rec(k).read_text())["findings"][f] for k in seeds]
            cells = _row(_section(md, name), row, f)
            assert cells[2] == "2"
            assert tuple(cells[3:5]) == _expect([m["auc"] for m in per])
            assert tuple(cells[5:7]) == _expect([m["accuracy"] for m in per])
    for stage_i, stage in enumerate(("head", "all")):
        abl = [json.loads((series / "a" / f"seed-{k}" / "ablation.json").read_text())
               for k in (3, 4)]  # fmt: skip
        aucs = [a["stages"][stage_i]["findings"]["Edema"]["auc"] for a in abl]
        assert tuple(_row(_section(md, "a"), stage, "Edema")[3:5]) == _expect(aucs)
    for name in ("t", "a", "c"):
        for f in ("edema", "pleural_effusion"):
            assert (out / f"roc_seeds_{name}_{f}.png").stat().st_size > 0
    assert any("roc_seeds_c_edema.png" in line for line in res.stdout.splitlines())


def test_each_seeds_curve_is_its_run_on_the_test_split(series):
    s = json.loads((series / "c" / "seeds.json").read_text())
    curves = seed_curves(series / "c", s, "Edema")
    assert set(curves) == {"multilabel", "multiclass"}
    for form, per_seed in curves.items():
        assert [k for k, *_ in per_seed] == [5, 6]
        for k, fpr, tpr, auc in per_seed:
            p = pd.read_csv(series / "c" / f"seed-{k}" / form / "predictions.csv")
            t = p[(p["split"] == "test") & p["y_Edema"].notna()]
            assert auc == pytest.approx(roc_auc_score(t["y_Edema"].astype(int), t["p_Edema"]))
            assert fpr[0] == tpr[0] == 0 and fpr[-1] == tpr[-1] == 1


def test_one_seed_alone_and_an_unfinished_series(series, tmp_path):
    _cli("report", series / "c" / "seed-5", "--out", tmp_path / "one")
    assert "roc_edema.png" in {p.name for p in (tmp_path / "one").iterdir()}
    half = tmp_path / "half"
    shutil.copytree(series / "t", half)
    (half / "seeds.json").unlink()  # as a series stopped before its last seed
    res = runner.invoke(app, ["report", str(half), "--out", str(tmp_path / "x")])
    assert res.exit_code == 2, res.output
    msg = res.stderr.strip().splitlines()[-1]
    assert "--seeds series" in msg and "--resume" in msg and f"{half}/seed-1" in msg, msg


def test_a_seeds_curve_from_an_edited_predictions_file_is_refused(series, tmp_path):
    """The checker's find: the per-seed ROC figure read seed-K/predictions.csv without checking
    it against the seed's record, so an edited file drew a curve its metrics never had."""
    copy = tmp_path / "t"
    shutil.copytree(series / "t", copy)
    edited = sorted((copy / "seed-1").rglob("predictions.csv"))
    assert edited
    for f in edited:
        df = pd.read_csv(f)
        df["p_Edema"] = 1 - df["p_Edema"]
        df.to_csv(f, index=False)
    res = runner.invoke(app, ["report", str(copy), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2, res.output
    assert "changed since the run wrote it" in res.stderr
