"""Statistics against independent computations: definitions, sklearn, a bootstrap."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import norm
from sklearn.metrics import average_precision_score, confusion_matrix, f1_score, roc_auc_score

from fastcxr.evaluate import stats
from fastcxr.evaluate.evaluation import evaluate, holm, pairwise


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


def psi_matrix(y, s):
    """psi(X_j, Y_k) for every (positive j, negative k) pair: 1 if X > Y, 1/2 if tied, else 0."""
    y = np.asarray(y).astype(bool)
    x, z = s[y][:, None], s[~y][None, :]
    return (x > z) + 0.5 * (x == z)


def delong_cov_reference(y, scores):
    """Plain DeLong (1988) covariance of the AUCs of the rows of `scores`, from psi matrices."""
    psis = [psi_matrix(y, s) for s in scores]
    m, n = psis[0].shape
    s10 = np.atleast_2d(np.cov(np.vstack([p.mean(1) for p in psis])))  # over positives
    s01 = np.atleast_2d(np.cov(np.vstack([p.mean(0) for p in psis])))  # over negatives
    return np.array([p.mean() for p in psis]), s10 / m + s01 / n


def obuchowski_cov_reference(y, scores, groups):
    """Obuchowski (1997) written out cluster by cluster with Python loops, from psi matrices."""
    y, groups = np.asarray(y).astype(bool), np.asarray(groups)
    pos_groups, neg_groups = groups[y], groups[~y]
    psis = [psi_matrix(y, s) for s in scores]
    big_m, big_n = psis[0].shape
    a = [p.mean() for p in psis]
    k, clusters = len(scores), list(dict.fromkeys(groups.tolist()))
    v10_i = [[p.mean(1)[pos_groups == c].sum() for c in clusters] for p in psis]
    v01_i = [[p.mean(0)[neg_groups == c].sum() for c in clusters] for p in psis]
    m_i = [int((pos_groups == c).sum()) for c in clusters]
    n_i = [int((neg_groups == c).sum()) for c in clusters]
    i10, i01, i_all = sum(x > 0 for x in m_i), sum(x > 0 for x in n_i), len(clusters)
    cov = np.zeros((k, k))
    for r in range(k):
        for s in range(k):
            s10 = s01 = s11 = s11_t = 0.0
            for i in range(i_all):
                d10r, d10s = v10_i[r][i] - m_i[i] * a[r], v10_i[s][i] - m_i[i] * a[s]
                d01r, d01s = v01_i[r][i] - n_i[i] * a[r], v01_i[s][i] - n_i[i] * a[s]
                s10 += d10r * d10s
                s01 += d01r * d01s
                s11 += d10r * d01s
                s11_t += d10s * d01r
            s10 *= i10 / ((i10 - 1) * big_m)
            s01 *= i01 / ((i01 - 1) * big_n)
            s11 *= i_all / (i_all - 1)
            s11_t *= i_all / (i_all - 1)
            cov[r, s] = s10 / big_m + s01 / big_n + (s11 + s11_t) / (big_m * big_n)
    return np.array(a), cov


def clustered_data(seed=0, n_pat=40, ties=True):
    """1-6 images per patient, a patient effect in both scores, patient-level prevalence."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 7, n_pat)
    g = np.repeat(np.arange(n_pat), sizes)
    u, prev = rng.normal(0, 1, n_pat), rng.uniform(0.05, 0.95, n_pat)
    y = (rng.random(len(g)) < prev[g]).astype(int)
    a = y + u[g] + rng.normal(0, 1, len(g))
    b = a + 0.5 * u[g] + rng.normal(0, 0.7, len(g))
    if ties:
        a, b = np.round(a, 1), np.round(b, 1)
    perm = rng.permutation(len(g))  # a patient's images need not be adjacent
    return y[perm], a[perm], b[perm], np.array([f"p{i:03d}" for i in g[perm]])


def no_nan(d):
    for v in d.values():
        for x in v if isinstance(v, list) else [v]:
            assert not (isinstance(x, float) and math.isnan(x)), d


@pytest.mark.parametrize("ties", [False, True])
def test_covariance_without_clusters_is_plain_delong(ties):
    y, a, b = data(ties=ties)
    ref_aucs, ref_cov = delong_cov_reference(y, [a, b])
    assert ref_aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    one_each = [None, np.arange(len(y)), np.array([f"img{i}" for i in np.arange(len(y))[::-1]])]
    for groups in one_each:
        aucs, cov, reason = stats.auc_covariance(y, np.vstack([a, b]), groups)
        assert reason is None
        np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
        np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-15)
    # the Obuchowski reference with one image per patient is DeLong's too
    np.testing.assert_allclose(
        obuchowski_cov_reference(y, [a, b], np.arange(len(y)))[1], ref_cov, rtol=1e-9
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_clustered_covariance_and_test_match_obuchowski_by_definition(seed):
    y, a, b, g = clustered_data(seed)
    ref_aucs, ref_cov = obuchowski_cov_reference(y, [a, b], g)
    aucs, cov, reason = stats.auc_covariance(y, np.vstack([a, b]), g)
    assert reason is None
    np.testing.assert_allclose(aucs, ref_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, ref_cov, rtol=1e-9, atol=1e-15)
    assert not np.allclose(cov, delong_cov_reference(y, [a, b])[1], rtol=0.01)  # clusters matter

    var = ref_cov[0, 0] + ref_cov[1, 1] - 2 * ref_cov[0, 1]
    diff = ref_aucs[0] - ref_aucs[1]
    r = stats.delong_test(y, a, b, groups=g)
    assert r["reason"] is None and r["method"] == "DeLong, clustered by patient (Obuchowski 1997)"
    assert r["patients"] == len(set(g)) and r["n"] == len(y)
    assert r["auc_diff"] == pytest.approx(diff, abs=1e-12)
    assert r["z"] == pytest.approx(diff / np.sqrt(var), rel=1e-9)
    assert r["p_value"] == pytest.approx(2 * norm.sf(abs(diff) / np.sqrt(var)), rel=1e-9)
    half = norm.ppf(0.975) * np.sqrt(var)
    assert r["diff_ci"] == pytest.approx([diff - half, diff + half], rel=1e-9)

    c = stats.auc_ci_delong(y, a, groups=g)
    assert c["variance"] == pytest.approx(ref_cov[0, 0], rel=1e-9) and c["reason"] is None
    half = norm.ppf(0.975) * np.sqrt(ref_cov[0, 0])
    assert c["ci"] == pytest.approx([ref_aucs[0] - half, ref_aucs[0] + half], rel=1e-9)
    assert stats.delong_ci(y, a, groups=g) == pytest.approx(tuple(c["ci"]))


def test_duplicated_images_clustered_is_delong_of_the_originals():
    # every image twice for its patient: the same information, so the same variance
    y, a, b = data(n=150, seed=4, ties=True)
    _, cov_orig = delong_cov_reference(y, [a, b])
    y2, s2 = np.repeat(y, 2), np.repeat(np.vstack([a, b]), 2, axis=1)
    _, cov, reason = stats.auc_covariance(y2, s2, np.repeat(np.arange(150), 2))
    assert reason is None
    np.testing.assert_allclose(cov, cov_orig, rtol=1e-9)
    _, naive, _ = stats.auc_covariance(y2, s2)
    assert naive[0, 0] < 0.6 * cov[0, 0]  # images as independent: about half the variance


def test_clustered_variance_agrees_with_a_patient_bootstrap():
    # 60 patients x 10 images; a strong patient effect in the scores, prevalence per patient.
    # Observed for data seeds 0-7: clustered / bootstrap variance 1.00-1.04, plain DeLong /
    # bootstrap 0.32-0.66; seed 0 (used here) gives 1.004 and 0.334.
    rng = np.random.default_rng(0)
    n_pat, per = 60, 10
    u = rng.normal(0, 2.0, n_pat)
    prev = 1 / (1 + np.exp(0.3 - rng.normal(0, 1, n_pat)))
    g = np.repeat(np.arange(n_pat), per)
    y = (rng.random(n_pat * per) < prev[g]).astype(int)
    s = 1.5 * y + u[g] + rng.normal(0, 1, n_pat * per)

    boot, rows = [], [np.flatnonzero(g == p) for p in range(n_pat)]
    rng_b = np.random.default_rng(1)
    for _ in range(2000):
        i = np.concatenate([rows[p] for p in rng_b.integers(0, n_pat, n_pat)])
        if 0 < y[i].sum() < len(i):
            boot.append(roc_auc_score(y[i], s[i]))
    var_boot = np.var(boot, ddof=1)

    clustered = stats.auc_ci_delong(y, s, groups=g)
    independent = stats.auc_ci_delong(y, s)
    assert clustered["patients"] == 60 and independent["patients"] == 600
    assert clustered["variance"] == pytest.approx(var_boot, rel=0.2)
    assert independent["variance"] < 0.6 * var_boot
    lo, hi = clustered["ci"]
    assert lo < roc_auc_score(y, s) < hi


def test_undefined_variance_is_none_with_a_reason_never_0_1():
    y, a, b = data(n=60, seed=2)
    one_pos = np.zeros(60, int)
    one_pos[7] = 1
    c = stats.auc_ci_delong(one_pos, a)
    assert c["ci"] is None and c["variance"] is None and "one positive image" in c["reason"]
    assert c["auc"] == pytest.approx(roc_auc_score(one_pos, a))
    assert stats.delong_ci(one_pos, a) is None
    r = stats.delong_test(one_pos, a, b)
    assert r["p_value"] is None and r["diff_ci"] is None and "one positive image" in r["reason"]
    assert r["auc_diff"] == pytest.approx(roc_auc_score(one_pos, a) - roc_auc_score(one_pos, b))
    one_neg = 1 - one_pos
    assert "one negative image" in stats.auc_ci_delong(one_neg, a)["reason"]

    # all positive images belong to one patient: defined per image, undefined per patient
    groups = np.arange(60) // 3
    y_c = (groups == 4).astype(int)
    assert stats.delong_ci(y_c, a) is not None
    c = stats.auc_ci_delong(y_c, a, groups=groups)
    assert c["ci"] is None and "one patient with a positive image" in c["reason"]
    assert c["patients"] == 20
    assert stats.delong_ci(y_c, a, groups=groups) is None
    assert (
        "one patient with a negative image"
        in stats.auc_ci_delong(1 - y_c, a, groups=groups)["reason"]
    )
    r = stats.delong_test(y_c, a, b, groups=groups)
    assert r["p_value"] is None and r["z"] is None and "positive" in r["reason"]
    single = stats.auc_ci_delong(y, a, groups=np.zeros(60))
    assert single["ci"] is None and "single patient" in single["reason"]

    # one class: no AUC at all
    for groups in [None, np.arange(60) // 3]:
        c = stats.auc_ci_delong(np.ones(60, int), a, groups=groups)
        assert c["auc"] is None and c["ci"] is None and c["reason"] == "one class in the test set"
        r = stats.delong_test(np.zeros(60, int), a, b, groups=groups)
        assert r["auc_a"] is r["auc_b"] is r["auc_diff"] is r["p_value"] is None
        assert r["reason"] == "one class in the test set"
        no_nan(c)
        no_nan(r)

    # perfect separation / all scores tied: variance 0, no degenerate [x, x] CI
    for s in [y + 0.0, np.full(60, 0.5)]:
        c = stats.auc_ci_delong(y, s)
        assert c["ci"] is None and c["variance"] == pytest.approx(0.0, abs=1e-15)
        assert "variance is 0" in c["reason"]
    no_nan(c)


@pytest.mark.parametrize("clustered", [False, True])
def test_identical_models_have_no_p_value(clustered):
    y, a, _, g = clustered_data(3)
    groups = g if clustered else None
    for b in [a, 3 * a + 1]:  # the same scores, or the same ranking of the images
        r = stats.delong_test(y, a, b, groups=groups)
        assert r["auc_diff"] == pytest.approx(0.0, abs=1e-12)
        assert r["p_value"] is None and r["z"] is None and r["diff_ci"] is None
        assert "rank the test images identically" in r["reason"]
        assert r["method"].startswith("DeLong") and r["n"] == len(y)
        assert r["patients"] == (len(set(g)) if clustered else len(y))
        no_nan(r)
    # defined results carry no NaN and no reason either
    r = stats.delong_test(y, a, _, groups=groups)
    assert r["reason"] is None and 0 < r["p_value"] <= 1
    no_nan(r)


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


@pytest.mark.parametrize("seed", range(6))
def test_youden_threshold_is_sklearns_roc_point(seed):
    """Ties included (scores rounded): the same point sklearn's roc_curve picks by argmax."""
    from sklearn.metrics import roc_curve

    rng = np.random.default_rng(seed)
    y = (rng.random(300) < 0.3).astype(int)
    s = np.round(rng.random(300) * 0.6 + 0.4 * y, 1 + seed % 3)
    fpr, tpr, thr = roc_curve(y, s)
    assert stats.choose_threshold(y, s) == thr[int(np.argmax(tpr - fpr))]


def test_threshold_of_one_class_is_undefined():
    assert stats.choose_threshold(np.zeros(5), np.linspace(0, 1, 5)) is None
    with pytest.raises(ValueError, match="target"):
        stats.choose_threshold(np.array([0, 1]), np.array([0.2, 0.8]), "specificity")


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
    # one image per patient: the clustered test is DeLong's, up to the order of summation
    assert len(pairs) == 1
    assert pairs[0]["p_value"] == pytest.approx(stats.delong_test(y, a, b)["p_value"], rel=1e-9)
    assert holm([0.01, 0.04, 0.03, None]) == pytest.approx([0.03, 0.06, 0.06, None])
