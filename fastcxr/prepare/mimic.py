"""MIMIC-CXR → manifest + 8-bit image cache; the DICOM release and MIMIC-CXR-JPG alike.

Labels are per *study* (`mimic-cxr-2.0.0-chexpert.csv.gz`, or `-negbio.csv.gz`: subject_id,
study_id, 14 findings); images are joined to them through `-metadata.csv.gz` (dicom_id,
subject_id, study_id, ViewPosition, …) and `-split.csv.gz` (dicom_id, …, split ∈
train/validate/test). The official split is kept ("validate" becomes "valid"). Which release
is on disk (files/…/*.dcm or *.jpg) is detected.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fastcxr.findings import CHEXPERT_FINDINGS
from fastcxr.prepare.common import PrepareReport, finish, read_label_file

FRONTAL_VIEWS = ("PA", "AP")
LABELERS = ("chexpert", "negbio")
_SPLIT_NAMES = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}


def _read_label_csv(root: Path, stem: str, needed: Sequence[str]) -> pd.DataFrame:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.exists():
            return read_label_file(p, needed)
    raise FileNotFoundError(f"{root}: no {stem}.csv.gz — is this a MIMIC-CXR download?")


def detect_extension(root: Path, rel_stems: Sequence[str]) -> str:
    """'.dcm' (DICOM release) or '.jpg' (MIMIC-CXR-JPG), from the first files found."""
    for stem in rel_stems[:200]:
        for ext in (".dcm", ".jpg"):
            if (root / (stem + ext)).exists():
                return ext
    return ".dcm"


def mimic_table(
    root: str | Path, views: Sequence[str] | None = FRONTAL_VIEWS, labels: str = "chexpert"
) -> pd.DataFrame:
    """One row per image: the join of metadata, split and per-study labels (no images read)."""
    root = Path(root)
    if labels not in LABELERS:
        raise ValueError(f"--labels must be one of {LABELERS}, not {labels!r}")
    meta = _read_label_csv(
        root, "mimic-cxr-2.0.0-metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    )
    split = _read_label_csv(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"])
    lab = _read_label_csv(root, f"mimic-cxr-2.0.0-{labels}", ["subject_id", "study_id"])
    df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner", validate="1:1")
    if views:
        df = df[df["ViewPosition"].astype(str).isin(views)]
    df = df.merge(lab, on=["subject_id", "study_id"], how="left", validate="m:1")
    sub = df["subject_id"].astype(str)
    stems = (
        "files/p"
        + sub.str[:2]
        + "/p"
        + sub
        + "/s"
        + df["study_id"].astype(str)
        + "/"
        + df["dicom_id"]
    ).tolist()
    ext = detect_extension(root, stems)
    findings = [f for f in CHEXPERT_FINDINGS if f in df.columns]
    out = pd.DataFrame({
        "image": "images/" + df["dicom_id"] + ".png",
        "patient_id": sub,
        "study_id": df["study_id"].astype(str),
        "view": df["ViewPosition"].astype(str),
        "split": df["split"].map(_SPLIT_NAMES),
        "source": [s + ext for s in stems],
        **{f: df[f] for f in findings},
    })  # fmt: skip
    return out.sort_values(["patient_id", "study_id", "image"]).reset_index(drop=True)


def prepare_mimic(
    root: str | Path,
    out: str | Path,
    size: int = 512,
    workers: int | None = None,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    intensity: str = "voi",
    progress: Callable[[int, int], None] | None = None,
    labels: str = "chexpert",
    shard: str | None = None,
    manifest_only: bool = False,
    list_files: str | Path | None = None,
) -> PrepareReport:
    """Write `out/manifest.csv`, `out/images/*.png` and `out/failures.csv` from a download.

    `list_files` writes the image files this subset needs (paths relative to the dataset
    root), so only those are downloaded instead of the whole 4.7 TB bucket.
    """
    root, out = Path(root).resolve(), Path(out)
    table = mimic_table(root, views, labels)
    if list_files:
        Path(list_files).write_text("\n".join(table["source"]) + "\n")
    return finish(
        table,
        root,
        out,
        size,
        intensity,
        views,
        workers,
        shard,
        manifest_only,
        progress,
        extra={"dataset": "mimic-cxr", "labels": labels},
    )
