"""`fastcxr lr-find`: fastai's learning-rate finder at every stage of the schedule."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fastcxr.cli import render
from fastcxr.cli.console import report, reporting, show
from fastcxr.cli.guard import guarded
from fastcxr.cli.options import SWEEP, Training, training_options


@training_options(*SWEEP)
def lr_find(
    o: Training,
    formulation: Annotated[
        str, typer.Option(help="single, multilabel or multiclass: the networks to sweep.")
    ] = "multilabel",
    ablation: Annotated[
        bool,
        typer.Option("--ablation", help="Sweep the unfreeze-ablation's stages (Experiment I)."),
    ] = False,
    start_lr: Annotated[float, typer.Option("--start-lr", help="First rate of the sweep.")] = 1e-7,
    end_lr: Annotated[float, typer.Option("--end-lr", help="Last rate of the sweep.")] = 10.0,
    num_it: Annotated[int, typer.Option("--num-it", help="Mini-batches of the sweep.")] = 100,
    out_dir: Annotated[
        Path, typer.Option("--out", help="Folder for lr_find.json and lr_find.png.")
    ] = Path("reports/build/lr-find"),
) -> None:
    """The loss against the learning rate at each stage (that stage's freezing and
    discriminative groups), with fastai's valley and minimum suggestions; each stage sweeps
    from the starting weights, nothing is trained. `--lr find` on train, compare or
    unfreeze-ablation runs the finder at each stage's real start instead."""
    with guarded(), reporting(not o.json_out):
        from fastcxr.cli.training import _dataset, _log
        from fastcxr.formulations import get_formulation
        from fastcxr.study import check_schedule, write_lr_find
        from fastcxr.train.lr_find import check_sweep

        check_sweep(start_lr, end_lr, num_it)

        cfg = o.config()
        form = get_formulation(formulation)
        schedule = cfg.ablation_stages if ablation else cfg.stages
        check_schedule(cfg, schedule)
        ds = _dataset(o.data, cfg, _log)
        result = write_lr_find(ds, form, cfg, schedule, out_dir, start_lr, end_lr, num_it,
                               lambda ev: report(ev) or _log(ev))  # fmt: skip
    if o.json_out:
        print(json.dumps(result.to_json(), indent=2))
        return
    show(render.lr_find(result))
