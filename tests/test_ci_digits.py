"""An interval whose ends differ prints ends that differ (#22 checker item 5): an AUC of
0.9999 with a CI of 0.9996 to 1.0 printed as "1.000 [1.000–1.000]", a certainty no resample
showed. Decimals grow (up to 6) until distinct values print distinct."""

import numpy as np
import pytest

from fastcxr.cli.render.evaluation import auc_ci
from fastcxr.evaluate.intervals import ci_text
from fastcxr.evaluate.report import _auc_ci


def _numbers(text: str) -> list[float]:
    return [float(t) for t in text.replace("–", " ").replace(" to ", " ").split()]


@pytest.mark.parametrize("signed", [False, True])
def test_distinct_values_print_distinct_with_the_fewest_decimals(signed):
    rng = np.random.default_rng(0)
    for _ in range(2000):
        base = rng.choice([1.0, 0.0, 0.5])
        vals = sorted(
            base - np.abs(rng.normal(0, 10.0 ** -rng.integers(2, 6), 3)) * rng.choice([-1, 1])
        )
        lo, v, hi = vals
        shown, lohi = ci_text(v, [lo, hi], signed=signed, sep=" to ")
        printed = _numbers(shown) + _numbers(lohi)
        d = len(shown.split(".")[1])
        assert 3 <= d <= 6
        for (a, pa), (b, pb) in [((v, printed[0]), (lo, printed[1])),
                                 ((v, printed[0]), (hi, printed[2])),
                                 ((lo, printed[1]), (hi, printed[2]))]:  # fmt: skip
            if round(a, 6) != round(b, 6):  # differ within the 6 decimals allowed
                assert pa != pb, (v, lo, hi, shown, lohi)
        if d > 3:  # one decimal fewer would have printed two different values alike
            r = [round(x, d - 1) + 0.0 for x in (v, lo, hi)]
            assert len(set(r)) < len({v, lo, hi}), (v, lo, hi, shown, lohi)


def test_an_ordinary_interval_keeps_three_decimals():
    assert ci_text(0.971, [0.945, 0.990]) == ("0.971", "0.945–0.990")
    assert ci_text(-0.027, [-0.074, 0.021], signed=True, sep=" to ") == (
        "-0.027", "-0.074 to +0.021")  # fmt: skip


def test_the_tables_and_the_report_show_a_near_one_interval():
    m = {"auc": 0.99993, "auc_ci": [0.99961, 1.0], "auc_ci_reason": None}
    assert auc_ci(m) == "0.9999\n[0.9996–1.0000]"
    assert _auc_ci(m) == "0.9999 [0.9996–1.0000]"
