"""Statistics against independent computations: definitions, sklearn, a bootstrap."""

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from fastcxr import stats
from fastcxr.evaluation import evaluate, holm, pairwise


def data(n=300, seed=0, ties=False):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.4
    s1 = np.clip(0.5 + 0.25 * (y - 0.5) + rng.normal(0, 0.2, n), 0, 1)
    s2 = np.clip(s1 + rng.normal(0, 0.15, n), 0, 1)  # correlated second model
    if ties:
        s1, s2 = np.round(s1, 1), np.round(s2, 1)
    return y.astype(int), s1, s2


def delong_by_definition(y, a, b):
    """DeLong et al. (1988) written out with the pairwise kernel, O(m·n)."""
    y = y.astype(bool)

    def comps(s):
        x, z = s[y][:, None], s[~y][None, :]
        psi = (x > z) + 0.5 * (x == z)
        return psi.mean(1), psi.mean(0), psi.mean()  # V10 (per positive), V01, AUC

    (v10a, v01a, auca), (v10b, v01b, aucb) = comps(a), comps(b)
    m, n = y.sum(), (~y).sum()
    s10 = np.cov(np.vstack([v10a, v10b]))
    s01 = np.cov(np.vstack([v01a, v01b]))
    cov = s10 / m + s01 / n
    var = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auca - aucb) / np.sqrt(var)
    return auca, aucb, var, 2 * norm.sf(abs(z)), cov[0, 0]


@pytest.mark.parametrize("ties", [False, True])
def test_auc_and_delong_match_the_definition(ties):
    y, a, b = data(ties=ties)
    assert stats.auc_rank(y, a) == pytest.approx(roc_auc_score(y, a))
    auca, aucb, var, p, var_a = delong_by_definition(y, a, b)
    r = stats.delong_test(y, a, b)
    assert r["auc_a"] == pytest.approx(auca) and r["auc_b"] == pytest.approx(aucb)
    assert r["p_value"] == pytest.approx(p, rel=1e-6)
    half = 1.959964 * np.sqrt(var)
    assert r["diff_ci"] == pytest.approx([auca - aucb - half, auca - aucb + half], rel=1e-5)
    lo, hi = stats.delong_ci(y, a)
    assert (hi - lo) / 2 == pytest.approx(1.959964 * np.sqrt(var_a), rel=1e-5)


def test_delong_se_agrees_with_a_paired_bootstrap():
    y, a, b = data(n=400, seed=3)
    rng = np.random.default_rng(1)
    diffs = []
    for _ in range(1000):
        i = rng.integers(0, len(y), len(y))
        if 0 < y[i].sum() < len(i):
            diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    r = stats.delong_test(y, a, b)
    se_delong = (r["diff_ci"][1] - r["diff_ci"][0]) / (2 * 1.959964)
    assert se_delong == pytest.approx(np.std(diffs), rel=0.15)


def test_patient_bootstrap_ci_covers_and_is_wider_with_clusters():
    y, a, _ = data(n=200, seed=5)
    per_image = stats.patient_bootstrap(y, a, np.arange(200), "auc", n_boot=500)
    assert per_image[0] < roc_auc_score(y, a) < per_image[1]
    # duplicate every image for its patient: the same information, twice the images
    y2, a2 = np.repeat(y, 2), np.repeat(a, 2)
    clustered = stats.patient_bootstrap(y2, a2, np.repeat(np.arange(200), 2), "auc", n_boot=500)
    naive = stats.patient_bootstrap(y2, a2, np.arange(400), "auc", n_boot=500)
    assert clustered[1] - clustered[0] > 1.25 * (naive[1] - naive[0])


def test_weighted_auc_equals_auc_of_the_repeated_sample():
    y, a, _ = data(n=120, seed=9, ties=True)
    w = stats.bootstrap_weights(np.arange(120) // 3, 20, seed=2)  # 3 images per patient
    got = stats.weighted_auc(y, a, w)
    for wi, g in zip(w, got):
        idx = np.repeat(np.arange(120), wi)
        assert g == pytest.approx(roc_auc_score(y[idx], a[idx]))


def test_threshold_metrics_match_sklearn():
    y, a, _ = data()
    r = stats.at_threshold(y, a, 0.55)
    pred = (a >= 0.55).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert r["confusion"] == {"tn": tn, "fp": fp, "fn": fn, "tp": tp}
    assert r["sensitivity"] == pytest.approx(tp / (tp + fn))
    assert r["npv"] == pytest.approx(tn / (tn + fn))
    assert r["f1"] == pytest.approx(f1_score(y, pred))
    assert stats.pr_auc(y, a) == pytest.approx(average_precision_score(y, a))


def test_youden_threshold_is_the_brute_force_optimum():
    y, a, _ = data(seed=8)
    t = stats.choose_threshold(y, a)
    j = [((a[y == 1] >= c).mean() + (a[y == 0] < c).mean() - 1) for c in np.unique(a)]
    best = (a[y == 1] >= t).mean() + (a[y == 0] < t).mean() - 1
    assert best == pytest.approx(max(j))
    ts = stats.choose_threshold(y, a, "sensitivity", 0.9)
    assert (a[y == 1] >= ts).mean() >= 0.9


def test_calibration_hand_worked():
    y = np.array([0, 1, 1, 1])
    s = np.array([0.05, 0.05, 0.95, 0.95])
    # bins: [0,.1): mean .05, observed .5 (2 imgs); [.9,1]: mean .95, observed 1 (2 imgs)
    assert stats.ece(y, s) == pytest.approx((2 * 0.45 + 2 * 0.05) / 4)
    assert stats.brier(y, s) == pytest.approx((0.05**2 + 0.95**2 + 2 * 0.05**2) / 4)


def test_single_class_is_undefined_not_a_crash():
    y = np.zeros(20, int)
    s = np.linspace(0, 1, 20)
    assert stats.auc_rank(y, s) is None and stats.delong_ci(y, s) is None
    assert stats.delong_test(y, s, s)["p_value"] is None
    pred = pd.DataFrame(
        {"split": "test", "image": range(20), "patient_id": range(20), "y_E": y, "p_E": s}
    )
    e = evaluate(pred, ["E"])["E"]
    assert e["auc"] is None and e["auc_ci"] is None and "undefined" in e["undefined"]


def test_pairwise_and_holm():
    y, a, b = data()

    def mk(s):
        n = len(y)
        return pd.DataFrame(
            {"split": "test", "image": range(n), "patient_id": range(n), "y_E": y, "p_E": s}
        )

    pairs = pairwise({"x": mk(a), "z": mk(b)}, ["E"])
    assert len(pairs) == 1 and pairs[0]["p_value"] == stats.delong_test(y, a, b)["p_value"]
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
