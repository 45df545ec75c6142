"""prepare mimic: each DICOM's Modality goes into the manifest; non-radiographs are skipped
(listed in failures.csv), read from the header only."""

import json
import shutil

import pandas as pd
import pydicom
import pytest

from fastcxr.manifest import read_manifest
from fastcxr.prepare.mimic import mimic_table, prepare_mimic

REASON = "modality CT is not a projection radiograph (--modalities CR,DX,DR to change)"


@pytest.fixture
def mixed_tree(synthetic_tree, tmp_path):
    """The synthetic tree with one file turned into a CT (whose pixel data is also broken,
    so only a header read can give the modality reason) and one without a Modality tag."""
    root = tmp_path / "mixed"
    shutil.copytree(synthetic_tree, root)
    table = mimic_table(root)
    ct, blank = root / table["source"].iloc[3], root / table["source"].iloc[5]
    ds = pydicom.dcmread(ct)
    ds.Modality = "CT"
    ds.PixelData = ds.PixelData[:50]
    ds.save_as(ct)
    ds = pydicom.dcmread(blank)
    del ds.Modality
    ds.save_as(blank)
    return root, table, ct, blank


def test_synthetic_dicoms_are_radiographs(synthetic_tree, prepared):
    df = read_manifest(prepared)
    assert set(df["modality"]) <= {"CR", "DX"} and len(df) == len(mimic_table(synthetic_tree))
    assert pd.read_csv(prepared / "failures.csv").empty


def test_non_radiograph_is_skipped_and_modality_recorded(mixed_tree, tmp_path):
    root, table, ct, blank = mixed_tree
    out = tmp_path / "out"
    rep = prepare_mimic(root, out, size=16, workers=1)
    fails = pd.read_csv(out / "failures.csv")
    assert fails.to_dict("records") == [{"file": str(ct), "reason": REASON}]
    assert rep.failures == 1 and rep.images == len(table) - 1
    assert json.loads((out / "prepare.json").read_text())["failures"] == 1
    df = read_manifest(out).set_index("image")
    by_source = dict(zip(table["source"], table["image"]))
    assert by_source[str(ct.relative_to(root))] not in df.index
    blank_row = df.loc[by_source[str(blank.relative_to(root))]]
    assert pd.isna(blank_row["modality"]) or blank_row["modality"] == ""  # kept, blank
    expected = {
        img: str(pydicom.dcmread(root / s, stop_before_pixels=True).get("Modality", ""))
        for s, img in by_source.items()
        if img in df.index
    }
    assert df["modality"].fillna("").to_dict() == expected
    columns = ["image", "patient_id", "study_id", "view", "modality"]
    assert list(df.reset_index().columns[:5]) == columns


def test_modalities_none_keeps_every_file(mixed_tree, tmp_path):
    root, table, ct, _ = mixed_tree
    out = tmp_path / "all"
    rep = prepare_mimic(root, out, size=16, workers=1, modalities=None, manifest_only=True)
    df = read_manifest(out)
    assert rep.failures == 0 and len(df) == len(table)
    assert (df["modality"] == "CT").sum() == 1


def test_shards_each_list_their_own_skipped_files(mixed_tree, tmp_path):
    root, _, ct, _ = mixed_tree
    out = tmp_path / "sharded"
    for i in range(2):
        prepare_mimic(root, out, size=16, workers=1, shard=f"{i}/2")
    listed = [pd.read_csv(out / f"failures.shard-{i}-of-2.csv") for i in range(2)]
    rows = pd.concat(listed).to_dict("records")
    assert rows == [{"file": str(ct), "reason": REASON}]  # in exactly one shard
    rep = prepare_mimic(root, out, size=16, workers=1)
    assert rep.converted == 0 and rep.failures == 1  # the shards converted everything else
    assert pd.read_csv(out / "failures.csv").to_dict("records") == rows
