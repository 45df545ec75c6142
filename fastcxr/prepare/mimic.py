"""MIMIC-CXR (DICOM release) → manifest + 8-bit image cache.

Labels are per *study* (`mimic-cxr-2.0.0-chexpert.csv.gz`: subject_id, study_id, 14
findings); images are joined to them through `-metadata.csv.gz` (dicom_id, subject_id,
study_id, ViewPosition, …) and `-split.csv.gz` (dicom_id, …, split ∈ train/validate/test).
The official split is kept ("validate" becomes "valid").
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from fastcxr.findings import CHEXPERT_FINDINGS
from fastcxr.manifest import validate_manifest
from fastcxr.prepare.cache import build_cache, write_csv_atomic

FRONTAL_VIEWS = ("PA", "AP")
_SPLIT_NAMES = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}


@dataclass(frozen=True)
class PrepareReport:
    manifest: str
    images: int
    converted: int
    skipped: int
    failures: int
    size: int
    intensity: str
    views: tuple[str, ...]
    splits: dict[str, int]


def _read_label_csv(root: Path, stem: str, needed: Sequence[str]) -> pd.DataFrame:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.exists():
            df = pd.read_csv(p)
            missing = [c for c in needed if c not in df.columns]
            if missing:
                raise ValueError(f"{p}: missing column(s) {missing}; has {list(df.columns)}")
            return df
    raise FileNotFoundError(f"{root}: no {stem}.csv.gz — is this a MIMIC-CXR download?")


def mimic_table(root: str | Path, views: Sequence[str] | None = FRONTAL_VIEWS) -> pd.DataFrame:
    """One row per image: the join of metadata, split and per-study labels (no images read)."""
    root = Path(root)
    meta = _read_label_csv(
        root, "mimic-cxr-2.0.0-metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    )
    split = _read_label_csv(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"])
    labels = _read_label_csv(root, "mimic-cxr-2.0.0-chexpert", ["subject_id", "study_id"])
    df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner", validate="1:1")
    if views:
        df = df[df["ViewPosition"].astype(str).isin(views)]
    df = df.merge(labels, on=["subject_id", "study_id"], how="left", validate="m:1")
    sub = df["subject_id"].astype(str)
    df["source"] = (
        "files/p"
        + sub.str[:2]
        + "/p"
        + sub
        + "/s"
        + df["study_id"].astype(str)
        + "/"
        + df["dicom_id"]
        + ".dcm"
    )
    df["split"] = df["split"].map(_SPLIT_NAMES)
    findings = [f for f in CHEXPERT_FINDINGS if f in df.columns]
    out = pd.DataFrame({
        "image": "images/" + df["dicom_id"] + ".png",
        "patient_id": sub,
        "study_id": df["study_id"].astype(str),
        "view": df["ViewPosition"].astype(str),
        "split": df["split"],
        "source": df["source"],
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
) -> PrepareReport:
    """Write `out/manifest.csv`, `out/images/*.png` and `out/failures.csv` from a download."""
    root, out = Path(root).resolve(), Path(out)
    table = mimic_table(root, views)
    if table.empty:
        raise ValueError(f"{root}: no images left after joining the label files (views={views})")
    sources = [root / s for s in table["source"]]
    targets = [out / p for p in table["image"]]
    res = build_cache(sources, targets, size, intensity, workers, progress)
    failed = set(res.failures["file"])
    manifest = table[[str(s) not in failed for s in sources]].reset_index(drop=True)
    validate_manifest(manifest, out / "manifest.csv")
    write_csv_atomic(res.failures, out / "failures.csv")
    write_csv_atomic(manifest, out / "manifest.csv")
    report = PrepareReport(
        manifest=str(out / "manifest.csv"),
        images=len(manifest),
        converted=res.converted,
        skipped=res.skipped,
        failures=len(res.failures),
        size=size,
        intensity=intensity,
        views=tuple(views or ()),
        splits=manifest["split"].value_counts().to_dict(),
    )
    (out / "prepare.json").write_text(json.dumps({**asdict(report), "root": str(root)}, indent=2))
    return report
