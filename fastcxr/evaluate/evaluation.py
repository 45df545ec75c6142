"""Evaluate saved predictions: per-finding metrics with CIs, and paired comparisons.

Works on a run record's `predictions.csv` (columns `split`, `image`, `patient_id`,
`y_<finding>`, `p_<finding>`), so reports never retrain.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fastcxr.errors import UsageError
from fastcxr.evaluate import stats
from fastcxr.leakage import patient_keys
from fastcxr.runtime.progress import progress_end, progress_event


@dataclass(frozen=True)
class EvalConfig:
    ci: str = "bootstrap"  # "bootstrap" (patients resampled) or "delong" (clustered by patient)
    n_boot: int = 2000
    level: float = 0.95
    # chosen on validation: youden | sensitivity | specificity; None: what the run recorded
    threshold: str | None = None
    target: float | None = None
    seed: int = 0

    def __post_init__(self):
        if self.ci not in CI_METHODS:
            raise UsageError(f"--ci must be one of {', '.join(CI_METHODS)}, not {self.ci!r}")
        if self.target is not None and self.threshold in (None, "youden"):
            raise UsageError("--target needs --threshold sensitivity or specificity")

    def rule(self, recorded: Mapping | None) -> tuple[str, float | None]:
        """The threshold method and target: this config's, else the run's, else Youden."""
        if self.threshold is not None:
            return self.threshold, self.target
        if recorded:
            return recorded.get("method", "youden"), recorded.get("target")
        return "youden", None


CI_METHODS = ("bootstrap", "delong")
CLUSTERED = "DeLong variance clustered by patient (Obuchowski 1997)"


def _split(pred: pd.DataFrame, split: str) -> pd.DataFrame:
    if "split" not in pred.columns:
        return pred if split == "test" else pred.iloc[:0]
    return pred[pred["split"] == split]


def _scored(rows: pd.DataFrame, finding: str) -> pd.DataFrame:
    """The rows a finding is scored on: its label is 0 or 1 (a blank label is not scored)."""
    return rows[rows[f"y_{finding}"].notna()]


PR_AUC_RESAMPLES = 500  # the PR AUC's bootstrap (recorded in `pr_auc_ci_method`)


def _bootstrap_bar(log, label: str):
    """`progress(done, n)` for a bootstrap: progress events of bar "bootstrap" for `log`."""
    if log is None:
        return None
    return lambda done, n: log(progress_event("bootstrap", label, done, n, "resample"))


def finding_report(
    pred: pd.DataFrame, finding: str, cfg: EvalConfig = EvalConfig(), recorded=None, log=None
) -> dict:
    """Everything about one finding on the test split; threshold chosen on validation
    (`recorded`: the run's threshold rule, used unless `cfg` names one). `log` hears of the
    bootstrap resamples as progress events (the same numbers either way)."""
    test, valid = _scored(_split(pred, "test"), finding), _scored(_split(pred, "valid"), finding)
    y, s = test[f"y_{finding}"].to_numpy(int), test[f"p_{finding}"].to_numpy(float)
    groups = patient_keys(test["patient_id"].astype(str))
    auc = stats.auc_rank(y, s)
    if cfg.ci == "delong":
        d = stats.auc_ci_delong(y, s, cfg.level, groups=groups)
        auc_ci, ci_reason, method = d["ci"], d["reason"], CLUSTERED
    else:
        bar = _bootstrap_bar(log, f"{finding}: AUC bootstrap")
        b = stats.patient_bootstrap_ci(y, s, groups, "auc", cfg.n_boot, cfg.seed, cfg.level, bar)
        auc_ci, ci_reason, method = b["ci"], b["reason"], bootstrap_method(cfg.n_boot)
    bar = _bootstrap_bar(log, f"{finding}: PR AUC bootstrap")
    pr_boot = min(cfg.n_boot, PR_AUC_RESAMPLES)  # sklearn's AP per resample: slow
    pr = stats.patient_bootstrap_ci(y, s, groups, "pr_auc", pr_boot, cfg.seed, cfg.level, bar)
    if log is not None:
        log(progress_end("bootstrap"))
    how, target = cfg.rule(recorded)
    t = stats.choose_threshold(
        valid[f"y_{finding}"].to_numpy(int), valid[f"p_{finding}"].to_numpy(float), how, target
    )
    chosen = {"method": how, "target": target, "chosen_on": "valid"}
    if t is None:
        chosen["reason"] = "the validation split has one class: no threshold can be chosen"
    else:
        chosen.update(stats.at_threshold(y, s, t))
    return {
        "n": int(len(y)), "positives": int(y.sum()), "patients": int(len(set(groups))),
        "auc": auc, "auc_ci": auc_ci, "auc_ci_method": method, "auc_ci_reason": ci_reason,
        "pr_auc": stats.pr_auc(y, s), "pr_auc_ci": pr["ci"],
        "pr_auc_ci_method": bootstrap_method(pr_boot), "pr_auc_ci_reason": pr["reason"],
        "at_0.5": stats.at_threshold(y, s, 0.5), "chosen_threshold": chosen,
        "brier": stats.brier(y, s) if len(y) else None, "ece": stats.ece(y, s) if len(y) else None,
        "calibration": stats.calibration_bins(y, s),
        "undefined": None if auc is not None else "one class in the test set: AUC undefined",
    }  # fmt: skip


def bootstrap_method(n_boot: int) -> str:
    """How a patient-bootstrap CI was computed, with its own number of resamples."""
    return f"percentile bootstrap over patients ({n_boot} resamples)"


def evaluate(
    pred: pd.DataFrame,
    findings: Sequence[str],
    cfg: EvalConfig = EvalConfig(),
    recorded=None,
    log=None,
) -> dict[str, dict]:
    """`finding_report` of each finding (`log`: progress events of its bootstraps)."""
    return {f: finding_report(pred, f, cfg, recorded, log) for f in findings}


def pairwise(preds: Mapping[str, pd.DataFrame], findings: Sequence[str]) -> list[dict]:
    """DeLong's test, clustered by patient (Obuchowski 1997), for every pair of runs and every
    finding, on their common scored test images."""
    out = []
    for (a, pa), (b, pb) in itertools.combinations(preds.items(), 2):
        ta, tb = _split(pa, "test"), _split(pb, "test")
        m = ta.merge(tb, on="image", suffixes=("_a", "_b"))
        for f in findings:
            ya, yb = m[f"y_{f}_a"], m[f"y_{f}_b"]
            if not ya.isna().equals(yb.isna()) or not (ya.dropna() == yb.dropna()).all():
                raise UsageError(f"{a} and {b} disagree on the labels of {f}: not the same data")
            mf = m[ya.notna()]
            r = stats.delong_test(
                mf[f"y_{f}_a"].to_numpy(int),
                mf[f"p_{f}_a"].to_numpy(float),
                mf[f"p_{f}_b"].to_numpy(float),
                groups=patient_keys(mf["patient_id_a"].astype(str)),
            )
            out.append({"a": a, "b": b, "finding": f, **r})
    return out


def _defined(p) -> bool:
    return p is not None and not math.isnan(float(p))


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm–Bonferroni adjusted p-values (family-wise error). Undefined entries (`None` or
    NaN) are left out of the family and stay `None`."""
    idx = [i for i, p in enumerate(pvalues) if _defined(p)]
    order = sorted(idx, key=lambda i: pvalues[i])
    adj: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        adj[i] = running
    return adj


def with_holm(pairs: list[dict]) -> list[dict]:
    """`pairs` with `p_holm` over the defined p-values; undefined ones say why."""
    for pr, adj in zip(pairs, holm([p["p_value"] for p in pairs])):
        pr["p_holm"] = adj
        if adj is None:
            pr["p_holm_reason"] = pr.get("reason") or "p-value undefined"
    return pairs


def table(evals: Mapping[str, Mapping[str, dict]]) -> pd.DataFrame:
    """One row per (run, finding): the headline numbers, for tables and results.md."""
    rows = []
    for run, by_f in evals.items():
        for f, e in by_f.items():
            ch = e["chosen_threshold"]
            ch = {k: ch.get(k) for k in ("threshold", "accuracy", "sensitivity", "specificity",
                                          "ppv", "npv", "f1")}  # fmt: skip
            rows.append({
                "run": run, "finding": f, "n": e["n"], "auc": e["auc"],
                "auc_lo": (e["auc_ci"] or (np.nan, np.nan))[0],
                "auc_hi": (e["auc_ci"] or (np.nan, np.nan))[1],
                "pr_auc": e["pr_auc"], "acc@0.5": e["at_0.5"]["accuracy"],
                "threshold": ch["threshold"], "acc@t": ch["accuracy"], "sens@t": ch["sensitivity"],
                "spec@t": ch["specificity"], "ppv@t": ch["ppv"], "npv@t": ch["npv"],
                "f1@t": ch["f1"], "brier": e["brier"], "ece": e["ece"],
                "note": "; ".join(r for r in (e["undefined"], e.get("auc_ci_reason"),
                                              e["chosen_threshold"].get("reason")) if r),
            })  # fmt: skip
    return pd.DataFrame(rows)
