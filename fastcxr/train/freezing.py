"""The freezing policy: which groups of a network train in a stage, at which learning rates,
and what a frozen block does while the rest trains. One object, `Freezing`, owns it; training
(`schedule`), the learning-rate finder, the bench and the ablation plan ask it, and nothing
else compares freezing-style strings.

Each stage unfreezes the head and the last n-1 blocks (`learn.freeze_to(-n)`) and trains the
unfrozen groups at learning rates spread geometrically from lr/lr_ratio (the earliest unfrozen
group) to lr (the head).

Styles:
* ``keras`` (the study's): frozen blocks are fully frozen — their BatchNorm layers too, kept in
  eval mode so running statistics do not drift — and no gradient flows through them.
* ``fastai``: fastai's default `train_bn=True`; BatchNorm stays trainable everywhere, so the
  backward pass still runs through the whole backbone (~3x the cost of a frozen stage).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from fastai.learner import Learner
from torch import nn

from fastcxr.config import Stage
from fastcxr.models import group_names, resolve_unfreeze
from fastcxr.train.callbacks import FrozenBNEval, frozen_bn_eval

if TYPE_CHECKING:
    from fastai.callback.core import Callback

    from fastcxr.config import TrainConfig

STYLES = ("keras", "fastai")


@dataclass(frozen=True)
class Freezing:
    """How a stage freezes the network (`style`) and spreads its learning rates (`lr_ratio`)."""

    style: str = "keras"
    lr_ratio: float = 10.0

    def __post_init__(self):
        if self.style not in STYLES:
            raise ValueError(f"freezing style {self.style!r}: one of {', '.join(STYLES)}")

    @classmethod
    def of(cls, cfg: TrainConfig) -> Freezing:
        return cls(cfg.freeze_style, cfg.lr_ratio)

    @property
    def train_bn(self) -> bool:
        """fastai's `train_bn` (a `Learner`'s argument): do frozen groups' BatchNorm layers
        train? Only in fastai's style."""
        return self.style == "fastai"

    @property
    def backward_through_frozen(self) -> bool:
        """Does the backward pass run through frozen blocks (their BatchNorm trains)?"""
        return self.train_bn

    def unfreeze(self, learn: Learner, stage: Stage) -> list[str]:
        """Freeze everything but the stage's groups; returns the unfrozen groups' names."""
        names = group_names(learn.model)
        n = resolve_unfreeze(stage.unfreeze, names)
        if n >= len(names):
            learn.unfreeze()
        else:
            learn.freeze_to(-n)
        return names[-n:]

    def lrs(self, learn: Learner, n_unfrozen: int, lr: float) -> list[float]:
        """Per-group LRs: geometric from lr/lr_ratio (earliest unfrozen group) to lr (head);
        frozen groups get the earliest rate (they have no trainable parameters but their
        BatchNorm's in fastai's style)."""
        n_groups = len(learn.opt.param_lists)
        ratio = self.lr_ratio
        live = np.geomspace(lr / ratio, lr, n_unfrozen) if n_unfrozen > 1 else np.array([lr])
        return [float(live[0])] * (n_groups - n_unfrozen) + live.tolist()

    def callbacks(self) -> list[Callback]:
        """What a fit of a stage adds: Keras-style, frozen BatchNorm layers in eval mode."""
        return [] if self.train_bn else [FrozenBNEval()]

    def settle(self, model: nn.Module) -> None:
        """For a training loop without fastai's callbacks, after `model.train()`: what
        `callbacks` does at the start of each fit."""
        if not self.train_bn:
            frozen_bn_eval(model)


def apply_stage(learn: Learner, stage: Stage) -> list[str]:
    """`Freezing.unfreeze` (the same for every style): the unfrozen groups' names."""
    return Freezing().unfreeze(learn, stage)


def stage_lrs(learn: Learner, n_unfrozen: int, lr: float, ratio: float) -> list[float]:
    """`Freezing.lrs` at `ratio`."""
    return Freezing(lr_ratio=ratio).lrs(learn, n_unfrozen, lr)


__all__ = ["STYLES", "Freezing", "apply_stage", "stage_lrs"]
