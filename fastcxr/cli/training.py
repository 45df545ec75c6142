"""`fastcxr compare`, `train` and `unfreeze-ablation`: the experiments, on one seed or several."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import err, esc, report, reporting, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import (
    Arch,
    BatchSize,
    Blank,
    Compile,
    CompileBackend,
    Data,
    Epochs,
    Findings,
    FreezeStyle,
    Json,
    Loader,
    Lr,
    NoPretrained,
    Overwrite,
    Patience,
    Precision,
    Preset,
    Resume,
    RunName,
    Runs,
    Seed,
    Seeds,
    Select,
    Size,
    Stages,
    Target,
    Threshold,
    Track,
    Uncertain,
    Weights,
    Workers,
)
from fastcxr.errors import UsageError


def _dataset(data: Path | None, cfg, log):
    from fastcxr.data.dataset import Dataset, builtin_dataset

    if data is None:
        return builtin_dataset(cfg.size, log=log)
    return Dataset.load(data)


def _is_main() -> bool:
    from fastcxr.runtime.distributed import is_main

    return is_main()


def _log(ev: dict) -> None:
    """Training events on stderr (rank 0 alone reports when several processes train)."""
    if not _is_main() or report(ev):  # a progress event moves a bar (a terminal only)
        return
    if "epoch" in ev:
        err.print(
            f"  [dim]{esc(str(ev['stage']).rjust(14))} epoch {ev['epoch']:>2}[/]  train "
            f"{ev['train_loss']:.4f}"
            f"  valid {ev['valid_loss']:.4f}  {ev['seconds']:.1f}s"
        )
    elif ev.get("event") == "network":
        err.print(f"[bold]{esc(ev['formulation'])}[/]: training network {esc(ev['network'])}")
    elif ev.get("event") == "resume":
        err.print(
            f"[bold]{esc(ev['formulation'])}[/]: resuming network {esc(ev['network'])} at "
            f"stage {esc(ev['stage'])} ({ev['epochs_done']} epochs already done)"
        )
    elif ev.get("event") == "skip":
        err.print(f"[bold]{esc(ev['formulation'])}[/]: skipped ({esc(ev['reason'])})")
    elif ev.get("event") == "data":
        err.print(esc(ev["message"]))
    elif ev.get("event") == "lr_find":
        where = f"network {esc(ev['network'])}, " if "network" in ev else ""

        def e(v) -> str:
            return "undefined" if v is None else f"{v:.2e}"

        found = (f": valley {e(ev['valley'])}, minimum {e(ev['minimum'])} → lr {e(ev['lr'])}"
                 if "lr" in ev else "")  # fmt: skip
        err.print(f"  [dim]lr_find: {where}stage {esc(str(ev['stage']))}{found}[/]")


def _check_resume(resume: bool, name: str | None) -> bool:
    if resume and not name:
        raise UsageError("--resume needs the --name of the run to continue")
    return resume


MAX_NAME = 120  # bytes of --name: leaves room for `.NAME.old-PID` and the like under 255


def _run_name(name: str | None, command: str, preset: str) -> str:
    """--name, a plain folder name inside --runs (never a path: --overwrite deletes it)."""
    if name is not None and (
        not name.strip() or name != Path(name).name or name in (".", "..") or name.startswith(".")
    ):
        raise UsageError(f"--name must be a plain folder name inside --runs, not {name!r}")
    if name is not None and len(name.encode()) > MAX_NAME:
        raise UsageError(
            f"--name is {len(name.encode())} bytes long; at most {MAX_NAME} (file systems "
            "allow 255 for a name, and the run writes names derived from it)"
        )
    return name or f"{command}-{preset}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def _seeds(seeds: str | None, seed: int | None) -> tuple[int, ...] | None:
    from fastcxr.runtime.seeds import parse_seeds

    if seeds is None:
        return None
    if seed is not None:
        raise UsageError("give --seed or --seeds, not both")
    return parse_seeds(seeds)


def _track(kind: str | None):
    """--track checked up front (its package too), before any data or training."""
    from fastcxr.runtime import tracking

    return None if kind is None else tracking.require(kind)


def _tracking(kind: str | None, run_dir: Path):
    from fastcxr.runtime.tracking import Tracking

    return None if kind is None else Tracking(kind, run_dir)


def _print_json(result: dict) -> None:
    print(json.dumps(result, indent=2))


def compare(
    data: Data = None,
    preset: Preset = "demo",
    arch: Arch = None,
    size: Size = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    patience: Patience = None,
    lr: Lr = None,
    stages: Stages = None,
    weights: Weights = None,
    no_pretrained: NoPretrained = False,
    freeze_style: FreezeStyle = None,
    findings: Findings = None,
    uncertain: Uncertain = None,
    blank: Blank = None,
    seed: Seed = None,
    seeds: Seeds = None,
    threshold: Threshold = None,
    target: Target = None,
    select: Select = None,
    workers: Workers = None,
    loader: Loader = None,
    precision: Precision = None,
    compile: Compile = False,
    compile_backend: CompileBackend = None,
    track: Track = None,
    formulations: Annotated[
        str, typer.Option(help="Comma-separated formulations.")
    ] = "single,multilabel,multiclass",
    name: RunName = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Experiment II: train single / multilabel / multiclass on the same data and compare."""
    with guarded(), reporting(not json_out):
        from fastcxr import study
        from fastcxr.config import TrainConfig

        cfg = TrainConfig.from_options(
            preset, arch=arch, size=size, batch_size=batch_size, epochs=epochs,
            patience=patience, lr=lr, stages=stages, weights=weights,
            pretrained=False if no_pretrained else None, freeze_style=freeze_style,
            findings=findings, uncertain=uncertain, blank=blank, seed=seed, workers=workers,
            loader=loader, precision=precision, compile=True if compile else None,
            compile_backend=compile_backend, threshold=threshold, target=target, select=select,
        )  # fmt: skip
        seed_list = _seeds(seeds, seed)
        _track(track)
        forms = tuple(f.strip() for f in formulations.split(",") if f.strip())
        ds = _dataset(data, cfg, _log)
        _check_resume(resume, name)
        run_dir = runs / _run_name(name, "compare", cfg.preset)
        tr = _tracking(track, run_dir)
        if seed_list:
            result = study.compare_seeds(
                ds, cfg, run_dir, seed_list, forms, _log, resume=resume, overwrite=overwrite,
                track=tr,
            )  # fmt: skip
        else:
            result = study.compare(
                ds, cfg, run_dir, forms, _log, resume=resume, overwrite=overwrite, track=tr
            )
    if not _is_main():
        return
    if json_out:
        return _print_json(result)
    show(render.compare(result, cfg.to_dict()))


def train(
    formulation: Annotated[
        str, typer.Option(help="single | multilabel | multiclass")
    ] = "multilabel",
    data: Data = None,
    preset: Preset = "demo",
    arch: Arch = None,
    size: Size = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    patience: Patience = None,
    lr: Lr = None,
    stages: Stages = None,
    weights: Weights = None,
    no_pretrained: NoPretrained = False,
    freeze_style: FreezeStyle = None,
    findings: Findings = None,
    uncertain: Uncertain = None,
    blank: Blank = None,
    seed: Seed = None,
    seeds: Seeds = None,
    threshold: Threshold = None,
    target: Target = None,
    select: Select = None,
    workers: Workers = None,
    loader: Loader = None,
    precision: Precision = None,
    compile: Compile = False,
    compile_backend: CompileBackend = None,
    track: Track = None,
    name: RunName = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Train one formulation through the schedule and write its run record."""
    with guarded(), reporting(not json_out):
        from fastcxr import study
        from fastcxr.config import TrainConfig

        cfg = TrainConfig.from_options(
            preset, arch=arch, size=size, batch_size=batch_size, epochs=epochs,
            patience=patience, lr=lr, stages=stages, weights=weights,
            pretrained=False if no_pretrained else None, freeze_style=freeze_style,
            findings=findings, uncertain=uncertain, blank=blank, seed=seed, workers=workers,
            loader=loader, precision=precision, compile=True if compile else None,
            compile_backend=compile_backend, threshold=threshold, target=target, select=select,
        )  # fmt: skip
        seed_list = _seeds(seeds, seed)
        _track(track)
        ds = _dataset(data, cfg, _log)
        run_dir = runs / _run_name(name, f"train-{formulation}", cfg.preset)
        _check_resume(resume, name)
        tr = _tracking(track, run_dir)
        if seed_list:
            result = study.train_seeds(
                ds, formulation, cfg, run_dir, seed_list, _log, resume=resume, overwrite=overwrite,
                track=tr,
            )  # fmt: skip
        else:
            result = study.train_formulation(
                ds, formulation, cfg, run_dir, _log, resume=resume, overwrite=overwrite, track=tr
            )
        result["run_dir"], result["synthetic"] = str(run_dir), ds.synthetic
    if not _is_main():
        return
    if json_out:
        return _print_json(result)
    show(render.train(result, cfg.to_dict(), formulation, run_dir))


def unfreeze_ablation(
    data: Data = None,
    preset: Preset = "demo",
    arch: Arch = None,
    size: Size = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    patience: Patience = None,
    lr: Lr = None,
    stages: Stages = None,
    weights: Weights = None,
    no_pretrained: NoPretrained = False,
    freeze_style: FreezeStyle = None,
    findings: Findings = None,
    uncertain: Uncertain = None,
    blank: Blank = None,
    seed: Seed = None,
    seeds: Seeds = None,
    threshold: Threshold = None,
    target: Target = None,
    select: Select = None,
    workers: Workers = None,
    loader: Loader = None,
    precision: Precision = None,
    compile: Compile = False,
    compile_backend: CompileBackend = None,
    track: Track = None,
    formulation: Annotated[str, typer.Option(help="Formulation to train.")] = "multilabel",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (stages and trainable parameters); no training."
        ),
    ] = False,
    name: RunName = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Experiment I: progressive block unfreezing, test metrics after each stage."""
    with guarded(), reporting(not json_out):
        from fastcxr import study
        from fastcxr.config import TrainConfig

        cfg = TrainConfig.from_options(
            preset, arch=arch, size=size, batch_size=batch_size, epochs=epochs,
            patience=patience, lr=lr, stages=stages, weights=weights,
            pretrained=False if no_pretrained else None, freeze_style=freeze_style,
            findings=findings, uncertain=uncertain, blank=blank, seed=seed, workers=workers,
            loader=loader, precision=precision, compile=True if compile else None,
            compile_backend=compile_backend, threshold=threshold, target=target, select=select,
        )  # fmt: skip
        seed_list = _seeds(seeds, seed)
        _track(track)
        if dry_run:
            result = study.ablation_plan(cfg, formulation)
        else:
            ds = _dataset(data, cfg, _log)
            run_dir = runs / _run_name(name, "ablation", cfg.preset)
            resume = _check_resume(resume, name)
            tr = _tracking(track, run_dir)
            if seed_list:
                result = study.ablation_seeds(
                    ds, cfg, run_dir, seed_list, formulation, _log, resume, overwrite, track=tr
                )
            else:
                result = study.unfreeze_ablation(
                    ds, cfg, run_dir, formulation, _log, resume=resume, overwrite=overwrite,
                    track=tr,
                )  # fmt: skip
    if not _is_main():
        return
    if json_out:
        return _print_json(result)
    if dry_run:
        return show(render.ablation_plan(result, cfg.to_dict(), formulation))
    show(render.ablation(result, cfg.to_dict(), formulation, run_dir))
