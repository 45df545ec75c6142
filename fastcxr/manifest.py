"""The manifest: one row per image, the contract between preparation and training.

Columns: `image` (path relative to the manifest's folder), `patient_id`, `study_id`, `view`,
`split` (train/valid/test) and one column per finding with the *raw* label
(1, 0, -1 uncertain, blank = not mentioned).

Optional demographic columns (every `prepare` writes them, blank where the dataset has no
value; manifests written before them stay valid): `sex` (F or M, blank = unknown), `age`
(years, a number in 0..120, blank = unknown) and `race` (free text, blank = unknown).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd

from fastcxr.errors import FastcxrError

REQUIRED = ("image", "patient_id", "split")
SPLITS = ("train", "valid", "test")
SEXES = ("F", "M")
AGE_RANGE = (0, 120)


class ManifestError(FastcxrError, ValueError):
    """A manifest that cannot be trained on; the message names the problem."""


def read_manifest(path: str | Path) -> pd.DataFrame:
    """Read and validate a manifest CSV (columns, splits, patient leakage, paths)."""
    path = Path(path)
    if path.is_dir():
        path = path / "manifest.csv"
    if not path.exists():
        raise ManifestError(f"no manifest at {path}")
    try:
        df = pd.read_csv(
            path,
            dtype={"image": str, "patient_id": str, "study_id": str, "sex": str, "race": str},
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as e:
        raise ManifestError(f"{path}: malformed CSV ({e})") from e
    if "patient_id" in df.columns:  # "123" and "123 " are one patient
        df["patient_id"] = df["patient_id"].str.strip()
    validate_manifest(df, path)
    return df


def validate_manifest(df: pd.DataFrame, source: str | Path = "manifest") -> None:
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ManifestError(f"{source}: missing column(s) {missing}; has {list(df.columns)}")
    blank = blank_patient_rows(df)
    if blank:
        shown = _shown(blank, 10)
        raise ManifestError(
            f"{source}: {len(blank)} row(s) have a blank patient_id (rows {shown}); every image "
            "needs its patient, or the leakage check and the patient-level statistics cannot "
            "group it"
        )
    bad = sorted(set(df["split"].astype(str)) - set(SPLITS))
    if bad:
        raise ManifestError(f"{source}: unknown split value(s) {bad}; expected {SPLITS}")
    leaks = patients_in_several_splits(df)
    if leaks:
        shown = _shown(leaks, 10)
        raise ManifestError(
            f"{source}: {len(leaks)} patient(s) appear in more than one split "
            f"(data leakage): {shown}"
        )
    empty = [i + 2 for i, v in enumerate(df["image"]) if not isinstance(v, str) or not v.strip()]
    if empty:
        shown = _shown(empty, 10)
        raise ManifestError(f"{source}: {len(empty)} row(s) have a blank 'image' (rows {shown})")
    shared = images_in_several_splits(df)
    if shared:
        shown = _shown(shared, 5)
        raise ManifestError(
            f"{source}: {len(shared)} image file(s) are listed more than once (in two splits "
            f"that is data leakage; in one, the image counts twice): {shown}"
        )
    for i, p in enumerate(df["image"].astype(str)):
        q = Path(p)
        if q.is_absolute() or ".." in q.parts:
            raise ManifestError(
                f"{source}: row {i + 2}, column 'image': path {p!r} leaves the "
                "dataset folder (absolute or '..')"
            )
    validate_demographics(df, source)


def validate_demographics(df: pd.DataFrame, source: str | Path = "manifest") -> None:
    """`sex` in {F, M, blank} and `age` a number in 0..120 or blank, where the columns exist;
    a bad value is a `ManifestError` naming its CSV rows (header = row 1)."""
    if "sex" in df.columns:
        sex = df["sex"]
        text = sex.astype(str).str.strip()
        bad = sex.notna().to_numpy() & ~text.isin(["", *SEXES]).to_numpy()
        if bad.any():
            rows = [int(i) + 2 for i in np.flatnonzero(bad)]
            values = sorted(set(text[bad]))
            raise ManifestError(
                f"{source}: {len(rows)} row(s) have a sex other than F, M or blank "
                f"(rows {_shown(rows, 10)}; values {_shown(values, 5)})"
            )
    if "age" in df.columns:
        age = df["age"]
        num = pd.to_numeric(age, errors="coerce").astype(float)
        text = age.astype(str).str.strip()
        blank = age.isna().to_numpy() | (text == "").to_numpy()
        lo, hi = AGE_RANGE
        bad = ~blank & (num.isna() | (num < lo) | (num > hi)).to_numpy()
        if bad.any():
            rows = [int(i) + 2 for i in np.flatnonzero(bad)]
            values = list(dict.fromkeys(text[bad]))
            raise ManifestError(
                f"{source}: {len(rows)} row(s) have an age that is not a number of years in "
                f"{lo}..{hi} or blank (rows {_shown(rows, 10)}; values {_shown(values, 5)})"
            )


def _shown(items: list, k: int) -> str:
    """The first `k` items for a message, with an ellipsis when there are more."""
    return ", ".join(map(str, items[:k])) + (" …" if len(items) > k else "")


def blank_patient_rows(df: pd.DataFrame) -> list[int]:
    """CSV row numbers (header = row 1) whose patient_id is missing, NaN or only spaces."""
    pid = df["patient_id"]
    text = pid.astype(str).str.strip()
    blank = pid.isna().to_numpy() | text.isin(["", "nan", "NaN", "None"]).to_numpy()
    return [int(i) + 2 for i in np.flatnonzero(blank)]


def images_in_several_splits(df: pd.DataFrame) -> list[str]:
    """Image files (normalised paths) listed more than once: in two splits (leakage) or
    twice in one (counted twice)."""
    key = df["image"].astype(str).map(lambda p: Path(p).as_posix())
    n = key.value_counts()
    return sorted(n[n > 1].index)


def patients_in_several_splits(df: pd.DataFrame) -> list[str]:
    """Patients in more than one split, ids compared as `leakage.patient_key` reads them
    (`10035354`, `10035354.0` and `010035354` are one patient); each shown as its spellings."""
    from fastcxr.leakage import patient_key

    ids = df["patient_id"].astype(str)
    key = ids.map(patient_key)
    n = df.groupby(key)["split"].nunique()
    leaks = sorted(n[n > 1].index)
    spell = ids.groupby(key).agg(lambda v: " = ".join(sorted(set(v))))
    return [spell[k] for k in leaks]


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
