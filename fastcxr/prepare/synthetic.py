"""A miniature MIMIC-CXR: real folder layout, real label files, radiograph-like DICOMs.

The tree `prepare synthetic OUT` writes is laid out exactly like a MIMIC-CXR download, so
`fastcxr prepare mimic OUT` runs on it unchanged:

    OUT/files/p10/p10000032/s50414267/02aa804e-bde0afdd-112c0b34-7bc16630-4e384014.dcm
    OUT/mimic-cxr-2.0.0-metadata.csv.gz   dicom_id, subject_id, study_id, …, ViewPosition, …
    OUT/mimic-cxr-2.0.0-chexpert.csv.gz   subject_id, study_id, 14 findings (1/0/-1/blank)
    OUT/mimic-cxr-2.0.0-split.csv.gz      dicom_id, study_id, subject_id, split
    OUT/patients.csv                      MIMIC-IV's: subject_id, gender, anchor_age, anchor_year, …
    OUT/admissions.csv                    MIMIC-IV's: subject_id, hadm_id, admittime, …, race

Images carry learnable signs: a pleural effusion is a basal opacity with a meniscus that
blunts the costophrenic angle; pulmonary edema is a bilateral perihilar ("bat-wing") haze.
Labels are slightly noisy (`p_label_noise`), as report-derived labels are. Label combinations
follow the study's training set (Table 2: (Edema, Effusion) = (0,0) 11548,
(0,1) 5709, (1,0) 2310, (1,1) 14136). Labels are per study; patients have several studies;
some labels are uncertain (-1) or blank; views are PA, AP and lateral; pixel data are 12-bit
MONOCHROME1 or MONOCHROME2, with or without a rescale and window tags.

Demographics, as MIMIC-IV's `patients.csv` / `admissions.csv` would give them (which
`prepare mimic` reads from the root): about half women, ages 18-90 in the anchor year (the
year of the first study) and a few years more at later studies, a handful of race categories
with MIMIC-IV's spellings, some patients' admissions disagreeing and some holding only
UNKNOWN / UNABLE TO OBTAIN / PATIENT DECLINED TO ANSWER. They are drawn from a generator of
their own after everything else, so the images and labels are those of a tree without them.
"""

from __future__ import annotations

import datetime as dt
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fastcxr.findings import CHEXPERT_FINDINGS
from fastcxr.runtime.runs import write_atomic, write_csv

TABLE2 = {(0, 0): 11548, (0, 1): 5709, (1, 0): 2310, (1, 1): 14136}  # (Edema, Effusion)
DX_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
SPLIT_PROBS = {"train": 0.75, "validate": 0.10, "test": 0.15}
# MIMIC-IV's spellings, roughly its shares of patients; "" = a patient whose admissions only
# hold the unknown markers.
RACES = {
    "WHITE": 0.58, "BLACK/AFRICAN AMERICAN": 0.15, "HISPANIC/LATINO - PUERTO RICAN": 0.04,
    "HISPANIC OR LATINO": 0.03, "ASIAN - CHINESE": 0.03, "ASIAN": 0.02, "OTHER": 0.04,
    "WHITE - OTHER EUROPEAN": 0.03, "": 0.08,
}  # fmt: skip
UNKNOWN_RACES = ("UNKNOWN", "UNABLE TO OBTAIN", "PATIENT DECLINED TO ANSWER")


@dataclass(frozen=True)
class SyntheticSpec:
    """What `write_synthetic_mimic` generates; deterministic for a seed."""

    patients: int = 1000
    seed: int = 0
    rows: int = 224
    cols: int = 192
    p_uncertain: float = 0.06  # per study and finding
    p_blank: float = 0.07
    p_lateral: float = 0.4  # a study also has a lateral view
    # Report labels disagree with the image now and then (a sign the report does not mention,
    # a mention the image does not show): this caps the achievable AUC near 0.96, as on real
    # data, instead of letting a model reach a perfect score.
    p_label_noise: float = 0.03


def _grid(rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    return y / (rows - 1), x / (cols - 1)


def _sig(v: np.ndarray, soft: float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(np.clip(-v / soft, -50, 50)))


def _ellipse(x, y, cx, cy, rx, ry, soft=0.08):
    return _sig(1.0 - ((x - cx) / rx) ** 2 - ((y - cy) / ry) ** 2, soft)


def _smooth_noise(rng: np.random.Generator, rows: int, cols: int, cells: int) -> np.ndarray:
    """Low-frequency texture: a coarse random grid, bilinearly upsampled."""
    g = rng.normal(size=(cells + 1, cells + 1)).astype(np.float32)
    yi = np.linspace(0, cells, rows, dtype=np.float32)
    xi = np.linspace(0, cells, cols, dtype=np.float32)
    y0, x0 = np.minimum(yi.astype(int), cells - 1), np.minimum(xi.astype(int), cells - 1)
    fy, fx = (yi - y0)[:, None], (xi - x0)[None, :]
    a, b = g[y0][:, x0], g[y0][:, x0 + 1]
    c, d = g[y0 + 1][:, x0], g[y0 + 1][:, x0 + 1]
    return (a * (1 - fx) + b * fx) * (1 - fy) + (c * (1 - fx) + d * fx) * fy


def render_frontal(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    edema: float,
    effusion: tuple[float, float],
    ap: bool = False,
    consolidation: float = 0.0,
) -> np.ndarray:
    """A frontal chest radiograph in display space (0..1, dense = bright).

    `edema` is the severity (0 none .. 1 severe) of a bilateral perihilar haze; `effusion`
    the severity at the image-left (patient right) and image-right bases; `consolidation` a
    unilateral patchy opacity that confounds both.
    """
    y, x = _grid(rows, cols)
    s = rng.uniform(0.94, 1.06)
    x = (x - 0.5 - rng.uniform(-0.03, 0.03)) / s + 0.5
    y = (y - 0.5 - rng.uniform(-0.03, 0.03)) / s + 0.5
    img = 0.05 + 0.45 * _ellipse(x, y, 0.5, 0.58, 0.47, 0.62, 0.05)  # air, then soft tissue
    img += 0.12 * _sig(0.09 - np.abs(x - 0.5), 0.01) * _sig(y - 0.05, 0.02)  # spine
    lungs = np.zeros_like(img)
    bases = []
    for side, cx in ((0, 0.31), (1, 0.69)):
        rx, ry = 0.15 * rng.uniform(0.92, 1.08), 0.30 * rng.uniform(0.92, 1.08)
        cy = 0.47
        base = cy + 0.78 * ry  # lowest point of the lung field, at the costophrenic angle
        lateral = (x - cx) * (1 if side else -1) / rx  # 1 at the lateral edge
        dome = base - 0.07 * (1 - np.clip(lateral, -1, 1) ** 2)
        field = _ellipse(x, y, cx, cy, rx, ry, 0.06)
        lung = field * _sig(dome - y, 0.006)
        lungs = np.maximum(lungs, lung)
        bases.append((cx, rx, ry, base, lung))
    img -= 0.33 * lungs
    ribs = np.sin((y * 11.0 + 1.6 * (x - 0.5) ** 2) * 2 * np.pi) > 0.75
    img += 0.05 * lungs * ribs
    heart_r = 0.15 * rng.uniform(0.9, 1.1) * (1.12 if ap else 1.0)
    heart = _ellipse(x, y, 0.55, 0.63, heart_r, 0.12, 0.05)
    mediastinum = _sig(0.07 - np.abs(x - 0.5), 0.012) * _sig(0.74 - y, 0.02)
    img += 0.30 * np.maximum(heart, mediastinum) * np.maximum(lungs, 0.35)
    if edema > 0:  # bilateral perihilar haze, fading towards the periphery
        haze = sum(_ellipse(x, y, hx, 0.47, 0.10, 0.16, 0.35) for hx in (0.39, 0.61))
        texture = 1 + 0.35 * _smooth_noise(rng, rows, cols, 12)
        img += (0.10 + 0.12 * edema) * haze * lungs * texture
    if consolidation > 0:  # a unilateral patch: opacity that is neither edema nor effusion
        cx, cy = rng.choice([0.3, 0.7]) + rng.uniform(-0.05, 0.05), rng.uniform(0.3, 0.6)
        patch = _ellipse(x, y, cx, cy, rng.uniform(0.04, 0.08), rng.uniform(0.05, 0.1), 0.3)
        img += 0.15 * consolidation * patch * lungs * (1 + 0.5 * _smooth_noise(rng, rows, cols, 16))
    for (cx, rx, ry, base, lung), sev in zip(bases, effusion):
        if sev <= 0:
            continue
        depth = (0.06 + 0.16 * sev) * ry / 0.30
        lateral = np.abs(x - cx) / rx
        meniscus = base - depth - 0.05 * np.clip(lateral, 0, 1.2) ** 2  # higher laterally
        img += (0.24 + 0.08 * sev) * _sig(y - meniscus, 0.008) * lung  # fills the base
    img += 0.04 * _smooth_noise(rng, rows, cols, 6) + rng.normal(0, 0.015, img.shape)
    img = np.clip(img, 0, 1) ** rng.uniform(0.85, 1.15)
    return img.astype(np.float32)


def render_lateral(
    rng: np.random.Generator, rows: int, cols: int, edema: float, effusion: float
) -> np.ndarray:
    """A lateral view: one lung field, spine posterior, effusion at the posterior sulcus."""
    y, x = _grid(rows, cols)
    img = 0.05 + 0.45 * _ellipse(x, y, 0.5, 0.55, 0.44, 0.6, 0.05)
    lung = _ellipse(x, y, 0.5, 0.47, 0.28, 0.32, 0.06)
    img -= 0.28 * lung
    img += 0.15 * _sig(0.03 - np.abs(x - 0.82 + 0.05 * y), 0.01)
    img += 0.2 * _ellipse(x, y, 0.38, 0.66, 0.14, 0.13, 0.05) * lung
    if edema > 0:
        img += (0.08 + 0.1 * edema) * _ellipse(x, y, 0.5, 0.47, 0.15, 0.18, 0.3) * lung
    if effusion > 0:
        img += (0.2 + 0.1 * effusion) * _sig(y - (0.74 - 0.1 * effusion), 0.01) * lung
    img += 0.04 * _smooth_noise(rng, rows, cols, 6) + rng.normal(0, 0.015, img.shape)
    return np.clip(img, 0, 1).astype(np.float32)


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5))


def encode_dicom(
    rng: np.random.Generator, img: np.ndarray, view: str, meta: dict, path: Path
) -> None:
    """Write `img` (display 0..1) as a 12-bit DICOM with varied but correct display tags."""
    rows, cols = img.shape
    mono1 = rng.random() < 0.3
    # Modality values: display 0..1 ↔ 100..3700; MONOCHROME1 stores dense tissue as low values.
    mv = 100 + 3600 * ((1 - img) if mono1 else img)
    slope, icpt = (1.0, 0.0) if rng.random() < 0.5 else (2.0, -1000.0)
    stored = np.clip(np.rint((mv - icpt) / slope), 0, 4095).astype(np.uint16)

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = DX_SOP_CLASS
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = DX_SOP_CLASS, fm.MediaStorageSOPInstanceUID
    ds.Modality = "CR" if rng.random() < 0.5 else "DX"
    ds.PatientID = str(meta["subject_id"])
    ds.StudyID = str(meta["study_id"])[-8:]
    ds.AccessionNumber = str(meta["study_id"])
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.StudyDate, ds.StudyTime = meta["StudyDate"], meta["StudyTime"]
    ds.ViewPosition = view
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME1" if mono1 else "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, icpt, "US"
    if rng.random() < 0.85:  # the rest have no window: readers fall back to min-max
        ds.WindowCenter = round(1900 + rng.uniform(-80, 80), 1)
        ds.WindowWidth = round(3600 + rng.uniform(-150, 150), 1)
    ds.PixelData = stored.tobytes()
    write_atomic(path, lambda t: ds.save_as(t, enforce_file_format=True))


def _raw_label(rng: np.random.Generator, truth: int, spec: SyntheticSpec) -> float:
    r = rng.random()
    if r < spec.p_uncertain:
        return -1.0
    if r < spec.p_uncertain + spec.p_blank:
        return np.nan
    return float(truth)


def _write_image(job) -> None:
    path, seed, view, sev_edema, sev_eff, consolidation, meta, rows, cols = job
    rng = np.random.default_rng(seed)
    if view == "LATERAL":
        img = render_lateral(rng, rows, cols, sev_edema, max(sev_eff))
    else:
        img = render_frontal(
            rng, rows, cols, sev_edema, sev_eff, ap=view == "AP", consolidation=consolidation
        )
    encode_dicom(rng, img, view, meta, path)


def synthetic_demographics(
    subjects: np.ndarray, study_dates: dict[int, list[dt.date]], seed: int
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """MIMIC-IV-style `patients` and `admissions` tables for `subjects` (each with the dates
    of its studies), from a generator of their own (`[seed, 1000]`): drawing them moves no
    image or label of the tree."""
    rng = np.random.default_rng([seed, 1000])
    races, p_race = list(RACES), np.array(list(RACES.values()))
    p_race = p_race / p_race.sum()
    hadm_pool = iter(rng.choice(np.arange(20_000_000, 30_000_000), len(subjects) * 6, False))
    patients, admissions = [], []
    for subject in (int(s) for s in subjects):
        dates = study_dates[subject]
        anchor_year = dates[0].year
        anchor_age = int(np.clip(np.rint(rng.normal(63, 16)), 18, 90))
        lo = 2008 + 3 * int(rng.integers(0, 4))
        patients.append({
            "subject_id": subject, "gender": "F" if rng.random() < 0.5 else "M",
            "anchor_age": anchor_age, "anchor_year": anchor_year,
            "anchor_year_group": f"{lo} - {lo + 2}", "dod": "",
        })  # fmt: skip
        race = races[rng.choice(len(races), p=p_race)]
        for _ in range(1 + min(int(rng.poisson(1.0)), 4)):
            day = dates[int(rng.integers(0, len(dates)))] - dt.timedelta(int(rng.integers(0, 3)))
            admit = dt.datetime.combine(day, dt.time(int(rng.integers(0, 24)), 0))
            r = rng.random()
            if not race or r < 0.12:  # the marker of an admission that recorded none
                value = UNKNOWN_RACES[int(rng.integers(0, len(UNKNOWN_RACES)))]
            elif r < 0.17:  # this admission recorded another category ("" is last: not it)
                value = races[int(rng.integers(0, len(races) - 1))]
            else:
                value = race
            admissions.append({
                "subject_id": subject, "hadm_id": int(next(hadm_pool)),
                "admittime": admit.strftime("%Y-%m-%d %H:%M:%S"),
                "dischtime": (admit + dt.timedelta(days=int(rng.integers(1, 12)))).strftime(
                    "%Y-%m-%d %H:%M:%S"
                ),
                "admission_type": "EW EMER." if rng.random() < 0.6 else "URGENT",
                "race": value,
            })  # fmt: skip
    return pd.DataFrame(patients), pd.DataFrame(admissions)


def write_synthetic_mimic(
    out: str | Path,
    spec: SyntheticSpec = SyntheticSpec(),
    workers: int | None = None,
    demographics: bool = True,
) -> Path:
    """Write the miniature MIMIC-CXR tree under `out`; returns `out`. With `demographics`,
    also MIMIC-IV's `patients.csv` and `admissions.csv` (drawn last, from their own generator:
    the images and label files are the same without them).

    Deterministic for `spec` (each image has its own seeded generator, so the worker count
    does not change a pixel); images already on disk are kept (an interrupted run resumes).
    """
    out = Path(out)
    rng = np.random.default_rng(spec.seed)
    subjects = rng.choice(np.arange(10_000_000, 20_000_000), spec.patients, replace=False)
    tree = _Tree(out, spec)
    study_pool = iter(rng.choice(np.arange(50_000_000, 60_000_000), spec.patients * 8, False))
    study_dates: dict[int, list[dt.date]] = {}
    for subject in subjects:
        split = SPLITS[rng.choice(len(SPLITS), p=list(SPLIT_PROBS.values()))]
        date = dt.date(2110, 1, 1) + dt.timedelta(days=int(rng.integers(0, 3000)))
        for _ in range(1 + min(int(rng.poisson(1.2)), 4)):
            study = int(next(study_pool))
            date += dt.timedelta(days=int(rng.integers(1, 400)))
            study_dates.setdefault(int(subject), []).append(date)  # (no draw: see below)
            labels, signs = _study_labels(rng, spec)
            tree.labels.append([int(subject), study, *labels])
            tree.add_study(rng, int(subject), study, date, split, signs)
    tree.write(workers)
    if not demographics:
        return out
    # Demographics last, from their own generator: the tree above is the same without them.
    patients, admissions = synthetic_demographics(subjects, study_dates, spec.seed)
    write_csv(out / "patients.csv", patients)
    write_csv(out / "admissions.csv", admissions)
    return out


SPLITS = list(SPLIT_PROBS)
_COMBOS = list(TABLE2)
_P_COMBO = np.array([TABLE2[c] for c in _COMBOS], float)
_P_COMBO /= _P_COMBO.sum()
_VIEW_MEANING = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral"}


def _study_labels(rng: np.random.Generator, spec: SyntheticSpec) -> tuple[list, tuple]:
    """One study's CheXpert labels, and the signs its images show: (edema severity,
    (left, right) effusion severities, consolidation). An uncertain label has a subtle sign
    half the time; a blank one shows nothing."""
    edema_i, effusion_i = (CHEXPERT_FINDINGS.index(f) for f in ("Edema", "Pleural Effusion"))
    edema, effusion = _COMBOS[rng.choice(len(_COMBOS), p=_P_COMBO)]
    labels = [np.nan] * len(CHEXPERT_FINDINGS)
    labels[edema_i] = _raw_label(rng, edema, spec)
    labels[effusion_i] = _raw_label(rng, effusion, spec)
    shown_edema = edema ^ int(rng.random() < spec.p_label_noise)
    shown_effusion = effusion ^ int(rng.random() < spec.p_label_noise)
    sev_edema = rng.uniform(0.1, 1.0) if shown_edema else 0.0
    if labels[edema_i] == -1:
        sev_edema = rng.uniform(0.0, 0.3) * (rng.random() < 0.5)
    elif np.isnan(labels[edema_i]):
        sev_edema = 0.0
    sides = rng.choice([(1, 1), (1, 0), (0, 1)], p=[0.6, 0.2, 0.2]) if shown_effusion else (0, 0)
    sev_eff = tuple(float(rng.uniform(0.15, 1.0) * s) for s in sides)
    if labels[effusion_i] == -1:
        sev_eff = (rng.uniform(0.0, 0.3) * (rng.random() < 0.5), 0.0)
    elif np.isnan(labels[effusion_i]):
        sev_eff = (0.0, 0.0)
    consolidation = rng.uniform(0.4, 1.0) if rng.random() < 0.2 else 0.0
    if consolidation:
        labels[CHEXPERT_FINDINGS.index("Consolidation")] = 1.0
        labels[CHEXPERT_FINDINGS.index("Lung Opacity")] = 1.0
    if not (edema or effusion or consolidation) and rng.random() < 0.5:
        labels[CHEXPERT_FINDINGS.index("No Finding")] = 1.0
    if rng.random() < 0.3:
        labels[CHEXPERT_FINDINGS.index("Support Devices")] = float(rng.random() < 0.6)
    return labels, (sev_edema, sev_eff, consolidation)


class _Tree:
    """The rows of the tree's three tables as they are drawn, and the images still to write."""

    def __init__(self, out: Path, spec: SyntheticSpec):
        self.out, self.spec = out, spec
        self.meta, self.labels, self.splits, self.jobs = [], [], [], []

    def add_study(self, rng, subject: int, study: int, date: dt.date, split: str, signs) -> None:
        """A study's images: a frontal view (PA or AP), sometimes a lateral too."""
        spec = self.spec
        views = ["PA" if rng.random() < 0.55 else "AP"]
        if rng.random() < spec.p_lateral:
            views.append("LATERAL")
        hh, mm, ss = (int(rng.integers(0, k)) for k in (24, 60, 60))
        stime = f"{hh:02d}{mm:02d}{ss:02d}.000"
        for view in views:
            dicom_id = _dicom_id(rng)
            m = dict(dicom_id=dicom_id, subject_id=subject, study_id=study,
                     StudyDate=date.strftime("%Y%m%d"), StudyTime=stime)  # fmt: skip
            path = (self.out / "files" / f"p{str(subject)[:2]}" / f"p{subject}" / f"s{study}"
                    / f"{dicom_id}.dcm")  # fmt: skip
            if not path.exists():
                seeds = [spec.seed, subject, study, len(self.meta)]
                self.jobs.append((path, seeds, view, *signs, m, spec.rows, spec.cols))
            self.meta.append({
                "dicom_id": dicom_id, "subject_id": subject, "study_id": study,
                "PerformedProcedureStepDescription": f"CHEST ({view})",
                "ViewPosition": view, "Rows": spec.rows, "Columns": spec.cols,
                "StudyDate": int(m["StudyDate"]), "StudyTime": float(stime),
                "ProcedureCodeSequence_CodeMeaning": f"CHEST ({view})",
                "ViewCodeSequence_CodeMeaning": _VIEW_MEANING[view],
                "PatientOrientationCodeSequence_CodeMeaning": "Erect",
            })  # fmt: skip
            self.splits.append([dicom_id, study, subject, split])

    def write(self, workers: int | None) -> None:
        """The images not yet on disk, then the three tables."""
        if workers == 1 or len(self.jobs) < 16:
            for job in self.jobs:
                _write_image(job)
        else:
            with ProcessPoolExecutor(workers or os.cpu_count()) as ex:
                list(ex.map(_write_image, self.jobs, chunksize=8))
        out = self.out
        write_csv(out / "mimic-cxr-2.0.0-metadata.csv.gz", pd.DataFrame(self.meta),
                  compression="gzip")  # fmt: skip
        labels = pd.DataFrame(self.labels, columns=["subject_id", "study_id", *CHEXPERT_FINDINGS])
        write_csv(out / "mimic-cxr-2.0.0-chexpert.csv.gz", labels, compression="gzip")
        splits = pd.DataFrame(self.splits, columns=["dicom_id", "study_id", "subject_id", "split"])
        write_csv(out / "mimic-cxr-2.0.0-split.csv.gz", splits, compression="gzip")
