"""The options several commands share, as `Annotated` types (typer reads name and help)."""

from __future__ import annotations

import functools
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

KEYWORD = inspect.Parameter.POSITIONAL_OR_KEYWORD

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
    typer.Option(
        help="Architecture (resnet10/18/34/50/101/152, densenet121/161/169/201, resnet22n: "
        "the demo's, no pretrained weights)."
    ),
]
Size = Annotated[int | None, typer.Option(help="Image size (square).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Batch size.")]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Max epochs per stage.")]
Patience = Annotated[
    int | None, typer.Option(help="Epochs without a better validation loss before a stage stops.")
]
Lr = Annotated[
    str | None,
    typer.Option(
        "--lr",
        help="Learning rate of the head (the other unfrozen groups get less, down to lr / "
        "lr_ratio), or 'find': fastai's lr_find at the start of each stage, its valley "
        "suggestion used and recorded in the run config.",
    ),
]
LrRatio = Annotated[
    float | None,
    typer.Option(
        "--lr-ratio",
        help="Discriminative learning rates: the earliest unfrozen group trains at lr / "
        "lr-ratio, the groups between geometrically spaced up to the head's lr (default 10).",
    ),
]
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
PrepWorkers = Annotated[
    int | None, typer.Option(help="Processes that convert images (default: one per core).")
]
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
RunName = Annotated[
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


Track = Annotated[
    str | None,
    typer.Option(
        "--track",
        help="Mirror the run in tensorboard|mlflow|wandb, or several (comma-separated): "
        "per-epoch losses, config, test metrics, the run record as artifacts; offline, in "
        "RUN/tracking, unless MLFLOW_TRACKING_URI / WANDB_MODE say otherwise. Needs: "
        "pip install 'fastcxr\\[tracking]'.",
    ),
]

# -- prepare ----------------------------------------------------------------------------------
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


# -- the training options, as one bundle ------------------------------------------------------
# Every option the training commands (compare, train, unfreeze-ablation, lr-find) share, in
# the order `--help` lists them, with its default. A command takes a parameter `o: Training`
# and names the shared options it offers in `@training_options(...)`; the options are put in
# its signature where `o` stands (the run's name and folder options last), and `o` receives
# them. Adding a training option: one line here, and the `TrainConfig` field it sets (an option
# whose name is a field of `TrainConfig` reaches it through `Training.config()` unchanged).
SHARED: dict[str, tuple[Any, Any]] = {
    "data": (Data, None), "preset": (Preset, "demo"), "arch": (Arch, None),
    "size": (Size, None), "batch_size": (BatchSize, None), "epochs": (Epochs, None),
    "patience": (Patience, None), "lr": (Lr, None), "lr_ratio": (LrRatio, None),
    "stages": (Stages, None), "weights": (Weights, None),
    "no_pretrained": (NoPretrained, False), "freeze_style": (FreezeStyle, None),
    "findings": (Findings, None), "uncertain": (Uncertain, None), "blank": (Blank, None),
    "seed": (Seed, None), "seeds": (Seeds, None), "threshold": (Threshold, None),
    "target": (Target, None), "select": (Select, None), "workers": (Workers, None),
    "loader": (Loader, None), "precision": (Precision, None), "compile": (Compile, False),
    "compile_backend": (CompileBackend, None), "track": (Track, None),
    # the run: its name and folder, listed after the command's own options
    "name": (RunName, None), "resume": (Resume, False), "overwrite": (Overwrite, False),
    "runs": (Runs, Path("runs")), "json_out": (Json, False),
}  # fmt: skip
RUN_OPTIONS = ("name", "resume", "overwrite", "runs", "json_out")
NOT_CONFIG = {"data", "preset", "seeds", "track", *RUN_OPTIONS}  # not TrainConfig's
TRAINING = tuple(SHARED)  # what compare, train and unfreeze-ablation take
SWEEP = tuple(  # lr-find trains nothing: no schedule length, seeds, thresholds or run folder
    n for n in SHARED if n not in {"epochs", "patience", "lr", "seeds", "threshold", "target",
                                   "select", "compile", "compile_backend", "track", "name",
                                   "resume", "overwrite", "runs", "json_out"}
) + ("json_out",)  # fmt: skip


class Training(SimpleNamespace):
    """The shared training options as given (None: the preset's value)."""

    def config(self):
        """The `TrainConfig`: the preset with every option given."""
        from fastcxr.config import TrainConfig

        given = {k: v for k, v in vars(self).items() if k not in NOT_CONFIG}
        given["pretrained"] = False if given.pop("no_pretrained", False) else None
        given["compile"] = True if given.get("compile") else None
        return TrainConfig.from_options(self.preset, **given)


def training_options(*names: str):
    """Put the shared options `names` (default: all) into the command's signature where its
    parameter `o` stands, the run options last; the command receives them as `o: Training`."""
    names = names or TRAINING

    def decorate(fn):
        sig = inspect.signature(fn, eval_str=True)
        own = [p for p in sig.parameters.values() if p.name != "o"]
        at = list(sig.parameters).index("o")

        def param(n: str) -> inspect.Parameter:
            annotation, default = SHARED[n]
            return inspect.Parameter(n, KEYWORD, default=default, annotation=annotation)

        head = [param(n) for n in names if n not in RUN_OPTIONS]
        tail = [param(n) for n in names if n in RUN_OPTIONS]
        params = own[:at] + head + own[at:] + tail

        @functools.wraps(fn)
        def command(**kwargs):
            o = Training(**{n: kwargs.pop(n) for n in names})
            return fn(o, **kwargs)

        del command.__wrapped__  # typer reads the signature below, not `fn`'s
        command.__signature__ = sig.replace(parameters=params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate
