"""Intervals as text: enough decimals that values which differ print differently. Pure Python,
so the command line's tables use it without loading the statistics stack."""

from __future__ import annotations

import math
from collections.abc import Sequence


def shown_digits(*values: float | None, digits: int = 3, most: int = 6) -> int:
    """Decimals enough that values which differ print differently (from `digits` up to
    `most`): a CI of 0.9996 to 1.0 around an AUC of 0.9999 is not "1.000 [1.000–1.000]",
    which reads as a certainty no resample showed."""
    vals = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    for d in range(digits, most):
        shown = {}
        for v in vals:
            shown.setdefault(float(f"{v:.{d}f}"), set()).add(v)  # -0.000 is 0.000
        if all(len(same) == 1 for same in shown.values()):
            return d
    return most


def ci_text(value: float, ci: Sequence[float], digits: int = 3, signed: bool = False,
            sep: str = "–") -> tuple[str, str]:  # fmt: skip
    """(`value`, `lo<sep>hi`) printed with `shown_digits` decimals (a sign with `signed`)."""
    d = shown_digits(value, *ci, digits=digits)
    f = f"{{:{'+' if signed else ''}.{d}f}}"
    return f.format(value), f"{f.format(ci[0])}{sep}{f.format(ci[1])}"


__all__ = ["ci_text", "shown_digits"]
