"""A bootstrap whose every resample gives the same value has no CI (#22 item 1): an AUC of 1
on a small subgroup used to print "1.000 [1.000–1.000]" as if the resamples proved it
certain. Each path that reports a patient-bootstrap CI gives null with the reason instead."""

import numpy as np
import pandas as pd
import pytest

from fastcxr.evaluate import stats
from fastcxr.evaluate.audit import score_finding
from fastcxr.evaluate.evaluation import EvalConfig, finding_report
from fastcxr.evaluate.external import auc_ci


def _separated(n_pat: int = 8, per: int = 2, seed: int = 0):
    """Patients with `per` images each; every positive scores above every negative."""
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_pat), per).astype(str)
    y = np.repeat(np.arange(n_pat) % 2, per)  # half the patients positive
    s = np.where(y == 1, 0.6 + 0.4 * rng.random(len(y)), 0.5 * rng.random(len(y)))
    return y, s, groups


def test_perfect_separation_gives_no_auc_ci_and_says_why():
    y, s, g = _separated()
    # the AUC of any resample holding both classes is 1 (positives all above negatives)
    assert min(s[y == 1]) > max(s[y == 0])
    got = stats.patient_bootstrap_ci(y, s, g, "auc", 300)
    assert got["ci"] is None
    assert (
        got["reason"]
        == "the AUC is 1 in every patient resample: a percentile CI would have zero width"
    )
    assert stats.patient_bootstrap(y, s, g, "auc", 300) is None


def test_an_ordinary_auc_keeps_its_interval():
    y, s, g = _separated()
    s = s.copy()
    s[0], s[3] = s[3], s[0]  # one positive and one negative swap places: AUC < 1
    got = stats.patient_bootstrap_ci(y, s, g, "auc", 300)
    assert got["reason"] is None and got["ci"][0] < got["ci"][1]


def test_percentile_ci_of_a_constant_is_none():
    assert stats.percentile_ci(np.full(100, 0.7), 100) is None
    assert stats.percentile_ci(np.r_[np.full(99, 0.7), 0.8], 100) is not None


def test_the_report_and_evaluate_paths_say_why():
    y, s, g = _separated()
    pred = pd.DataFrame({"split": ["test"] * len(y) + ["valid"] * len(y),
                         "patient_id": np.r_[g, np.char.add("v", g)],
                         "y_a": np.r_[y, y], "p_a": np.r_[s, s]})  # fmt: skip
    r = finding_report(pred, "a", EvalConfig(n_boot=200))
    assert r["auc"] == 1.0 and r["auc_ci"] is None
    assert "in every patient resample" in r["auc_ci_reason"]
    assert r["pr_auc_ci"] is None and "PR AUC is 1" in r["pr_auc_ci_reason"]
    e = auc_ci(y, s, g, EvalConfig(n_boot=200))
    assert e["auc_ci"] is None and "in every patient resample" in e["auc_ci_reason"]


@pytest.mark.parametrize("n_boot", [200, 1000])
def test_the_pr_auc_ci_method_names_its_own_resamples(n_boot):
    y, s, g = _separated(n_pat=30, per=2, seed=3)
    s = s + np.random.default_rng(1).normal(0, 0.3, len(s))  # overlapping classes
    pred = pd.DataFrame({"split": ["test"] * len(y), "patient_id": g, "y_a": y, "p_a": s})
    r = finding_report(pred, "a", EvalConfig(n_boot=n_boot))
    k = min(n_boot, 500)
    assert r["auc_ci_method"] == f"percentile bootstrap over patients ({n_boot} resamples)"
    assert r["pr_auc_ci_method"] == f"percentile bootstrap over patients ({k} resamples)"
    assert r["pr_auc_ci"] == stats.patient_bootstrap(y, s, g, "pr_auc", k)


def test_an_audits_small_separated_subgroup_has_no_auc_ci():
    y1, s1, g1 = _separated(8, 2, seed=1)  # the subgroup: separated
    rng = np.random.default_rng(2)
    y2 = rng.integers(0, 2, 60)
    s2 = rng.random(60)
    y, s = np.r_[y1, y2], np.r_[s1, s2]
    g = np.r_[g1, (100 + np.arange(60) // 2).astype(str)]
    sub = np.r_[np.ones(len(y1), bool), np.zeros(60, bool)]
    m = score_finding(y, s, g, {"age": {"20-39": sub, "40-59": ~sub}}, 0.5,
                      EvalConfig(n_boot=200), 5)  # fmt: skip
    small = m["by"]["age"][0]
    assert small["subgroup"] == "20-39" and small["auc"] == 1.0
    assert (
        small["auc_ci"] is None and "AUC is 1 in every patient resample" in small["auc_ci_reason"]
    )
    assert m["by"]["age"][1]["auc_ci"] is not None
