"""Manifest → DataLoaders: targets per formulation, DICOMs read straight from the manifest."""

import numpy as np
import pandas as pd
import pytest

from fastcxr.config import DEMO
from fastcxr.data import GRAY_MEAN, GRAY_STD, DataError, apply_policy, network_data
from fastcxr.dicom import read_dicom
from fastcxr.formulations import get_formulation
from fastcxr.prepare.mimic import mimic_table

FINDINGS = ("Edema", "Pleural Effusion")
CFG = DEMO.replace(size=24, batch_size=8, workers=0)


@pytest.fixture(scope="module")
def dicom_manifest(synthetic_tree):
    """A manifest whose images are the DICOMs themselves (no cache)."""
    t = mimic_table(synthetic_tree)
    return apply_policy(t.assign(image=t["source"]), CFG, FINDINGS)


def test_dicom_images_through_the_datablock(dicom_manifest, synthetic_tree):
    form = get_formulation("multilabel")
    nd = network_data(dicom_manifest, synthetic_tree, form, form.networks(FINDINGS)[0], CFG)
    x, y = nd.dls.valid.one_batch()
    assert x.shape == (8, 1, 24, 24) and y.shape == (8, 2)
    first = nd.valid.iloc[0]
    expect = read_dicom(synthetic_tree / first["image"], size=24) / 255.0
    got = x[0, 0].cpu().numpy() * GRAY_STD + GRAY_MEAN
    # the DataBlock reads through the run's Preprocessing: the very pixels `predict` makes
    np.testing.assert_allclose(got, expect, atol=1e-5)
    np.testing.assert_array_equal(y[0].cpu().numpy(), first[list(FINDINGS)].to_numpy(float))


def test_multiclass_targets_are_powerset_codes(dicom_manifest, synthetic_tree):
    form = get_formulation("multiclass")
    nd = network_data(dicom_manifest, synthetic_tree, form, form.networks(FINDINGS)[0], CFG)
    _, y = nd.dls.valid.one_batch()
    rows = nd.valid.iloc[:8]
    assert y.tolist() == (2 * rows["Edema"] + rows["Pleural Effusion"]).tolist()
    assert nd.dls.c == 4


def test_policy_errors(dicom_manifest):
    raw = pd.DataFrame(
        {
            "image": ["a", "b", "c"],
            "patient_id": ["1", "2", "3"],
            "split": ["train", "valid", "test"],
            "Edema": [1, -1, 0],
            "Pleural Effusion": [1, 0, 0],
        }
    )
    with pytest.raises(DataError, match="'valid' split is empty"):
        apply_policy(raw, CFG, FINDINGS)
    raw.loc[1, "Edema"] = 0
    with pytest.raises(DataError, match="only class"):
        apply_policy(raw, CFG, FINDINGS)
