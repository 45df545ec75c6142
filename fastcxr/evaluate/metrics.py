"""Per-finding metrics from test predictions, as plain data.

Each finding is scored on the images whose label for it is 0 or 1 (NaN labels are left out).
Decisions use the finding's threshold chosen on the validation split; accuracy at 0.5 is
reported beside it. A metric that is undefined on the given labels (ROC AUC with one class
present) is `None`, with a `reason`, never a crash and never a made-up number.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fastcxr.evaluate import stats


def scored_rows(y: np.ndarray) -> np.ndarray:
    """Mask of the images a finding is scored on: label 0 or 1 (not NaN)."""
    return ~np.isnan(np.asarray(y, float))


def finding_metrics(y: np.ndarray, p: np.ndarray, threshold: float | None) -> dict:
    """Accuracy, sensitivity, specificity and confusion counts at `threshold` (chosen on
    validation), accuracy at 0.5, ROC AUC; on the rows whose label is not NaN."""
    y, p = np.asarray(y, float), np.asarray(p, float)
    keep = scored_rows(y)
    y, p = y[keep].astype(int), p[keep]
    at = stats.at_threshold(y, p, threshold) if threshold is not None else None
    auc = stats.auc_rank(y, p)
    reasons = []
    if auc is None:
        reasons.append("one class in the test set: AUC undefined")
    if at is None:
        reasons.append("no threshold chosen on validation: decisions undefined")

    def at_t(key: str):
        return at[key] if at is not None else None

    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": threshold,
        "accuracy": at_t("accuracy"),
        "accuracy_at_0.5": stats.at_threshold(y, p, 0.5)["accuracy"],
        "auc": auc, "sensitivity": at_t("sensitivity"), "specificity": at_t("specificity"),
        "confusion": at_t("confusion"), "reason": "; ".join(reasons) or None,
    }  # fmt: skip


def thresholds(
    y: np.ndarray, p: np.ndarray, findings: Sequence[str], method: str, target: float | None
) -> dict[str, float | None]:
    """Per finding, the threshold `method` chooses on (validation) labels `y` (NaN = not
    scored) and probabilities `p`, both (n, k)."""
    out = {}
    for i, f in enumerate(findings):
        keep = scored_rows(y[:, i])
        out[f] = stats.choose_threshold(y[keep, i], p[keep, i], method, target)
    return out


def all_metrics(
    y: np.ndarray, p: np.ndarray, findings: Sequence[str], thresholds: Mapping[str, float | None]
) -> dict[str, dict]:
    """`finding_metrics` for each column of (n, k) labels `y` and probabilities `p`."""
    return {f: finding_metrics(y[:, i], p[:, i], thresholds[f]) for i, f in enumerate(findings)}
