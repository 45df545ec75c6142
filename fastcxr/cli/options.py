"""The options several commands share, as `Annotated` types (typer reads name and help)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
