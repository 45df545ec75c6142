"""`fastcxr audit` (issue 14, item 3): a run's test predictions by subgroup.

The audit reads a run record, not a model, so most tests build the record by hand: the session
manifest's test split with predictions drawn here and thresholds chosen here. Every count,
rate, AUC and gap is recomputed with pandas / sklearn / a hand loop over patient resamples,
never with fastcxr. The end-to-end path on a trained run and an evaluation is in
tests/test_external.py, which has both."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.errors import UsageError
from fastcxr.evaluate.audit import audit_run, parse_age_bins
from fastcxr.evaluate.stats import bootstrap_weights

runner = CliRunner()
FINDINGS = ("Edema", "Pleural Effusion", "No Finding")
T = {"Edema": 0.45, "Pleural Effusion": 0.6, "No Finding": 0.5}


def _manifest(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "manifest.csv", dtype={"image": str, "patient_id": str,
                                                       "sex": str, "race": str})  # fmt: skip


def _record(folder, manifest_csv, thresholds=T, seed=0):
    """A complete run folder holding what `fastcxr audit` reads: the test images of
    `manifest_csv` with certain labels and probabilities that carry some signal."""
    m = _manifest(manifest_csv.parent)
    test = m[m["split"] == "test"].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    pred = test[["image", "patient_id"]].copy()
    pred.insert(0, "split", "test")
    for f in FINDINGS:
        y = test[f].where(test[f].isin([0, 1]))
        pred[f"y_{f}"] = pd.array(y.to_numpy(float), dtype="Int64")
        p = np.clip(0.35 * y.fillna(0.5).to_numpy() + rng.uniform(0, 0.65, len(y)), 0, 1)
        pred[f"p_{f}"] = p
    valid = pred.iloc[:3].assign(split="valid")  # the audit reads the test rows only
    folder.mkdir(parents=True)
    pd.concat([pred, valid]).to_csv(folder / "predictions.csv", index=False)
    (folder / "config.json").write_text(json.dumps({
        "data": {"manifest": str(manifest_csv), "sha256": None},
        "thresholds": {"method": "youden", "values": thresholds}}))  # fmt: skip
    (folder / "metrics.json").write_text("{}")
    (folder / "record.json").write_text(json.dumps({"complete": True}))
    return folder


@pytest.fixture
def manifest(prepared, tmp_path):
    """The session's prepared manifest, No Finding labelled 0 where a finding is present
    (as CheXpert's labeller does), so underdiagnosis has images with a finding."""
    df = _manifest(prepared)
    has = (df[["Edema", "Pleural Effusion"]] == 1).any(axis=1)
    df.loc[has, "No Finding"] = 0
    out = tmp_path / "data"
    out.mkdir()
    df.to_csv(out / "manifest.csv", index=False)
    return out / "manifest.csv"


def _joined(run, manifest_csv) -> pd.DataFrame:
    pred = pd.read_csv(run / "predictions.csv", dtype={"image": str, "patient_id": str})
    pred = pred[pred["split"] == "test"]
    m = _manifest(manifest_csv.parent).drop(columns=["patient_id", "split", *FINDINGS])
    return pred.merge(m, on="image", how="left", validate="one_to_one")


def _groups(df: pd.DataFrame, attribute: str) -> pd.Series:
    if attribute == "age":
        cut = pd.cut(df["age"], [0, 20, 40, 60, 80, np.inf], right=False,
                     labels=["0-19", "20-39", "40-59", "60-79", "80+"])  # fmt: skip
        return cut.astype(object).where(df["age"].notna(), "unknown")
    v = df[attribute].fillna("").astype(str).str.strip()
    return v.where(v != "", "unknown")


def _gap_ci(y, hit, patients, sub, n_boot=2000, seed=0):
    """The gap's percentile CI: each patient resample (the bootstrap's own multiplicities)
    expanded into images with np.repeat, then TPR(subgroup) − TPR(all) from its definition."""
    w = bootstrap_weights(patients, n_boot, seed)
    gaps = []
    idx = np.arange(len(y))
    for wi in w:
        take = np.repeat(idx, wi)
        pos = take[y[take] == 1]
        pos_sub = pos[sub[pos]]
        if len(pos_sub) == 0:
            continue
        gaps.append(hit[pos_sub].mean() - hit[pos].mean())
    return np.quantile(gaps, [0.025, 0.975])


def test_counts_rates_aucs_and_gaps_equal_pandas(manifest, tmp_path):
    run = _record(tmp_path / "run", manifest)
    a = audit_run(run, min_size=8).to_json()  # the JSON `audit --json` prints
    df = _joined(run, manifest)
    assert a["by"] == ["sex", "age", "race", "view"]
    checked_ci = 0
    for f in FINDINGS:
        scored = df[df[f"y_{f}"].notna()].reset_index(drop=True)
        y, p = scored[f"y_{f}"].to_numpy(int), scored[f"p_{f}"].to_numpy(float)
        hit = p >= T[f]
        whole = a["findings"][f]["all"]
        assert (whole["n"], whole["positives"]) == (len(y), int(y.sum()))
        assert whole["tpr"] == pytest.approx(hit[y == 1].mean())
        assert whole["fpr"] == pytest.approx(hit[y == 0].mean())
        for attr in ("sex", "age", "race", "view"):
            g = _groups(scored, attr)
            got = {s["subgroup"]: s for s in a["findings"][f]["by"][attr]}
            assert set(got) == set(g.unique()), (f, attr)
            for name, s in got.items():
                sub = (g == name).to_numpy()
                ys, hs = y[sub], hit[sub]
                assert s["n"] == sub.sum() and s["positives"] == ys.sum(), (f, attr, name)
                assert s["patients"] == scored.loc[sub, "patient_id"].nunique()
                assert s["prevalence"] == pytest.approx(ys.mean())
                assert s["small"] == (sub.sum() < 8)
                if 0 < ys.sum() < len(ys):
                    assert s["auc"] == pytest.approx(roc_auc_score(ys, p[sub]), abs=1e-12)
                else:
                    assert s["auc"] is None and s["reasons"]["auc"] == "one class in the subgroup"
                if ys.sum():
                    assert s["tpr"] == pytest.approx(hs[ys == 1].mean())
                    assert s["tpr_gap"] == pytest.approx(hs[ys == 1].mean() - hit[y == 1].mean())
                else:
                    assert s["tpr"] is None and s["tpr_gap"] is None
                    assert s["reasons"]["tpr"] == "no positive image"
                if (ys == 0).any():
                    assert s["fpr"] == pytest.approx(hs[ys == 0].mean())
                if s["tpr_gap_ci"] is not None and checked_ci < 6:
                    lo, hi = _gap_ci(y, hit, scored["patient_id"].to_numpy(), sub)
                    assert s["tpr_gap_ci"] == pytest.approx([lo, hi], abs=1e-12)
                    checked_ci += 1
    assert checked_ci == 6
    # underdiagnosis: FPR of No Finding (images with a finding called normal), per subgroup
    nf = df[df["y_No Finding"].notna()]
    ill = nf[nf["y_No Finding"] == 0]
    for s in a["underdiagnosis"]["sex"]:
        rows = ill[_groups(ill, "sex") == s["subgroup"]]
        assert s["n_with_finding"] == len(rows)
        if len(rows):
            assert s["rate"] == pytest.approx((rows["p_No Finding"] >= 0.5).mean())
        if s["gap"] is not None and s["gap_ci"] is None:  # a missing CI says why
            assert s["gap_ci_reason"], s
    assert len(ill) > 0 and a["underdiagnosis_rule"].startswith("underdiagnosis = FPR")


def test_written_atomically_beside_the_predictions(manifest, tmp_path):
    run = _record(tmp_path / "run", manifest)
    res = runner.invoke(app, ["audit", str(run), "--by", "sex,view", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    folder = run / "audit"
    saved = json.loads((folder / "audit.json").read_text())
    assert out["findings"] == saved["findings"] and saved["by"] == ["sex", "view"]
    csv = pd.read_csv(folder / "subgroups.csv")
    by = {f: saved["findings"][f]["by"] for f in FINDINGS}
    want = sum(1 + len(by[f]["sex"]) + len(by[f]["view"]) for f in FINDINGS)  # "all" once
    assert len(csv) == want and (folder / "tpr_gaps.png").stat().st_size > 1000
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    res = runner.invoke(app, ["audit", str(run), "--by", "view"])  # replaced, whole
    assert res.exit_code == 0, res.output
    assert json.loads((folder / "audit.json").read_text())["by"] == ["view"]
    assert "subgroup audit" in res.stdout and "underdiagnosis" in res.stdout


def test_custom_age_bins_and_no_no_finding(manifest, tmp_path):
    t = {k: v for k, v in T.items() if k != "No Finding"}
    run = _record(tmp_path / "run", manifest, thresholds=t)
    pred = pd.read_csv(run / "predictions.csv")
    pred.drop(columns=["y_No Finding", "p_No Finding"]).to_csv(run / "predictions.csv",
                                                             index=False)  # fmt: skip
    a = audit_run(run, by=["age"], age_bins="30,65", write=False).to_json()
    df = _joined(run, manifest)
    scored = df[df["y_Edema"].notna()]
    age = scored["age"]
    want = {"<30": (age < 30).sum(), "30-64": ((age >= 30) & (age < 65)).sum(),
            "65+": (age >= 65).sum(), "unknown": age.isna().sum()}  # fmt: skip
    got = {s["subgroup"]: s["n"] for s in a["findings"]["Edema"]["by"]["age"]}
    assert got == {k: v for k, v in want.items() if v}
    assert a["underdiagnosis"] is None and "does not predict No Finding" in a["underdiagnosis_rule"]
    assert parse_age_bins("0,18.5,65") == (0, 18.5, 65)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--by", "hospital"], ["no column 'hospital'", "it has:"]),
        (["--by", "patient_id"], ["patient_id is not a subgroup attribute"]),
        (["--by", "Edema"], ["Edema is a finding label, not a patient attribute"]),
        (["--age-bins", "40,20"], ["--age-bins", "increase"]),
        (["--age-bins", "a,b"], ["--age-bins"]),
        (["--min-size", "0"], ["--min-size"]),
        (["--evaluation", "nope"], ["no evaluation 'nope'"]),
    ],
)
def test_bad_options_are_one_line(manifest, tmp_path, args, words):
    run = _record(tmp_path / "run", manifest)
    res = runner.invoke(app, ["audit", str(run), *args])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0]
    assert not (run / "audit").exists()


def test_wrong_or_bare_manifest_is_refused(manifest, tmp_path):
    run = _record(tmp_path / "run", manifest)
    bare = tmp_path / "bare"
    bare.mkdir()
    _manifest(manifest.parent).drop(columns=["sex", "age", "race", "view"]).to_csv(
        bare / "manifest.csv", index=False)  # fmt: skip
    with pytest.raises(UsageError, match="no values for sex, age, race, view"):
        audit_run(run, data=bare, write=False)
    other = tmp_path / "other"
    other.mkdir()
    m = _manifest(manifest.parent)
    m = m[m["split"] != "test"]
    m.to_csv(other / "manifest.csv", index=False)
    with pytest.raises(UsageError, match="not in the manifest"):
        audit_run(run, data=other, write=False)
    moved = tmp_path / "moved"
    shutil.copytree(manifest.parent, moved)
    manifest.unlink()
    with pytest.raises(UsageError, match="--data"):
        audit_run(run, write=False)
    assert audit_run(run, data=moved, write=False).findings["Edema"].all.n > 0


def test_report_includes_the_audit_and_flags_a_stale_one(manifest, tmp_path):
    from fastcxr.evaluate.report import audit_markdown, subgroup_audits

    run = _record(tmp_path / "run", manifest)
    audit_run(run, by=["sex"])
    audits = subgroup_audits({"run": run})
    assert list(audits) == ["run"] and not audits["run"]["stale"]
    md = "\n".join(audit_markdown(audits))
    assert "## Subgroup audit" in md and "| Edema | sex | F" in md
    pred = pd.read_csv(run / "predictions.csv")
    pred["p_Edema"] = 1 - pred["p_Edema"]
    pred.to_csv(run / "predictions.csv", index=False)
    audits = subgroup_audits({"run": run})
    assert audits["run"]["stale"] and "**stale**" in "\n".join(audit_markdown(audits))


def test_a_subgroup_whose_tpr_cannot_vary_gets_no_gap_ci(manifest, tmp_path):
    """Every positive of the view=AP subgroup detected: the subgroup's TPR is 1 in every
    resample, so a percentile CI of the gap would only show the whole set's spread."""
    run = _record(tmp_path / "run", manifest)
    pred = pd.read_csv(run / "predictions.csv", dtype={"image": str, "patient_id": str})
    m = _manifest(manifest.parent).set_index("image")
    ap = (m.loc[pred["image"], "view"] == "AP").to_numpy()
    pred.loc[ap & (pred["y_Edema"] == 1).to_numpy(), "p_Edema"] = 0.99
    pred.to_csv(run / "predictions.csv", index=False)
    a = audit_run(run, by=["view"], write=False).to_json()
    s = {g["subgroup"]: g for g in a["findings"]["Edema"]["by"]["view"]}["AP"]
    assert s["tpr"] == 1.0 and s["tpr_gap"] > 0 and s["tpr_gap_ci"] is None
    assert "is 1 in every resample" in s["reasons"]["tpr_gap_ci"]


def test_a_new_audit_says_it_replaces_the_previous_one(manifest, tmp_path):
    run = _record(tmp_path / "run", manifest)
    first = runner.invoke(app, ["audit", str(run), "--by", "sex"])
    assert first.exit_code == 0 and "replaced" not in first.stderr
    created = json.loads((run / "audit" / "audit.json").read_text())["created"]
    res = runner.invoke(app, ["audit", str(run), "--by", "age", "--json"])
    assert res.exit_code == 0, res.output
    warn = json.loads(res.stdout)["warnings"]
    assert warn == [f"replaced the previous audit in {run / 'audit'} (written {created}; by sex)"]
