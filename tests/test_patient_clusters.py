"""Two spellings of one patient (`007`, `7.0`, `7E+00`) are one cluster in the patient-level
statistics, as they are one patient in the leakage check: the #22 checker found a manifest
that spelled a patient's id two ways split that patient into two bootstrap/DeLong clusters,
narrowing the CI."""

import numpy as np
import pandas as pd
import pytest

from fastcxr.evaluate.evaluation import EvalConfig, finding_report, pairwise
from fastcxr.leakage import patient_key


@pytest.mark.parametrize(
    ("spelling", "key"),
    [("010035354", "10035354"), ("10035354.0", "10035354"), ("1.0035354E+07", "10035354"),
     ("1e3", "1000"), (" 42 ", "42"), ("p-01", "p-01"), ("1.23e-1", "1.23e-1")],
)  # fmt: skip
def test_patient_key_reads_one_number_however_written(spelling, key):
    assert patient_key(spelling) == key


def _predictions(ids_of, n_pat=30, per=4, seed=1):
    """Test and valid rows of `n_pat` patients with `per` images each; `ids_of(i, j)` spells
    patient i's id on its j-th image. Scores are correlated within a patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for split in ("test", "valid"):
        for i in range(n_pat):
            y = int(rng.random() < 0.4)
            base = rng.normal(0.8 * y, 1.0)
            for j in range(per):
                s = 1 / (1 + np.exp(-(base + rng.normal(0, 0.3))))
                rows.append({"split": split, "image": f"{split}/{i}_{j}.png",
                             "patient_id": ids_of(i, j) if split == "test" else f"v{i}",
                             "y_a": y, "p_a": s, "p_b": 1 - s if j == 0 else s})  # fmt: skip
    return pd.DataFrame(rows)


def _spelled(i, j):
    return [f"{i}", f"{i:03d}", f"{i}.0", f"{i}E+00"][j]


@pytest.mark.parametrize("ci", ["bootstrap", "delong"])
def test_respelled_ids_give_the_same_clusters(ci):
    plain = _predictions(lambda i, j: str(i))
    mixed = _predictions(_spelled)
    assert mixed["patient_id"].nunique() > plain["patient_id"].nunique()  # the test bites
    cfg = EvalConfig(n_boot=200, ci=ci)
    want, got = finding_report(plain, "a", cfg), finding_report(mixed, "a", cfg)
    assert got["patients"] == 30 == want["patients"]
    assert got["auc_ci"] == want["auc_ci"] and got["pr_auc_ci"] == want["pr_auc_ci"]
    # and the clustering matters: one cluster per image gives another interval
    per_image = _predictions(lambda i, j: f"{i}-{j}")
    assert finding_report(per_image, "a", cfg)["auc_ci"] != want["auc_ci"]


def test_the_paired_test_clusters_respelled_ids_as_one_patient():
    def two_runs(ids_of):
        pred = _predictions(ids_of)
        other = pred.assign(p_a=pred["p_b"])
        return {"x": pred, "y": other}

    want = pairwise(two_runs(lambda i, j: str(i)), ["a"])[0]
    got = pairwise(two_runs(_spelled), ["a"])[0]
    assert got["patients"] == 30 == want["patients"]
    assert got["p_value"] == pytest.approx(want["p_value"], rel=1e-12)
    assert got["diff_ci"] == pytest.approx(want["diff_ci"], rel=1e-12)
    per_image = pairwise(two_runs(lambda i, j: f"{i}-{j}"), ["a"])[0]
    assert per_image["p_value"] != pytest.approx(want["p_value"], rel=1e-6)
