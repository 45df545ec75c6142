"""`fastcxr prepare synthetic|mimic|chexpert|nih` (manifest + image cache) and `fastcxr labels`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import out, progress, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import (
    Blank,
    Findings,
    Json,
    ManifestOnly,
    PrepOut,
    PrepSize,
    PrepViews,
    PrepWorkers,
    Shard,
    Uncertain,
)


def labels(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (or its folder).")],
    findings: Findings = None,
    uncertain: Uncertain = "drop",
    blank: Blank = "drop",
    json_out: Json = False,
) -> None:
    """Label composition under a policy: combinations per split (the study's Table 2),
    each finding's raw 1/0/-1/blank counts, and the images by sex and age group."""
    with guarded():
        from fastcxr.findings import STUDY_FINDINGS, LabelPolicy, canonical_findings, composition
        from fastcxr.manifest import read_manifest

        fs = canonical_findings(findings.split(",")) if findings else STUDY_FINDINGS
        policy = LabelPolicy.parse(uncertain or "drop", blank or "drop")
        result = composition(read_manifest(manifest), fs, policy)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    show(render.labels(result, fs, policy.describe()))


def synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the MIMIC-style tree to.")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    rows: Annotated[int, typer.Option(help="DICOM rows.")] = 224,
    cols: Annotated[int, typer.Option(help="DICOM columns.")] = 192,
    workers: Annotated[
        int | None, typer.Option(help="Processes that write DICOMs (default: one per core).")
    ] = None,
) -> None:
    """Write a miniature MIMIC-CXR (DICOMs + label files in the real layout)."""
    with guarded():
        from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

        write_synthetic_mimic(
            out_dir,
            SyntheticSpec(patients=patients, seed=seed, rows=rows, cols=cols),
            workers=workers,
        )
    n = sum(1 for _ in out_dir.glob("files/p*/p*/s*/*.dcm"))
    out.print(f"wrote {n} DICOMs and the three label files under {out_dir} (synthetic)")


def _views(views: str) -> tuple[str, ...] | None:
    return None if views.strip().lower() == "all" else tuple(v.strip() for v in views.split(","))


def _modalities(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "all":
        return None
    return tuple(m.strip().upper() for m in text.split(",") if m.strip())


def _run_prepare(fn, json_out: bool, out_dir: Path, **kwargs) -> None:
    """`fn(out=out_dir, **kwargs)` (a `fastcxr.prepare` function) with a progress bar; its
    report as JSON or a table."""
    from dataclasses import asdict

    with guarded(), progress(not json_out) as bar:
        task = bar.add_task("reading the labels and listing the images", total=None)

        def converted(i: int, n: int) -> None:
            bar.update(task, completed=i, total=n, description="converting")

        report = fn(out=out_dir, progress=converted, **kwargs)
    if json_out:
        print(json.dumps(asdict(report), indent=2))
        return
    show(render.prepare(asdict(report), kwargs["root"], out_dir))


def mimic(
    root: Annotated[Path, typer.Argument(help="MIMIC-CXR root (files/ + the label CSVs).")],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: PrepWorkers = None,
    views: PrepViews = "PA,AP",
    intensity: Annotated[
        str,
        typer.Option(
            help="voi (DICOM window/VOI LUT) or mimic-jpg (min-max + histogram equalisation)."
        ),
    ] = "voi",
    labels: Annotated[str, typer.Option(help="Labeller: chexpert or negbio.")] = "chexpert",
    list_files: Annotated[
        Path | None,
        typer.Option(
            "--list-files", help="Write the image files this subset needs (to download only those)."
        ),
    ] = None,
    shard: Shard = None,
    manifest_only: ManifestOnly = False,
    modalities: Annotated[
        str,
        typer.Option(
            help="DICOM Modality values to keep (comma-separated; 'all' keeps every file). "
            "Others (CT, MR, US, …) are skipped and listed in failures.csv; a file without "
            "a Modality tag is kept."
        ),
    ] = "CR,DX,DR",
    demographics: Annotated[
        Path | None,
        typer.Option(
            "--demographics",
            help="MIMIC-IV folder with patients.csv and admissions.csv (.csv.gz too; or their "
            "hosp/ subfolder): the manifest's sex, age (at the study, from anchor_age and "
            "anchor_year) and race. Without it the root is looked in; else they are blank.",
        ),
    ] = None,
    json_out: Json = False,
) -> None:
    """MIMIC-CXR (DICOM or JPG release): join the label files to the images; write
    manifest.csv, an 8-bit cache and failures.csv."""
    from fastcxr.prepare.mimic import prepare_mimic

    _run_prepare(
        prepare_mimic,
        json_out,
        out_dir,
        root=root,
        size=size,
        workers=workers,
        views=_views(views),
        intensity=intensity,
        labels=labels,
        shard=shard,
        manifest_only=manifest_only,
        list_files=list_files,
        modalities=_modalities(modalities),
        demographics=demographics,
    )


def chexpert(
    root: Annotated[Path, typer.Argument(help="CheXpert folder (train.csv, valid.csv, train/).")],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: PrepWorkers = None,
    views: PrepViews = "PA,AP",
    test_fraction: Annotated[
        float, typer.Option(help="Share of training patients held out as the test split.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the patient-grouped test split.")] = 0,
    shard: Shard = None,
    manifest_only: ManifestOnly = False,
    json_out: Json = False,
) -> None:
    """CheXpert: official valid stays valid; test carved from train by patient."""
    from fastcxr.prepare.chexpert import prepare_chexpert

    _run_prepare(
        prepare_chexpert,
        json_out,
        out_dir,
        root=root,
        size=size,
        workers=workers,
        views=_views(views),
        test_fraction=test_fraction,
        seed=seed,
        shard=shard,
        manifest_only=manifest_only,
    )


def nih(
    root: Annotated[
        Path,
        typer.Argument(help="ChestX-ray14 folder (Data_Entry_2017*.csv, test_list.txt, images*/)."),
    ],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: PrepWorkers = None,
    views: PrepViews = "PA,AP",
    valid_fraction: Annotated[
        float, typer.Option(help="Share of train_val patients held out for validation.")
    ] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed of the patient-grouped validation split.")] = 0,
    shard: Shard = None,
    manifest_only: ManifestOnly = False,
    json_out: Json = False,
) -> None:
    """NIH ChestX-ray14: official test list; validation carved from train_val by patient."""
    from fastcxr.prepare.nih import prepare_nih

    _run_prepare(
        prepare_nih,
        json_out,
        out_dir,
        root=root,
        size=size,
        workers=workers,
        views=_views(views),
        valid_fraction=valid_fraction,
        seed=seed,
        shard=shard,
        manifest_only=manifest_only,
    )
