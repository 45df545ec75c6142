"""CheXpert and NIH ChestX-ray14 in their real layouts and column orders, written here."""

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.findings import CHEXPERT_FINDINGS, LabelPolicy, composition
from fastcxr.manifest import read_manifest
from fastcxr.prepare.chexpert import chexpert_table
from fastcxr.prepare.common import carve_split
from fastcxr.prepare.nih import nih_table

runner = CliRunner()
CHEXPERT_COLUMNS = [
    "Path",
    "Sex",
    "Age",
    "Frontal/Lateral",
    "AP/PA",
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


def _jpg(path, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (40, 32), dtype=np.uint8)
    Image.fromarray(arr).save(path)


@pytest.fixture(scope="module")
def chexpert(tmp_path_factory):
    root = tmp_path_factory.mktemp("cx") / "CheXpert-v1.0-small"
    rng = np.random.default_rng(0)
    rows = {"train": [], "valid": []}
    for split, n_pat in (("train", 40), ("valid", 5)):
        for p in range(n_pat):
            for s in range(1, 3):
                for v, (fl, appa) in enumerate(
                    [("Frontal", rng.choice(["AP", "PA"])), ("Lateral", np.nan)], 1
                ):
                    rel = (
                        f"{split}/patient{p + (0 if split == 'train' else 1000):05d}/study{s}/"
                        f"view{v}_{fl.lower()}.jpg"
                    )
                    _jpg(root / rel, len(rows[split]))
                    labels = rng.choice([1.0, 0.0, -1.0, np.nan], size=14)
                    rows[split].append(
                        [f"CheXpert-v1.0-small/{rel}", "Female", 60, fl, appa, *labels]
                    )
    for split in rows:
        pd.DataFrame(rows[split], columns=CHEXPERT_COLUMNS).to_csv(
            root / f"{split}.csv", index=False
        )
    return root


def test_chexpert_table_and_composition(chexpert):
    t = chexpert_table(chexpert)
    raw = pd.concat([pd.read_csv(chexpert / "train.csv"), pd.read_csv(chexpert / "valid.csv")])
    frontal = raw[raw["Frontal/Lateral"] == "Frontal"]
    assert len(t) == len(frontal)
    assert (t[t["split"] == "valid"]["patient_id"].str[-4:].astype(int) >= 1000).all()
    assert set(t["split"]) == {"train", "valid", "test"}
    assert t.groupby("patient_id")["split"].nunique().max() == 1  # test carved by patient
    comp = composition(t, ["Edema", "Pleural Effusion"], LabelPolicy())
    # independent count of the (Edema, Effusion) combinations of the frontal training rows
    tr = t[t["split"] == "train"]
    both = tr[tr["Edema"].isin([0, 1]) & tr["Pleural Effusion"].isin([0, 1])]
    n01 = int(((both["Edema"] == 0) & (both["Pleural Effusion"] == 1)).sum())
    assert comp["splits"]["train"]["combinations"]["0,1"] == n01
    assert comp["splits"]["train"]["findings"]["Edema"]["-1"] == int((tr["Edema"] == -1).sum())
    assert sum(comp["splits"]["train"]["combinations"].values()) == len(both)


def test_chexpert_prepare_cli_and_labels_json(chexpert, tmp_path):
    res = runner.invoke(
        app,
        [
            "prepare",
            "chexpert",
            str(chexpert),
            "--out",
            str(tmp_path),
            "--size",
            "16",
            "--workers",
            "1",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    m = read_manifest(tmp_path)
    assert (tmp_path / m["image"].iloc[0]).exists()
    res = runner.invoke(
        app,
        [
            "labels",
            str(tmp_path),
            "--findings",
            "Edema,Pleural Effusion",
            "--uncertain",
            "ones",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    tr = m[m["split"] == "train"]
    keep = tr["Edema"].notna() & tr["Pleural Effusion"].notna() & (tr["Pleural Effusion"] != -1)
    e = tr.loc[keep, "Edema"].abs()  # uncertain → 1
    assert out["splits"]["train"]["combinations"]["1,0"] == int(
        ((e == 1) & (tr.loc[keep, "Pleural Effusion"] == 0)).sum()
    )
    assert set(out["splits"]["train"]["findings"]["Edema"]) == {"1", "0", "-1", "blank"}


def test_chexpert_manifest_only_converts_nothing(chexpert, tmp_path):
    res = runner.invoke(
        app,
        ["prepare", "chexpert", str(chexpert), "--out", str(tmp_path), "--manifest-only", "--json"],
    )
    assert res.exit_code == 0 and json.loads(res.stdout)["converted"] == 0
    assert not (tmp_path / "images").exists() and (tmp_path / "manifest.csv").exists()


@pytest.fixture(scope="module")
def nih(tmp_path_factory):
    root = tmp_path_factory.mktemp("nih")
    labels = [
        "No Finding",
        "Effusion",
        "Edema|Effusion",
        "Infiltration",
        "Edema",
        "Atelectasis|Effusion|Mass",
    ]
    rows, names = [], []
    for p in range(1, 31):
        for k in range(3):
            name = f"{p:08d}_{k:03d}.png"
            names.append(name)
            _jpg(root / "images_001" / "images" / name, len(rows))
            rows.append(
                [
                    name,
                    labels[(p + k) % len(labels)],
                    k,
                    p,
                    50,
                    "M",
                    "PA" if k < 2 else "AP",
                    2500,
                    2048,
                    0.143,
                    0.143,
                ]
            )
    cols = [
        "Image Index",
        "Finding Labels",
        "Follow-up #",
        "Patient ID",
        "Patient Age",
        "Patient Gender",
        "View Position",
        "OriginalImage[Width",
        "Height]",
        "OriginalImagePixelSpacing[x",
        "y]",
    ]
    pd.DataFrame(rows, columns=cols).to_csv(root / "Data_Entry_2017_v2020.csv", index=False)
    test = [n for n in names if int(n[:8]) > 24]
    (root / "test_list.txt").write_text("\n".join(test) + "\n")
    (root / "train_val_list.txt").write_text("\n".join(sorted(set(names) - set(test))) + "\n")
    return root


def test_nih_table(nih):
    t = nih_table(nih)
    raw = pd.read_csv(nih / "Data_Entry_2017_v2020.csv")
    assert len(t) == len(raw)
    assert (t["split"] == "test").sum() == len((nih / "test_list.txt").read_text().split())
    eff = raw["Finding Labels"].str.contains("Effusion")
    assert t["Pleural Effusion"].sum() == eff.sum()  # NIH "Effusion" is our Pleural Effusion
    assert t["Edema"].sum() == raw["Finding Labels"].str.contains("Edema").sum()
    assert t.groupby("patient_id")["split"].nunique().max() == 1
    assert set(t[["Edema", "Pleural Effusion"]].stack().unique()) <= {0.0, 1.0}


def test_nih_prepare_with_shards(nih, tmp_path):
    args = ["prepare", "nih", str(nih), "--out", str(tmp_path), "--size", "16", "--workers", "1"]
    for i in range(2):
        res = runner.invoke(app, [*args, "--shard", f"{i}/2", "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout)["manifest"] is None
    res = runner.invoke(app, [*args, "--json"])
    rep = json.loads(res.stdout)
    assert rep["converted"] == 0 and rep["skipped"] == 90  # the shards did all the work
    assert len(read_manifest(tmp_path)) == 90


def test_missing_finding_is_a_clear_error(nih, tmp_path):
    res = runner.invoke(
        app, ["prepare", "nih", str(nih), "--out", str(tmp_path), "--manifest-only"]
    )
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["labels", str(tmp_path), "--findings", "Support Devices"])
    assert res.exit_code == 2 and "no column" in res.stderr and "Support Devices" in res.stderr


def test_carved_split_is_grouped_deterministic_and_stable():
    pats = pd.Series([f"p{i}" for i in range(2000)] * 2)
    a = carve_split(pats, {"test": 0.1}, "train", seed=1)
    assert a.equals(carve_split(pats, {"test": 0.1}, "train", seed=1))
    assert 0.07 < (a == "test").mean() < 0.13
    more = pd.Series([f"p{i}" for i in range(3000)])
    b = carve_split(more, {"test": 0.1}, "train", seed=1)
    assert (b[:2000].to_numpy() == a[:2000].to_numpy()).all()  # new patients move nobody
    assert set(CHEXPERT_FINDINGS) >= {"Edema", "Pleural Effusion"}
