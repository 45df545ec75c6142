"""Run configuration: frozen dataclasses, schedule stages as data, and the presets."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from fastcxr.findings import STUDY_FINDINGS

THRESHOLD_METHODS = ("youden", "sensitivity", "specificity")
SELECT_CHOICES = ("best", "last")


@dataclass(frozen=True)
class Stage:
    """One step of a schedule: unfreeze `unfreeze` (see `models.resolve_unfreeze`), then fit."""

    name: str
    unfreeze: str
    max_epochs: int = 10
    lr: float = 1e-3

    def __post_init__(self):
        if not isinstance(self.max_epochs, int) or self.max_epochs < 1:
            raise ValueError(
                f"stage {self.name}: --epochs must be at least 1, not {self.max_epochs!r} "
                "(a run with no epoch would record an untrained network)"
            )
        if not self.lr > 0 or self.lr != self.lr or self.lr == float("inf"):
            raise ValueError(f"stage {self.name}: --lr must be a positive number, not {self.lr!r}")


# The study's Experiment I: head; + conv5 block 3; + all of conv5; + last 3 blocks of conv4.
PAPER_STAGES = (
    Stage("head", "head"),
    Stage("conv5_block3", "conv5_block-1", lr=1e-4),
    Stage("conv5", "conv5", lr=1e-4),
    Stage("conv4_last3", "conv4_block-3", lr=1e-4),
)


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the data; saved, resolved, with every run."""

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
    freeze_style: str = "keras"  # "keras": frozen blocks fully frozen, BN in eval; "fastai"
    uncertain: str = "drop"
    blank: str = "drop"
    augment: bool = True
    seed: int = 0
    workers: int | None = None
    loader: str = "auto"  # "fast" (uint8 cache → GPU), "datablock" (fastai's); auto: fast on GPU
    precision: str = "auto"  # "bf16" | "fp32"; auto: bf16 on GPU
    compile: bool = False  # torch.compile the model (compile time is reported apart)
    compile_backend: str = "inductor"
    preset: str = "paper"
    max_train_images: int | None = None
    # Decisions (accuracy, sensitivity, confusion, predict's 0/1) use a threshold per finding
    # chosen on the validation predictions: youden | sensitivity | specificity (with target).
    threshold: str = "youden"
    threshold_target: float | None = None
    # The model a run reports and saves: the stage with the lowest validation loss ("best")
    # or the schedule's last stage ("last").
    select: str = "best"

    def __post_init__(self):
        for name, low in (("size", 8), ("batch_size", 1), ("patience", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or v < low:
                opt = "--" + name.replace("_", "-")
                raise ValueError(f"{opt} must be an integer >= {low}, not {v!r}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"--workers must be 0 or more, not {self.workers!r}")
        if not self.lr_ratio >= 1:
            raise ValueError(f"lr_ratio must be >= 1, not {self.lr_ratio!r}")
        if self.threshold not in THRESHOLD_METHODS:
            raise ValueError(
                f"--threshold must be one of {', '.join(THRESHOLD_METHODS)}, not {self.threshold!r}"
            )
        if self.threshold == "youden" and self.threshold_target is not None:
            raise ValueError("--target needs --threshold sensitivity or specificity")
        if self.threshold != "youden":
            t = self.threshold_target
            if t is None or not 0 < t < 1:
                raise ValueError(
                    f"--threshold {self.threshold} needs --target X with 0 < X < 1 "
                    f"(the {self.threshold} to reach on the validation split), not {t!r}"
                )
        if self.select not in SELECT_CHOICES:
            raise ValueError(
                f"--select must be one of {', '.join(SELECT_CHOICES)}, not {self.select!r}"
            )

    def replace(self, **changes) -> TrainConfig:
        return replace(self, **{k: v for k, v in changes.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        d = dict(d)
        for k in ("stages", "ablation_stages"):
            d[k] = tuple(Stage(**s) for s in d.get(k, ()))
        d["findings"] = tuple(d["findings"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# The CPU demo: a one-block-per-stage ResNet from scratch on 48x48 images. With random
# weights a frozen backbone is meaningless, so compare/train unfreeze everything at once;
# the ablation keeps the study's stage list (its numbers then show what random features buy).
DEMO = TrainConfig(
    arch="resnet10", size=48, batch_size=64, pretrained=False,
    stages=(Stage("all", "all", max_epochs=5, lr=2e-3),),
    ablation_stages=tuple(replace(s, max_epochs=2, lr=2e-3) for s in PAPER_STAGES),
    patience=2, augment=False, preset="demo",
)  # fmt: skip
PAPER = TrainConfig()
PRESETS: dict[str, TrainConfig] = {"demo": DEMO, "paper": PAPER}


def get_preset(name: str) -> TrainConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose from {list(PRESETS)}") from None


def parse_stages(
    text: str, max_epochs: int | None = None, lr: float | None = None
) -> tuple[Stage, ...]:
    """`head,conv5_block-1,conv5` → stages named after what they unfreeze."""
    out = []
    for spec in (s.strip() for s in text.split(",") if s.strip()):
        name, _, unfreeze = spec.partition("=")
        st = Stage(name, unfreeze or name)
        out.append(
            replace(
                st, **{k: v for k, v in (("max_epochs", max_epochs), ("lr", lr)) if v is not None}
            )
        )
    if not out:
        raise ValueError("--stages is empty")
    names = [s.name for s in out]
    if len(set(names)) != len(names):
        raise ValueError(f"--stages repeats a stage name: {text!r} (give each NAME=SPEC)")
    return tuple(out)


__all__ = [
    "DEMO",
    "PAPER",
    "PAPER_STAGES",
    "PRESETS",
    "SELECT_CHOICES",
    "THRESHOLD_METHODS",
    "Stage",
    "TrainConfig",
    "get_preset",
    "parse_stages",
]
