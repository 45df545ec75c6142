"""Per-finding metrics from test predictions, as plain data.

A metric that is undefined on the given labels (ROC AUC with one class present) is `None`,
never a crash and never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastcxr import stats


def finding_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, sensitivity, specificity and confusion counts at `threshold`."""
    y = np.asarray(y).astype(int)
    at = stats.at_threshold(y, p, threshold)
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": threshold,
        "accuracy": at["accuracy"], "auc": stats.auc_rank(y, p),
        "sensitivity": at["sensitivity"], "specificity": at["specificity"],
        "confusion": at["confusion"],
    }  # fmt: skip


def all_metrics(y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> dict[str, dict]:
    """`finding_metrics` for each column of (n, k) labels `y` and probabilities `p`."""
    return {f: finding_metrics(y[:, i], p[:, i]) for i, f in enumerate(findings)}
