"""`fastcxr version`, `bench`, `bench-prepare`, `report` and `predict`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import err, esc, out, progress, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import BatchSize, Compile, CompileBackend, Json, Precision, Workers
from fastcxr.errors import UsageError


def version() -> None:
    """Print the fastcxr version."""
    from fastcxr import __version__

    out.print(__version__)


def bench_prepare(
    n: Annotated[int, typer.Option("--n", help="MIMIC-sized DICOMs to convert.")] = 8,
    size: Annotated[int, typer.Option(help="Cache image size.")] = 512,
    json_out: Json = False,
) -> None:
    """DICOM → cache conversion speed per core, against a plain pydicom + PIL baseline
    measured in the same run, and the projected time for all of MIMIC-CXR."""
    with guarded():
        from fastcxr import bench

        r = bench.bench_prepare(n, size)
    if json_out:
        print(json.dumps(r.to_json(), indent=2))
        return
    show(render.bench_prepare(r, size))


BenchStages = Annotated[
    str, typer.Option(help="Comma-separated stages (NAME=SPEC or SPEC) to measure.")
]
BenchStyles = Annotated[
    str, typer.Option("--freeze-style", help="Comma-separated freezing styles: keras,fastai.")
]
Warmup = Annotated[int, typer.Option(help="Untimed batches per stage (compile, cuDNN).")]
Steps = Annotated[int, typer.Option(help="Timed batches per stage.")]
Rounds = Annotated[
    int,
    typer.Option(
        help="Interleaved rounds (limit, fastcxr, defaults) per stage; the ratios are the "
        "median over rounds, with their range."
    ),
]
BenchImages = Annotated[
    int | None, typer.Option(help="Images in the bench cache (default: enough for one pass).")
]
BenchCache = Annotated[
    Path | None,
    typer.Option(help="Image cache folder (generated if absent; default under FASTCXR_HOME)."),
]
NoDefaults = Annotated[
    bool, typer.Option("--no-defaults", help="Skip the fastai-defaults baseline.")
]
ProjectImages = Annotated[
    int, typer.Option(help="Training images for the projected `compare --preset paper`.")
]


def bench(
    arch: Annotated[str, typer.Option(help="Architecture.")] = "resnet152",
    size: Annotated[int, typer.Option(help="Image size (square).")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 64,
    stages: BenchStages = "head,conv5_block3=conv5_block-1,conv5,conv4_last3=conv4_block-3,all",
    freeze_style: BenchStyles = "keras,fastai",
    precision: Precision = None,
    compile: Compile = False,
    compile_backend: CompileBackend = None,
    warmup: Warmup = 5,
    steps: Steps = 20,
    rounds: Rounds = 3,
    images: BenchImages = None,
    cache: BenchCache = None,
    no_defaults: NoDefaults = False,
    formulation: Annotated[str, typer.Option(help="Formulation of the network.")] = "multilabel",
    workers: Workers = None,
    project_images: ProjectImages = 34_000,
    json_out: Json = False,
) -> None:
    """Training speed per stage: the model-only limit (random tensors on the device), fastcxr's
    real loop on an image cache, and fastai's defaults, measured in one run."""
    with guarded(), progress(not json_out) as bar:
        from fastcxr import bench
        from fastcxr.config import TrainConfig, parse_stages

        styles = _freeze_styles(freeze_style)
        given = {"precision": precision, "compile_backend": compile_backend}
        cfg = TrainConfig(
            arch=arch, size=size, batch_size=batch_size, pretrained=False,
            freeze_style=styles[0], workers=workers, compile=compile,
            **{k: v for k, v in given.items() if v is not None},
        )  # fmt: skip
        task = bar.add_task("measuring", total=None, unit="measurement")
        r = bench.bench_train(
            cfg, parse_stages(stages), styles, warmup, steps, images, cache,
            defaults=not no_defaults, formulation=formulation, project_images=project_images,
            rounds=rounds, log=None if json_out else (lambda m: err.print(f"[dim]{esc(m)}[/]")),
            progress=lambda i, n: bar.update(task, completed=i, total=n),
        )  # fmt: skip
    if json_out:
        print(json.dumps(r.to_json(), indent=2))
        return
    show(render.bench(r, defaults=not no_defaults))


def _freeze_styles(text: str) -> tuple[str, ...]:
    """`--freeze-style keras,fastai`: each one a known style."""
    from fastcxr.config import FREEZE_STYLES

    styles = tuple(s.strip() for s in text.split(",") if s.strip())
    for s in styles or (text,):
        if s not in FREEZE_STYLES:
            raise UsageError(f"--freeze-style must list keras and/or fastai, not {s!r}")
    return styles


def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="compare, ablation or run folders.")],
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for the figures and results.md.")
    ] = Path("reports/build"),
    ci: Annotated[
        str, typer.Option(help="AUC CI: bootstrap (patients resampled) or delong.")
    ] = "bootstrap",
    threshold: Annotated[
        str | None,
        typer.Option(
            help="Threshold chosen on validation: youden, sensitivity or specificity "
            "(default: each run's own, as it was trained)."
        ),
    ] = None,
    template: Annotated[
        Path | None, typer.Option(help="Write-up template (Markdown) that opens results.md.")
    ] = None,
    target: Annotated[
        float | None, typer.Option(help="Target for sensitivity/specificity.")
    ] = None,
) -> None:
    """Figures and results.md from run records (no retraining)."""
    with guarded():
        from fastcxr.evaluate.evaluation import EvalConfig
        from fastcxr.evaluate.report import build_report

        files = build_report(
            run_dirs, out_dir, EvalConfig(ci=ci, threshold=threshold, target=target), template
        )
    show(render.report(files))


RunDir = Annotated[Path, typer.Argument(help="A trained run (train, or compare/NAME).")]
Inputs = Annotated[
    list[Path], typer.Argument(help="DICOM/PNG/JPG files, folders (recursive) or a manifest CSV.")
]
PredictionsCsv = Annotated[Path, typer.Option("--out", help="Predictions CSV.")]
Cam = Annotated[
    Path | None,
    typer.Option("--cam", help="Folder for Grad-CAM overlays (one PNG per image and finding)."),
]
ExportDir = Annotated[
    Path | None,
    typer.Option("--export", help="Also export the model (see --format) with an export.json."),
]
ExportFormat = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="Export format: torch (torch.export .pt2 per network, the default) or onnx "
        "(one model.onnx: uint8 images in, per-finding probabilities out; needs the onnx "
        "extra: pip install 'fastcxr\\[onnx]').",
    ),
]
ExportOverwrite = Annotated[
    bool, typer.Option("--overwrite", help="Replace a previous export in the --export folder.")
]


def predict(
    run_dir: RunDir,
    paths: Inputs,
    out_csv: PredictionsCsv = Path("predictions.csv"),
    cam: Cam = None,
    export_dir: ExportDir = None,
    export_format: ExportFormat = None,
    batch_size: BatchSize = 64,
    overwrite: ExportOverwrite = False,
    json_out: Json = False,
) -> None:
    """Predict findings for new radiographs with a trained run; unreadable files are listed."""
    with guarded(), progress() as bar:
        from fastcxr import predict as lib

        export_format = _export_format(batch_size, export_format, export_dir)
        pred = lib.Predictor.load(run_dir)
        files = lib.collect_inputs(paths)
        lib.check_outputs(out_csv, files, export_dir, overwrite)
        task = bar.add_task("predicting", total=len(files))
        df, fails = lib.predict(
            pred, files, batch_size or 64, progress=lambda i, n: bar.update(task, completed=i)
        )
        _write_predictions(df, fails, out_csv)
        cams = lib.write_cams(pred, [Path(f) for f in df["file"]], cam) if cam else []
        if export_dir:
            from fastcxr import export

            export.clear_export(export_dir)
        exported = export.export(pred, export_dir, export_format) if export_dir else []
    summary = {"predicted": len(df), "failed": len(fails), "csv": str(out_csv),
               "failures": fails.to_dict("records"), "cams": len(cams),
               "exported": [str(p) for p in exported], "device": str(pred.device)}  # fmt: skip
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    show(render.predict(summary, cam, export_dir))


def _export_format(batch_size: int | None, export_format: str | None, export_dir) -> str:
    """predict's options checked before anything is read: the export format (its extra too)."""
    from fastcxr import export as lib

    if batch_size is not None and batch_size < 1:
        raise UsageError(f"--batch-size must be 1 or more, not {batch_size}")
    if export_format is not None and export_dir is None:
        raise UsageError("--format chooses the export's format: it needs --export DIR")
    export_format = export_format or "torch"
    if export_format not in lib.EXPORT_FORMATS:
        raise UsageError(f"--format must be torch or onnx, not {export_format!r}")
    if export_format == "onnx":
        lib.onnx_modules()  # a missing extra is refused before any prediction is made
    return export_format


def _write_predictions(df, fails, out_csv: Path) -> None:
    """The predictions CSV and, beside it, the failures CSV; nothing readable is an error."""
    from fastcxr.runtime.runs import write_csv

    failures_csv = out_csv.with_name(out_csv.stem + "_failures.csv")
    if len(fails):
        write_csv(failures_csv, fails)
    if not len(df):
        raise UsageError(
            f"none of the {len(fails)} input file(s) could be read (e.g. "
            f"{fails['reason'].iloc[0] if len(fails) else 'no input'}); the reasons are in "
            f"{failures_csv}"
        )
    write_csv(out_csv, df)
