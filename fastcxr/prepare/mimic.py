"""MIMIC-CXR → manifest + 8-bit image cache; the DICOM release and MIMIC-CXR-JPG alike.

Labels are per *study* (`mimic-cxr-2.0.0-chexpert.csv.gz`, or `-negbio.csv.gz`: subject_id,
study_id, 14 findings); images are joined to them through `-metadata.csv.gz` (dicom_id,
subject_id, study_id, ViewPosition, …) and `-split.csv.gz` (dicom_id, …, split ∈
train/validate/test). The official split is kept ("validate" becomes "valid"). Which release
is on disk (files/…/*.dcm or *.jpg) is detected.

Each DICOM's Modality is read from its header (no pixel data) into the manifest's `modality`
column, and by default only projection radiographs (CR, DX, DR) are kept: a CT, MR or
ultrasound file that found its way into the tree goes to failures.csv with the reason. A file
without a Modality tag, a file that is not there (yet), and the JPG release keep a blank
modality and are not filtered.

Demographics: MIMIC-CXR records none; they come from MIMIC-IV (`--demographics DIR`, the
folder holding MIMIC-IV's `patients.csv[.gz]` and `admissions.csv[.gz]`, directly or in its
`hosp/` or `core/` subfolder). Without `DIR`, the dataset root itself is looked in (the
synthetic tree ships both files there); when none is found the columns are written blank.

- `sex`: `patients.gender` (M/F).
- `age`: MIMIC-IV shifts every patient's dates and gives `anchor_age`, the age in the
  shifted `anchor_year`. MIMIC-CXR's `StudyDate` is shifted consistently with MIMIC-IV, so
  when `anchor_year` and the metadata's `StudyDate` are both there the age at the study is
  estimated as anchor_age + (study year − anchor_year) (good to about a year: the birthday
  is not known); otherwise `anchor_age` alone, an approximation of the age at the study.
  MIMIC-IV writes 91 for every patient older than 89 in the anchor year.
- `race`: `admissions.race` (`ethnicity` in releases before MIMIC-IV 2.0). A patient's
  admissions may disagree: the most frequent value other than UNKNOWN, UNABLE TO OBTAIN and
  PATIENT DECLINED TO ANSWER is taken (a tie goes to the value of the latest admission by
  `admittime`, then alphabetically); blank when no admission has one.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

from fastcxr.dicom import RADIOGRAPH_MODALITIES, DicomError, not_a_radiograph_reason, read_modality
from fastcxr.errors import MissingFile, UsageError
from fastcxr.findings import CHEXPERT_FINDINGS
from fastcxr.prepare.common import (
    PrepareError,
    PrepareReport,
    check_options,
    demographics,
    finish,
    no_view_left,
    parse_shard,
    read_label_file,
)
from fastcxr.runtime.runs import write_atomic, write_csv

FRONTAL_VIEWS = ("PA", "AP")
LABELERS = ("chexpert", "negbio")
_SPLIT_NAMES = {"train": "train", "validate": "valid", "valid": "valid", "test": "test"}


def _read_label_csv(root: Path, stem: str, needed: Sequence[str]) -> pd.DataFrame:
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.exists():
            return read_label_file(p, needed)
    raise MissingFile(f"{root}: no {stem}.csv.gz — is this a MIMIC-CXR download?")


def detect_extension(root: Path, rel_stems: Sequence[str]) -> str:
    """'.dcm' (DICOM release) or '.jpg' (MIMIC-CXR-JPG), from the first files found."""
    for stem in rel_stems[:200]:
        for ext in (".dcm", ".jpg"):
            if (root / (stem + ext)).exists():
                return ext
    return ".dcm"


# Race values that say nothing about the patient's race.
UNKNOWN_RACE = frozenset({
    "UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER", "UNKNOWN/NOT SPECIFIED",
    "DECLINED TO ANSWER", "NAN", "",
})  # fmt: skip


def _find_mimic_iv(folder: Path, stem: str) -> Path | None:
    for sub in ("", "hosp", "core"):
        for name in (f"{stem}.csv.gz", f"{stem}.csv"):
            p = folder / sub / name
            if p.is_file():
                return p
    return None


def _read_columns(path: Path, needed: Sequence[str], optional: Sequence[str]) -> pd.DataFrame:
    """The needed (and, when there, optional) columns of a MIMIC-IV table; errors name it."""
    want = {*needed, *optional}
    try:
        df = pd.read_csv(path, usecols=lambda c: c in want, dtype={"subject_id": "Int64"})
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError, EOFError, OSError) as e:
        raise PrepareError(f"{path}: malformed CSV ({e})") from e
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    return df[df["subject_id"].notna()]


def patient_race(admissions: pd.DataFrame, column: str = "race") -> pd.Series:
    """subject_id → one race: the most frequent known value over the patient's admissions
    (a tie: the latest admission's, then alphabetical); patients with none are left out."""
    a = admissions[["subject_id", column]].copy()
    a["value"] = a[column].map(lambda v: str(v).strip() if pd.notna(v) else "")
    a = a[~a["value"].str.upper().isin(UNKNOWN_RACE)]
    if a.empty:
        return pd.Series(dtype=object)
    when = admissions.loc[a.index, "admittime"] if "admittime" in admissions else None
    a["when"] = pd.to_datetime(when, errors="coerce") if when is not None else pd.NaT
    g = a.groupby(["subject_id", "value"]).agg(n=("value", "size"), last=("when", "max"))
    g = g.reset_index().sort_values(
        ["subject_id", "n", "last", "value"], ascending=[True, False, False, True],
        na_position="last",
    )  # fmt: skip
    return g.drop_duplicates("subject_id").set_index("subject_id")["value"]


def mimic_demographics(folder: str | Path) -> tuple[pd.DataFrame, dict]:
    """Per subject_id: `sex`, `anchor_age`, `anchor_year` (when given) and `race`, from a
    MIMIC-IV folder; and where each came from (for prepare.json)."""
    folder = Path(folder)
    pat_path = _find_mimic_iv(folder, "patients")
    if pat_path is None:
        raise PrepareError(
            f"{folder}: no patients.csv(.gz) here or in hosp/ or core/ — --demographics "
            "takes the MIMIC-IV folder with patients.csv and admissions.csv"
        )
    pat = _read_columns(pat_path, ["subject_id", "gender", "anchor_age"], ["anchor_year"])
    pat = pat.drop_duplicates("subject_id").set_index("subject_id")
    out = pd.DataFrame({"sex": pat["gender"], "anchor_age": pat["anchor_age"], "known": True})
    out["anchor_year"] = pat["anchor_year"] if "anchor_year" in pat else np.nan
    adm_path = _find_mimic_iv(folder, "admissions")
    race_col = None
    out["race"] = ""
    if adm_path is not None:
        adm = _read_columns(adm_path, ["subject_id"], ["race", "ethnicity", "admittime"])
        race_col = next((c for c in ("race", "ethnicity") if c in adm.columns), None)
        if race_col is None:
            raise PrepareError(f"{adm_path}: no race (or ethnicity) column; has {list(adm)}")
        race = patient_race(adm, race_col)
        out = out.join(race.rename("_race"), how="outer")
        out["race"] = out["_race"].fillna("")
        out = out.drop(columns="_race")
        out["known"] = out["known"].fillna(False).astype(bool)
    info = {
        "patients": str(pat_path),
        "admissions": str(adm_path) if adm_path else None,
        "race_column": race_col,
        "age": "anchor_age + (study year - anchor_year)" if "anchor_year" in pat else "anchor_age",
    }
    return out, info


def _attach_demographics(df: pd.DataFrame, folder: Path | None) -> tuple[dict, dict | None]:
    """The manifest's demographic columns for the joined rows `df` (blank without `folder`)."""
    if folder is None:
        return demographics(df.index), None
    per, info = mimic_demographics(folder)
    sub = pd.to_numeric(df["subject_id"], errors="coerce")
    d = per.reindex(sub.to_numpy())
    d.index = df.index
    age = pd.to_numeric(d["anchor_age"], errors="coerce")
    if "StudyDate" in df.columns:
        year = pd.to_numeric(df["StudyDate"], errors="coerce") // 10000
        shift = year - pd.to_numeric(d["anchor_year"], errors="coerce")
        age = age.where(shift.isna(), age + shift)
    else:
        info["age"] = "anchor_age"
    info["matched_subjects"] = int(sub[d["known"].fillna(False).to_numpy(bool)].nunique())
    info["subjects"] = int(sub.nunique())
    return demographics(df.index, d["sex"], age, d["race"]), info


def resolve_demographics(root: Path, folder: str | Path | None) -> Path | None:
    """`folder` as given, else the dataset root when it holds a patients.csv (or None)."""
    if folder is not None:
        folder = Path(folder)
        if not folder.is_dir():
            raise PrepareError(f"--demographics {folder}: no such folder")
        return folder
    return root if _find_mimic_iv(root, "patients") is not None else None


def mimic_table(
    root: str | Path,
    views: Sequence[str] | None = FRONTAL_VIEWS,
    labels: str = "chexpert",
    demographics_dir: str | Path | None = None,
    info: dict | None = None,
) -> pd.DataFrame:
    """One row per image: the join of metadata, split and per-study labels (no images read),
    with the demographics of `demographics_dir` (or of the root, when it has MIMIC-IV's
    patients.csv; else blank). `info`, when given, receives where they came from."""
    root = Path(root)
    if labels not in LABELERS:
        raise UsageError(f"--labels must be one of {LABELERS}, not {labels!r}")
    meta = _read_label_csv(
        root, "mimic-cxr-2.0.0-metadata", ["dicom_id", "subject_id", "study_id", "ViewPosition"]
    )
    split = _read_label_csv(root, "mimic-cxr-2.0.0-split", ["dicom_id", "split"])
    lab = _read_label_csv(root, f"mimic-cxr-2.0.0-{labels}", ["subject_id", "study_id"])
    df = meta.merge(split[["dicom_id", "split"]], on="dicom_id", how="inner", validate="1:1")
    if views:
        present = df["ViewPosition"].dropna().astype(str)
        df = df[df["ViewPosition"].astype(str).isin(views)]
        if df.empty and len(present):
            raise no_view_left(views, present)
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
    demo, where = _attach_demographics(df, resolve_demographics(root, demographics_dir))
    if info is not None:
        info["demographics"] = where
    out = pd.DataFrame({
        "image": "images/" + df["dicom_id"] + ".png",
        "patient_id": sub,
        "study_id": df["study_id"].astype(str),
        "view": df["ViewPosition"].astype(str),
        "split": df["split"].map(_SPLIT_NAMES),
        **demo,
        "source": [s + ext for s in stems],
        **{f: df[f] for f in findings},
    })  # fmt: skip
    return out.sort_values(["patient_id", "study_id", "image"]).reset_index(drop=True)


def _modality_or_blank(path: str) -> str:
    try:
        return read_modality(path)
    except (DicomError, OSError, ValueError):
        return ""  # missing or unreadable: the conversion reports it


def read_modalities(paths: Sequence[Path], workers: int | None = None) -> list[str]:
    """Each DICOM's Modality tag from its header alone ('' when absent or unreadable)."""
    jobs = [str(p) for p in paths]
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(jobs) < 64:
        return [_modality_or_blank(p) for p in jobs]
    with ProcessPoolExecutor(workers) as ex:
        return list(ex.map(_modality_or_blank, jobs, chunksize=64))


def _record_skipped(
    out: Path, report: PrepareReport, skipped: pd.DataFrame, shard: str | None
) -> PrepareReport:
    """Add the modality-skipped files to the failures.csv that `finish` wrote (and to the
    counts in the report and prepare.json)."""
    sh = parse_shard(shard)
    path = out / ("failures.csv" if sh is None else f"failures.shard-{sh[0]}-of-{sh[1]}.csv")
    failures = pd.read_csv(path, dtype=str) if path.exists() else pd.DataFrame()
    failures = pd.concat([failures, skipped], ignore_index=True)[["file", "reason"]]
    write_csv(path, failures)
    report = dataclasses.replace(report, failures=len(failures))
    info_path = out / "prepare.json"
    if sh is None and info_path.exists():
        info = json.loads(info_path.read_text())
        info["failures"] = report.failures
        text = json.dumps(info, indent=2)
        write_atomic(info_path, lambda t: t.write_text(text))
    return report


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
    modalities: tuple[str, ...] | None = RADIOGRAPH_MODALITIES,
    demographics: str | Path | None = None,
) -> PrepareReport:
    """Write `out/manifest.csv`, `out/images/*.png` and `out/failures.csv` from a download.

    `list_files` writes the image files this subset needs (paths relative to the dataset
    root), so only those are downloaded instead of the whole 4.7 TB bucket.

    `modalities`: the DICOM Modality values to keep (None keeps every file); a DICOM of
    another modality is left out of the manifest and listed in failures.csv. The Modality of
    each DICOM on disk is read from its header (also with `manifest_only` or `shard`, so that
    every run agrees on the table) and recorded in the manifest's `modality` column.

    `demographics`: the MIMIC-IV folder with patients.csv and admissions.csv (see the module
    docstring); None looks in `root` and writes blank columns when there is none there.
    """
    check_options(size, workers, views, intensity)
    root, out = Path(root).resolve(), Path(out)
    info: dict = {}
    table = mimic_table(root, views, labels, demographics, info)
    if list_files:
        try:
            Path(list_files).write_text("\n".join(table["source"]) + "\n")
        except OSError as e:
            raise UsageError(
                f"--list-files {list_files}: cannot write it ({e.strerror or e})"
            ) from None
    table, skipped = _by_modality(table, root, workers, modalities, shard)
    extra = {"dataset": "mimic-cxr", "labels": labels,
             "modalities": list(modalities) if modalities is not None else None,
             "demographics": info.get("demographics")}  # fmt: skip
    report = finish(table, root, out, size, intensity, views, workers, shard, manifest_only,
                    progress, extra=extra)  # fmt: skip
    return _record_skipped(out, report, skipped, shard) if len(skipped) else report


def _by_modality(table: pd.DataFrame, root: Path, workers, modalities, shard):
    """Each DICOM's Modality (read from the headers on disk) as the table's `modality`
    column; the rows of another modality than `modalities` dropped and listed (this shard's
    share of them) with their reason. Returns (the kept table, the skipped files)."""
    modality = pd.Series("", index=table.index, dtype=object)
    dicom = table["source"].str.lower().str.endswith(".dcm")
    if dicom.any():
        on_disk = {i: root / s for i, s in table.loc[dicom, "source"].items()}
        on_disk = {i: p for i, p in on_disk.items() if p.exists()}
        modality[list(on_disk)] = read_modalities(list(on_disk.values()), workers)
    table.insert(table.columns.get_loc("view") + 1, "modality", modality)
    skip = pd.Series(False, index=table.index)
    if modalities is not None:
        keep = {m.strip().upper() for m in modalities}
        skip = (table["modality"] != "") & ~table["modality"].isin(keep)
    kept = tuple(modalities or ())
    skipped = pd.DataFrame({
        "file": [str(root / s) for s in table.loc[skip, "source"]],
        "reason": [not_a_radiograph_reason(m, kept) for m in table.loc[skip, "modality"]],
    })  # fmt: skip
    sh = parse_shard(shard)
    if sh is not None:  # each shard lists the skipped files of its own slice of the table
        skipped = skipped[[i % sh[1] == sh[0] for i in range(len(table)) if skip.iloc[i]]]
    if skip.all():
        found = ", ".join(sorted(set(table["modality"])))
        raise PrepareError(
            f"{root}: every image was skipped by --modalities {','.join(kept)} "
            f"(found: {found}); pass --modalities to keep them"
        )
    return table[~skip].reset_index(drop=True), skipped
