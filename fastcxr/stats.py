"""Statistics a reviewer accepts: AUC confidence intervals, DeLong's paired test, thresholds
chosen on validation, calibration.

* DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated
  ROC curves", Biometrics 44:837; computed with the fast algorithm of Sun & Xu (2014), IEEE
  Signal Processing Letters 21:1389. DeLong treats test images as independent.
* The patient bootstrap resamples *patients* (all of a patient's images together), so images
  of one patient do not count as independent evidence; it is the default for CIs.

Undefined quantities (an AUC with one class present) are `None`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import average_precision_score


def _two_classes(y: np.ndarray) -> bool:
    return len(np.unique(y)) == 2


def auc_rank(y: np.ndarray, s: np.ndarray) -> float | None:
    """ROC AUC as the Mann-Whitney statistic (ties count 1/2)."""
    y = np.asarray(y).astype(bool)
    n1, n0 = int(y.sum()), int((~y).sum())
    if n1 == 0 or n0 == 0:
        return None
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def _delong_components(y: np.ndarray, scores: np.ndarray):
    """AUCs and DeLong's covariance matrix for the rows of `scores` (m, n) on labels `y`."""
    y = np.asarray(y).astype(bool)
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx = np.apply_along_axis(rankdata, 1, pos)
    ty = np.apply_along_axis(rankdata, 1, neg)
    tz = np.apply_along_axis(rankdata, 1, np.concatenate([pos, neg], axis=1))
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v01 = (tz[:, :m] - tx) / n  # structural components of the positives
    v10 = 1.0 - (tz[:, m:] - ty) / m  # … and of the negatives
    s01 = np.atleast_2d(np.cov(v01))
    s10 = np.atleast_2d(np.cov(v10))
    return aucs, s01 / m + s10 / n


def delong_ci(y: np.ndarray, s: np.ndarray, level: float = 0.95) -> tuple[float, float] | None:
    """CI of one AUC from DeLong's variance (normal approximation, clipped to [0, 1])."""
    if not _two_classes(y):
        return None
    aucs, cov = _delong_components(y, np.asarray(s, float)[None, :])
    half = norm.ppf(0.5 + level / 2) * math.sqrt(max(cov[0, 0], 0.0))
    return max(0.0, float(aucs[0] - half)), min(1.0, float(aucs[0] + half))


def delong_test(y: np.ndarray, s1: np.ndarray, s2: np.ndarray, level: float = 0.95) -> dict:
    """DeLong's test for two correlated ROC curves on the same cases.

    Returns the two AUCs, their difference (s1 − s2), its CI and the two-sided p-value.
    """
    if not _two_classes(y):
        return {
            "auc_a": None,
            "auc_b": None,
            "auc_diff": None,
            "diff_ci": None,
            "p_value": None,
            "z": None,
        }
    aucs, cov = _delong_components(y, np.vstack([s1, s2]).astype(float))
    diff = float(aucs[0] - aucs[1])
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if var <= 1e-15:  # identical rankings: no evidence of a difference
        z, p = 0.0, 1.0
    else:
        z = diff / math.sqrt(var)
        p = float(2 * norm.sf(abs(z)))
    half = norm.ppf(0.5 + level / 2) * math.sqrt(max(var, 0.0))
    return {
        "auc_a": float(aucs[0]),
        "auc_b": float(aucs[1]),
        "auc_diff": diff,
        "diff_ci": [diff - half, diff + half],
        "p_value": p,
        "z": z,
    }


def bootstrap_weights(groups: Sequence, n_boot: int, seed: int = 0) -> np.ndarray:
    """(n_boot, n) image multiplicities from resampling patients (clusters) with replacement."""
    _, inverse = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_pat = int(inverse.max()) + 1
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(n_pat, np.full(n_pat, 1.0 / n_pat), size=n_boot)
    return counts[:, inverse]


def weighted_auc(y: np.ndarray, s: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Mann-Whitney AUC for each row of weights `w` (B, n); NaN where a class is absent."""
    y = np.asarray(y).astype(bool)
    levels, lvl = np.unique(np.asarray(s, float), return_inverse=True)
    onehot = np.zeros((len(y), len(levels)))
    onehot[np.arange(len(y)), lvl] = 1.0
    wpos, wneg = (w * y) @ onehot, (w * ~y) @ onehot  # (B, L) weight per score level
    below = np.cumsum(wneg, axis=1) - wneg  # negatives strictly below each level
    num = (wpos * (below + 0.5 * wneg)).sum(1)
    den = wpos.sum(1) * wneg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def patient_bootstrap(
    y: np.ndarray,
    s: np.ndarray,
    groups: Sequence,
    stat: str = "auc",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile CI of the ROC AUC (`stat="auc"`) or PR AUC (`"pr_auc"`), resampling
    patients with replacement; resamples with one class are skipped."""
    y, s = np.asarray(y).astype(int), np.asarray(s, float)
    if not _two_classes(y):
        return None
    w = bootstrap_weights(groups, n_boot, seed)
    if stat == "auc":
        vals = weighted_auc(y, s, w)
    elif stat == "pr_auc":
        vals = np.array(
            [
                average_precision_score(y, s, sample_weight=wi) if (wi * y).sum() > 0 else np.nan
                for wi in w
            ]
        )
    else:
        raise ValueError(f"unknown bootstrap statistic {stat!r}: auc or pr_auc")
    vals = vals[~np.isnan(vals)]
    if len(vals) < n_boot / 2:
        return None
    a = (1 - level) / 2
    return float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))


def pr_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(average_precision_score(y, s)) if _two_classes(y) else None


def choose_threshold(
    y: np.ndarray, s: np.ndarray, method: str = "youden", target: float | None = None
) -> float:
    """A threshold chosen on (validation) data.

    `youden` maximises sensitivity + specificity − 1; `sensitivity` / `specificity` take the
    highest / lowest threshold that reaches `target`. Falls back to 0.5 with one class.
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, float)
    if not _two_classes(y):
        return 0.5
    cands = np.unique(s)
    sens = np.array([(s[y] >= t).mean() for t in cands])
    spec = np.array([(s[~y] < t).mean() for t in cands])
    if method == "youden":
        return float(cands[int(np.argmax(sens + spec - 1))])
    if method == "sensitivity":
        ok = np.flatnonzero(sens >= target)
        return float(cands[ok.max()]) if len(ok) else float(cands.min())
    if method == "specificity":
        ok = np.flatnonzero(spec >= target)
        return float(cands[ok.min()]) if len(ok) else float(cands.max())
    raise ValueError(f"unknown threshold method {method!r}: youden, sensitivity, specificity")


def at_threshold(y: np.ndarray, s: np.ndarray, t: float) -> dict:
    """Accuracy, sensitivity, specificity, PPV, NPV, F1 and the confusion counts at `t`."""
    y = np.asarray(y).astype(bool)
    pred = np.asarray(s, float) >= t
    tp, fn = int((pred & y).sum()), int((~pred & y).sum())
    fp, tn = int((pred & ~y).sum()), int((~pred & ~y).sum())

    def ratio(a, b):
        return a / b if b else None

    sens, ppv = ratio(tp, tp + fn), ratio(tp, tp + fp)
    f1 = 2 * sens * ppv / (sens + ppv) if sens is not None and ppv and sens + ppv else None
    return {
        "threshold": float(t),
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": sens,
        "specificity": ratio(tn, tn + fp),
        "ppv": ppv,
        "npv": ratio(tn, tn + fn),
        "f1": f1,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }


def brier(y: np.ndarray, s: np.ndarray) -> float:
    return float(np.mean((np.asarray(s, float) - np.asarray(y, float)) ** 2))


def calibration_bins(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> list[dict]:
    """Equal-width bins of predicted probability: count, mean prediction, observed rate."""
    y, s = np.asarray(y, float), np.asarray(s, float)
    idx = np.minimum((s * n_bins).astype(int), n_bins - 1)
    out = []
    for b in range(n_bins):
        m = idx == b
        out.append(
            {
                "lo": b / n_bins,
                "hi": (b + 1) / n_bins,
                "n": int(m.sum()),
                "mean_pred": float(s[m].mean()) if m.any() else None,
                "observed": float(y[m].mean()) if m.any() else None,
            }
        )
    return out


def ece(y: np.ndarray, s: np.ndarray, n_bins: int = 10) -> float:
    """Expected calibration error: bin-size-weighted |observed − predicted|."""
    bins = calibration_bins(y, s, n_bins)
    n = sum(b["n"] for b in bins)
    return float(sum(b["n"] * abs(b["observed"] - b["mean_pred"]) for b in bins if b["n"]) / n)
