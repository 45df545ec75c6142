"""CheXpert (Irvin et al. 2019) → manifest + cache.

`train.csv` / `valid.csv`: Path, Sex, Age, Frontal/Lateral, AP/PA, then 14 findings per image
(1, 0, -1, blank). Patient and study come from the path
(`CheXpert-v1.0[-small]/train/patient00001/study1/view1_frontal.jpg`). The official validation
set stays validation; a test split is carved from train by patient (deterministic, `seed`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pandas as pd

from fastcxr.errors import MissingFile
from fastcxr.findings import CHEXPERT_FINDINGS
from fastcxr.prepare.common import (
    PrepareReport,
    carve_split,
    check_options,
    demographics,
    finish,
    read_label_file,
)

FRONTAL_VIEWS = ("PA", "AP")
REQUIRED = ("Path", "Frontal/Lateral", "AP/PA")


def _read(root: Path, name: str) -> pd.DataFrame:
    p = root / name
    if not p.exists():
        raise MissingFile(f"{root}: no {name} — is this a CheXpert download?")
    return read_label_file(p, REQUIRED)


def _resolve(root: Path, path: str) -> str:
    """CSV paths start with the dataset folder's own name; make them relative to `root`."""
    parts = Path(path).parts
    return str(Path(*parts[1:])) if parts and parts[0].startswith("CheXpert") else path


def chexpert_table(
    root: str | Path,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    test_fraction: float = 0.1,
    seed: int = 0,
) -> pd.DataFrame:
    root = Path(root)
    train, valid = _read(root, "train.csv"), _read(root, "valid.csv")
    train["split"] = "train"
    valid["split"] = "valid"
    df = pd.concat([train, valid], ignore_index=True)
    rel = df["Path"].map(lambda p: _resolve(root, p))
    parts = rel.str.split("/")
    df["patient_id"] = parts.str[1]
    df["study_id"] = parts.str[1] + "/" + parts.str[2]
    frontal = df["Frontal/Lateral"].astype(str).str.lower() == "frontal"
    df["view"] = df["AP/PA"].where(frontal, "LATERAL").fillna("UNKNOWN").astype(str)
    if views:
        df = df[df["view"].isin(views)].copy()
        rel = rel[df.index]
    is_train = df["split"] == "train"
    df.loc[is_train, "split"] = carve_split(
        df.loc[is_train, "patient_id"], {"test": test_fraction}, "train", seed
    )
    findings = [f for f in CHEXPERT_FINDINGS if f in df.columns]
    out = pd.DataFrame({
        "image": "images/" + rel.str.replace("/", "_").str.rsplit(".", n=1).str[0] + ".png",
        "patient_id": df["patient_id"], "study_id": df["study_id"], "view": df["view"],
        "split": df["split"], **demographics(df.index, df.get("Sex"), df.get("Age")),
        "source": rel,
        **{f: df[f] for f in findings},
    })  # fmt: skip
    return out.reset_index(drop=True)


def prepare_chexpert(
    root: str | Path,
    out: str | Path,
    size: int = 512,
    workers: int | None = None,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    test_fraction: float = 0.1,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    shard: str | None = None,
    manifest_only: bool = False,
) -> PrepareReport:
    check_options(size, workers, views, "voi", {"--test-fraction": test_fraction})
    root, out = Path(root).resolve(), Path(out)
    table = chexpert_table(root, views, test_fraction, seed)
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
        extra={"dataset": "chexpert", "test_fraction": test_fraction, "seed": seed},
    )
