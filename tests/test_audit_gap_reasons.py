"""Every gap without a CI says why (#22 checker item 6): a subgroup that is the whole set
had a TPR gap of 0 and a null CI with no reason, and the underdiagnosis rows carried no reason
for a missing gap CI at all."""

import numpy as np

from fastcxr.evaluate.audit import score_finding
from fastcxr.evaluate.evaluation import EvalConfig


def _data(n_pat=40, per=3, seed=0):
    rng = np.random.default_rng(seed)
    patients = np.repeat(np.arange(n_pat), per).astype(str)
    y = np.repeat(rng.random(n_pat) < 0.4, per).astype(int)
    p = np.clip(0.35 * y + 0.65 * rng.random(len(y)), 0, 1)
    return y, p, patients


def _no_silent_nulls(s: dict) -> None:
    for k in ("tpr", "fpr"):
        if s[f"{k}_gap"] is not None and s[f"{k}_gap_ci"] is None:
            assert s["reasons"].get(f"{k}_gap_ci"), (s["subgroup"], k, s)


def test_a_subgroup_that_is_the_whole_set_says_why_its_gap_has_no_ci():
    y, p, patients = _data()
    everyone = np.ones(len(y), bool)
    half = np.arange(len(y)) < len(y) // 2
    r = score_finding(y, p, patients, {"site": {"only site": everyone, "first half": half}},
                      0.5, EvalConfig(n_boot=300), min_size=10)  # fmt: skip
    only, first = r["by"]["site"]
    assert only["tpr_gap"] == 0.0 and only["fpr_gap"] == 0.0  # its rates are the whole set's
    assert only["tpr_gap_ci"] is None and only["fpr_gap_ci"] is None
    assert "+0 in every patient resample" in only["reasons"]["tpr_gap_ci"]
    assert first["tpr_gap_ci"] is not None  # an ordinary subgroup keeps its interval
    for s in (r["all"], only, first):
        _no_silent_nulls(s)
