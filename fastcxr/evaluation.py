"""Evaluate saved predictions: per-finding metrics with CIs, and paired comparisons.

Works on a run record's `predictions.csv` (columns `split`, `image`, `patient_id`,
`y_<finding>`, `p_<finding>`), so reports never retrain.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fastcxr import stats


@dataclass(frozen=True)
class EvalConfig:
    ci: str = "bootstrap"  # "bootstrap" (patients resampled) or "delong"
    n_boot: int = 2000
    level: float = 0.95
    threshold: str = "youden"  # chosen on validation: youden | sensitivity | specificity
    target: float | None = None
    seed: int = 0


def _split(pred: pd.DataFrame, split: str) -> pd.DataFrame:
    if "split" not in pred.columns:
        return pred if split == "test" else pred.iloc[:0]
    return pred[pred["split"] == split]


def finding_report(pred: pd.DataFrame, finding: str, cfg: EvalConfig = EvalConfig()) -> dict:
    """Everything about one finding on the test split; threshold chosen on validation."""
    test, valid = _split(pred, "test"), _split(pred, "valid")
    y, s = test[f"y_{finding}"].to_numpy(int), test[f"p_{finding}"].to_numpy(float)
    groups = test["patient_id"].to_numpy()
    auc = stats.auc_rank(y, s)
    if cfg.ci == "delong":
        auc_ci = stats.delong_ci(y, s, cfg.level)
        method = "DeLong variance (images independent)"
    else:
        auc_ci = stats.patient_bootstrap(y, s, groups, "auc", cfg.n_boot, cfg.seed, cfg.level)
        method = f"percentile bootstrap over patients ({cfg.n_boot} resamples)"
    pr_ci = stats.patient_bootstrap(
        y, s, groups, "pr_auc", min(cfg.n_boot, 500), cfg.seed, cfg.level
    )
    if len(valid):
        t = stats.choose_threshold(
            valid[f"y_{finding}"], valid[f"p_{finding}"], cfg.threshold, cfg.target
        )
    else:
        t = 0.5
    return {
        "n": int(len(y)), "positives": int(y.sum()), "auc": auc, "auc_ci": auc_ci,
        "auc_ci_method": method, "pr_auc": stats.pr_auc(y, s), "pr_auc_ci": pr_ci,
        "at_0.5": stats.at_threshold(y, s, 0.5),
        "chosen_threshold": {"method": cfg.threshold, "target": cfg.target,
                             "chosen_on": "valid" if len(valid) else "default 0.5",
                             **stats.at_threshold(y, s, t)},
        "brier": stats.brier(y, s), "ece": stats.ece(y, s),
        "calibration": stats.calibration_bins(y, s),
        "undefined": None if auc is not None else "one class in the test set: AUC undefined",
    }  # fmt: skip


def evaluate(
    pred: pd.DataFrame, findings: Sequence[str], cfg: EvalConfig = EvalConfig()
) -> dict[str, dict]:
    return {f: finding_report(pred, f, cfg) for f in findings}


def pairwise(preds: Mapping[str, pd.DataFrame], findings: Sequence[str]) -> list[dict]:
    """DeLong's test for every pair of runs and every finding, on their common test images."""
    out = []
    for (a, pa), (b, pb) in itertools.combinations(preds.items(), 2):
        ta, tb = _split(pa, "test"), _split(pb, "test")
        m = ta.merge(tb, on="image", suffixes=("_a", "_b"))
        for f in findings:
            if not (m[f"y_{f}_a"] == m[f"y_{f}_b"]).all():
                raise ValueError(f"{a} and {b} disagree on the labels of {f}: not the same data")
            r = stats.delong_test(
                m[f"y_{f}_a"].to_numpy(int),
                m[f"p_{f}_a"].to_numpy(float),
                m[f"p_{f}_b"].to_numpy(float),
            )
            out.append({"a": a, "b": b, "finding": f, "n": int(len(m)), "method": "DeLong", **r})
    return out


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (family-wise error), `None` kept in place."""
    idx = [i for i, p in enumerate(pvalues) if p is not None]
    order = sorted(idx, key=lambda i: pvalues[i])
    adj: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adj[i] = running
    return adj


def table(evals: Mapping[str, Mapping[str, dict]]) -> pd.DataFrame:
    """One row per (run, finding): the headline numbers, for tables and results.md."""
    rows = []
    for run, by_f in evals.items():
        for f, e in by_f.items():
            ch = e["chosen_threshold"]
            rows.append({
                "run": run, "finding": f, "n": e["n"], "auc": e["auc"],
                "auc_lo": (e["auc_ci"] or (np.nan, np.nan))[0],
                "auc_hi": (e["auc_ci"] or (np.nan, np.nan))[1],
                "pr_auc": e["pr_auc"], "acc@0.5": e["at_0.5"]["accuracy"],
                "threshold": ch["threshold"], "acc@t": ch["accuracy"], "sens@t": ch["sensitivity"],
                "spec@t": ch["specificity"], "ppv@t": ch["ppv"], "npv@t": ch["npv"],
                "f1@t": ch["f1"], "brier": e["brier"], "ece": e["ece"],
            })  # fmt: skip
    return pd.DataFrame(rows)
