"""Statistics a reviewer accepts: AUC confidence intervals, DeLong's paired test, thresholds
chosen on validation, calibration.

* DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated
  ROC curves", Biometrics 44:837; the structural components come from ranks with the fast
  algorithm of Sun & Xu (2014), IEEE Signal Processing Letters 21:1389.
* A patient's images are correlated, so with `groups` (patient ids) the variance is
  Obuchowski's (1997), "Nonparametric analysis of clustered ROC curve data", Biometrics
  53:567: the components are summed per patient and their between-patient spread, including
  the covariance of a patient's positive and negative images, gives the (co)variance of the
  AUCs. With one image per patient it is DeLong's exactly; without `groups` every image
  counts as independent, which understates the variance when patients have several images.
* The patient bootstrap resamples *patients* (all of a patient's images together), so images
  of one patient do not count as independent evidence; it is the default for CIs.

Undefined quantities are `None`, never NaN or a made-up 0 or 1: an AUC with one class
present, a variance with fewer than two patients with a positive (or a negative) image, a
test whose difference has zero variance. The DeLong functions say why in `reason`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import average_precision_score

from fastcxr.errors import UsageError


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


def _structural_components(y: np.ndarray, scores: np.ndarray):
    """AUCs (K,) and DeLong's structural components for the rows of `scores` (K, n).

    V10 (K, M): for each positive, the fraction of negatives it outscores (ties 1/2);
    V01 (K, N): for each negative, the fraction of positives that outscore it. From ranks
    (Sun & Xu 2014), O(K n log n) instead of O(K M N).
    """
    pos, neg = scores[:, y], scores[:, ~y]
    m, n = pos.shape[1], neg.shape[1]
    tx, ty = rankdata(pos, axis=1), rankdata(neg, axis=1)
    tz = rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    aucs = (tz[:, :m].sum(1) / m - (m + 1) / 2) / n
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return aucs, v10, v01


def _delong_components(y: np.ndarray, scores: np.ndarray):
    """AUCs and plain DeLong covariance (images independent); NaN where undefined."""
    aucs, cov, _ = auc_covariance(y, scores)
    return aucs, np.full((len(aucs), len(aucs)), np.nan) if cov is None else cov


def _clusters(groups: Sequence | None, n: int) -> np.ndarray:
    """Cluster number 0..I-1 of every image; every image is its own cluster without `groups`."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.shape != (n,):
        raise ValueError(f"groups has shape {g.shape}, expected ({n},): one patient per image")
    return np.unique(g.astype(str), return_inverse=True)[1].ravel()


def auc_covariance(
    y: np.ndarray, scores: np.ndarray, groups: Sequence | None = None
) -> tuple[np.ndarray, np.ndarray | None, str | None]:
    """AUCs (K,) of the rows of `scores` (K, n) and their covariance (K, K), with a reason.

    DeLong's structural components are summed per cluster (patient) as in Obuchowski (1997);
    `groups=None` makes every image its own cluster, which is plain DeLong. Where the
    covariance is undefined it is `None` and the reason says why; with one class (or NaN
    scores) the AUCs are NaN as well.
    """
    y = np.asarray(y).astype(bool)
    scores = np.atleast_2d(np.asarray(scores, float))
    if y.ndim != 1 or scores.ndim != 2 or scores.shape[1] != len(y):
        raise ValueError(f"scores {scores.shape} and labels {y.shape}: expected (K, n) and (n,)")
    g = _clusters(groups, len(y))
    undefined = np.full(scores.shape[0], np.nan)
    if y.all() or not y.any():
        return undefined, None, "one class in the test set"
    if np.isnan(scores).any():
        return undefined, None, "NaN among the scores"
    aucs, v10, v01 = _structural_components(y, scores)
    n_cl = int(g.max()) + 1
    m_i = np.bincount(g[y], minlength=n_cl)  # positives per cluster
    n_i = np.bincount(g[~y], minlength=n_cl)  # negatives per cluster
    i10, i01 = int((m_i > 0).sum()), int((n_i > 0).sum())
    if n_cl < 2:
        return aucs, None, "a single patient: variance undefined"
    if i10 < 2:
        who = "positive image" if groups is None else "patient with a positive image"
        return aucs, None, f"only one {who}: variance undefined"
    if i01 < 2:
        who = "negative image" if groups is None else "patient with a negative image"
        return aucs, None, f"only one {who}: variance undefined"
    v10_i, v01_i = np.zeros((n_cl, len(aucs))), np.zeros((n_cl, len(aucs)))
    np.add.at(v10_i, g[y], v10.T)  # per-cluster sums of the components
    np.add.at(v01_i, g[~y], v01.T)
    d10 = v10_i - m_i[:, None] * aucs  # (I, K), centred
    d01 = v01_i - n_i[:, None] * aucs
    big_m, big_n = len(v10[0]), len(v01[0])
    s10 = i10 / ((i10 - 1) * big_m) * (d10.T @ d10)
    s01 = i01 / ((i01 - 1) * big_n) * (d01.T @ d01)
    s11 = n_cl / (n_cl - 1) * (d10.T @ d01)
    cov = s10 / big_m + s01 / big_n + (s11 + s11.T) / (big_m * big_n)
    return aucs, cov, None


def _n_clusters(groups: Sequence | None, n: int) -> int:
    return n if groups is None else int(len(np.unique(np.asarray(groups).astype(str))))


def _z(level: float) -> float:
    if not 0 < level < 1:
        raise ValueError(f"level {level} is not in (0, 1)")
    return float(norm.ppf(0.5 + level / 2))


def auc_ci_delong(
    y: np.ndarray, s: np.ndarray, level: float = 0.95, groups: Sequence | None = None
) -> dict:
    """CI of one AUC from DeLong's variance, clustered by patient when `groups` is given.

    Normal approximation clipped to [0, 1]. Keys: `auc`, `ci` ([lo, hi] or None), `variance`,
    `reason` (None when the CI is defined) and `patients` (clusters; images without groups).
    """
    z = _z(level)
    y = np.asarray(y)
    aucs, cov, reason = auc_covariance(y, np.asarray(s, float)[None, :], groups)
    auc = None if np.isnan(aucs[0]) else float(aucs[0])
    out = {"auc": auc, "ci": None, "variance": None, "reason": reason}
    out["patients"] = _n_clusters(groups, len(y))
    if cov is None:
        return out
    var = float(cov[0, 0])
    if not math.isfinite(var):
        out["reason"] = "variance is not finite"
        return out
    out["variance"] = max(var, 0.0)
    if var <= 1e-15:
        out["reason"] = (
            "the variance is 0 (classes perfectly separated or all scores tied): "
            "no normal-approximation CI"
        )
        return out
    half = z * math.sqrt(var)
    out["ci"] = [max(0.0, auc - half), min(1.0, auc + half)]
    return out


def delong_ci(
    y: np.ndarray, s: np.ndarray, level: float = 0.95, groups: Sequence | None = None
) -> tuple[float, float] | None:
    """CI of one AUC (see `auc_ci_delong`); None wherever the variance is undefined or 0."""
    ci = auc_ci_delong(y, s, level, groups)["ci"]
    return None if ci is None else (ci[0], ci[1])


def delong_test(
    y: np.ndarray,
    s1: np.ndarray,
    s2: np.ndarray,
    level: float = 0.95,
    groups: Sequence | None = None,
) -> dict:
    """DeLong's test for two correlated ROC curves on the same images, clustered by patient
    (Obuchowski 1997) when `groups` is given.

    Returns the two AUCs, their difference (s1 − s2), its CI, z and the two-sided p-value;
    undefined ones are None and `reason` says why.
    """
    z_level = _z(level)
    y = np.asarray(y)
    s = np.vstack([np.asarray(s1, float), np.asarray(s2, float)])
    aucs, cov, reason = auc_covariance(y, s, groups)
    defined = not np.isnan(aucs).any()
    out = {
        "auc_a": float(aucs[0]) if defined else None,
        "auc_b": float(aucs[1]) if defined else None,
        "auc_diff": float(aucs[0] - aucs[1]) if defined else None,
        "diff_ci": None,
        "p_value": None,
        "z": None,
        "method": (
            "DeLong (images independent)"
            if groups is None
            else "DeLong, clustered by patient (Obuchowski 1997)"
        ),
        "patients": _n_clusters(groups, len(y)),
        "n": int(len(y)),
        "reason": reason,
    }
    if cov is None:
        return out
    var = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if not math.isfinite(var):
        out["reason"] = "variance of the difference is not finite"
    elif var <= 1e-15:
        same = _same_components(y, s)
        out["reason"] = (
            "the two models rank the test images identically: variance of the difference is 0"
            if same
            else "variance of the difference is 0 (e.g. both models separate the classes)"
        )
    else:
        diff, se = out["auc_diff"], math.sqrt(var)
        out["z"] = diff / se
        out["p_value"] = float(2 * norm.sf(abs(diff / se)))
        out["diff_ci"] = [max(-1.0, diff - z_level * se), min(1.0, diff + z_level * se)]
    return out


def _same_components(y: np.ndarray, s: np.ndarray) -> bool:
    """Whether both score rows give every image the same structural component."""
    _, v10, v01 = _structural_components(np.asarray(y).astype(bool), s)
    return bool(np.allclose(v10[0], v10[1]) and np.allclose(v01[0], v01[1]))


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
    progress: Callable[[int, int], None] | None = None,
) -> tuple[float, float] | None:
    """Percentile CI of the ROC AUC (`stat="auc"`) or PR AUC (`"pr_auc"`), resampling
    patients with replacement; resamples with one class are skipped. `None` when it is
    undefined (`patient_bootstrap_ci` gives the reason). `progress(done, n_boot)` hears of
    the resamples as they are scored (the same numbers either way)."""
    return patient_bootstrap_ci(y, s, groups, stat, n_boot, seed, level, progress)["ci"]


_STAT_NAMES = {"auc": "AUC", "pr_auc": "PR AUC"}


def patient_bootstrap_ci(
    y: np.ndarray,
    s: np.ndarray,
    groups: Sequence,
    stat: str = "auc",
    n_boot: int = 2000,
    seed: int = 0,
    level: float = 0.95,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """`{"ci": (lo, hi) or None, "reason": why it is None}` of `patient_bootstrap`. Undefined:
    one class, one patient of a class, fewer than half of the resamples with both classes, or
    a statistic that is the same in every resample (e.g. an AUC of 1: perfectly separated
    classes stay separated in every resample) — its percentile interval would have zero width
    and read as certainty that a resample of the patients cannot give."""
    if stat not in _STAT_NAMES:
        raise ValueError(f"unknown bootstrap statistic {stat!r}: auc or pr_auc")
    y, s = np.asarray(y).astype(int), np.asarray(s, float)
    why = bootstrap_reason(y, groups)
    if why is not None:
        return {"ci": None, "reason": why}
    w = bootstrap_weights(groups, n_boot, seed)

    def score(ws: np.ndarray) -> np.ndarray:
        if stat == "auc":
            return weighted_auc(y, s, ws)
        return np.array([average_precision_score(y, s, sample_weight=wi)
                         if (wi * y).sum() > 0 else np.nan for wi in ws])  # fmt: skip

    vals = _by_rows(score, w, progress)
    defined = vals[~np.isnan(vals)]
    if len(defined) < n_boot / 2:
        return {"ci": None, "reason": "fewer than half of the patient resamples hold both classes"}
    if _constant(defined):
        return {"ci": None, "reason": constant_reason(_STAT_NAMES[stat], np.median(defined))}
    ci = percentile_ci(vals, n_boot, level)
    return {"ci": (ci[0], ci[1]), "reason": None}


def _constant(vals: np.ndarray) -> bool:
    """Every value the same, up to floating-point rounding (sklearn's weighted average
    precision of a perfect ranking is 1 or 0.9999999999999999)."""
    return len(vals) > 0 and float(vals.max() - vals.min()) <= 1e-12


def constant_reason(name: str, value: float) -> str:
    """Why a bootstrap whose every resample gives `value` has no CI."""
    return (f"the {name} is {value:.6g} in every patient resample: a percentile CI would have "
            "zero width")  # fmt: skip


def _by_rows(fn, w: np.ndarray, progress: Callable[[int, int], None] | None) -> np.ndarray:
    """`fn` over the rows of `w`: at once, or in 20 parts reported to `progress`."""
    if progress is None:
        return fn(w)
    step, parts = max(1, len(w) // 20), []
    for i in range(0, len(w), step):
        parts.append(fn(w[i : i + step]))
        progress(min(i + step, len(w)), len(w))
    return np.concatenate(parts)


def percentile_ci(vals: np.ndarray, n_boot: int, level: float = 0.95) -> list[float] | None:
    """Percentile interval of bootstrap statistics `vals` (NaN: an undefined resample, left
    out); None when fewer than half of the `n_boot` resamples are defined, or when every
    defined resample gives the same value (a zero-width interval is not a CI)."""
    vals = np.asarray(vals, float)
    vals = vals[~np.isnan(vals)]
    if len(vals) < n_boot / 2 or _constant(vals):
        return None
    a = (1 - level) / 2
    return [float(np.quantile(vals, a)), float(np.quantile(vals, 1 - a))]


def bootstrap_reason(y: np.ndarray, groups: Sequence) -> str | None:
    """Why a patient bootstrap CI is undefined: resampling one patient's images says nothing
    about how the AUC varies across patients."""
    y = np.asarray(y).astype(bool)
    if not _two_classes(y):
        return "one class in the test set"
    g = np.asarray(groups).astype(str)
    if len(set(g[y])) < 2:
        return "only one patient with a positive image: CI undefined"
    if len(set(g[~y])) < 2:
        return "only one patient with a negative image: CI undefined"
    return None


def pr_auc(y: np.ndarray, s: np.ndarray) -> float | None:
    return float(average_precision_score(y, s)) if _two_classes(y) else None


def choose_threshold(
    y: np.ndarray, s: np.ndarray, method: str = "youden", target: float | None = None
) -> float | None:
    """A threshold chosen on (validation) data; a case is positive when its score is >= it.

    `youden` maximises sensitivity + specificity − 1 (the highest such threshold on a tie, as
    sklearn's `roc_curve` orders them); `sensitivity` / `specificity` take the highest /
    lowest threshold that reaches `target`. `None` when `y` holds one class: no threshold can
    be chosen (never a made-up 0.5).
    """
    y = np.asarray(y).astype(bool)
    s = np.asarray(s, float)
    if method not in ("youden", "sensitivity", "specificity"):
        raise UsageError(f"unknown threshold method {method!r}: youden, sensitivity, specificity")
    if method != "youden" and (target is None or not 0 < target < 1):
        raise UsageError(f"threshold method {method!r} needs a target in (0, 1), not {target!r}")
    if not _two_classes(y):
        return None
    cands = np.unique(s)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    sens = 1.0 - np.searchsorted(pos, cands, side="left") / len(pos)  # P(s >= t | positive)
    spec = np.searchsorted(neg, cands, side="left") / len(neg)  # P(s < t | negative)
    if method == "youden":  # J x n_pos x n_neg in integers, so ties are exact
        tp = len(pos) - np.searchsorted(pos, cands, side="left")
        tn = np.searchsorted(neg, cands, side="left")
        j = tp * len(neg) + tn * len(pos)
        return float(cands[np.flatnonzero(j == j.max()).max()])
    if method == "sensitivity":
        return float(cands[np.flatnonzero(sens >= target).max()])  # t = min(s) reaches 1
    ok = np.flatnonzero(spec >= target)
    return float(cands[ok.min()]) if len(ok) else float(np.nextafter(cands.max(), np.inf))


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
