"""`fastcxr evaluate` (issue 14, item 1): a finished run applied to another dataset.

Evaluated on its own manifest and test split, a run gives back its recorded test metrics; on a
second synthetic dataset (another seed) every number is recomputed here from the written
predictions.csv and the manifest with sklearn / numpy / a hand loop, not with fastcxr."""

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.errors import UsageError
from fastcxr.evaluate.external import evaluate_run

runner = CliRunner()
FINDINGS = ("Edema", "Pleural Effusion")


def _cli(*args, code: int = 0):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == code, res.output
    return res


def _one_line_error(res, *words: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def run(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ext-runs")
    _cli("train", "--formulation", "multilabel", "--data", prepared, *TINY_TRAIN,
         "--epochs", "2", "--stages", "all", "--loader", "datablock", "--precision", "fp32",
         "--runs", runs, "--name", "ml")  # fmt: skip
    return runs / "ml"


@pytest.fixture(scope="module")
def external(tmp_path_factory):
    """A second synthetic MIMIC-CXR (seed 1), prepared at the run's 32 px."""
    root = tmp_path_factory.mktemp("ext")
    _cli("prepare", "synthetic", root / "raw", "--patients", 50, "--seed", 1, "--rows", 96,
         "--cols", 80, "--workers", 1)  # fmt: skip
    _cli("prepare", "mimic", root / "raw", "--out", root / "other-32", "--size", 32,
         "--workers", 1)  # fmt: skip
    return root / "other-32"


def _manifest(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "manifest.csv", dtype={"image": str, "patient_id": str})


def _predictions(folder) -> pd.DataFrame:
    return pd.read_csv(folder / "predictions.csv", dtype={"image": str, "patient_id": str})


@pytest.mark.slow
def test_own_manifest_and_test_split_reproduce_the_record(run, prepared):
    with pytest.raises(UsageError, match="the run's own dataset"):  # not an external validation
        evaluate_run(run, prepared / "manifest.csv", name="own", device="cpu")
    r = evaluate_run(run, prepared / "manifest.csv", name="own", device="cpu", allow_overlap=True)
    r = r.to_json()  # the JSON `evaluate --json` prints
    assert r["external"] is False and r["overlap"]["own_dataset"] is True
    recorded = json.loads((run / "metrics.json").read_text())["findings"]
    for f in FINDINGS:
        got, want = r["findings"][f], recorded[f]
        assert (got["n"], got["positives"]) == (want["n"], want["positives"])
        for k in ("auc", "accuracy", "sensitivity", "specificity", "accuracy_at_0.5", "threshold"):
            assert got[k] == pytest.approx(want[k], abs=1e-6), (f, k)
        assert got["confusion"] == want["confusion"]
        assert r["internal"][f]["auc"] == pytest.approx(want["auc"], abs=1e-12)
    ours = _predictions(run / "evaluations" / "own")
    rec = _predictions(run)
    rec = rec[rec["split"] == "test"].reset_index(drop=True)
    assert list(ours["image"]) == list(rec["image"]) and (ours["split"] == "test").all()
    for f in FINDINGS:
        pd.testing.assert_series_equal(ours[f"y_{f}"], rec[f"y_{f}"])
        np.testing.assert_allclose(ours[f"p_{f}"], rec[f"p_{f}"], atol=1e-5, rtol=0)
    assert r["preprocessing_mismatch"] == [] and r["images"]["unreadable"] == 0
    assert r["precision"] == "fp32" and r["split"] == "test"


def _ece(y: np.ndarray, p: np.ndarray) -> float:
    """10 equal-width bins [k/10, (k+1)/10), the last one closed; weighted |rate − mean p|."""
    total = 0.0
    for k in range(10):
        lo, hi = k / 10, (k + 1) / 10
        inside = (p >= lo) & ((p < hi) if k < 9 else (p <= hi))
        if inside.any():
            total += inside.sum() * abs(y[inside].mean() - p[inside].mean())
    return total / len(y)


def _bootstrap_ci(y, p, patients, n_boot=2000, seed=0):
    """Percentile CI of the AUC over patient resamples (patients drawn with replacement, all
    their images together, one-class resamples skipped); each resample's AUC from its
    definition: the weighted share of (positive, negative) pairs ranked right, ties 1/2."""
    uniq, inverse = np.unique(np.asarray(patients, str), return_inverse=True)
    rng = np.random.default_rng(seed)
    w = rng.multinomial(len(uniq), np.full(len(uniq), 1 / len(uniq)), size=n_boot)[:, inverse]
    pos, neg = p[y == 1], p[y == 0]
    right = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    wp, wn = w[:, y == 1].astype(float), w[:, y == 0].astype(float)
    both = (wp.sum(1) > 0) & (wn.sum(1) > 0)
    aucs = np.einsum("bi,ij,bj->b", wp, right, wn)[both] / (wp.sum(1) * wn.sum(1))[both]
    return np.quantile(aucs, [0.025, 0.975])


def test_external_dataset_metrics_recomputed_independently(run, external):
    res = _cli("evaluate", run, "--data", external, "--json")
    out = json.loads(res.stdout)
    assert out["name"] == "other-32-test"
    folder = run / "evaluations" / "other-32-test"
    m = json.loads((folder / "metrics.json").read_text())
    assert out["findings"] == m["findings"] and out["dir"] == str(folder)
    cfg = json.loads((run / "config.json").read_text())
    assert (
        m["manifest_sha256"] == hashlib.sha256((external / "manifest.csv").read_bytes()).hexdigest()
    )
    assert m["thresholds"]["values"] == cfg["thresholds"]["values"]
    assert m["preprocessing"]["run"] == cfg["preprocessing"] and m["preprocessing_mismatch"] == []
    assert (
        m["preprocessing"]["dataset"]["size"] == 32
        and "10 equal-width bins" in m["calibration_method"]
    )
    pred = _predictions(folder)
    test = _manifest(external)
    test = test[test["split"] == "test"]
    assert (pred["split"] == "test").all()
    for f in FINDINGS:
        certain = test[test[f].isin([0, 1])]
        rows = pred[pred[f"y_{f}"].notna()]
        assert sorted(rows["image"]) == sorted(certain["image"])
        truth = certain.set_index("image")[f].loc[rows["image"]].to_numpy(int)
        y, p = rows[f"y_{f}"].to_numpy(int), rows[f"p_{f}"].to_numpy(float)
        assert (y == truth).all()
        e = m["findings"][f]
        assert (e["n"], e["positives"]) == (len(certain), int((certain[f] == 1).sum()))
        assert e["patients"] == certain["patient_id"].nunique()
        assert 0 < e["positives"] < e["n"], "the test needs both classes"
        assert e["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
        lo, hi = _bootstrap_ci(y, p, rows["patient_id"])
        assert e["auc_ci"] == pytest.approx([lo, hi], abs=1e-9)
        t = cfg["thresholds"]["values"][f]
        d = p >= t
        assert e["threshold"] == t
        assert e["accuracy"] == pytest.approx((d == y).mean())
        assert e["sensitivity"] == pytest.approx(d[y == 1].mean())
        assert e["specificity"] == pytest.approx((~d)[y == 0].mean())
        assert e["accuracy_at_0.5"] == pytest.approx(((p >= 0.5) == y).mean())
        assert e["brier"] == pytest.approx(np.mean((p - y) ** 2), abs=1e-12)
        assert e["ece"] == pytest.approx(_ece(y, p), abs=1e-12)
    # images scored for no finding are not read; the others are all there
    scored = test[test[list(FINDINGS)].isin([0, 1]).any(axis=1)]
    assert sorted(pred["image"]) == sorted(scored["image"])
    assert m["images"] == {"in_split": len(test), "unscored": len(test) - len(scored),
                           "read": len(scored), "unreadable": 0}  # fmt: skip


def test_refusals_are_one_line(run, external, tmp_path):
    bad_split = ["evaluate", str(run), "--data", str(external), "--split", "train"]
    _one_line_error(runner.invoke(app, bad_split), "--split", "test, valid, all")
    no_edema = tmp_path / "no-edema"
    no_edema.mkdir()
    _manifest(external).drop(columns=["Edema"]).to_csv(no_edema / "manifest.csv", index=False)
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(no_edema)])
    _one_line_error(res, "no labels for Edema", "it has:", "Pleural Effusion", "Cardiomegaly")
    assert not (run / "evaluations" / "no-edema-test").exists()
    args = ["evaluate", str(run), "--data", str(external), "--split", "valid", "--name", "v"]
    _cli(*args)
    _one_line_error(runner.invoke(app, args), "exists", "--overwrite")
    before = (run / "evaluations" / "v" / "metrics.json").stat().st_mtime_ns
    _cli(*args, "--overwrite")
    assert (run / "evaluations" / "v" / "metrics.json").stat().st_mtime_ns != before
    assert not [p for p in (run / "evaluations").iterdir() if p.name.startswith(".")]
    _one_line_error(runner.invoke(app, ["evaluate", str(run), "--data", str(external),
                                        "--name", "../x"]), "--name")  # fmt: skip


def test_default_names_of_two_same_named_dataset_folders_do_not_collide(run, external, tmp_path):
    a, b = tmp_path / "site-a" / "prepared-32", tmp_path / "site-b" / "prepared-32"
    for d in (a, b):
        shutil.copytree(external, d)
    _cli("evaluate", run, "--data", a, "--split", "valid")
    _cli("evaluate", run, "--data", b, "--split", "valid")
    made = {}
    for name in ("prepared-32-valid", "site-b-prepared-32-valid"):
        metrics = json.loads((run / "evaluations" / name / "metrics.json").read_text())
        made[name] = Path(metrics["manifest"]).resolve()
    assert made == {"prepared-32-valid": (a / "manifest.csv").resolve(),
                    "site-b-prepared-32-valid": (b / "manifest.csv").resolve()}  # fmt: skip
    # the same dataset again keeps its name: refused without --overwrite, replaced with it
    _one_line_error(runner.invoke(app, ["evaluate", str(run), "--data", str(a), "--split",
                                        "valid"]), "prepared-32-valid", "exists")  # fmt: skip
    _cli("evaluate", run, "--data", b, "--split", "valid", "--overwrite")
    assert sorted(p.name for p in (run / "evaluations").iterdir() if "prepared" in p.name) == [
        "prepared-32-valid", "site-b-prepared-32-valid"]  # fmt: skip


def test_intensity_mismatch_and_unreadable_images_are_recorded(run, external, tmp_path):
    other = tmp_path / "jpg-like"
    shutil.copytree(external, other)
    info = json.loads((other / "prepare.json").read_text())
    (other / "prepare.json").write_text(json.dumps({**info, "intensity": "mimic-jpg"}))
    test = _manifest(other)
    test = test[(test["split"] == "test") & test["Edema"].isin([0, 1])]
    broken = test["image"].iloc[0]
    (other / broken).write_bytes(b"not a png")
    r = evaluate_run(run, other, name="jpg", device="cpu").to_json()
    assert len(r["preprocessing_mismatch"]) == 1 and "intensity" in r["preprocessing_mismatch"][0]
    assert r["images"]["unreadable"] == 1 and r["failures"][0]["image"] == broken
    assert r["findings"]["Edema"]["n"] == len(test) - 1
    folder = run / "evaluations" / "jpg"
    assert broken not in set(_predictions(folder)["image"])
    assert list(pd.read_csv(folder / "failures.csv")["image"]) == [broken]


@pytest.mark.slow
def test_compare_folder_and_report(run, external, tmp_path):
    from fastcxr.evaluate.evaluation import EvalConfig, evaluate

    cmp = tmp_path / "cmp"
    for form in ("single", "multilabel"):  # two formulation runs, cheaply: copies of one
        shutil.copytree(run, cmp / form, ignore=shutil.ignore_patterns("evaluations"))
    (cmp / "compare.json").write_text(json.dumps({"formulations": ["single", "multilabel"]}))
    res = _cli("evaluate", cmp, "--data", external, "--name", "ext")
    assert res.stdout.count("external AUC") == 2 and "Pleural Effusion" in res.stdout
    summary = json.loads((cmp / "evaluations" / "ext" / "summary.json").read_text())
    assert set(summary["runs"]) == {"single", "multilabel"}
    for form in ("single", "multilabel"):
        m = json.loads((cmp / form / "evaluations" / "ext" / "metrics.json").read_text())
        assert summary["runs"][form]["findings"]["Edema"]["auc"] == m["findings"]["Edema"]["auc"]
    # the subgroup audit (issue 14, item 3) of every formulation, and of their evaluation
    res = _cli("audit", cmp, "--by", "sex,view", "--json")
    assert set(json.loads(res.stdout)["runs"]) == {"single", "multilabel"}
    res = _cli("audit", cmp, "--evaluation", "ext", "--by", "sex", "--json")
    ev_audit = json.loads(res.stdout)["runs"]["single"]
    assert ev_audit["kind"] == "evaluation" and ev_audit["manifest"] == str(
        (external / "manifest.csv").resolve())  # fmt: skip
    ext_test = _manifest(external).astype({"sex": str})
    ext_test = ext_test[(ext_test["split"] == "test") & ext_test["Edema"].isin([0, 1])]
    got = {s["subgroup"]: (s["n"], s["positives"])
           for s in ev_audit["findings"]["Edema"]["by"]["sex"]}  # fmt: skip
    want = {
        sex: (len(g), int((g["Edema"] == 1).sum()))
        for sex, g in ext_test.groupby(ext_test["sex"].replace("nan", "unknown"))
    }
    assert got == want
    _cli("report", cmp, "--out", tmp_path / "fig")
    md = (tmp_path / "fig" / "results.md").read_text()
    assert "## External validation" in md and "### ext" in md and "Paired comparisons" in md
    assert "## Subgroup audit" in md and "### single/ext" in md and "### multilabel\n" in md
    assert (tmp_path / "fig" / "tpr_gaps_single_ext.png").exists()
    ev = evaluate(_predictions(run), FINDINGS, EvalConfig(),
                  json.loads((run / "config.json").read_text())["thresholds"])  # fmt: skip
    m = json.loads((cmp / "single" / "evaluations" / "ext" / "metrics.json").read_text())
    for f in FINDINGS:
        lo, hi = ev[f]["auc_ci"]
        ext = m["findings"][f]
        row = (f"| single | {f} | {ev[f]['auc']:.3f} [{lo:.3f}–{hi:.3f}] | {ext['auc']:.3f} "
               f"[{ext['auc_ci'][0]:.3f}–{ext['auc_ci'][1]:.3f}] | {ext['n']} | "
               f"{ext['positives']} |")  # fmt: skip
        assert row in md, (row, md)


def test_findings_match_through_the_vocabulary(tmp_path):
    from fastcxr.errors import UsageError
    from fastcxr.evaluate.external import finding_columns

    df = pd.DataFrame(columns=["image", "patient_id", "split", "Effusion", "pulmonary edema"])
    got = finding_columns(df, FINDINGS, tmp_path / "manifest.csv")
    assert got == {"Edema": "pulmonary edema", "Pleural Effusion": "Effusion"}
    with pytest.raises(UsageError, match=r"no labels for Edema.*it has: Pleural Effusion$"):
        finding_columns(df.drop(columns=["pulmonary edema"]), FINDINGS, tmp_path / "m.csv")


def test_renderer_on_a_hand_made_result():
    from fastcxr.cli import render

    one_class = {"n": 10, "positives": 0, "threshold": 0.4, "accuracy": 0.9, "sensitivity": None,
                 "specificity": 0.9, "auc": None, "auc_ci": None, "ece": 0.1, "brier": 0.2,
                 "auc_ci_reason": "one class in the test set",
                 "reason": "one class in the test set: AUC undefined"}  # fmt: skip
    method = "percentile bootstrap over patients (2000 resamples)"
    fine = {**one_class, "positives": 4, "sensitivity": 0.5, "auc": 0.75, "auc_ci": [0.6, 0.9],
            "reason": None, "auc_ci_method": method}  # fmt: skip
    result = {"run": "/r/ml", "name": "x-test", "manifest": "/d/m.csv", "split": "test",
              "dir": "/r/ml/evaluations/x-test", "findings": {"Pleural Effusion": fine,
                                                              "Edema": one_class},
              "internal": {"Edema": {"auc": 0.8, "auc_ci": [0.7, 0.9]}},
              "preprocessing_mismatch": ["intensity: voi against mimic-jpg"],
              "images": {"unreadable": 2}}  # fmt: skip
    page = render.evaluation(result)
    cells = [list(c.cells) for c in page.stdout[0].columns]
    assert cells[0] == ["Pleural Effusion", "Edema"]
    assert cells[1] == ["undefined (not scored)", "0.800\n[0.700–0.900]"]
    assert cells[2][0] == "0.750\n[0.600–0.900]" and cells[2][1].startswith("undefined (one class")
    assert cells[7] == ["0.500", "undefined (no positive image)"]
    err = " ".join(map(str, page.stderr))
    assert "preprocessing mismatch" in err and "2 unreadable" in err
    assert "2000 resamples" in " ".join(map(str, page.stdout[1:]))


# -- not external (#22 item 6) -------------------------------------------------------------------
def _train_rows_as_test(prepared, folder):
    """The run's own training rows relabelled test, in a folder whose images are a symlink to
    the prepared images (other path strings, the same files)."""
    folder.mkdir()
    m = _manifest(prepared)
    rows = m[m["split"] == "train"].head(40).assign(split="test")
    for top in {Path(p).parts[0] for p in rows["image"]}:
        (folder / top).symlink_to(prepared / top, target_is_directory=True)
    rows.to_csv(folder / "manifest.csv", index=False)
    return rows


def test_the_runs_own_training_images_are_not_an_external_validation(run, prepared, tmp_path):
    rows = _train_rows_as_test(prepared, tmp_path / "own")
    args = ["evaluate", str(run), "--data", str(tmp_path / "own"), "--name", "own-train"]
    _one_line_error(runner.invoke(app, args), "not an external validation",
                    f"{len(rows)} image(s)", "--allow-overlap")  # fmt: skip
    assert not (run / "evaluations" / "own-train").exists()
    res = runner.invoke(app, [*args, "--allow-overlap", "--json"])
    assert res.exit_code == 0, res.output
    m = json.loads((run / "evaluations" / "own-train" / "metrics.json").read_text())
    assert m["external"] is False and m["overlap"]["images"] == len(rows)
    assert m["overlap"]["patients"] == rows["patient_id"].nunique()
    res = runner.invoke(app, [*args, "--allow-overlap", "--overwrite"])
    assert "not an external validation" in res.stderr and "NOT external" in res.stdout


def test_a_copy_of_a_training_image_and_a_training_patient_are_found(run, prepared, external,
                                                                     tmp_path):  # fmt: skip
    folder = tmp_path / "ext"
    shutil.copytree(external, folder)
    ext = _manifest(folder)
    test = ext.index[ext["split"] == "test"]
    own = _manifest(prepared)
    train = own[own["split"] == "train"].iloc[0]
    # one test image replaced by a byte-identical copy of a training image
    shutil.copyfile(prepared / train["image"], folder / ext.loc[test[0], "image"])
    # one test patient renamed to a training patient, spelled with a leading zero
    pid = str(own[own["split"] == "train"]["patient_id"].iloc[5])
    ext.loc[ext["patient_id"] == ext.loc[test[1], "patient_id"], "patient_id"] = "0" + pid
    ext.to_csv(folder / "manifest.csv", index=False)
    res = runner.invoke(app, ["evaluate", str(run), "--data", str(folder), "--name", "mixed"])
    _one_line_error(res, "1 image(s) and 1 patient(s)", "identical content", f"patient 0{pid}")


def test_an_evaluation_being_written_locks_its_name(run, external):
    """#22 item 11: two `evaluate --name c` at once both said "written" and one was lost."""
    from fastcxr.runtime.runs import RunLock

    with RunLock(run / "evaluations" / "busy"):  # another process evaluating under that name
        res = runner.invoke(app, ["evaluate", str(run), "--data", str(external), "--name",
                                  "busy"])  # fmt: skip
    _one_line_error(res, "being written by another fastcxr process")
    assert not (run / "evaluations" / "busy").exists()
    _cli("evaluate", run, "--data", external, "--name", "busy")  # free again: it runs
    assert not list((run / "evaluations").glob(".busy.lock"))


def _copy_run(run, tmp_path, manifest):
    """The run, copied, its config pointing at `manifest` (as if its data had moved)."""
    import shutil

    copy = tmp_path / "run-copy"
    shutil.copytree(run, copy)
    cfg = json.loads((copy / "config.json").read_text())
    cfg["data"]["manifest"] = str(manifest)
    (copy / "config.json").write_text(json.dumps(cfg))
    return copy


def test_an_overlap_that_cannot_be_checked_is_not_called_external(run, prepared, external,
                                                                   tmp_path):  # fmt: skip
    """The run's manifest moved, or re-split since training (its sha256 differs from the
    record's): the overlap check cannot run, so the evaluation is refused, or recorded as not
    external with --allow-overlap — never "external validation" by default."""
    gone = _copy_run(run, tmp_path, tmp_path / "moved" / "manifest.csv")
    with pytest.raises(UsageError, match=r"cannot check .* cannot be read"):
        evaluate_run(gone, external / "manifest.csv", name="x", device="cpu")
    resplit = tmp_path / "resplit"
    resplit.mkdir()
    df = pd.read_csv(prepared / "manifest.csv")
    df["split"] = df["split"].map({"train": "test", "test": "train"}).fillna(df["split"])
    df.to_csv(resplit / "manifest.csv", index=False)
    changed = _copy_run(run, tmp_path / "b", resplit / "manifest.csv")
    with pytest.raises(UsageError, match=r"changed since training \(sha256"):
        evaluate_run(changed, external / "manifest.csv", name="x", device="cpu")
    r = evaluate_run(changed, external / "manifest.csv", name="x", device="cpu",
                     allow_overlap=True)  # fmt: skip
    assert r.external is False and r.overlap.checked is False


def test_a_default_name_from_a_long_folder_name_fits_the_name_rule(tmp_path):
    """#22 checker: a 200-character dataset folder gave a default evaluation name over 120
    characters, refused as if the user's --name were too long."""
    from fastcxr.evaluate.external import _check_name, default_name

    folder = tmp_path / ("chest_xray_external_site_" * 8)
    folder.mkdir()
    (folder / "manifest.csv").write_text("image\n")
    name = default_name(folder / "manifest.csv", "test")
    assert len(name) <= 120 and _check_name(name) == name
    assert name.endswith("-site-test")  # the split, and the words nearest the manifest
    assert set(name.split("-")) <= {"chest", "xray", "external", "site", "test"}  # no cut word
