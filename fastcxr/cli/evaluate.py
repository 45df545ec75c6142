"""`fastcxr evaluate`: a finished run applied to another prepared dataset (external validation)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import progress, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import BatchSize, Json
from fastcxr.errors import UsageError


def evaluate(
    run_dir: Annotated[
        Path,
        typer.Argument(help="A finished run: train, compare (every formulation) or compare/NAME."),
    ],
    data: Annotated[
        Path,
        typer.Option(
            "--data",
            help="Manifest CSV (or its folder) of the dataset to evaluate on, as `fastcxr "
            "prepare` writes it.",
        ),
    ],
    split: Annotated[
        str, typer.Option(help="Rows of the manifest to evaluate: test, valid or all.")
    ] = "test",
    name: Annotated[
        str | None,
        typer.Option(
            help="Evaluation name: RUN/evaluations/NAME (default: the manifest's folder and "
            "the split, e.g. prepared-512-test; the folders above it are added when another "
            "dataset's evaluation has that name)."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace an existing evaluation of the same name."),
    ] = False,
    batch_size: BatchSize = None,
    allow_overlap: Annotated[
        bool,
        typer.Option(
            "--allow-overlap",
            help="Evaluate rows that share images or patients with the run's training or "
            "validation data (recorded as not external) instead of refusing.",
        ),
    ] = False,
    json_out: Json = False,
) -> None:
    """Apply a finished run to another dataset with its own preprocessing, precision and
    validation-chosen thresholds: AUC with the patient-bootstrap CI, accuracy, sensitivity and
    specificity at the run's threshold, ECE and Brier per finding; written into the run."""
    with guarded(), progress() as bar:
        from fastcxr.evaluate.external import evaluate_run

        if batch_size is not None and batch_size < 1:
            raise UsageError(f"--batch-size must be 1 or more, not {batch_size}")

        task = bar.add_task("evaluating", total=None)
        result = evaluate_run(
            run_dir, data, split, name, overwrite=overwrite, batch_size=batch_size or 64,
            progress=lambda i, n: bar.update(task, completed=i, total=n),
            allow_overlap=allow_overlap,
        )  # fmt: skip
    if json_out:
        print(json.dumps(result.to_json(), indent=2))
        return
    show(render.evaluation(result))
