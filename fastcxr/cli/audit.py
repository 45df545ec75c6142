"""`fastcxr audit`: a finished run's test predictions (or an evaluation's) by subgroup."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import report, reporting, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import Json


def audit(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run (train, compare: every formulation, compare/NAME) or an "
            "evaluation folder (RUN/evaluations/NAME)."
        ),
    ],
    by: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated manifest columns to group by (default: those of sex, age, "
            "race, view the manifest has values for)."
        ),
    ] = None,
    age_bins: Annotated[
        str,
        typer.Option("--age-bins", help="Lower edges of the age groups, in years."),
    ] = "0,20,40,60,80",
    min_size: Annotated[
        int,
        typer.Option("--min-size", help="Subgroups with fewer scored images are flagged."),
    ] = 50,
    evaluation: Annotated[
        str | None,
        typer.Option(
            help="Audit the run's evaluation NAME (fastcxr evaluate) instead of its test split."
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="The manifest the predictions were made on, if it moved "
            "(default: the one the run or evaluation recorded).",
        ),
    ] = None,
    json_out: Json = False,
) -> None:
    """Per finding and subgroup: n, prevalence, AUC with the patient-bootstrap CI, TPR and FPR
    at the run's threshold, the TPR gap to the whole test set with its CI (CheXclusion), and
    underdiagnosis (FPR of No Finding) when the run predicts it; written into RUN/audit/."""
    with guarded(), reporting(not json_out):
        from fastcxr.evaluate.audit import audit_run

        result = audit_run(
            run_dir, by.split(",") if by is not None else None, age_bins, min_size,
            evaluation=evaluation, data=data, log=report,
        )  # fmt: skip
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
        return
    show(render.audit(result))
