"""`fastcxr compare`, `train` and `unfreeze-ablation`: the experiments, on one seed or several."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import err, esc, report, reporting, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import Training, training_options
from fastcxr.errors import UsageError

if TYPE_CHECKING:
    from fastcxr.results import Result


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


def _print_json(result: Result) -> None:
    print(json.dumps(result.to_json(), indent=2))


def _run(o: Training, kind: str, command: str, **job) -> tuple[Result, object, Path]:
    """A training command's job: the config from `o`, the data, the run folder, then
    `study.run`; returns (result, config, run folder). The result says whether the data
    were the built-in synthetic dataset (`synthetic`)."""
    from fastcxr import study

    cfg = o.config()
    seeds = _seeds(o.seeds, o.seed)
    _track(o.track)
    ds = _dataset(o.data, cfg, _log)
    _check_resume(o.resume, o.name)
    run_dir = o.runs / _run_name(o.name, command, cfg.preset)
    result = study.run(
        kind, ds, cfg, run_dir, seeds=seeds, log=_log, resume=o.resume, overwrite=o.overwrite,
        track=_tracking(o.track, run_dir), **job,
    )  # fmt: skip
    if not result.has("synthetic"):
        result.synthetic = ds.synthetic
    return result, cfg, run_dir


def _show(o: Training, result: Result, table) -> None:
    if not _is_main():
        return
    if o.json_out:
        return _print_json(result)
    show(table())


@training_options()
def compare(
    o: Training,
    formulations: Annotated[
        str, typer.Option(help="Comma-separated formulations.")
    ] = "single,multilabel,multiclass",
) -> None:
    """Experiment II: train single / multilabel / multiclass on the same data and compare."""
    with guarded(), reporting(not o.json_out):
        forms = tuple(f.strip() for f in formulations.split(",") if f.strip())
        result, cfg, _ = _run(o, "compare", "compare", formulations=forms)
    _show(o, result, lambda: render.compare(result, cfg.to_dict()))


@training_options()
def train(
    o: Training,
    formulation: Annotated[
        str, typer.Option(help="single | multilabel | multiclass")
    ] = "multilabel",
) -> None:
    """Train one formulation through the schedule and write its run record."""
    with guarded(), reporting(not o.json_out):
        result, cfg, run_dir = _run(o, "train", f"train-{formulation}", formulation=formulation)
        result.run_dir = str(run_dir)
    _show(o, result, lambda: render.train(result, cfg.to_dict(), formulation, run_dir))


@training_options()
def unfreeze_ablation(
    o: Training,
    formulation: Annotated[str, typer.Option(help="Formulation to train.")] = "multilabel",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (stages and trainable parameters); no training."
        ),
    ] = False,
) -> None:
    """Experiment I: progressive block unfreezing, test metrics after each stage."""
    with guarded(), reporting(not o.json_out):
        if dry_run:
            from fastcxr import study

            cfg = o.config()
            _seeds(o.seeds, o.seed)
            _track(o.track)
            result = study.ablation_plan(cfg, formulation)
            table = lambda: render.ablation_plan(result, cfg.to_dict(), formulation)  # noqa: E731
        else:
            result, cfg, run_dir = _run(o, "ablation", "ablation", formulation=formulation)
            table = lambda: render.ablation(result, cfg.to_dict(), formulation, run_dir)  # noqa: E731
    _show(o, result, table)
