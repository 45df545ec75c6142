"""Finding names shared across datasets, and the label policies applied at training time.

Manifests keep the *raw* labels (1 positive, 0 negative, -1 uncertain, blank = not mentioned);
a `LabelPolicy` turns them into 0/1 targets when training, so one manifest serves every policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from fastcxr.errors import UsageError
from fastcxr.formulations import powerset_bits
from fastcxr.manifest import ManifestError

# The 14 CheXpert-labeller findings, in the column order of mimic-cxr-2.0.0-chexpert.csv.
CHEXPERT_FINDINGS = (
    "Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Enlarged Cardiomediastinum",
    "Fracture", "Lung Lesion", "Lung Opacity", "No Finding", "Pleural Effusion",
    "Pleural Other", "Pneumonia", "Pneumothorax", "Support Devices",
)  # fmt: skip
# Findings NIH ChestX-ray14 labels that the CheXpert labeller does not.
NIH_ONLY_FINDINGS = ("Infiltration", "Mass", "Nodule", "Emphysema", "Fibrosis",
                     "Pleural Thickening", "Hernia")  # fmt: skip
ALL_FINDINGS = CHEXPERT_FINDINGS + NIH_ONLY_FINDINGS
STUDY_FINDINGS = ("Edema", "Pleural Effusion")  # the study's two findings, in its order
# `composition`'s age groups: [lower, upper) in years, named by the whole years they hold as
# `audit` names its bins (20-39); the last is open-ended.
AGE_GROUPS = (("0-19", 0, 20), ("20-39", 20, 40), ("40-59", 40, 60), ("60-79", 60, 80),
              ("80+", 80, float("inf")))  # fmt: skip

# Other spellings users and datasets use (lower-case) → the canonical name.
_ALIASES = {
    "pulmonary edema": "Edema",
    "oedema": "Edema",
    "pulmonary oedema": "Edema",
    "effusion": "Pleural Effusion",  # NIH ChestX-ray14's name
    "pleural effusion": "Pleural Effusion",
    "pleural_thickening": "Pleural Thickening",
}

NO_FINDING = "No Finding"
# Not a pathology: "No Finding" is 1 with support devices present (the CheXpert labeller).
NOT_PATHOLOGY = (NO_FINDING, "Support Devices")
NO_FINDING_RULE = (
    "No Finding is 0 where it is blank and the image is positive (1) for any other finding the "
    "manifest labels (Support Devices excepted), as CheXclusion (Seyyed-Kalantari et al. 2021) "
    "reads MIMIC-CXR and CheXpert, whose No Finding is 1 or blank; otherwise as labelled"
)

UNCERTAIN_CHOICES = ("drop", "zeros", "ones")
BLANK_CHOICES = ("drop", "zeros")


def derive_no_finding(df: pd.DataFrame) -> pd.DataFrame:
    """`df` with No Finding set to 0 where it is blank and another finding is positive
    (`NO_FINDING_RULE`); `df` itself when it has no No Finding column or no other finding.
    Labels other than blank are left as they are (a bad value is still refused later)."""
    if NO_FINDING not in df.columns:
        return df
    others = [c for c in df.columns if c in ALL_FINDINGS and c not in NOT_PATHOLOGY]
    if not others:
        return df
    positive = (df[others].apply(pd.to_numeric, errors="coerce") == 1).any(axis=1)
    derive = df[NO_FINDING].isna() & positive
    if not derive.any():
        return df
    out = df.copy()
    out.loc[derive, NO_FINDING] = 0
    return out


class MissingColumn(ManifestError, KeyError):
    """The manifest has no column for a finding asked for (also a `KeyError`)."""

    __str__ = Exception.__str__  # the message itself, not KeyError's repr of it


def canonical_finding(name: str) -> str:
    """Map a finding name or alias onto the shared vocabulary; unknown names raise."""
    key = name.strip().lower()
    for f in ALL_FINDINGS:
        if f.lower() == key:
            return f
    if key in _ALIASES:
        return _ALIASES[key]
    raise UsageError(f"unknown finding {name!r}; known: {', '.join(ALL_FINDINGS)}")


def canonical_findings(names: Sequence[str]) -> tuple[str, ...]:
    out = tuple(canonical_finding(n) for n in names)
    if len(set(out)) != len(out):
        raise UsageError(f"findings repeat: {list(names)}")
    if not out:
        raise UsageError("no findings given")
    return out


@dataclass(frozen=True)
class LabelPolicy:
    """How uncertain (-1) and blank labels become targets.

    `uncertain` / `blank` apply to every finding unless `per_finding` overrides them, e.g.
    ``{"Edema": ("ones", "drop")}`` for the U-Ones policy on Edema only (Irvin et al. 2019).
    The study's default keeps only images whose findings are all 0 or 1.
    """

    uncertain: str = "drop"
    blank: str = "drop"
    per_finding: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self):
        for f, (u, b) in [("*", (self.uncertain, self.blank)), *self.per_finding.items()]:
            if u not in UNCERTAIN_CHOICES:
                raise UsageError(f"uncertain policy for {f} must be one of {UNCERTAIN_CHOICES}")
            if b not in BLANK_CHOICES:
                raise UsageError(f"blank policy for {f} must be one of {BLANK_CHOICES}")

    @classmethod
    def parse(cls, uncertain: str = "drop", blank: str = "drop") -> LabelPolicy:
        """From option strings: a default, then FINDING=CHOICE overrides, comma-separated,
        e.g. ``--uncertain "zeros,Edema=ones"`` (U-Zeros, but U-Ones for Edema)."""

        def split(text: str, what: str) -> tuple[str, dict[str, str]]:
            default, per = "drop", {}
            for tok in (t.strip() for t in text.split(",") if t.strip()):
                if "=" in tok:
                    f, _, v = tok.partition("=")
                    per[canonical_finding(f)] = v.strip()
                else:
                    default = tok
            return default, per

        u, per_u = split(uncertain, "uncertain")
        b, per_b = split(blank, "blank")
        per = {f: (per_u.get(f, u), per_b.get(f, b)) for f in {*per_u, *per_b}}
        return cls(u, b, per)

    def for_finding(self, finding: str) -> tuple[str, str]:
        return self.per_finding.get(finding, (self.uncertain, self.blank))

    def apply(self, df: pd.DataFrame, findings: Sequence[str]) -> pd.DataFrame:
        """Rows kept under the policy, with each finding column as int 0/1."""
        missing = [f for f in findings if f not in df.columns]
        if missing:
            raise MissingColumn(
                f"manifest has no column for {missing}; columns: {list(df.columns)}"
            )
        keep = np.ones(len(df), bool)
        targets = {}
        for f in findings:
            raw = pd.to_numeric(df[f], errors="coerce").to_numpy(float)
            bad = ~np.isnan(raw) & ~np.isin(raw, (1.0, 0.0, -1.0))
            bad |= df[f].notna().to_numpy() & np.isnan(raw)  # text such as "yes"
            if bad.any():
                i = int(np.flatnonzero(bad)[0])
                v = df[f].iloc[i]
                v = v.item() if isinstance(v, np.generic) else v
                raise ManifestError(
                    f"row {i + 2}, column {f!r}: {v!r} is not a label (expected 1, 0, -1 or blank)"
                )
            uncertain, blank = self.for_finding(f)
            y = raw.copy()
            if uncertain == "drop":
                keep &= raw != -1
            else:
                y[raw == -1] = 1.0 if uncertain == "ones" else 0.0
            if blank == "drop":
                keep &= ~np.isnan(raw)
            else:
                y[np.isnan(raw)] = 0.0
            targets[f] = y
        out = df.loc[keep].copy()
        for f in findings:
            out[f] = targets[f][keep].astype(np.int64)
        return out.reset_index(drop=True)

    def describe(self) -> str:
        s = f"uncertain={self.uncertain}, blank={self.blank}"
        extra = ", ".join(f"{f}: uncertain={u} blank={b}" for f, (u, b) in self.per_finding.items())
        return f"{s}; {extra}" if extra else s


def composition(df: pd.DataFrame, findings: Sequence[str], policy: LabelPolicy) -> dict:
    """Per split: how many images hold each label combination under `policy` (the study's
    Table 2; keys like "0,1" in the order of `findings`), each finding's raw counts, and
    `demographics`: the split's images (before the policy) by sex (F, M, unknown) and by age
    group (0-19, 20-39, 40-59, 60-79, 80+ years, and unknown); all
    unknown for a manifest without the `sex` / `age` columns. No Finding is derived as
    training and scoring read it (`NO_FINDING_RULE`)."""
    if NO_FINDING in findings:
        df = derive_no_finding(df)
    kept = policy.apply(df, findings)
    out: dict = {"splits": {}}
    splits = [s for s in ("train", "valid", "test") if s in set(df["split"])]
    splits += sorted(set(df["split"]) - set(splits))
    for split in splits:
        raw = df[df["split"] == split]
        k = kept[kept["split"] == split]
        combos = k.groupby(list(findings)).size() if len(k) else pd.Series(dtype=int)
        out["splits"][split] = {
            "images": int(len(raw)),
            "kept": int(len(k)),
            "combinations": {
                ",".join(str(b) for b in bits): int(
                    combos.get(bits if len(bits) > 1 else bits[0], 0)
                )
                for bits in map(tuple, powerset_bits(len(findings)).tolist())
            },
            "findings": {f: _raw_counts(raw[f]) for f in findings},
            "demographics": demographic_counts(raw),
        }
    return out


def demographic_counts(df: pd.DataFrame) -> dict[str, dict[str, int]]:
    """Rows by sex (F/M/unknown) and by age group (`AGE_GROUPS`, then unknown)."""
    n = len(df)
    if "sex" in df.columns:
        sex = df["sex"].where(df["sex"].notna(), "").astype(str).str.strip()
    else:
        sex = pd.Series("", index=df.index)
    by_sex = {s: int((sex == s).sum()) for s in ("F", "M")}
    by_sex["unknown"] = n - sum(by_sex.values())
    if "age" in df.columns:
        age = pd.to_numeric(df["age"], errors="coerce").astype(float)
    else:
        age = pd.Series(np.nan, index=df.index)
    by_age = {name: int(((age >= lo) & (age < hi)).sum()) for name, lo, hi in AGE_GROUPS}
    by_age["unknown"] = n - sum(by_age.values())
    return {"sex": by_sex, "age": by_age}


def _raw_counts(col: pd.Series) -> dict[str, int]:
    v = pd.to_numeric(col, errors="coerce")
    return {
        "1": int((v == 1).sum()),
        "0": int((v == 0).sum()),
        "-1": int((v == -1).sum()),
        "blank": int(v.isna().sum()),
    }
