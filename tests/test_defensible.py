"""Numbers a reviewer can defend (issue 11): thresholds from validation, the best stage
selected, one fixed test set, one recorded preprocessing, no blank patients, undefined
statistics left out of Holm, seed variance. Expected values are computed here, from the
run's own files, with sklearn / numpy / pandas — not with the code under test."""

import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.config import DEMO, Stage
from fastcxr.data import DataError, apply_policy, require_thresholds, scored
from fastcxr.data.dataset import Dataset
from fastcxr.evaluate.evaluation import holm, pairwise, with_holm
from fastcxr.manifest import ManifestError, read_manifest
from fastcxr.predict import Predictor
from fastcxr.study import train_formulation

runner = CliRunner()
FINDINGS = ("Edema", "Pleural Effusion")
CFG = DEMO.replace(size=32, batch_size=16, workers=0, loader="datablock", precision="fp32")


def _cli(*args):
    res = runner.invoke(app, [str(a) for a in args])
    assert res.exit_code == 0, res.output
    return res


def _no_nan(obj) -> bool:
    """True when no float in a JSON-like object is NaN or infinite."""
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_no_nan(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_no_nan(v) for v in obj)
    return True


# -- Holm and undefined statistics -------------------------------------------------------------
def test_holm_leaves_undefined_out_of_the_family():
    # by hand: the family is {0.001, 0.01, 0.02}; 3 x 0.001, 2 x 0.01, max(0.02, 1 x 0.02)
    got = holm([0.001, float("nan"), 0.01, 0.02])
    assert got[1] is None
    np.testing.assert_allclose([got[0], got[2], got[3]], [0.003, 0.02, 0.02], rtol=1e-12)
    assert holm([None, 0.04]) == [None, 0.04]


def test_one_positive_makes_its_pair_undefined_without_poisoning_holm():
    rng = np.random.default_rng(0)
    n = 80
    patients = [f"p{i // 2}" for i in range(n)]
    y_a = (rng.random(n) < 0.4).astype(int)
    y_b = np.zeros(n, int)
    y_b[5] = 1  # one positive image: variance undefined
    sa, sb = rng.random(n) + y_a, rng.random(n) + y_a * 0.5
    one = pd.DataFrame({"split": "test", "image": [f"i{i}" for i in range(n)],
                        "patient_id": patients, "y_A": y_a, "p_A": sa, "y_B": y_b,
                        "p_B": rng.random(n)})  # fmt: skip
    two = one.assign(p_A=sb, p_B=rng.random(n))
    pairs = with_holm(pairwise({"x": one, "z": two}, ["A", "B"]))
    a, b = pairs
    assert b["p_value"] is None and b["p_holm"] is None and b["diff_ci"] is None
    assert b["reason"] and "positive" in b["reason"]
    assert a["p_value"] is not None and a["p_holm"] == pytest.approx(a["p_value"])  # family of 1
    assert a["patients"] == n // 2 and "clustered" in a["method"].lower()
    assert _no_nan(pairs) and json.dumps(pairs, allow_nan=False)


# -- the manifest -------------------------------------------------------------------------------
@pytest.mark.parametrize("blank", ["", "   ", None])
def test_blank_patient_ids_are_refused_naming_the_rows(prepared, tmp_path, blank):
    df = pd.read_csv(prepared / "manifest.csv", dtype=str)
    df.loc[[3, 7], "patient_id"] = blank
    p = tmp_path / "manifest.csv"
    df.to_csv(p, index=False)
    with pytest.raises(ManifestError, match=r"blank patient_id \(rows 5, 9\)"):
        read_manifest(p)


# -- one test set -------------------------------------------------------------------------------
def test_label_policy_leaves_the_test_images_unchanged(prepared):
    raw = read_manifest(prepared / "manifest.csv")
    test_raw = raw[raw["split"] == "test"]
    # independently: per finding, the test images whose raw label is 0 or 1
    expected = {f: set(test_raw.loc[test_raw[f].isin([0, 1]), "image"]) for f in FINDINGS}
    assert (test_raw[list(FINDINGS)].isin([-1]) | test_raw[list(FINDINGS)].isna()).any().any()
    for uncertain in ("drop", "zeros", "ones"):
        for blank in ("drop", "zeros"):
            df = apply_policy(raw, CFG.replace(uncertain=uncertain, blank=blank), FINDINGS)
            test = df[df["split"] == "test"]
            for f in FINDINGS:
                got = test[test[scored(f)].notna()]
                assert set(got["image"]) == expected[f], (uncertain, blank, f)
                want = test_raw.set_index("image").loc[got["image"], f].astype(int)
                assert (got[scored(f)].astype(int).to_numpy() == want.to_numpy()).all()


def test_valid_with_one_class_is_refused(prepared):
    raw = read_manifest(prepared / "manifest.csv")
    raw.loc[raw["split"] == "valid", "Edema"] = 0
    with pytest.raises(DataError, match="only class \\[0\\] in the validation split"):
        require_thresholds(apply_policy(raw, CFG, FINDINGS), FINDINGS)


@pytest.mark.slow
def test_runs_with_different_policies_score_the_same_images(prepared, tmp_path):
    recs = []
    for policy in ("drop", "zeros"):
        _cli("train", "--formulation", "multilabel", "--data", prepared, *TINY_TRAIN,
             "--epochs", "1", "--stages", "all", "--no-pretrained", "--uncertain", policy,
             "--blank", policy, "--runs", tmp_path, "--name", policy)  # fmt: skip
        pred = pd.read_csv(tmp_path / policy / "predictions.csv")
        recs.append(pred[pred["split"] == "test"].set_index("image"))
        cfg = json.loads((tmp_path / policy / "config.json").read_text())
        assert "same images for every label policy" in cfg["test_set"]
    a, b = recs
    assert list(a.index) == list(b.index)
    for f in FINDINGS:
        pd.testing.assert_series_equal(a[f"y_{f}"], b[f"y_{f}"])


# -- thresholds and the selected stage ----------------------------------------------------------
@pytest.fixture(scope="module")
def two_stage_run(prepared, tmp_path_factory):
    """head for 2 epochs, then every block at an absurd learning rate: the earlier stage has
    the lower validation loss, so `select=best` must report and save it."""
    stages = (
        Stage("head", "head", max_epochs=2, lr=2e-3),
        Stage("all", "all", max_epochs=1, lr=5.0),
    )
    run = tmp_path_factory.mktemp("sel") / "run"
    summary = train_formulation(Dataset.load(prepared), "multilabel", CFG, run, stages=stages)
    return run, summary


@pytest.mark.slow
def test_selected_stage_is_the_argmin_of_validation_loss(two_stage_run, prepared):
    run, summary = two_stage_run
    hist = pd.read_csv(run / "history.csv")
    best = hist.loc[hist["valid_loss"].idxmin(), "stage"]
    assert summary["selected_stage"] == {"edema+pleural_effusion": best}
    assert best == "head", "the test needs a run whose last stage is not the best"
    side = json.loads((run / "model-edema+pleural_effusion.json").read_text())
    assert side["selected_stage"] == best
    # the reported test predictions are the selected stage's, and the saved weights give them
    metrics = json.loads((run / "metrics.json").read_text())
    pred = pd.read_csv(run / "predictions.csv")
    test = pred[pred["split"] == "test"]
    for f in FINDINGS:
        t = test[test[f"y_{f}"].notna()]
        auc = roc_auc_score(t[f"y_{f}"].astype(int), t[f"p_{f}"])
        assert auc == pytest.approx(metrics["per_stage"][best][f]["auc"])
        assert auc == pytest.approx(summary["findings"][f]["auc"])
    p = Predictor.load(run, device="cpu")
    imgs = np.stack([p.load_image(prepared / i) for i in test["image"]])
    np.testing.assert_allclose(
        p.probabilities(imgs), test[[f"p_{f}" for f in FINDINGS]].to_numpy(), atol=1e-4
    )


@pytest.mark.slow
def test_select_last_keeps_the_last_stage(prepared, tmp_path):
    stages = (
        Stage("head", "head", max_epochs=1, lr=2e-3),
        Stage("all", "all", max_epochs=1, lr=5.0),
    )
    s = train_formulation(
        Dataset.load(prepared), "multilabel", CFG.replace(select="last"), tmp_path, stages=stages
    )
    assert s["selected_stage"] == {"edema+pleural_effusion": "all"}


def _youden_sklearn(y, s) -> float:
    fpr, tpr, thr = roc_curve(y, s)
    return float(thr[int(np.argmax(tpr - fpr))])


def test_thresholds_are_sklearns_youden_point_on_validation(two_stage_run):
    run, summary = two_stage_run
    pred = pd.read_csv(run / "predictions.csv")
    valid, test = pred[pred["split"] == "valid"], pred[pred["split"] == "test"]
    side = json.loads((run / "model-edema+pleural_effusion.json").read_text())
    for f in FINDINGS:
        v = valid[valid[f"y_{f}"].notna()]
        t_expected = _youden_sklearn(v[f"y_{f}"].astype(int), v[f"p_{f}"])
        m = summary["findings"][f]
        assert m["threshold"] == pytest.approx(t_expected, abs=1e-12)
        assert side["thresholds"][f] == pytest.approx(t_expected, abs=1e-12)
        tt = test[test[f"y_{f}"].notna()]
        y, s = tt[f"y_{f}"].astype(int).to_numpy(), tt[f"p_{f}"].to_numpy()
        assert m["accuracy"] == pytest.approx(((s >= t_expected) == y).mean())
        assert m["accuracy_at_0.5"] == pytest.approx(((s >= 0.5) == y).mean())


@pytest.mark.slow
def test_sensitivity_target_threshold(prepared, tmp_path):
    cfg = CFG.replace(threshold="sensitivity", threshold_target=0.8)
    stages = (Stage("all", "all", max_epochs=1, lr=2e-3),)
    s = train_formulation(Dataset.load(prepared), "multilabel", cfg, tmp_path, stages=stages)
    pred = pd.read_csv(tmp_path / "predictions.csv")
    valid = pred[pred["split"] == "valid"]
    for f in FINDINGS:
        v = valid[valid[f"y_{f}"].notna()]
        y, p = v[f"y_{f}"].astype(int).to_numpy(), v[f"p_{f}"].to_numpy()
        # the highest threshold whose validation sensitivity reaches 0.8, by brute force
        ok = [t for t in np.unique(p) if (p[y == 1] >= t).mean() >= 0.8]
        assert s["findings"][f]["threshold"] == pytest.approx(max(ok))


def test_threshold_options_are_checked():
    with pytest.raises(ValueError, match="needs --target"):
        CFG.replace(threshold="specificity")
    with pytest.raises(ValueError, match="--select"):
        CFG.replace(select="worst")


# -- predict rebuilds the preprocessing ----------------------------------------------------------
@pytest.fixture(scope="module")
def prepared_jpg(synthetic_tree, tmp_path_factory):
    from fastcxr.prepare.mimic import prepare_mimic

    out = tmp_path_factory.mktemp("prepared-jpg")
    prepare_mimic(synthetic_tree, out, size=32, workers=2, intensity="mimic-jpg")
    return out


@pytest.mark.parametrize("mode", ["voi", "mimic-jpg"])
@pytest.mark.slow
def test_predict_on_source_dicoms_reproduces_the_run(
    mode, prepared, prepared_jpg, synthetic_tree, tmp_path
):
    data = prepared if mode == "voi" else prepared_jpg
    _cli("train", "--formulation", "multiclass", "--data", data, *TINY_TRAIN, "--epochs", "1",
         "--stages", "all", "--no-pretrained", "--runs", tmp_path, "--name", "r")  # fmt: skip
    run = tmp_path / "r"
    side = json.loads((run / "model-edema+pleural_effusion.json").read_text())
    assert side["preprocessing"]["intensity"] == mode
    assert json.loads((run / "config.json").read_text())["preprocessing"]["intensity"] == mode
    manifest = pd.read_csv(data / "manifest.csv")
    rec = pd.read_csv(run / "predictions.csv")
    test = rec[rec["split"] == "test"].merge(manifest[["image", "source"]], on="image")
    folder = tmp_path / "dicoms"
    folder.mkdir()
    for src in test["source"]:
        shutil.copy(synthetic_tree / src, folder)
    out = tmp_path / "p.csv"
    _cli("predict", run, folder, "--out", out)
    got = pd.read_csv(out)
    got["dicom"] = got["file"].str.rsplit("/", n=1).str[-1]
    test["dicom"] = test["source"].str.rsplit("/", n=1).str[-1]
    m = test.merge(got, on="dicom", suffixes=("_rec", ""))
    assert len(m) == len(test)
    for f in FINDINGS:
        np.testing.assert_allclose(m[f"p_{f}"], m[f"p_{f}_rec"], atol=1e-4)
        t = side["thresholds"][f]
        assert (m[f"pred_{f}"] == (m[f"p_{f}_rec"] >= t)).all()


# -- seed variance ------------------------------------------------------------------------------
@pytest.mark.slow
def test_compare_over_seeds_aggregates_each_seeds_record(prepared, tmp_path):
    args = ["compare", "--data", prepared, *TINY_TRAIN, "--epochs", "1", "--stages", "all",
            "--no-pretrained", "--formulations", "multilabel,multiclass", "--seeds", "0,1",
            "--runs", tmp_path, "--name", "s", "--json"]  # fmt: skip
    out = json.loads(_cli(*args).stdout)
    assert out["seeds"] == [0, 1] and _no_nan(out)
    for form in ("multilabel", "multiclass"):
        for f in FINDINGS:
            aucs, accs = [], []
            for seed in (0, 1):
                rec = json.loads(
                    (tmp_path / "s" / f"seed-{seed}" / form / "record.json").read_text()
                )
                cfg = json.loads(
                    (tmp_path / "s" / f"seed-{seed}" / form / "config.json").read_text()
                )
                assert cfg["train"]["seed"] == seed
                aucs.append(rec["findings"][f]["auc"])
                accs.append(rec["findings"][f]["accuracy"])
            agg = out["aggregate"][form][f]
            assert agg["auc"]["mean"] == pytest.approx(np.mean(aucs))
            assert agg["auc"]["sd"] == pytest.approx(np.std(aucs, ddof=1))
            assert (agg["auc"]["min"], agg["auc"]["max"]) == pytest.approx((min(aucs), max(aucs)))
            assert agg["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    seed0 = json.loads((tmp_path / "s" / "seed-0" / "multilabel" / "record.json").read_text())
    seed1 = json.loads((tmp_path / "s" / "seed-1" / "multilabel" / "record.json").read_text())
    assert seed0["findings"] != seed1["findings"]  # another seed is another run
    # --resume: finished seeds are read back, not retrained
    again = runner.invoke(app, [str(a) for a in [*args, "--resume"]])
    assert again.exit_code == 0, again.output
    assert again.stderr.count("skipped") >= 2
    assert json.loads(again.stdout)["aggregate"] == out["aggregate"]
    table = _cli(*args[:-1], "--resume").stdout
    assert "±" in table and "mean ± sd" in table


@pytest.mark.slow
def test_ablation_and_train_over_seeds(prepared, tmp_path):
    common = [*TINY_TRAIN, "--epochs", "1", "--stages", "head,all", "--no-pretrained",
              "--runs", tmp_path, "--json"]  # fmt: skip
    out = json.loads(
        _cli(
            "unfreeze-ablation", "--data", prepared, "--seeds", "3,4", "--name", "a", *common
        ).stdout
    )
    assert set(out["aggregate"]) == {"head", "all"} and _no_nan(out)
    for i, stage in enumerate(("head", "all")):
        aucs = [
            json.loads((tmp_path / "a" / f"seed-{k}" / "ablation.json").read_text())["stages"][i][
                "findings"
            ]["Edema"]["auc"]
            for k in (3, 4)
        ]
        assert out["aggregate"][stage]["Edema"]["auc"]["mean"] == pytest.approx(np.mean(aucs))
    one = json.loads(
        _cli("train", "--data", prepared, "--seeds", "5", "--name", "t", *common).stdout
    )
    agg = one["aggregate"]["multilabel"]["Edema"]["auc"]
    assert agg["sd"] is None and "one seed" in agg["reason"] and agg["n"] == 1
    res = runner.invoke(app, ["train", "--seeds", "1,1", "--seed", "2"])
    assert res.exit_code == 2


def test_report_agrees_with_the_run(two_stage_run):
    from fastcxr.evaluate.evaluation import EvalConfig, evaluate

    run, summary = two_stage_run
    cfg = json.loads((run / "config.json").read_text())
    ev = evaluate(pd.read_csv(run / "predictions.csv"), FINDINGS, EvalConfig(), cfg["thresholds"])
    for f in FINDINGS:
        ch = ev[f]["chosen_threshold"]
        assert ch["threshold"] == pytest.approx(summary["findings"][f]["threshold"], abs=1e-12)
        assert ch["accuracy"] == pytest.approx(summary["findings"][f]["accuracy"])
        assert ev[f]["auc"] == pytest.approx(summary["findings"][f]["auc"])


def test_undefined_bootstrap_and_numpy_nan():
    from fastcxr.evaluate import stats

    y = np.array([0, 0, 1, 1, 0, 0, 1, 0])
    s = np.linspace(0, 1, 8)
    one_patient_pos = ["a", "b", "c", "c", "d", "e", "c", "f"]  # every positive is patient c
    assert stats.patient_bootstrap(y, s, one_patient_pos) is None
    assert "one patient with a positive" in stats.bootstrap_reason(y, one_patient_pos)
    got = holm([np.float32(0.001), np.float32("nan"), 0.01])
    assert got[1] is None and got[0] == pytest.approx(0.002) and got[2] == pytest.approx(0.01)
    with pytest.raises(ValueError, match="--target needs --threshold"):
        CFG.replace(threshold_target=0.9)


@pytest.mark.slow
def test_compare_never_reads_back_runs_of_another_configuration(prepared, tmp_path):
    args = [
        "compare",
        "--data",
        prepared,
        *TINY_TRAIN,
        "--epochs",
        "1",
        "--stages",
        "all",
        "--no-pretrained",
        "--formulations",
        "multilabel",
        "--runs",
        tmp_path,
        "--name",
        "c",
    ]
    _cli(*args)
    for change in (["--threshold", "specificity", "--target", "0.9"], ["--select", "last"],
                   ["--lr", "0.01"]):  # fmt: skip
        res = runner.invoke(app, [str(a) for a in [*args, *change]])
        assert res.exit_code == 2, res.output
        assert "another configuration" in res.stderr
    plan = tmp_path / "c" / "plan.json"
    plan.unlink()  # a folder from before plan.json: the runs' own records are checked
    res = runner.invoke(app, [str(a) for a in [*args, "--select", "last"]])
    assert res.exit_code == 2 and "select: 'best' → 'last'" in res.stderr, res.output
