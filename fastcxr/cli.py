"""The `fastcxr` command line: thin commands that call the library and render with rich."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from fastcxr import __version__

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train chest-radiograph classifiers fast and honestly, on fastai.",
)
prepare_app = typer.Typer(
    no_args_is_help=True, help="Build a manifest and an 8-bit image cache from a dataset."
)
app.add_typer(prepare_app, name="prepare")

# Tables stay readable when piped or logged (rich would otherwise fall back to 80 columns).
# Results on stdout are never read as markup (they hold user text: paths, stage names);
# stderr's colours are written with `_e` around every user-supplied value.
out = Console(width=None if sys.stdout.isatty() else 120, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


def _e(value) -> str:
    """A value shown inside stderr's markup, escaped so that `[red]` or `[/]` stay text."""
    from rich.markup import escape

    return escape(str(value))


# -- shared options -------------------------------------------------------------------------
Data = Annotated[
    Path | None,
    typer.Option(
        "--data", help="Manifest CSV (or its folder). Default: the built-in synthetic dataset."
    ),
]
Preset = Annotated[
    str,
    typer.Option(
        help="Settings preset: demo (CPU-sized) or paper (the "
        "study: ResNet152, 512x512, its schedule)."
    ),
]
Arch = Annotated[
    str | None,
    typer.Option(help="Architecture (resnet10/18/34/50/101/152, densenet121/161/169/201)."),
]
Size = Annotated[int | None, typer.Option(help="Image size (square).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Batch size.")]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Max epochs per stage.")]
Patience = Annotated[
    int | None, typer.Option(help="Epochs without a better validation loss before a stage stops.")
]
Lr = Annotated[float | None, typer.Option("--lr", help="Learning rate of the head.")]
Stages = Annotated[
    str | None,
    typer.Option(
        "--stages",
        help="Comma-separated stages, each what it unfreezes: head, conv5_block-1, "
        "conv5, conv4_block-3, all (optionally NAME=SPEC).",
    ),
]
Weights = Annotated[
    Path | None,
    typer.Option(
        "--weights", help="Local torchvision state dict to start from (offline machines)."
    ),
]
NoPretrained = Annotated[
    bool, typer.Option("--no-pretrained", help="Random initialisation instead of ImageNet weights.")
]
FreezeStyle = Annotated[
    str | None,
    typer.Option(
        "--freeze-style",
        help="keras: frozen blocks fully frozen, BatchNorm in eval (the study); "
        "fastai: BatchNorm stays trainable (train_bn=True).",
    ),
]
Findings = Annotated[
    str | None, typer.Option(help="Comma-separated findings (default: Edema,Pleural Effusion).")
]
Uncertain = Annotated[
    str | None,
    typer.Option(
        help="Uncertain (-1) labels: drop|zeros|ones, then FINDING=CHOICE overrides, e.g. "
        "'zeros,Edema=ones'."
    ),
]
Blank = Annotated[
    str | None, typer.Option(help="Blank labels: drop|zeros, with FINDING=CHOICE overrides.")
]
Seed = Annotated[int | None, typer.Option(help="Random seed.")]
Seeds = Annotated[
    str | None,
    typer.Option(
        help="Repeat the experiment per seed (e.g. 0,1,2; same split, new initialisation, "
        "shuffling and augmentation): each seed's run record under RUN/seed-K, and the mean, "
        "sd and range across seeds."
    ),
]
Threshold = Annotated[
    str | None,
    typer.Option(
        help="Decision threshold per finding, chosen on the validation predictions: youden "
        "(default), sensitivity or specificity (with --target)."
    ),
]
Target = Annotated[
    float | None,
    typer.Option(help="Sensitivity or specificity the threshold must reach on validation."),
]
Select = Annotated[
    str | None,
    typer.Option(
        help="Model a run reports and saves: best (the stage with the lowest validation loss, "
        "default) or last."
    ),
]
Workers = Annotated[int | None, typer.Option(help="DataLoader worker processes.")]
Loader = Annotated[
    str | None,
    typer.Option(
        help="auto|fast|datablock: fast = uint8 cache batches normalised and augmented on the "
        "GPU; datablock = fastai's DataBlock. auto: fast on a GPU."
    ),
]
Precision = Annotated[
    str | None, typer.Option(help="auto|bf16|fp32 (autocast). auto: bf16 on a GPU.")
]
Compile = Annotated[
    bool,
    typer.Option("--compile", help="torch.compile the model; compile time is reported apart."),
]
CompileBackend = Annotated[
    str | None, typer.Option("--compile-backend", help="torch.compile backend (inductor).")
]
Name = Annotated[
    str | None,
    typer.Option(help="Run name (default: command-preset-time). An existing compare run resumes."),
]
Runs = Annotated[Path, typer.Option(help="Folder that holds run records.")]
Overwrite = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace the run --name if it exists (its folder is removed first); without it a "
        "complete run is never replaced.",
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Continue the run --name from its last checkpoint (after a crash, a "
        "kill or SIGTERM); finished networks, stages and epochs are not repeated.",
    ),
]


def _fail(msg: str) -> None:
    """One line on stderr (user text is never read as markup), exit status 2."""
    if "Original Traceback" in msg:  # raised in a DataLoader worker: torch adds its traceback
        msg = msg.strip().splitlines()[-1].partition(": ")[2] or msg
    msg = " ".join(msg.split())
    err.print(f"[bold red]error:[/] {_e(msg)}", soft_wrap=True)
    raise typer.Exit(2)


_OVERRIDES = (
    "arch",
    "size",
    "batch_size",
    "epochs",
    "patience",
    "lr",
    "stages",
    "weights",
    "no_pretrained",
    "freeze_style",
    "findings",
    "uncertain",
    "blank",
    "seed",
    "workers",
    "loader",
    "precision",
    "compile",
    "compile_backend",
    "threshold",
    "target",
    "select",
)


def _overrides(options: dict) -> dict:
    """The training options a command received, by name (see `_config`)."""
    return {k: options[k] for k in _OVERRIDES if k in options}


def _config(preset: str, **overrides):
    from fastcxr.config import get_preset, parse_stages
    from fastcxr.findings import canonical_findings
    from fastcxr.schedule import FREEZE_STYLES

    cfg = get_preset(preset)
    stages = overrides.pop("stages", None)
    epochs, lr = overrides.pop("epochs", None), overrides.pop("lr", None)
    findings = overrides.pop("findings", None)
    if overrides.pop("no_pretrained", False):
        overrides["pretrained"] = False
    if not overrides.get("compile"):
        overrides.pop("compile", None)  # a flag left off keeps the preset's value
    if overrides.get("weights") is not None:
        overrides["weights"] = str(overrides["weights"])
    if "target" in overrides:
        overrides["threshold_target"] = overrides.pop("target")
    if findings is not None:
        overrides["findings"] = canonical_findings(findings.split(","))
    cfg = cfg.replace(**overrides)
    if stages is not None:
        cfg = cfg.replace(
            stages=parse_stages(stages, epochs, lr),
            ablation_stages=parse_stages(stages, epochs, lr),
        )
    elif epochs is not None or lr is not None:
        from dataclasses import replace

        upd = {k: v for k, v in (("max_epochs", epochs), ("lr", lr)) if v is not None}
        cfg = cfg.replace(
            stages=tuple(replace(s, **upd) for s in cfg.stages),
            ablation_stages=tuple(replace(s, **upd) for s in cfg.ablation_stages),
        )
    if cfg.freeze_style not in FREEZE_STYLES:
        raise ValueError(f"--freeze-style must be keras or fastai, not {cfg.freeze_style!r}")
    return cfg


def _dataset(data: Path | None, cfg, log):
    from fastcxr.study import Dataset, builtin_dataset

    if data is None:
        return builtin_dataset(cfg.size, log=log)
    return Dataset.load(data)


def _is_main() -> bool:
    from fastcxr.distributed import is_main

    return is_main()


def _logger(quiet: bool):
    def log(ev: dict) -> None:
        if not _is_main():  # several processes: rank 0 reports for all
            return
        if "epoch" in ev:
            err.print(
                f"  [dim]{_e(str(ev['stage']).rjust(14))} epoch {ev['epoch']:>2}[/]  train "
                f"{ev['train_loss']:.4f}"
                f"  valid {ev['valid_loss']:.4f}  {ev['seconds']:.1f}s"
            )
        elif ev.get("event") == "network":
            err.print(f"[bold]{_e(ev['formulation'])}[/]: training network {_e(ev['network'])}")
        elif ev.get("event") == "resume":
            err.print(
                f"[bold]{_e(ev['formulation'])}[/]: resuming network {_e(ev['network'])} at "
                f"stage {_e(ev['stage'])} ({ev['epochs_done']} epochs already done)"
            )
        elif ev.get("event") == "skip":
            err.print(f"[bold]{_e(ev['formulation'])}[/]: skipped ({_e(ev['reason'])})")
        elif ev.get("event") == "data":
            err.print(_e(ev["message"]))

    return log


@contextlib.contextmanager
def _library_errors():
    """Turn the library's errors into a clean exit; keep stdout for the result only."""
    import signal

    import torch

    from fastcxr.data import DataError
    from fastcxr.dicom import DicomError
    from fastcxr.manifest import ManifestError
    from fastcxr.runs import RunError
    from fastcxr.stopping import STOP, Interrupted

    def on_signal(signum, frame):  # clusters send SIGTERM before they kill a job
        if STOP.is_set() and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        err.print(f"[yellow]{signal.Signals(signum).name}: stopping cleanly…[/]")
        STOP.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        with contextlib.redirect_stdout(sys.stderr), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    except Interrupted as e:
        err.print(f"[yellow]{_e(e)}[/]", soft_wrap=True)
        raise typer.Exit(143) from None
    except torch.cuda.OutOfMemoryError:
        _fail(
            "the GPU ran out of memory: lower --batch-size (evaluation batches are twice "
            "its size); finished epochs are checkpointed, so add --resume with the same --name"
        )
    except (
        DataError,
        DicomError,
        ManifestError,
        RunError,
        ValueError,
        KeyError,
        FileNotFoundError,
    ) as e:
        _fail(str(e).strip("'\""))
    finally:
        STOP.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


def _progress():
    """A progress bar on stderr: count, images per second and time left."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            return Text(f"{task.speed:.1f} img/s" if task.speed else "– img/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )


def _check_resume(resume: bool, name: str | None) -> bool:
    if resume and not name:
        raise ValueError("--resume needs the --name of the run to continue")
    return resume


def _run_name(name: str | None, command: str, preset: str) -> str:
    """--name, a plain folder name inside --runs (never a path: --overwrite deletes it)."""
    if name is not None and (
        not name.strip() or name != Path(name).name or name in (".", "..") or name.startswith(".")
    ):
        raise ValueError(f"--name must be a plain folder name inside --runs, not {name!r}")
    return name or f"{command}-{preset}-{dt.datetime.now():%Y%m%d-%H%M%S}"


def _fmt(v, digits=3, why: str | None = None) -> str:
    if v is None or (isinstance(v, float) and v != v):
        return f"undefined ({why})" if why else "undefined"
    return f"{v:.{digits}f}"


def _stages(selected) -> str:
    """A run's selected stage(s): one name, or network: name pairs."""
    if selected is None:
        return "last (a record from before stage selection)"
    if isinstance(selected, dict):
        vals = set(selected.values())
        return (
            next(iter(vals))
            if len(vals) == 1
            else ", ".join(f"{k} {v}" for k, v in selected.items())
        )
    return str(selected)


def _spread(a: dict, digits=3) -> str:
    """mean ± sd across seeds, with the range."""
    if a["mean"] is None:
        return _fmt(None, why=a.get("reason"))
    sd = f" ± {a['sd']:.{digits}f}" if a["sd"] is not None else " ± undefined (one seed)"
    return f"{a['mean']:.{digits}f}{sd}\n[{a['min']:.{digits}f}–{a['max']:.{digits}f}]"


_SELECT_TEXT = {
    "best": "the stage with the lowest validation loss",
    "last": "the schedule's last stage (--select last)",
}


def _threshold_label(cfg) -> str:
    t = cfg.threshold + (f" {cfg.threshold_target:g}" if cfg.threshold != "youden" else "")
    return f"acc @ t\n({t})"


def _seeds(seeds: str | None, seed: int | None) -> tuple[int, ...] | None:
    from fastcxr.seeds import parse_seeds

    if seeds is None:
        return None
    if seed is not None:
        raise ValueError("give --seed or --seeds, not both")
    return parse_seeds(seeds)


def _aggregate_table(result: dict, findings, title: str, row_label: str) -> Table:
    t = Table(title=f"{title} — mean ± sd [range] over seeds {result['seeds']}")
    t.add_column(row_label)
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for row, by_f in result["aggregate"].items():
        cells = [row]
        for f in findings:
            cells += [_spread(by_f[f]["accuracy"]), _spread(by_f[f]["auc"])]
        t.add_row(*cells)
    return t


def _synthetic_note(result: dict) -> None:
    if result.get("synthetic"):
        err.print(
            "[yellow]Data: the built-in SYNTHETIC dataset (not patient data); "
            "numbers show the pipeline works, not clinical performance.[/]"
        )


# -- commands -------------------------------------------------------------------------------
@app.command()
def version() -> None:
    """Print the fastcxr version."""
    out.print(__version__)


@app.command("compare")
def compare_cmd(
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
    formulations: Annotated[
        str, typer.Option(help="Comma-separated formulations.")
    ] = "single,multilabel,multiclass",
    name: Name = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Experiment II: train single / multilabel / multiclass on the same data and compare."""
    from fastcxr.study import compare, compare_seeds

    with _library_errors():
        cfg = _config(preset, **_overrides(locals()))
        seed_list = _seeds(seeds, seed)
        forms = tuple(f.strip() for f in formulations.split(",") if f.strip())
        log = _logger(json_out)
        ds = _dataset(data, cfg, log)
        _check_resume(resume, name)
        run_dir = runs / _run_name(name, "compare", cfg.preset)
        if seed_list:
            result = compare_seeds(
                ds, cfg, run_dir, seed_list, forms, log, resume=resume, overwrite=overwrite
            )
        else:
            result = compare(ds, cfg, run_dir, forms, log, resume=resume, overwrite=overwrite)
    if not _is_main():
        return
    if json_out:
        print(json.dumps(result, indent=2))
        return
    _synthetic_note(result)
    title = f"Experiment II — formulations ({cfg.arch}, {cfg.size}px, {cfg.preset})"
    if seed_list:
        out.print(_aggregate_table(result, cfg.findings, title, "formulation"))
        out.print(
            f"threshold per finding: {cfg.threshold} on each seed's validation split; "
            f"training time over all seeds {result['train_seconds']:.0f} s — run records: "
            f"{result['run_dir']}/seed-K"
        )
        return
    t = Table(title=title)
    t.add_column("formulation")
    for f in cfg.findings:
        t.add_column(f"{f}\n{_threshold_label(cfg)}", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for c in ("epochs", "s/epoch", "train time (s)"):
        t.add_column(c, justify="right")
    for fname, r in result["formulations"].items():
        cells = [fname + (f" ({len(r['networks'])} nets)" if len(r["networks"]) > 1 else "")]
        for f in cfg.findings:
            m = r["findings"][f]
            ci = m.get("auc_ci")
            auc = _fmt(m["auc"], why=m.get("reason"))
            auc += (
                f"\n({ci[0]:.3f}–{ci[1]:.3f})"
                if ci
                else f"\nCI {_fmt(None, why=m.get('auc_ci_reason'))}"
            )
            acc = _fmt(m["accuracy"], why=m.get("reason"))
            if m.get("threshold") is not None:
                acc += f"\nt={m['threshold']:.3f}"
            cells += [acc, auc]
        cells += [str(r["epochs"]), f"{r['seconds_per_epoch']:.1f}", f"{r['train_seconds']:.0f}"]
        t.add_row(*cells)
    out.print(t)
    out.print(
        f"acc @ t: accuracy at each finding's threshold t, chosen ({cfg.threshold}) on the "
        "validation predictions; accuracy at 0.5 is in --json and `fastcxr report`."
    )
    out.print(
        f"AUC 95% CI: {result.get('auc_ci_method', '')}. Model reported and saved: "
        f"{_SELECT_TEXT[cfg.select]}: "
        + "; ".join(
            f"{k}: {_stages(r.get('selected_stage'))}" for k, r in result["formulations"].items()
        )
    )
    if result.get("pairs"):
        pt = Table(
            title="Paired comparison of AUCs (DeLong's test clustered by patient, "
            "Obuchowski 1997, on the same test images)"
        )
        for c in ("finding", "a − b", "patients", "AUC diff", "95% CI", "p", "p (Holm)"):
            pt.add_column(c, justify="left" if c in ("finding", "a − b") else "right")
        for p in result["pairs"]:
            ci, why = p["diff_ci"], p.get("reason")
            pt.add_row(
                p["finding"],
                f"{p['a']} − {p['b']}",
                str(p.get("patients", "")),
                _fmt(p["auc_diff"], 4, why),
                f"{ci[0]:+.4f} … {ci[1]:+.4f}" if ci else _fmt(None, why=why),
                _fmt(p["p_value"], 4, why),
                _fmt(p.get("p_holm"), 4, p.get("p_holm_reason")),
            )
        out.print(pt)
    out.print(f"run record: {result['run_dir']}")


@app.command("train")
def train_cmd(
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
    name: Name = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Train one formulation through the schedule and write its run record."""
    from fastcxr.study import train_formulation, train_seeds

    with _library_errors():
        cfg = _config(preset, **_overrides(locals()))
        seed_list = _seeds(seeds, seed)
        log = _logger(json_out)
        ds = _dataset(data, cfg, log)
        run_dir = runs / _run_name(name, f"train-{formulation}", cfg.preset)
        _check_resume(resume, name)
        if seed_list:
            result = train_seeds(
                ds, formulation, cfg, run_dir, seed_list, log, resume=resume, overwrite=overwrite
            )
        else:
            result = train_formulation(
                ds, formulation, cfg, run_dir, log, resume=resume, overwrite=overwrite
            )
        result["run_dir"], result["synthetic"] = str(run_dir), ds.synthetic
    if not _is_main():
        return
    if json_out:
        print(json.dumps(result, indent=2))
        return
    _synthetic_note(result)
    if seed_list:
        out.print(_aggregate_table(result, cfg.findings, formulation, "formulation"))
        out.print(f"training time over all seeds {result['train_seconds']:.0f} s — {run_dir}")
        return
    t = Table(title=f"{formulation} ({cfg.arch}, {cfg.size}px)")
    for c in ("finding", _threshold_label(cfg), "threshold", "acc @ 0.5", "ROC AUC"):
        t.add_column(c, justify="right" if c != "finding" else "left")
    for f, m in result["findings"].items():
        why = m.get("reason")
        t.add_row(
            f, _fmt(m["accuracy"], why=why), _fmt(m["threshold"], why=why),
            _fmt(m["accuracy_at_0.5"]), _fmt(m["auc"], why=why),
        )  # fmt: skip
    out.print(t)
    out.print(f"selected stage ({cfg.select}): {_stages(result['selected_stage'])}")
    compiled = f" (+ {result['compile_seconds']:.0f} s compiling)" if cfg.compile else ""
    out.print(
        f"{result['epochs']} epochs, {result['seconds_per_epoch']:.1f} s/epoch, "
        f"{result['train_seconds']:.0f} s{compiled} — run record: {run_dir}"
    )


@app.command("unfreeze-ablation")
def ablation_cmd(
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
    formulation: Annotated[str, typer.Option(help="Formulation to train.")] = "multilabel",
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run", help="Print the plan (stages and trainable parameters); no training."
        ),
    ] = False,
    name: Name = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
    runs: Runs = Path("runs"),
    json_out: Json = False,
) -> None:
    """Experiment I: progressive block unfreezing, test metrics after each stage."""
    from fastcxr.study import ablation_plan, ablation_seeds, unfreeze_ablation

    with _library_errors():
        cfg = _config(preset, **_overrides(locals()))
        seed_list = _seeds(seeds, seed)
        if dry_run:
            result = ablation_plan(cfg, formulation)
        else:
            log = _logger(json_out)
            ds = _dataset(data, cfg, log)
            run_dir = runs / _run_name(name, "ablation", cfg.preset)
            resume = _check_resume(resume, name)
            if seed_list:
                result = ablation_seeds(
                    ds, cfg, run_dir, seed_list, formulation, log, resume, overwrite
                )
            else:
                result = unfreeze_ablation(
                    ds, cfg, run_dir, formulation, log, resume=resume, overwrite=overwrite
                )
    if not _is_main():
        return
    if json_out:
        print(json.dumps(result, indent=2))
        return
    if dry_run:
        t = Table(
            title=f"Experiment I plan — {cfg.arch}, {formulation}, "
            f"{cfg.freeze_style}-style freezing"
        )
        for c in ("stage", "adds", "trainable params", "Δ params", "epochs≤", "lr"):
            t.add_column(c, justify="left" if c in ("stage", "adds") else "right")
        prev, seen = 0, set()
        for s in result["stages"]:
            new = [g for g in s["unfrozen"] if g not in seen]
            seen.update(new)
            shown = ", ".join(new[:3]) + (f" … ({len(new)} groups)" if len(new) > 3 else "")
            t.add_row(
                s["name"],
                shown,
                f"{s['trainable_params']:,}",
                f"{s['trainable_params'] - prev:+,}",
                str(s["max_epochs"]),
                f"{s['lr']:g}",
            )
            prev = s["trainable_params"]
        out.print(t)
        out.print(f"total parameters: {result['total_params']:,}")
        return
    _synthetic_note(result)
    title = f"Experiment I — progressive unfreezing ({cfg.arch}, {formulation})"
    if seed_list:
        out.print(_aggregate_table(result, cfg.findings, title, "stage"))
        out.print(f"training time over all seeds {result['train_seconds']:.0f} s — {run_dir}")
        return
    t = Table(title=title)
    for c in ("stage", "unfrozen", "trainable params", "epochs", "valid loss"):
        t.add_column(c, justify="left" if c in ("stage", "unfrozen") else "right")
    for f in cfg.findings:
        t.add_column(f"{f}\n{_threshold_label(cfg)}", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for s in result["stages"]:
        best = s["name"] == result["best_stage"]
        unfrozen = [g for g in s["unfrozen"] if g != "head"]
        shown = "head" + (f" + {len(unfrozen)} blocks ({unfrozen[0]}…)" if unfrozen else "")
        cells = [
            s["name"] + (" ★" if best else ""),
            shown,
            f"{s['trainable_params']:,}",
            str(s["epochs"]),
            f"{s['valid_loss']:.4f}",
        ]
        for f in cfg.findings:
            m = s["findings"][f]
            cells += [_fmt(m["accuracy"], why=m.get("reason")), _fmt(m["auc"], why=m.get("reason"))]
        t.add_row(*cells, style="bold" if best else None)
    out.print(t)
    out.print(
        f"★ best stage by validation loss: {result['best_stage']}; the run's model "
        f"({cfg.select}): {_stages(result['selected_stage'])} — run record: {result['run_dir']}"
    )


@app.command("labels")
def labels_cmd(
    manifest: Annotated[Path, typer.Argument(help="Manifest CSV (or its folder).")],
    findings: Findings = None,
    uncertain: Uncertain = "drop",
    blank: Blank = "drop",
    json_out: Json = False,
) -> None:
    """Label composition under a policy: combinations per split (the study's Table 2) and
    each finding's raw 1/0/-1/blank counts."""
    from fastcxr.findings import STUDY_FINDINGS, LabelPolicy, canonical_findings, composition
    from fastcxr.manifest import read_manifest

    with _library_errors():
        fs = canonical_findings(findings.split(",")) if findings else STUDY_FINDINGS
        policy = LabelPolicy.parse(uncertain or "drop", blank or "drop")
        result = composition(read_manifest(manifest), fs, policy)
    if json_out:
        print(json.dumps(result, indent=2))
        return
    t = Table(title=f"Label combinations ({', '.join(fs)}) under {policy.describe()}")
    t.add_column("split")
    combos = list(next(iter(result["splits"].values()))["combinations"])
    for c in combos:
        t.add_column(f"({c})", justify="right")
    t.add_column("kept / images", justify="right")
    for split, r in result["splits"].items():
        t.add_row(
            split, *[str(r["combinations"][c]) for c in combos], f"{r['kept']} / {r['images']}"
        )
    out.print(t)
    ft = Table(title="Raw labels per finding")
    for c in ("split", "finding", "1", "0", "-1", "blank"):
        ft.add_column(c, justify="left" if c in ("split", "finding") else "right")
    for split, r in result["splits"].items():
        for f, counts in r["findings"].items():
            ft.add_row(split, f, *[str(counts[k]) for k in ("1", "0", "-1", "blank")])
    out.print(ft)


@app.command("bench-prepare")
def bench_prepare_cmd(
    n: Annotated[int, typer.Option("--n", help="MIMIC-sized DICOMs to convert.")] = 8,
    size: Annotated[int, typer.Option(help="Cache image size.")] = 512,
    json_out: Json = False,
) -> None:
    """DICOM → cache conversion speed per core, against a plain pydicom + PIL baseline
    measured in the same run, and the projected time for all of MIMIC-CXR."""
    from fastcxr.bench import bench_prepare

    with _library_errors():
        r = bench_prepare(n, size)
    if json_out:
        print(json.dumps(r, indent=2))
        return
    t = Table(
        title=f"Conversion of {r['rows']}x{r['cols']} {r['bits_stored']}-bit DICOMs to "
        f"{size}x{size} PNG (one process)"
    )
    t.add_column("")
    t.add_column("images/s per core", justify="right")
    t.add_row(
        "baseline: pydicom + LUTs + float rescale + PIL resize + PNG",
        f"{r['baseline_images_per_s_per_core']:.2f}",
    )
    t.add_row("fastcxr", f"{r['fastcxr_images_per_s_per_core']:.2f}")
    out.print(t)
    out.print(
        f"fastcxr / baseline = {r['ratio']:.2f}x; all of MIMIC-CXR (377,110 images) on 16 "
        f"cores ≈ {r['mimic_minutes_on_16_cores']:.0f} min at this rate"
    )


@app.command("bench")
def bench_cmd(
    arch: Annotated[str, typer.Option(help="Architecture.")] = "resnet152",
    size: Annotated[int, typer.Option(help="Image size (square).")] = 512,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Batch size.")] = 64,
    stages: Annotated[
        str, typer.Option(help="Comma-separated stages (NAME=SPEC or SPEC) to measure.")
    ] = "head,conv5_block3=conv5_block-1,conv5,conv4_last3=conv4_block-3,all",
    freeze_style: Annotated[
        str, typer.Option("--freeze-style", help="Comma-separated freezing styles: keras,fastai.")
    ] = "keras,fastai",
    precision: Precision = None,
    compile: Compile = False,
    compile_backend: CompileBackend = None,
    warmup: Annotated[int, typer.Option(help="Untimed batches per stage (compile, cuDNN).")] = 5,
    steps: Annotated[int, typer.Option(help="Timed batches per stage.")] = 20,
    images: Annotated[
        int | None, typer.Option(help="Images in the bench cache (default: enough for one pass).")
    ] = None,
    cache: Annotated[
        Path | None,
        typer.Option(help="Image cache folder (generated if absent; default under FASTCXR_HOME)."),
    ] = None,
    no_defaults: Annotated[
        bool, typer.Option("--no-defaults", help="Skip the fastai-defaults baseline.")
    ] = False,
    formulation: Annotated[str, typer.Option(help="Formulation of the network.")] = "multilabel",
    workers: Workers = None,
    project_images: Annotated[
        int, typer.Option(help="Training images for the projected `compare --preset paper`.")
    ] = 34_000,
    json_out: Json = False,
) -> None:
    """Training speed per stage: the model-only limit (random tensors on the device), fastcxr's
    real loop on an image cache, and fastai's defaults, measured in one run."""
    from fastcxr.bench import bench_train
    from fastcxr.config import TrainConfig, parse_stages
    from fastcxr.schedule import FREEZE_STYLES

    with _library_errors():
        styles = tuple(s.strip() for s in freeze_style.split(",") if s.strip())
        for s in styles:
            if s not in FREEZE_STYLES:
                raise ValueError(f"--freeze-style must list keras and/or fastai, not {s!r}")
        cfg = TrainConfig(
            arch=arch, size=size, batch_size=batch_size, pretrained=False,
            freeze_style=styles[0], workers=workers, compile=compile,
        ).replace(precision=precision, compile_backend=compile_backend)  # fmt: skip
        r = bench_train(
            cfg, parse_stages(stages), styles, warmup, steps, images, cache,
            defaults=not no_defaults, formulation=formulation, project_images=project_images,
            log=None if json_out else (lambda m: err.print(f"[dim]{_e(m)}[/]")),
        )  # fmt: skip
    if json_out:
        print(json.dumps(r, indent=2))
        return
    sp = r["speed"]
    t = Table(
        title=f"Training img/s — {r['arch']}, {r['size']}px, batch {r['batch_size']}, "
        f"{sp['precision']}, channels_last={sp['channels_last']}, compile={sp['compile']} "
        f"on {r['device']}"
    )
    cols = ["stage", "freezing", "limit", "fastcxr", "fastcxr/limit"]
    if not no_defaults:
        cols += ["fastai defaults", "fastcxr/defaults"]
    if sp["compile"]:
        cols += ["compile s (fastcxr)"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "freezing") else "right")
    for row in r["rows"]:
        cells = [row["stage"], row["freeze_style"], f"{row['limit_img_s']:.1f}",
                 f"{row['fastcxr_img_s']:.1f}", f"{row['fastcxr_vs_limit']:.2f}"]  # fmt: skip
        if not no_defaults:
            cells += [f"{row['defaults_img_s']:.1f}", f"{row['fastcxr_vs_defaults']:.2f}x"]
        if sp["compile"]:
            cells += [f"{row['compile_s']['fastcxr']:.1f}"]
        t.add_row(*cells)
    out.print(t)
    out.print(f"evaluation (no gradient, batch {2 * r['batch_size']}): {r['eval_img_s']:.1f} img/s")
    pj = r["projection"]
    if pj["available"]:
        out.print(
            f"projected `compare --preset paper` on {pj['train_images']:,} training images "
            f"({pj['networks']} networks x 4 stages x {pj['epochs_per_stage']} epochs, "
            f"{pj['freeze_style']} freezing, no early stop): {pj['hours']:.2f} h"
        )


@app.command("report")
def report_cmd(
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
    from fastcxr.evaluation import EvalConfig
    from fastcxr.figures import build_report

    with _library_errors():
        files = build_report(
            run_dirs, out_dir, EvalConfig(ci=ci, threshold=threshold, target=target), template
        )
    for f in files:
        out.print(f"wrote {f}")


@app.command("predict")
def predict_cmd(
    run_dir: Annotated[Path, typer.Argument(help="A trained run (train, or compare/NAME).")],
    paths: Annotated[
        list[Path],
        typer.Argument(help="DICOM/PNG/JPG files, folders (recursive) or a manifest CSV."),
    ],
    out_csv: Annotated[Path, typer.Option("--out", help="Predictions CSV.")] = Path(
        "predictions.csv"
    ),
    cam: Annotated[
        Path | None,
        typer.Option("--cam", help="Folder for Grad-CAM overlays (one PNG per image and finding)."),
    ] = None,
    export_dir: Annotated[
        Path | None,
        typer.Option("--export", help="Also export the model (torch.export .pt2 + export.json)."),
    ] = None,
    batch_size: BatchSize = 64,
    json_out: Json = False,
) -> None:
    """Predict findings for new radiographs with a trained run; unreadable files are listed."""
    from fastcxr.predict import Predictor, collect_inputs, export, predict, write_cams
    from fastcxr.runs import write_csv

    with (
        _library_errors(),
        _progress() as bar,
    ):
        pred = Predictor.load(run_dir)
        files = collect_inputs(paths)
        task = bar.add_task("predicting", total=len(files))
        df, fails = predict(
            pred, files, batch_size or 64, progress=lambda i, n: bar.update(task, completed=i)
        )
        write_csv(out_csv, df)
        if len(fails):
            write_csv(out_csv.with_name(out_csv.stem + "_failures.csv"), fails)
        cams = write_cams(pred, [Path(f) for f in df["file"]], cam) if cam else []
        exported = export(pred, export_dir) if export_dir else []
    summary = {
        "predicted": len(df),
        "failed": len(fails),
        "csv": str(out_csv),
        "failures": fails.to_dict("records"),
        "cams": len(cams),
        "exported": [str(p) for p in exported],
        "device": str(pred.device),
    }
    if json_out:
        print(json.dumps(summary, indent=2))
        return
    out.print(f"predicted {len(df)} image(s) on {pred.device} → {out_csv}")
    for r in summary["failures"]:
        err.print(f"[yellow]could not read[/] {_e(r['file'])}: {_e(r['reason'])}")
    if cams:
        out.print(f"wrote {len(cams)} Grad-CAM overlays to {cam}")
    if exported:
        out.print(f"exported to {export_dir}")


@prepare_app.command("synthetic")
def prepare_synthetic(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the MIMIC-style tree to.")],
    patients: Annotated[int, typer.Option(help="Number of patients.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    rows: Annotated[int, typer.Option(help="DICOM rows.")] = 224,
    cols: Annotated[int, typer.Option(help="DICOM columns.")] = 192,
    workers: Workers = None,
) -> None:
    """Write a miniature MIMIC-CXR (DICOMs + label files in the real layout)."""
    from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

    with _library_errors():
        write_synthetic_mimic(
            out_dir,
            SyntheticSpec(patients=patients, seed=seed, rows=rows, cols=cols),
            workers=workers,
        )
    n = sum(1 for _ in out_dir.glob("files/p*/p*/s*/*.dcm"))
    out.print(f"wrote {n} DICOMs and the three label files under {out_dir} (synthetic)")


PrepViews = Annotated[
    str, typer.Option(help="Views to keep (comma-separated; 'all' for every view).")
]
PrepSize = Annotated[int, typer.Option(help="Cache image size.")]
PrepOut = Annotated[Path, typer.Option("--out", help="Output folder (manifest + cache).")]
Shard = Annotated[
    str | None,
    typer.Option(
        help="I/N: convert only shard I of N (cluster array jobs); run once more without it to "
        "verify and write the manifest."
    ),
]
ManifestOnly = Annotated[
    bool,
    typer.Option(
        "--manifest-only", help="Write the manifest from the label files alone; convert nothing."
    ),
]


def _views(views: str) -> tuple[str, ...] | None:
    return None if views.strip().lower() == "all" else tuple(v.strip() for v in views.split(","))


def _modalities(text: str) -> tuple[str, ...] | None:
    if text.strip().lower() == "all":
        return None
    return tuple(m.strip().upper() for m in text.split(",") if m.strip())


def _run_prepare(fn, json_out: bool, out_dir: Path, **kwargs) -> None:
    from dataclasses import asdict

    with (
        _library_errors(),
        _progress() as bar,
    ):
        task = bar.add_task("converting", total=None)
        report = fn(
            out=out_dir, progress=lambda i, n: bar.update(task, completed=i, total=n), **kwargs
        )
    if json_out:
        print(json.dumps(asdict(report), indent=2))
        return
    t = Table(title=f"prepared {kwargs['root']} → {out_dir}")
    t.add_column("")
    t.add_column("", justify="right")
    for k in ("images", "converted", "skipped", "failures"):
        t.add_row(k, str(getattr(report, k)))
    for k, v in report.splits.items():
        t.add_row(f"split {k}", str(v))
    out.print(t)
    if report.failures:
        err.print(
            f"[yellow]{report.failures} file(s) could not be read or were skipped (e.g. not "
            f"a radiograph modality): see {_e(out_dir)}/failures*.csv[/]"
        )
    if report.manifest is None:
        err.print("shard done; run again without --shard to write the manifest")


@prepare_app.command("mimic")
def prepare_mimic_cmd(
    root: Annotated[Path, typer.Argument(help="MIMIC-CXR root (files/ + the label CSVs).")],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: Workers = None,
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
    )


@prepare_app.command("chexpert")
def prepare_chexpert_cmd(
    root: Annotated[Path, typer.Argument(help="CheXpert folder (train.csv, valid.csv, train/).")],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: Workers = None,
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


@prepare_app.command("nih")
def prepare_nih_cmd(
    root: Annotated[
        Path,
        typer.Argument(help="ChestX-ray14 folder (Data_Entry_2017*.csv, test_list.txt, images*/)."),
    ],
    out_dir: PrepOut,
    size: PrepSize = 512,
    workers: Workers = None,
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


def main() -> None:  # pragma: no cover
    app()
