"""NIH ChestX-ray14 (Wang et al. 2017) → manifest + cache.

`Data_Entry_2017*.csv`: Image Index, Finding Labels (pipe-separated; "No Finding" when none),
Follow-up #, Patient ID, Patient Age, Patient Gender, View Position, …. The official
`test_list.txt` is the test split; validation is carved from `train_val_list.txt` by patient.
Labels are text-mined and binary: every finding is 1 or 0 (no uncertain, no blank).

Demographics: `Patient Gender` (M/F) → the manifest's `sex`; `Patient Age` → `age` in years
(the 2020 release writes integers, the original 2017 one strings such as "058Y"; both are
read; the handful of impossible ages over 120 in the release become blank); no race is
recorded, so `race` is blank.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fastcxr.errors import MissingFile
from fastcxr.prepare.common import (
    PrepareError,
    PrepareReport,
    carve_split,
    check_options,
    demographics,
    finish,
    read_label_file,
)

FRONTAL_VIEWS = ("PA", "AP")
# NIH label → fastcxr's vocabulary (CheXpert names where the finding is the same).
NIH_FINDINGS = {
    "Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly", "Effusion": "Pleural Effusion",
    "Infiltration": "Infiltration", "Mass": "Mass", "Nodule": "Nodule", "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax", "Consolidation": "Consolidation", "Edema": "Edema",
    "Emphysema": "Emphysema", "Fibrosis": "Fibrosis", "Pleural_Thickening": "Pleural Thickening",
    "Hernia": "Hernia", "No Finding": "No Finding",
}  # fmt: skip
REQUIRED = ("Image Index", "Finding Labels", "Patient ID", "View Position")


def _entries(root: Path) -> pd.DataFrame:
    files = sorted(root.glob("Data_Entry_2017*.csv"))
    if not files:
        raise MissingFile(f"{root}: no Data_Entry_2017*.csv — is this ChestX-ray14?")
    return read_label_file(files[-1], REQUIRED)


def _image_paths(root: Path) -> dict[str, str]:
    """Image file name → path relative to root (images/ or images_001/images/ …)."""
    return {p.name: str(p.relative_to(root)) for p in root.glob("images*/**/*.png")}


def nih_table(
    root: str | Path,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    valid_fraction: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    root = Path(root)
    df = _entries(root)
    test = (
        set((root / "test_list.txt").read_text().split())
        if (root / "test_list.txt").exists()
        else None
    )
    if test is None:
        raise MissingFile(f"{root}: no test_list.txt (the official test split)")
    if views:
        df = df[df["View Position"].astype(str).isin(views)]
    df = df.reset_index(drop=True)
    labels = df["Finding Labels"].astype(str).str.split("|")
    unknown = set().union(*labels.map(set)) - set(NIH_FINDINGS)
    if unknown:
        raise PrepareError(f"Finding Labels holds unknown label(s) {sorted(unknown)[:5]}")
    split = pd.Series("train", index=df.index, dtype=object)
    split[df["Image Index"].isin(test)] = "test"
    tv = split == "train"
    split[tv] = carve_split(df.loc[tv, "Patient ID"], {"valid": valid_fraction}, "train", seed)
    paths = _image_paths(root)
    out = pd.DataFrame({
        "image": "images/" + df["Image Index"].astype(str),
        "patient_id": df["Patient ID"].astype(str),
        "study_id": df["Patient ID"].astype(str) + "/" + df.get("Follow-up #", 0).astype(str),
        "view": df["View Position"].astype(str), "split": split,
        **demographics(df.index, df.get("Patient Gender"), df.get("Patient Age")),
        "source": [paths.get(n, f"images/{n}") for n in df["Image Index"]],
    })  # fmt: skip
    for nih, name in NIH_FINDINGS.items():
        out[name] = labels.map(lambda ls, k=nih: float(k in ls))
    return out


def prepare_nih(
    root: str | Path,
    out: str | Path,
    size: int = 512,
    workers: int | None = None,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    valid_fraction: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    shard: str | None = None,
    manifest_only: bool = False,
) -> PrepareReport:
    check_options(size, workers, views, "voi", {"--valid-fraction": valid_fraction})
    root, out = Path(root).resolve(), Path(out)
    table = nih_table(root, views, valid_fraction, seed)
    return finish(
        table,
        root,
        out,
        size,
        "voi",
        views,
        workers,
        shard,
        manifest_only,
        progress,
        extra={"dataset": "nih-chestxray14", "valid_fraction": valid_fraction, "seed": seed},
    )
