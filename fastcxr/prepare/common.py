"""What every dataset's preparation shares: patient-grouped splits, sharding, and turning an
image table into manifest.csv + cache + failures.csv."""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fastcxr.errors import FastcxrError, UsageError
from fastcxr.manifest import validate_manifest
from fastcxr.prepare.cache import CacheWriteError, build_cache, check_size, describe_write_error
from fastcxr.runtime.runs import write_atomic, write_csv


class PrepareError(FastcxrError, ValueError):
    """A dataset folder that cannot be prepared: a label file missing a column or malformed,
    unknown labels, or no images left; the message names the file or folder."""


@dataclass(frozen=True)
class PrepareReport:
    manifest: str | None
    images: int
    converted: int
    skipped: int
    failures: int
    size: int
    intensity: str
    views: tuple[str, ...]
    splits: dict[str, int]
    shard: str | None = None
    manifest_only: bool = False


def read_label_file(path: Path, required: Sequence[str]) -> pd.DataFrame:
    """A dataset's CSV with its required columns checked; errors name the file."""
    try:
        df = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise PrepareError(f"{path}: malformed CSV ({e})") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise PrepareError(f"{path}: missing column(s) {missing}; has {list(df.columns)}")
    return df


# -- demographics -------------------------------------------------------------------------------
# The manifest's optional demographic columns, written by every `prepare` (blank when the
# dataset does not record them): `sex` F/M, `age` in years (0..120), `race` free text.
DEMOGRAPHIC_COLUMNS = ("sex", "age", "race")
MAX_AGE = 120
_SEX = {"f": "F", "female": "F", "w": "F", "woman": "F", "m": "M", "male": "M", "man": "M"}
# "058Y", "7M", "12 W", "3D" (NIH's older releases; the DICOM Age String), or a bare number.
_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([YMWD]?)\s*$", re.IGNORECASE)
_AGE_UNIT = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}


def parse_sex(values: pd.Series) -> pd.Series:
    """Sex as F/M: "Female"/"F" → "F", "Male"/"M" → "M" (any case); anything else
    ("Unknown", blank, "O") → "" (unknown)."""
    return values.map(lambda v: _SEX.get(str(v).strip().lower(), "") if pd.notna(v) else "")


def _age_years(v) -> float:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return np.nan
    if isinstance(v, int | float | np.integer | np.floating):
        return float(v)
    m = _AGE.match(str(v))
    return float(m.group(1)) * _AGE_UNIT[m.group(2).upper()] if m else np.nan


def parse_age(values: pd.Series) -> pd.Series:
    """Ages in years: numbers as they are, "058Y" / "7M" / "12W" / "3D" strings converted;
    blank, unparseable and implausible values (outside 0..120, such as the few ages over 400
    in NIH ChestX-ray14) become blank. Whole years stay integers (nullable `Int64`)."""
    age = values.map(_age_years).astype(float)
    age[(age < 0) | (age > MAX_AGE)] = np.nan
    known = age.dropna()
    if (known == known.round()).all():
        return age.round().astype("Int64")
    return age.round(2)


def demographics(
    index: pd.Index,
    sex: pd.Series | None = None,
    age: pd.Series | None = None,
    race: pd.Series | None = None,
) -> dict[str, pd.Series]:
    """The three demographic columns for a table with `index` (each blank where not given):
    pass a dataset's raw sex / age / race values; they are normalised here."""
    blank = pd.Series("", index=index, dtype=object)
    return {
        "sex": parse_sex(sex) if sex is not None else blank,
        "age": parse_age(age) if age is not None else pd.Series(np.nan, index=index),
        "race": (
            race.map(lambda v: str(v).strip() if pd.notna(v) else "").astype(object)
            if race is not None
            else blank.copy()
        ),
    }


def patient_fraction(patient: str, seed: int) -> float:
    """A patient's fixed position in [0, 1): adding patients never moves the others."""
    h = hashlib.sha256(f"{seed}:{patient}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def carve_split(
    patients: pd.Series, fractions: Mapping[str, float], rest: str, seed: int
) -> pd.Series:
    """Assign whole patients to splits: `fractions` of patients to each named split, the rest
    to `rest`. Deterministic for a seed; grouped, so no patient spans two splits."""
    u = patients.astype(str).map(lambda p: patient_fraction(p, seed))
    out = pd.Series(rest, index=patients.index, dtype=object)
    lo = 0.0
    for split, frac in fractions.items():
        out[(u >= lo) & (u < lo + frac)] = split
        lo += frac
    return out


def check_options(
    size: int, workers: int | None, views, intensity: str = "voi", fractions: dict | None = None
) -> None:
    """A `prepare` command's options, checked before anything is read or written: one-line
    `UsageError`s naming the value (a bogus intensity once wrote a header-only manifest and
    "failed" every image; an empty --views raised a pandas traceback)."""
    from fastcxr.dicom import INTENSITY_MODES
    from fastcxr.prepare.cache import check_size

    check_size(size)
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):  # fmt: skip
        raise UsageError(f"--workers must be 1 or more (default: one per core), not {workers!r}")
    if views is not None:
        names = list(views)
        if not names or any(not isinstance(v, str) or not v.strip() for v in names):
            raise UsageError(
                f"--views must name views, comma-separated (e.g. PA,AP), or 'all', not "
                f"{','.join(map(str, names))!r}"
            )
    if intensity not in INTENSITY_MODES:
        raise UsageError(
            f"--intensity must be one of {', '.join(INTENSITY_MODES)}, not {intensity!r}"
        )
    for option, v in (fractions or {}).items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v < 1:
            raise UsageError(f"{option} must be a fraction between 0 and 1 (exclusive), not {v!r}")


def no_view_left(views, present) -> UsageError:
    """The error when --views keeps no image: the views the data hold."""
    shown = ", ".join(sorted(map(str, set(present)))[:12]) or "none"
    return UsageError(f"--views {','.join(views)} keeps no image; the data hold views: {shown}")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`I/N` (0 ≤ I < N) → (I, N)."""
    if not text:
        return None
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise UsageError(f"--shard must look like I/N (e.g. 0/8), not {text!r}") from None
    if not 0 <= i < n:
        raise UsageError(f"--shard {text}: need 0 <= I < N")
    return i, n


def finish(
    table: pd.DataFrame,
    root: Path,
    out: Path,
    size: int,
    intensity: str,
    views: Sequence[str] | None,
    workers: int | None = None,
    shard: str | None = None,
    manifest_only: bool = False,
    progress: Callable[[int, int], None] | None = None,
    extra: Mapping | None = None,
) -> PrepareReport:
    """Convert `table.source` (relative to `root`) into `out/<table.image>`; write the manifest.

    With `shard` only every N-th image (offset I) is converted and no manifest is written: run
    once more without it to verify the shards' work and write the manifest. With
    `manifest_only` nothing is converted. A `size` outside [8, 4096] is refused before anything
    is read or written; a full or read-only disk stops with a one-line `CacheWriteError`.
    """
    size = check_size(size)
    if table.empty:
        raise PrepareError(f"{root}: no images left after reading the label files (views={views})")
    validate_manifest(table, out / "manifest.csv")
    sh = parse_shard(shard)
    failures = pd.DataFrame(columns=["file", "reason"])
    converted = skipped = 0
    if not manifest_only:
        todo = table if sh is None else table.iloc[sh[0] :: sh[1]]
        sources = [root / s for s in todo["source"]]
        res = build_cache(
            sources, [out / p for p in todo["image"]], size, intensity, workers, progress
        )
        converted, skipped, failures = res.converted, res.skipped, res.failures
    suffix = "" if sh is None else f".shard-{sh[0]}-of-{sh[1]}"
    _write(out / f"failures{suffix}.csv", lambda p: write_csv(p, failures))
    failed = set(failures["file"])
    manifest = table[[str(root / s) not in failed for s in table["source"]]]
    manifest = manifest.reset_index(drop=True)
    path = None
    if sh is None:
        path = out / "manifest.csv"
        _write(path, lambda p: write_csv(p, manifest))
    report = PrepareReport(
        manifest=str(path) if path else None, images=len(manifest), converted=converted,
        skipped=skipped, failures=len(failures), size=size, intensity=intensity,
        views=tuple(views or ()), splits=manifest["split"].value_counts().to_dict(),
        shard=shard, manifest_only=manifest_only,
    )  # fmt: skip
    if sh is None:
        info = {**asdict(report), "root": str(root), **(extra or {})}
        text = json.dumps(info, indent=2)
        _write(out / "prepare.json", lambda p: write_atomic(p, lambda t: t.write_text(text)))
    return report


def _write(path: Path, write: Callable[[Path], None]) -> None:
    """`write(path)` (an atomic writer); a full or read-only disk becomes `CacheWriteError`,
    with the writer's partial `.NAME.part` file removed."""
    try:
        write(path)
    except OSError as e:
        with contextlib.suppress(OSError):
            path.with_name(f".{path.name}.part").unlink(missing_ok=True)
        raise CacheWriteError(describe_write_error(e, path.parent)) from None
