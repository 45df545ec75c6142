"""No Finding on MIMIC-CXR / CheXpert labels (#22 item 2): there No Finding is 1 or blank,
never 0, so a run with No Finding was refused and the audit's underdiagnosis (the FPR of No
Finding, CheXclusion) could not be computed on real labels. CheXclusion's convention: No
Finding is 0 where it is blank and another finding is positive. Here a run is trained on the
synthetic MIMIC-CXR manifest as prepared (No Finding 1 or blank) and every derived number is
recomputed from the manifest with pandas."""

import json

import numpy as np
import pandas as pd
import pytest
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.findings import ALL_FINDINGS, LabelPolicy, composition, derive_no_finding

runner = CliRunner()


def _manifest(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "manifest.csv", dtype={"image": str, "patient_id": str})


def _expected_no_finding(m: pd.DataFrame) -> pd.Series:
    """1 where labelled 1; 0 where blank and any pathology (not Support Devices) is 1."""
    not_pathology = ("No Finding", "Support Devices")
    others = [c for c in m.columns if c in ALL_FINDINGS and c not in not_pathology]
    out = pd.Series(np.nan, index=m.index)
    out[m["No Finding"] == 1] = 1.0
    sick = (m[others] == 1).any(axis=1)
    out[m["No Finding"].isna() & sick] = 0.0
    out[m["No Finding"] == 0] = 0.0
    return out


def test_the_prepared_mimic_manifest_has_no_finding_1_or_blank_only(prepared):
    m = _manifest(prepared)
    assert set(m["No Finding"].dropna().unique()) == {1.0}  # as MIMIC-CXR's labeller writes


def test_derivation_fills_only_blanks_next_to_a_positive_finding():
    df = pd.DataFrame({"No Finding": [1, np.nan, np.nan, np.nan, 0, np.nan],
                       "Edema": [np.nan, 1, 0, -1, np.nan, np.nan],
                       "Support Devices": [1, np.nan, np.nan, np.nan, np.nan, 1],
                       "Cardiomegaly": [np.nan, np.nan, 1, np.nan, np.nan, np.nan]})  # fmt: skip
    got = derive_no_finding(df)["No Finding"].tolist()
    # uncertain (-1) and Support Devices do not make an image "with a finding"
    assert got[:2] == [1, 0] and got[2] == 0 and np.isnan(got[3]) and got[4] == 0
    assert np.isnan(got[5])
    assert df["No Finding"].isna().sum() == 4  # the input is left alone


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("nf-runs")
    res = runner.invoke(app, ["train", "--data", str(prepared), *TINY_TRAIN,
                              "--findings", "Edema,No Finding", "--formulation", "multilabel",
                              "--stages", "all", "--epochs", "2", "--no-pretrained",
                              "--loader", "datablock", "--precision", "fp32",
                              "--runs", str(runs), "--name", "nf"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return runs / "nf"


def test_a_no_finding_run_trains_and_scores_the_derived_labels(run, prepared):
    m = _manifest(prepared)
    want = _expected_no_finding(m)
    pred = pd.read_csv(run / "predictions.csv", dtype={"image": str, "patient_id": str})
    test = pred[pred["split"] == "test"].merge(
        m[["image"]].assign(want=want), on="image", validate="one_to_one")  # fmt: skip
    edema_or_nf = test["y_No Finding"].notna() | test["y_Edema"].notna()
    assert edema_or_nf.all()
    got, exp = test["y_No Finding"].to_numpy(float), test["want"].to_numpy(float)
    assert (
        np.array_equal(np.isnan(got), np.isnan(exp))
        and (got[~np.isnan(got)] == exp[~np.isnan(exp)]).all()
    )
    assert (got == 0).sum() > 0 and (got == 1).sum() > 0
    cfg = json.loads((run / "config.json").read_text())
    assert "CheXclusion" in cfg["label_policy"]["no_finding"]


def test_the_audit_reports_underdiagnosis_by_sex_on_real_labels(run, prepared):
    res = runner.invoke(app, ["audit", str(run), "--by", "sex", "--min-size", "5", "--json"])
    assert res.exit_code == 0, res.output
    a = json.loads(res.stdout)
    t = json.loads((run / "config.json").read_text())["thresholds"]["values"]["No Finding"]
    pred = pd.read_csv(run / "predictions.csv", dtype={"image": str, "patient_id": str})
    m = _manifest(prepared)[["image", "sex"]]
    test = pred[pred["split"] == "test"].merge(m, on="image")
    ill = test[test["y_No Finding"] == 0]
    rows = {s["subgroup"]: s for s in a["underdiagnosis"]["sex"]}
    assert set(rows) == set(ill["sex"].fillna("unknown"))
    for sex, grp in ill.groupby(ill["sex"].fillna("unknown")):
        assert rows[sex]["n_with_finding"] == len(grp)
        assert rows[sex]["rate"] == pytest.approx((grp["p_No Finding"] >= t).mean())


def test_labels_count_the_derived_no_finding(prepared):
    m = _manifest(prepared)
    comp = composition(m, ["No Finding"], LabelPolicy())
    want = _expected_no_finding(m)
    for split in ("train", "valid", "test"):
        kept = want[(m["split"] == split).to_numpy()].dropna()
        combos = comp["splits"][split]["combinations"]
        assert combos.get("0", 0) == int((kept == 0).sum())
        assert combos.get("1", 0) == int((kept == 1).sum())


def test_an_edited_predictions_file_is_refused_by_the_audit_and_the_report(run, tmp_path):
    """The record keeps predictions.csv's sha256: an edited file (here one probability) would be
    audited and reported under metrics it no longer matches."""
    import hashlib
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    record = json.loads((copy / "record.json").read_text())
    pred_csv = copy / "predictions.csv"
    assert record["predictions_sha256"] == hashlib.sha256(pred_csv.read_bytes()).hexdigest()
    pred = pd.read_csv(pred_csv, dtype={"image": str, "patient_id": str})
    pred.loc[0, "p_Edema"] = 1 - pred.loc[0, "p_Edema"]
    pred.to_csv(pred_csv, index=False)
    for args in (
        ["audit", str(copy), "--by", "sex"],
        ["report", str(copy), "--out", str(tmp_path / "r")],
    ):
        res = runner.invoke(app, args)
        assert res.exit_code != 0, (args, res.output)
        assert "changed since the run wrote it" in res.output, res.output
