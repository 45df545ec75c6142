"""Demographics in the manifest: CheXpert's Sex/Age, NIH's Patient Gender/Age, MIMIC-IV's
patients/admissions for MIMIC-CXR, the synthetic tree's own; validation; `composition` and
`fastcxr labels`. Every expected value is written out or computed here, not by fastcxr."""

import gzip
import hashlib
import json
import re

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.findings import LabelPolicy, composition
from fastcxr.manifest import ManifestError, read_manifest, validate_manifest
from fastcxr.prepare.chexpert import prepare_chexpert
from fastcxr.prepare.mimic import prepare_mimic
from fastcxr.prepare.nih import prepare_nih
from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

runner = CliRunner()
FINDINGS = ["Edema", "Pleural Effusion"]


def _blank(v) -> bool:
    return v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA or v == ""


def _same(got, want) -> bool:
    if _blank(want):
        return _blank(got)
    if isinstance(want, str):
        return got == want
    return not _blank(got) and abs(float(got) - want) < 1e-9


# -- CheXpert -----------------------------------------------------------------------------------
# (Sex, Age) as CheXpert writes them → (sex, age) expected in the manifest.
CHEXPERT_CASES = [
    ("Male", 67, "M", 67),
    ("Female", 18, "F", 18),
    ("Unknown", 45, "", 45),
    ("Female", 0, "F", 0),  # CheXpert has a few age-0 rows; 0 is a valid age
    ("Male", np.nan, "M", None),
    (np.nan, 90, "", 90),
]


def test_chexpert_sex_and_age_are_read_into_the_manifest(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    root.mkdir()
    rows, expected = {"train": [], "valid": []}, {}
    for i, (sex, age, want_sex, want_age) in enumerate(CHEXPERT_CASES * 2):
        split = "valid" if i % 4 == 3 else "train"
        rel = f"{split}/patient{i:05d}/study1/view1_frontal.jpg"
        rows[split].append([f"CheXpert-v1.0-small/{rel}", sex, age, "Frontal", "PA", 1.0, 0.0])
        expected[rel] = (want_sex, want_age)
    cols = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *FINDINGS]
    for split, r in rows.items():
        pd.DataFrame(r, columns=cols).to_csv(root / f"{split}.csv", index=False)
    prepare_chexpert(root, tmp_path / "out", size=16, manifest_only=True)
    m = read_manifest(tmp_path / "out")
    assert {"sex", "age", "race"} <= set(m.columns) and len(m) == len(expected)
    for r in m.itertuples():
        want_sex, want_age = expected[r.source]
        assert _same(r.sex, want_sex) and _same(r.age, want_age), (r.source, r.sex, r.age)
    assert m["race"].isna().all()  # CheXpert's label files carry no race


# -- NIH ChestX-ray14 ---------------------------------------------------------------------------
# (Patient Gender, Patient Age) → expected (sex, age): the 2017 release's "058Y" strings, a
# months string, and one of the release's impossible ages (over 400), which becomes blank.
NIH_CASES = [
    ("M", "058Y", "M", 58),
    ("F", "081Y", "F", 81),
    ("F", "7", "F", 7),
    ("M", "002M", "M", 2 / 12),
    ("M", "414", "M", None),
    ("F", "", "F", None),
]


def test_nih_gender_and_age_are_read_into_the_manifest(tmp_path):
    rows, expected = [], {}
    for p, (gender, age, want_sex, want_age) in enumerate(NIH_CASES, 1):
        for k in range(2):
            name = f"{p:08d}_{k:03d}.png"
            rows.append([name, "No Finding", k, p, age, gender, "PA"])
            expected[f"images/{name}"] = (want_sex, want_age)
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position"]  # fmt: skip
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "Data_Entry_2017.csv", index=False)
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n00000001_001.png\n")
    prepare_nih(tmp_path, tmp_path / "out", size=16, manifest_only=True)
    m = read_manifest(tmp_path / "out")
    assert len(m) == len(expected)
    for r in m.itertuples():
        want_sex, want_age = expected[r.image]
        if isinstance(want_age, float):
            want_age = round(want_age, 2)
        assert _same(r.sex, want_sex) and _same(r.age, want_age), (r.image, r.sex, r.age)
    assert m["race"].isna().all()


def test_nih_integer_ages_stay_whole_numbers(tmp_path):
    """The 2020 release's integer ages are written as integers ("58", not "58.0")."""
    rows = [[f"{p:08d}_000.png", "No Finding", 0, p, 40 + p, "MF"[p % 2], "AP"] for p in (1, 2)]
    cols = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
            "Patient Gender", "View Position"]  # fmt: skip
    pd.DataFrame(rows, columns=cols).to_csv(tmp_path / "Data_Entry_2017_v2020.csv", index=False)
    (tmp_path / "test_list.txt").write_text("00000001_000.png\n")
    prepare_nih(tmp_path, tmp_path / "out", size=16, manifest_only=True)
    raw = pd.read_csv(tmp_path / "out" / "manifest.csv", dtype=str)
    assert raw.set_index("patient_id")[["sex", "age"]].to_dict("index") == {
        "1": {"sex": "F", "age": "41"},
        "2": {"sex": "M", "age": "42"},
    }


# -- MIMIC-CXR + MIMIC-IV -----------------------------------------------------------------------
# subject_id → the studies' (study_id, StudyDate) of a miniature MIMIC-CXR.
STUDIES = {
    11: [(501, 21500304), (502, 21531120)],
    12: [(503, 21780101)],
    13: [(504, 21200505)],
    14: [(505, 21330101)],
    15: [(506, 21400101)],  # in neither MIMIC-IV table
    16: [(507, 21510601)],
}
PATIENTS = [  # subject_id, gender, anchor_age, anchor_year
    (11, "F", 60, 2150),
    (12, "M", 45, 2180),
    (13, "M", 91, 2120),
    (14, "F", 30, 2133),
    (16, "M", 70, 2151),
]
ADMISSIONS = [  # subject_id, admittime, race
    (11, "2150-03-01 10:00:00", "WHITE"),
    (11, "2151-01-01 10:00:00", "WHITE"),
    (11, "2152-01-01 10:00:00", "BLACK/AFRICAN AMERICAN"),
    (12, "2178-01-01 10:00:00", "UNKNOWN"),
    (12, "2178-02-01 10:00:00", "UNABLE TO OBTAIN"),
    (12, "2178-03-01 10:00:00", "PATIENT DECLINED TO ANSWER"),
    (13, "2120-01-01 10:00:00", "UNKNOWN"),
    (13, "2120-02-01 10:00:00", "UNKNOWN"),
    (13, "2120-03-01 10:00:00", "ASIAN"),
    (16, "2150-01-01 10:00:00", "OTHER"),  # a tie: the latest admission's value wins
    (16, "2151-05-01 10:00:00", "HISPANIC OR LATINO"),
]
# Expected per subject: sex, race, and the age at each study = anchor_age + (year − anchor_year).
EXPECTED_MIMIC = {
    11: ("F", "WHITE", {501: 60, 502: 63}),
    12: ("M", "", {503: 43}),
    13: ("M", "ASIAN", {504: 91}),
    14: ("F", "", {505: 30}),  # no admissions
    15: ("", "", {506: None}),  # not in patients.csv
    16: ("M", "HISPANIC OR LATINO", {507: 70}),
}


def _mimic_cxr(root):
    meta, split, labels = [], [], []
    for subject, studies in STUDIES.items():
        for study, date in studies:
            dicom = f"d{study}"
            meta.append([dicom, subject, study, "PA", date])
            split.append([dicom, study, subject, "train" if subject % 2 else "test"])
            labels.append([subject, study, 1.0, 0.0])
    root.mkdir(parents=True, exist_ok=True)
    frames = {
        "metadata": pd.DataFrame(
            meta, columns=["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate"]
        ),
        "split": pd.DataFrame(split, columns=["dicom_id", "study_id", "subject_id", "split"]),
        "chexpert": pd.DataFrame(labels, columns=["subject_id", "study_id", *FINDINGS]),
    }
    for name, df in frames.items():
        df.to_csv(root / f"mimic-cxr-2.0.0-{name}.csv.gz", index=False, compression="gzip")
    return root


def _mimic_iv(folder, race_column="race", gz=True, anchor_year=True):
    folder.mkdir(parents=True, exist_ok=True)
    pat = pd.DataFrame(PATIENTS, columns=["subject_id", "gender", "anchor_age", "anchor_year"])
    pat["anchor_year_group"] = "2008 - 2010"
    if not anchor_year:
        pat = pat.drop(columns="anchor_year")
    adm = pd.DataFrame(ADMISSIONS, columns=["subject_id", "admittime", race_column])
    adm.insert(1, "hadm_id", range(20000001, 20000001 + len(adm)))
    ext = ".csv.gz" if gz else ".csv"
    pat.to_csv(folder / f"patients{ext}", index=False)  # compression from the name
    adm.to_csv(folder / f"admissions{ext}", index=False)
    return folder


def test_mimic_demographics_from_mimic_iv_folder(tmp_path):
    root = _mimic_cxr(tmp_path / "cxr")
    _mimic_iv(tmp_path / "mimiciv" / "hosp")  # MIMIC-IV's own layout: hosp/*.csv.gz
    with gzip.open(tmp_path / "mimiciv" / "hosp" / "patients.csv.gz", "rt") as f:
        assert f.readline().startswith("subject_id,gender")  # really gzipped
    res = runner.invoke(
        app,
        ["prepare", "mimic", str(root), "--out", str(tmp_path / "out"), "--manifest-only",
         "--demographics", str(tmp_path / "mimiciv"), "--json"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path / "out")
    assert len(m) == sum(len(s) for s in STUDIES.values())
    for r in m.itertuples():
        sex, race, ages = EXPECTED_MIMIC[int(r.patient_id)]
        got = (r.sex, r.race, r.age)
        assert _same(r.sex, sex) and _same(r.race, race), got
        assert _same(r.age, ages[int(r.study_id)]), got
    info = json.loads((tmp_path / "out" / "prepare.json").read_text())["demographics"]
    assert info["race_column"] == "race" and info["matched_subjects"] == 5
    assert info["age"].startswith("anchor_age + ")


def test_mimic_older_release_ethnicity_and_no_anchor_year(tmp_path):
    """`ethnicity` (MIMIC-IV before 2.0), plain .csv; without anchor_year, anchor_age."""
    root = _mimic_cxr(tmp_path / "cxr")
    folder = _mimic_iv(tmp_path / "iv", race_column="ethnicity", gz=False, anchor_year=False)
    prepare_mimic(root, tmp_path / "out", size=16, manifest_only=True, demographics=folder)
    m = read_manifest(tmp_path / "out")
    anchor = {s: a for s, _, a, _ in PATIENTS}
    for r in m.itertuples():
        sex, race, _ = EXPECTED_MIMIC[int(r.patient_id)]
        assert _same(r.sex, sex) and _same(r.race, race)
        assert _same(r.age, anchor.get(int(r.patient_id)))


def test_mimic_without_demographics_writes_blank_columns(tmp_path):
    root = _mimic_cxr(tmp_path / "cxr")
    prepare_mimic(root, tmp_path / "out", size=16, manifest_only=True)
    m = read_manifest(tmp_path / "out")
    assert {"sex", "age", "race"} <= set(m.columns)
    assert m[["sex", "age", "race"]].isna().all().all()
    assert json.loads((tmp_path / "out" / "prepare.json").read_text())["demographics"] is None


def test_mimic_demographics_folder_without_patients_is_a_clear_error(tmp_path):
    root = _mimic_cxr(tmp_path / "cxr")
    (tmp_path / "empty").mkdir()
    res = runner.invoke(
        app,
        ["prepare", "mimic", str(root), "--out", str(tmp_path / "out"), "--manifest-only",
         "--demographics", str(tmp_path / "empty")],
    )  # fmt: skip
    assert res.exit_code == 2 and "patients.csv" in res.stderr


# -- the synthetic tree -------------------------------------------------------------------------
def _digest(root) -> str:
    """The synthetic tree's label files and pixel data (its DICOM UIDs are random by design)."""
    import pydicom

    h = hashlib.sha256()
    for name in ("metadata", "chexpert", "split"):
        with gzip.open(root / f"mimic-cxr-2.0.0-{name}.csv.gz", "rb") as f:
            h.update(f.read())
    for p in sorted(root.rglob("*.dcm")):
        h.update(str(p.relative_to(root)).encode())
        h.update(pydicom.dcmread(p).PixelData)
    return h.hexdigest()


def test_synthetic_demographics_are_plausible_and_leave_images_and_labels_alone(tmp_path):
    spec = SyntheticSpec(patients=12, seed=7, rows=32, cols=32)
    root = write_synthetic_mimic(tmp_path / "with", spec, workers=1)
    # the reference: the same spec's tree without demographics, written here and now (a digest
    # recorded once would change with the numpy, pandas or pydicom of the day)
    plain = write_synthetic_mimic(tmp_path / "without", spec, workers=1, demographics=False)
    assert not (plain / "patients.csv").exists() and (root / "patients.csv").exists()
    assert _digest(root) == _digest(plain)
    other = write_synthetic_mimic(tmp_path / "other", SyntheticSpec(patients=12, seed=8, rows=32,
                                  cols=32), workers=1, demographics=False)  # fmt: skip
    assert _digest(other) != _digest(plain)  # the digest sees labels and pixels
    pat = pd.read_csv(root / "patients.csv")
    adm = pd.read_csv(root / "admissions.csv")
    assert set(pat["gender"]) <= {"F", "M"} and pat["anchor_age"].between(18, 90).all()
    assert set(adm["subject_id"]) <= set(pat["subject_id"])
    prepare_mimic(root, tmp_path / "out", size=16, manifest_only=True)
    m = read_manifest(tmp_path / "out")
    meta = pd.read_csv(root / "mimic-cxr-2.0.0-metadata.csv.gz")
    year = meta.set_index("dicom_id")["StudyDate"] // 10000
    p = pat.set_index("subject_id")
    for r in m.itertuples():
        s = int(r.patient_id)
        assert r.sex == p.loc[s, "gender"]
        want = p.loc[s, "anchor_age"] + year[r.image[7:-4]] - p.loc[s, "anchor_year"]
        assert r.age == want


# -- validation ---------------------------------------------------------------------------------
def _manifest(**cols):
    n = len(next(iter(cols.values())))
    base = {"image": [f"{i}.png" for i in range(n)], "patient_id": [str(i) for i in range(n)],
            "split": ["train"] * n}  # fmt: skip
    return pd.DataFrame({**base, **cols})


def test_validation_rejects_bad_sex_and_age_naming_the_rows(tmp_path):
    with pytest.raises(ManifestError, match=r"sex other than F, M or blank \(rows 3;.*'?X"):
        validate_manifest(_manifest(sex=["F", "X", "M", np.nan]))
    with pytest.raises(ManifestError, match=r"age .*0\.\.120.*rows 4\b.*200"):
        validate_manifest(_manifest(age=[30, np.nan, 200, 45]))
    with pytest.raises(ManifestError, match=r"rows 2, 3.*old"):
        validate_manifest(_manifest(age=["old", "-1", 20]))
    validate_manifest(_manifest(sex=["F", "M", np.nan], age=[0, 120, np.nan], race=["A", "", 1]))
    validate_manifest(_manifest(split=["train", "test"]))  # no demographic columns: still valid
    p = tmp_path / "manifest.csv"
    p.write_text("image,patient_id,split,sex,age\na.png,1,train,F,50\nb.png,2,test,X,51\n")
    with pytest.raises(ManifestError, match=r"manifest.csv: 1 row\(s\) have a sex.*rows 3"):
        read_manifest(p)
    p.write_text("image,patient_id,split,sex,age\na.png,1,train,F,50\nb.png,2,test,,\n")
    assert read_manifest(p)["sex"].tolist()[0] == "F"


# -- composition and `fastcxr labels` -----------------------------------------------------------
@pytest.fixture
def demo_manifest(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    df = pd.DataFrame({
        "image": [f"images/{i}.png" for i in range(n)],
        "patient_id": [str(i) for i in range(n)],
        "split": rng.choice(["train", "valid", "test"], n, p=[0.6, 0.2, 0.2]),
        "sex": rng.choice(["F", "M", None], n, p=[0.45, 0.45, 0.1]),
        "age": np.where(rng.random(n) < 0.1, np.nan, rng.integers(0, 101, n)),
        "race": "",
        "Edema": rng.choice([0.0, 1.0, -1.0], n),
        "Pleural Effusion": rng.choice([0.0, 1.0], n),
    })  # fmt: skip
    df.loc[:4, "age"] = [20, 40, 60, 80, 19.5]  # the edges fall in the upper group
    df.to_csv(tmp_path / "manifest.csv", index=False)
    return tmp_path / "manifest.csv"


def _expected_counts(df: pd.DataFrame) -> dict:
    bins = pd.cut(df["age"], [0, 20, 40, 60, 80, np.inf], right=False,
                  labels=["0-19", "20-39", "40-59", "60-79", "80+"])  # fmt: skip
    df = df.assign(sex=df["sex"].fillna("unknown"),
                   group=bins.astype(object).fillna("unknown"))  # fmt: skip
    by_sex = df.groupby(["split", "sex"]).size()
    by_age = df.groupby(["split", "group"]).size()
    out = {}
    for split in df["split"].unique():
        out[split] = {
            "sex": {k: int(by_sex.get((split, k), 0)) for k in ("F", "M", "unknown")},
            "age": {k: int(by_age.get((split, k), 0))
                    for k in ("0-19", "20-39", "40-59", "60-79", "80+", "unknown")},
        }  # fmt: skip
    return out


def test_composition_demographics_equal_a_pandas_groupby(demo_manifest):
    df = read_manifest(demo_manifest)
    comp = composition(df, FINDINGS, LabelPolicy())
    want = _expected_counts(pd.read_csv(demo_manifest))
    assert {s: r["demographics"] for s, r in comp["splits"].items()} == want
    tr = comp["splits"]["train"]
    assert set(tr) == {"images", "kept", "combinations", "findings", "demographics"}
    old = composition(df.drop(columns=["sex", "age", "race"]), FINDINGS, LabelPolicy())
    assert old["splits"]["train"]["demographics"]["sex"]["unknown"] == tr["images"]
    assert {k: v for k, v in old["splits"]["train"].items() if k != "demographics"} == {
        k: v for k, v in tr.items() if k != "demographics"
    }  # the existing keys do not depend on the new columns


def test_labels_cli_shows_sex_and_age_table(demo_manifest, tmp_path):
    want = _expected_counts(pd.read_csv(demo_manifest))
    res = runner.invoke(app, ["labels", str(demo_manifest), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)["splits"]
    assert {s: r["demographics"] for s, r in got.items()} == want
    res = runner.invoke(app, ["labels", str(demo_manifest)])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "Images by sex and age group" in out
    for split, d in want.items():
        line = next(ln for ln in out.splitlines() if re.match(rf"\W*{split}\b", ln)
                    and len(re.findall(r"\d+", ln)) == 9)  # fmt: skip
        assert [int(v) for v in re.findall(r"\d+", line)] == [*d["sex"].values(),
                                                                *d["age"].values()]  # fmt: skip
    old = tmp_path / "old.csv"
    pd.read_csv(demo_manifest).drop(columns=["sex", "age", "race"]).to_csv(old, index=False)
    res = runner.invoke(app, ["labels", str(old)])
    assert res.exit_code == 0 and "Images by sex" not in res.stdout
    assert "no sex or age recorded" in res.stderr
