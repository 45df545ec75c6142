import gzip

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fastcxr.manifest import ManifestError, read_manifest, validate_manifest
from fastcxr.prepare.mimic import mimic_table, prepare_mimic
from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic


def read_gz(path):
    with gzip.open(path, "rt") as f:
        return pd.read_csv(f)


def test_synthetic_tree_has_mimic_layout_and_columns(synthetic_tree):
    meta = read_gz(synthetic_tree / "mimic-cxr-2.0.0-metadata.csv.gz")
    labels = read_gz(synthetic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split = read_gz(synthetic_tree / "mimic-cxr-2.0.0-split.csv.gz")
    assert list(meta.columns[:5]) == [
        "dicom_id",
        "subject_id",
        "study_id",
        "PerformedProcedureStepDescription",
        "ViewPosition",
    ]
    assert list(labels.columns[:4]) == ["subject_id", "study_id", "Atelectasis", "Cardiomegaly"]
    assert len(labels.columns) == 16
    assert list(split.columns) == ["dicom_id", "study_id", "subject_id", "split"]
    assert set(split["split"]) <= {"train", "validate", "test"}
    r = meta.iloc[0]
    s = str(r.subject_id)
    assert (
        synthetic_tree / "files" / f"p{s[:2]}" / f"p{s}" / f"s{r.study_id}" / f"{r.dicom_id}.dcm"
    ).exists()
    assert labels.groupby("subject_id").size().max() > 1  # several studies per patient
    assert set(meta["ViewPosition"]) == {"PA", "AP", "LATERAL"}
    assert (labels["Edema"] == -1).any() and labels["Edema"].isna().any()


def test_synthetic_is_deterministic(tmp_path):
    spec = SyntheticSpec(patients=4, seed=7, rows=64, cols=48)
    a = write_synthetic_mimic(tmp_path / "a", spec, workers=1)
    b = write_synthetic_mimic(tmp_path / "b", spec, workers=1)
    for name in ("metadata", "chexpert", "split"):
        pd.testing.assert_frame_equal(
            read_gz(a / f"mimic-cxr-2.0.0-{name}.csv.gz"),
            read_gz(b / f"mimic-cxr-2.0.0-{name}.csv.gz"),
        )
    fa = sorted(p.relative_to(a) for p in a.rglob("*.dcm"))
    assert fa == sorted(p.relative_to(b) for p in b.rglob("*.dcm"))
    import pydicom

    np.testing.assert_array_equal(
        pydicom.dcmread(a / fa[0]).pixel_array, pydicom.dcmread(b / fa[0]).pixel_array
    )


def test_join_counts_match_an_independent_join(synthetic_tree):
    meta = read_gz(synthetic_tree / "mimic-cxr-2.0.0-metadata.csv.gz")
    labels = read_gz(synthetic_tree / "mimic-cxr-2.0.0-chexpert.csv.gz")
    split = read_gz(synthetic_tree / "mimic-cxr-2.0.0-split.csv.gz")
    lab = {(r.subject_id, r.study_id): r.Edema for r in labels.itertuples()}
    spl = dict(zip(split.dicom_id, split.split))
    frontal = [r for r in meta.itertuples() if r.ViewPosition in ("PA", "AP")]
    table = mimic_table(synthetic_tree)
    assert len(table) == len(frontal)
    by_id = table.set_index(table["image"].str[7:-4])
    for r in frontal:
        row = by_id.loc[r.dicom_id]
        assert row["split"] == {"validate": "valid"}.get(spl[r.dicom_id], spl[r.dicom_id])
        e = lab[(r.subject_id, r.study_id)]
        assert (np.isnan(e) and np.isnan(row["Edema"])) or e == row["Edema"]
    assert len(mimic_table(synthetic_tree, views=None)) == len(meta)


def test_prepare_writes_cache_and_resumes(prepared, synthetic_tree):
    df = read_manifest(prepared)
    assert len(df) > 50
    assert {"image", "patient_id", "study_id", "view", "split", "Edema", "Pleural Effusion"} <= set(
        df.columns
    )
    with Image.open(prepared / df["image"].iloc[0]) as im:
        assert im.size == (32, 32) and im.mode == "L"
    again = prepare_mimic(synthetic_tree, prepared, size=32, workers=2)
    assert again.converted == 0 and again.skipped == len(df)
    pd.testing.assert_frame_equal(read_manifest(prepared), df)


def test_broken_dicom_is_reported_not_fatal(synthetic_tree, tmp_path):
    import shutil

    root = tmp_path / "copy"
    shutil.copytree(synthetic_tree, root)
    table = mimic_table(root)
    victim = root / table["source"].iloc[0]
    victim.write_bytes(victim.read_bytes()[:400])  # truncate
    rep = prepare_mimic(root, tmp_path / "out", size=16, workers=1)
    fails = pd.read_csv(tmp_path / "out" / "failures.csv")
    assert rep.failures == 1 and fails["file"].iloc[0] == str(victim)
    assert rep.images == len(table) - 1


def test_leakage_and_bad_paths_are_refused():
    df = pd.DataFrame(
        {"image": ["a.png", "b.png"], "patient_id": ["1", "1"], "split": ["train", "test"]}
    )
    with pytest.raises(ManifestError, match="more than one split.*1"):
        validate_manifest(df)
    with pytest.raises(ManifestError, match="missing column"):
        validate_manifest(df.drop(columns="patient_id"))
    df2 = df.assign(patient_id=["1", "2"], image=["a.png", "../../etc/passwd"])
    with pytest.raises(ManifestError, match="row 3"):
        validate_manifest(df2)


def test_jpg_release_is_detected(synthetic_tree, tmp_path):
    """MIMIC-CXR-JPG: same CSVs, files/…/*.jpg instead of .dcm."""
    import shutil

    from fastcxr.dicom import read_dicom

    root = tmp_path / "jpg"
    root.mkdir()
    for name in ("metadata", "chexpert", "split"):
        shutil.copy(synthetic_tree / f"mimic-cxr-2.0.0-{name}.csv.gz", root)
    for dcm in synthetic_tree.glob("files/**/*.dcm"):
        dst = root / dcm.relative_to(synthetic_tree).with_suffix(".jpg")
        dst.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(read_dicom(dcm, mode="mimic-jpg")).save(dst, quality=95)
    t = mimic_table(root)
    assert t["source"].str.endswith(".jpg").all()
    rep = prepare_mimic(root, tmp_path / "out", size=16, workers=1)
    assert rep.failures == 0 and rep.images == len(t)
    lst = tmp_path / "needed.txt"
    prepare_mimic(root, tmp_path / "out2", size=16, manifest_only=True, list_files=lst)
    assert lst.read_text().split() == t["source"].tolist()


def test_malformed_manifest_csv_names_the_file_and_line(tmp_path):
    p = tmp_path / "manifest.csv"
    p.write_text("image,patient_id,split\na.png,1,train\nb.png,2,valid,extra,fields\n")
    with pytest.raises(ManifestError, match=r"manifest.csv: malformed CSV.*line 3"):
        read_manifest(p)
