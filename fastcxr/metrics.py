"""Per-finding metrics from test predictions, as plain data.

A metric that is undefined on the given labels (ROC AUC with one class present) is `None`,
never a crash and never a made-up number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import confusion_matrix, roc_auc_score


def finding_metrics(y: np.ndarray, p: np.ndarray, threshold: float = 0.5) -> dict:
    """Accuracy, ROC AUC, confusion counts at `threshold` for one finding."""
    y = np.asarray(y).astype(int)
    p = np.asarray(p, float)
    pred = (p >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y, pred, labels=[0, 1]).ravel().tolist()
    auc = float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else None
    return {
        "n": int(len(y)), "positives": int(y.sum()), "threshold": threshold,
        "accuracy": float((pred == y).mean()) if len(y) else None, "auc": auc,
        "sensitivity": tp / (tp + fn) if tp + fn else None,
        "specificity": tn / (tn + fp) if tn + fp else None,
        "confusion": {"tn": tn, "fp": fp, "fn": fn, "tp": tp},
    }  # fmt: skip


def all_metrics(y: np.ndarray, p: np.ndarray, findings: Sequence[str]) -> dict[str, dict]:
    """`finding_metrics` for each column of (n, k) labels `y` and probabilities `p`."""
    return {f: finding_metrics(y[:, i], p[:, i]) for i, f in enumerate(findings)}
