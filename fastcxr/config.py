"""Run configuration: frozen dataclasses that validate themselves, stages as data, presets.

`TrainConfig.from_options(preset, **options)` is the one way options become a configuration
(the command line calls it with each option by name); a value that cannot be used raises
`UsageError` naming the option and, for a choice, the choices.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from fastcxr.errors import UsageError
from fastcxr.findings import STUDY_FINDINGS

LR_FIND = "find"  # `--lr find`: each stage's rate is the learning-rate finder's suggestion

FreezeStyle = Literal["keras", "fastai"]
LoaderChoice = Literal["auto", "fast", "datablock"]
PrecisionChoice = Literal["auto", "bf16", "fp32"]
ThresholdMethod = Literal["youden", "sensitivity", "specificity"]
SelectChoice = Literal["best", "last"]

FREEZE_STYLES: tuple[str, ...] = typing.get_args(FreezeStyle)
LOADERS: tuple[str, ...] = typing.get_args(LoaderChoice)
PRECISIONS: tuple[str, ...] = typing.get_args(PrecisionChoice)
THRESHOLD_METHODS: tuple[str, ...] = typing.get_args(ThresholdMethod)
SELECT_CHOICES: tuple[str, ...] = typing.get_args(SelectChoice)


def _option(field: str) -> str:
    """The command-line option of a configuration field (`batch_size` → `--batch-size`)."""
    return "--" + {"threshold_target": "target", "max_epochs": "epochs"}.get(field, field).replace(
        "_", "-"
    )


@dataclass(frozen=True)
class Stage:
    """One step of a schedule: unfreeze `unfreeze` (see `models.resolve_unfreeze`), then fit."""

    name: str
    unfreeze: str
    max_epochs: int = 10
    lr: float | Literal["find"] = 1e-3  # "find": the learning-rate finder's suggestion

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name.strip():
            raise UsageError(f"a stage needs a name, not {self.name!r}")
        if not isinstance(self.unfreeze, str) or not self.unfreeze.strip():
            raise UsageError(f"stage {self.name}: what it unfreezes is empty")
        if not _is_int(self.max_epochs) or self.max_epochs < 1:
            raise UsageError(
                f"stage {self.name}: --epochs must be at least 1, not {self.max_epochs!r} "
                "(a run with no epoch would record an untrained network)"
            )
        if not _is_positive(self.lr) and self.lr != LR_FIND:
            raise UsageError(
                f"stage {self.name}: --lr must be a positive number or {LR_FIND!r}, not {self.lr!r}"
            )


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_positive(v) -> bool:
    return _is_number(v) and math.isfinite(v) and v > 0


# The study's Experiment I: head; + conv5 block 3; + all of conv5; + last 3 blocks of conv4.
PAPER_STAGES = (
    Stage("head", "head"),
    Stage("conv5_block3", "conv5_block-1", lr=1e-4),
    Stage("conv5", "conv5", lr=1e-4),
    Stage("conv4_last3", "conv4_block-3", lr=1e-4),
)


SEED_RANGE = f"a whole number from {-(2**63)} to {2**63 - 1} (what torch's generator accepts)"


def seed_in_range(seed: int) -> bool:
    """Whether torch's generator accepts `seed` (a signed 64-bit integer)."""
    return -(2**63) <= seed < 2**63


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data; saved, resolved, with every run.

    `stages` is the schedule `train` and `compare` run, `ablation_stages` the one
    `unfreeze-ablation` runs (the demo preset's differ: see `DEMO`); `--stages` sets both.
    """

    arch: str = "resnet152"
    size: int = 512
    batch_size: int = 64
    pretrained: bool = True
    weights: str | None = None
    findings: tuple[str, ...] = STUDY_FINDINGS
    stages: tuple[Stage, ...] = PAPER_STAGES
    ablation_stages: tuple[Stage, ...] = PAPER_STAGES
    patience: int = 3  # epochs without a better validation loss before a stage stops
    lr_ratio: float = 10.0  # discriminative LRs: earliest unfrozen group gets lr / lr_ratio
    weight_decay: float = 1e-2
    # keras: frozen blocks fully frozen, BatchNorm in eval (the study); fastai: train_bn=True
    freeze_style: FreezeStyle = "keras"
    uncertain: str = "drop"  # label policy, see `findings.LabelPolicy.parse`
    blank: str = "drop"
    augment: bool = True
    seed: int = 0
    workers: int | None = None
    # fast: uint8 cache batches normalised and augmented on the GPU; datablock: fastai's
    # DataBlock; auto: fast on a GPU
    loader: LoaderChoice = "auto"
    precision: PrecisionChoice = "auto"  # autocast dtype; auto: bf16 on a GPU
    compile: bool = False  # torch.compile the model (compile time is reported apart)
    compile_backend: str = "inductor"
    preset: str = "paper"
    # Decisions (accuracy, sensitivity, confusion, predict's 0/1) use a threshold per finding
    # chosen on the validation predictions: youden | sensitivity | specificity (with target).
    threshold: ThresholdMethod = "youden"
    threshold_target: float | None = None
    # The model a run reports and saves: the stage with the lowest validation loss ("best")
    # or the schedule's last stage ("last").
    select: SelectChoice = "best"

    def __post_init__(self):
        self._check_choices()
        self._check_numbers()
        self._check_threshold()
        for name in ("stages", "ablation_stages"):
            v = getattr(self, name)
            if not isinstance(v, tuple) or not v or not all(isinstance(s, Stage) for s in v):
                raise UsageError(f"{name} must be a non-empty tuple of Stage, not {v!r}")
        if not isinstance(self.findings, tuple) or not self.findings:
            raise UsageError(f"findings must be a non-empty tuple, not {self.findings!r}")
        from fastcxr.findings import LabelPolicy

        try:
            LabelPolicy.parse(self.uncertain, self.blank)
        except ValueError as e:
            raise UsageError(f"--uncertain/--blank: {e}") from None

    def _check_choices(self) -> None:
        """Every `Literal` field holds one of its choices; an unknown value is listed with
        them (a library caller's "Keras" is refused, not silently neither style)."""
        for name, choices in _choices().items():
            v = getattr(self, name)
            if v not in choices:
                raise UsageError(
                    f"unknown {name.replace('_', ' ')} {v!r}; {_option(name)} must be one of "
                    f"{', '.join(choices)}"
                )

    def _check_numbers(self) -> None:
        if not _is_int(self.seed) or not seed_in_range(self.seed):
            raise UsageError(f"--seed must be {SEED_RANGE}, not {self.seed!r}")
        for name, low in (("size", 8), ("batch_size", 1), ("patience", 1)):
            v = getattr(self, name)
            if not _is_int(v) or v < low:
                raise UsageError(f"{_option(name)} must be an integer >= {low}, not {v!r}")
        if self.workers is not None and (not _is_int(self.workers) or self.workers < 0):
            raise UsageError(f"--workers must be 0 or more, not {self.workers!r}")
        if not _is_positive(self.lr_ratio) or self.lr_ratio < 1:
            raise UsageError(f"lr_ratio (--lr-ratio) must be >= 1, not {self.lr_ratio!r}")
        if not _is_number(self.weight_decay) or not self.weight_decay >= 0:
            raise UsageError(f"weight_decay must be >= 0, not {self.weight_decay!r}")
        for name in ("pretrained", "augment", "compile"):
            if not isinstance(getattr(self, name), bool):
                raise UsageError(f"{name} must be True or False, not {getattr(self, name)!r}")
        for name in ("arch", "compile_backend", "preset"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise UsageError(f"{_option(name)} must be a name, not {getattr(self, name)!r}")

    def _check_threshold(self) -> None:
        if self.threshold == "youden" and self.threshold_target is not None:
            raise UsageError("--target needs --threshold sensitivity or specificity")
        if self.threshold != "youden":
            t = self.threshold_target
            if not _is_number(t) or not 0 < t < 1:
                raise UsageError(
                    f"--threshold {self.threshold} needs --target X with 0 < X < 1 "
                    f"(the {self.threshold} to reach on the validation split), not {t!r}"
                )

    def replace(self, **changes) -> TrainConfig:
        """A copy with `changes` applied, validated; `None` is a value (it resets
        `threshold_target`, `workers` or `weights`), not "keep"."""
        unknown = sorted(set(changes) - set(self.__dataclass_fields__))
        if unknown:
            raise UsageError(f"TrainConfig has no field {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        """From `to_dict()` (a run record's `train`); keys of older versions are ignored."""
        d = dict(d)
        for k in ("stages", "ablation_stages"):
            if k in d:
                d[k] = tuple(Stage(**s) for s in d[k])
        if "findings" in d:
            d["findings"] = tuple(d["findings"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    @classmethod
    def from_options(
        cls,
        preset: str = "paper",
        *,
        arch: str | None = None,
        size: int | None = None,
        batch_size: int | None = None,
        epochs: int | None = None,
        patience: int | None = None,
        lr: float | str | None = None,
        stages: str | Sequence[str] | Sequence[Stage] | None = None,
        weights: str | Path | None = None,
        pretrained: bool | None = None,
        freeze_style: str | None = None,
        findings: str | Sequence[str] | None = None,
        uncertain: str | None = None,
        blank: str | None = None,
        seed: int | None = None,
        workers: int | None = None,
        loader: str | None = None,
        precision: str | None = None,
        compile: bool | None = None,
        compile_backend: str | None = None,
        threshold: str | None = None,
        target: float | None = None,
        select: str | None = None,
        **fields: Any,
    ) -> TrainConfig:
        """The preset with the options given (`None`: keep the preset's value); `fields`: any
        other `TrainConfig` field by its name (e.g. `lr_ratio`), also kept when None.

        `stages` is `--stages` text (`parse_stages`) or Stage objects and replaces both
        schedules; `epochs` and `lr` then apply to every stage of both. `findings` is
        comma-separated text or names, mapped onto fastcxr's vocabulary.
        """
        from fastcxr.findings import canonical_findings

        base = get_preset(preset)
        given = {
            "arch": arch, "size": size, "batch_size": batch_size, "patience": patience,
            "weights": None if weights is None else str(weights), "pretrained": pretrained,
            "freeze_style": freeze_style, "uncertain": uncertain, "blank": blank,
            "seed": seed, "workers": workers, "loader": loader, "precision": precision,
            "compile": compile, "compile_backend": compile_backend, "threshold": threshold,
            "threshold_target": target, "select": select,
        }  # fmt: skip
        unknown = set(fields) - set(cls.__dataclass_fields__)
        if unknown:
            raise TypeError(f"TrainConfig has no field {', '.join(sorted(unknown))}")
        changes = {k: v for k, v in {**given, **fields}.items() if v is not None}
        if findings is not None:
            names = findings.split(",") if isinstance(findings, str) else list(findings)
            try:
                changes["findings"] = canonical_findings(names)
            except ValueError as e:
                raise UsageError(f"--findings: {e}") from None
        changes.update(_schedules(base, stages, epochs, parse_lr(lr)))
        return dataclasses.replace(base, **changes)


def parse_lr(lr: float | str | None) -> float | str | None:
    """`--lr`: a positive number (text or number), `find` (the finder's suggestion per
    stage), or None (the preset's rates)."""
    if lr is None or lr == LR_FIND or not isinstance(lr, str):
        return lr
    try:
        value = float(lr)
    except ValueError:
        raise UsageError(f"--lr must be a positive number or {LR_FIND!r}, not {lr!r}") from None
    if not _is_positive(value):
        raise UsageError(f"--lr must be a positive number or {LR_FIND!r}, not {lr!r}")
    return value


def _choices() -> dict[str, tuple]:
    """`Literal` fields of `TrainConfig` → their choices."""
    hints = typing.get_type_hints(TrainConfig)
    return {k: typing.get_args(t) for k, t in hints.items() if typing.get_origin(t) is Literal}


def _schedules(base: TrainConfig, stages, epochs, lr) -> dict:
    """Both stage lists after `--stages`, `--epochs` and `--lr`."""
    if stages is None and epochs is None and lr is None:
        return {}
    upd = {k: v for k, v in (("max_epochs", epochs), ("lr", lr)) if v is not None}
    if stages is not None:
        if not isinstance(stages, str) and all(isinstance(x, str) for x in stages):
            stages = ",".join(stages)  # ["head", "c5=conv5"]: specs, as --stages lists them
        new = parse_stages(stages, epochs, lr) if isinstance(stages, str) else tuple(stages)
        new = tuple(dataclasses.replace(s, **upd) for s in new)
        return {"stages": new, "ablation_stages": new}
    return {
        k: tuple(dataclasses.replace(s, **upd) for s in getattr(base, k))
        for k in ("stages", "ablation_stages")
    }


# The CPU demo: a narrow ResNet-22 (`models.resnet22n`: 3 blocks in conv4 and conv5, as in
# the study's ResNet152, so each of the study's stages unfreezes blocks the one before did
# not) from scratch on 48x48 images. With random weights a frozen backbone is meaningless, so
# compare/train unfreeze everything at once; the ablation keeps the study's stage list (its
# numbers then show what random features buy).
DEMO = TrainConfig(
    arch="resnet22n", size=48, batch_size=64, pretrained=False,
    stages=(Stage("all", "all", max_epochs=5, lr=2e-3),),
    ablation_stages=tuple(dataclasses.replace(s, max_epochs=2, lr=2e-3) for s in PAPER_STAGES),
    patience=2, augment=False, preset="demo",
)  # fmt: skip
PAPER = TrainConfig()
PRESETS: dict[str, TrainConfig] = {"demo": DEMO, "paper": PAPER}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise UsageError(f"--preset must be one of {', '.join(PRESETS)}, not {name!r}") from None


def parse_stages(
    text: str, max_epochs: int | None = None, lr: float | None = None
) -> tuple[Stage, ...]:
    """`head,conv5_block-1,conv5` → stages named after what they unfreeze (`NAME=SPEC` names
    one); `max_epochs` and `lr`, when given, apply to every stage."""
    upd = {k: v for k, v in (("max_epochs", max_epochs), ("lr", lr)) if v is not None}
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, unfreeze = spec.partition("=")
        out.append(Stage(name.strip(), (unfreeze or name).strip(), **upd))
    if not out:
        raise UsageError("--stages is empty")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise UsageError(f"--stages repeats a stage name: {text!r} (give each NAME=SPEC)")
    return tuple(out)


__all__ = [
    "DEMO",
    "FREEZE_STYLES",
    "LOADERS",
    "PAPER",
    "PAPER_STAGES",
    "PRECISIONS",
    "PRESETS",
    "SELECT_CHOICES",
    "THRESHOLD_METHODS",
    "Stage",
    "TrainConfig",
    "get_preset",
    "parse_stages",
]
