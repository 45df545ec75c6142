"""Run a schedule of stages on a fastai `Learner`: freeze_to, discriminative LRs, early stop.

Each stage unfreezes the head and the last n-1 blocks (`learn.freeze_to(-n)`), trains up to
`max_epochs` with Adam at per-group learning rates spread geometrically from lr/lr_ratio
(earliest unfrozen block) to lr (head), stops when validation loss has not improved for
`patience` epochs, and restores the weights of its best epoch.

Freezing styles:
* ``keras`` (the study's): frozen blocks are fully frozen — their BatchNorm layers too, kept in
  eval mode so running statistics do not drift — and no gradient flows through them.
* ``fastai``: fastai's default `train_bn=True`; BatchNorm stays trainable everywhere, so the
  backward pass still runs through the whole backbone (~3x the cost of a frozen stage).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import EarlyStoppingCallback, TrackerCallback
from fastai.learner import Learner, Recorder
from fastcore.foundation import L
from torch import nn

from fastcxr.config import Stage, TrainConfig
from fastcxr.distributed import unwrap
from fastcxr.models import count_params, group_names, resolve_unfreeze
from fastcxr.stopping import Interrupted as Interrupted  # re-exported: training stops with it

FREEZE_STYLES = ("keras", "fastai")


class FrozenBNEval(Callback):
    """Keras-style freezing: BatchNorm layers whose parameters are frozen run in eval mode."""

    order = 1  # after TrainEvalCallback (order -10) has put the model in train mode

    def before_train(self):
        frozen_bn_eval(self.learn.model)


def frozen_bn_eval(model: nn.Module) -> None:
    """Put every BatchNorm layer whose parameters are frozen in eval mode."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.weight is not None:
            if not m.weight.requires_grad:
                m.eval()


class RestoreBest(TrackerCallback):
    """Keep the best epoch's weights in memory; load them when the stage ends.

    `offset` and `initial` (best, best_epoch, best_state) continue a resumed stage.
    """

    def __init__(self, monitor="valid_loss", offset: int = 0, initial: tuple | None = None):
        super().__init__(monitor=monitor)
        self.offset, self.initial = offset, initial
        self.best, self.best_epoch, self.best_state = initial or (float("inf"), None, None)

    def before_fit(self):
        super().before_fit()
        self.best_state, self.best_epoch = None, None
        if self.initial is not None:
            self.best, self.best_epoch, self.best_state = self.initial

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.best_epoch = self.offset + self.epoch
            self.best_state = copy.deepcopy(
                {k: v.detach().cpu() for k, v in unwrap(self.learn.model).state_dict().items()}
            )

    def after_fit(self):
        if self.best_state is not None:
            unwrap(self.learn.model).load_state_dict(self.best_state)


class ResumableEarlyStopping(EarlyStoppingCallback):
    """fastai's early stopping that can start from a saved (best, wait) and calls
    `on_epoch_end` after each epoch's decision (to write a checkpoint) before stopping."""

    def __init__(
        self,
        patience: int,
        initial: tuple | None = None,
        on_epoch_end: Callable[[bool], None] | None = None,
    ):
        super().__init__(monitor="valid_loss", patience=patience)
        self.initial, self.on_epoch_end = initial, on_epoch_end

    def before_fit(self):
        super().before_fit()
        if self.initial is not None:
            self.best, self.wait = self.initial

    def after_epoch(self):
        stop = False
        try:
            super().after_epoch()
        except CancelFitException:
            stop = True
        if self.on_epoch_end:
            self.on_epoch_end(stop)
        if stop:
            raise CancelFitException


class ContinueSmoothLoss(Callback):
    """A resumed stage's training loss continues fastai's smoothed average (Recorder resets
    it when a fit starts) from where the interrupted fit left it, so the history is the
    uninterrupted run's."""

    order = Recorder.order + 1

    def __init__(self, count: int, val: float):
        self.count, self.val = count, val

    def before_fit(self):
        sl = self.learn.recorder.smooth_loss
        sl.count, sl.val = self.count, torch.tensor(self.val)


def smooth_loss_state(learn: Learner) -> tuple[int, float]:
    sl = learn.recorder.smooth_loss
    return int(sl.count), float(sl.val)


class History(Callback):
    """Per-epoch record: stage, losses and seconds (train and whole epoch)."""

    order = Recorder.order + 1

    def __init__(
        self, stage: str, rows: list[dict], log: Callable[[dict], None] | None, offset: int = 0
    ):
        self.stage, self.rows, self.log, self.offset = stage, rows, log, offset

    def _compiling(self) -> float:
        acc = getattr(self.learn, "accelerated", None)  # fastcxr.fastpath.Accelerated
        return acc.compile_seconds if acc is not None else 0.0

    def before_epoch(self):
        self.t0, self.c0 = time.perf_counter(), self._compiling()

    def before_train(self):
        self.t_train, self.c_train = time.perf_counter(), self._compiling()

    def after_train(self):
        compiling = self._compiling() - self.c_train
        self.train_seconds = time.perf_counter() - self.t_train - compiling

    def after_epoch(self):
        vals = self.learn.recorder.values[-1] if self.learn.recorder.values else [np.nan] * 2
        row = {
            "stage": self.stage,
            "epoch": self.offset + self.epoch + 1,
            "train_loss": float(vals[0]),
            "valid_loss": float(vals[1]),
            "train_seconds": self.train_seconds,
            "seconds": time.perf_counter() - self.t0 - (self._compiling() - self.c0),
            "compile_seconds": self._compiling() - self.c0,
        }
        self.rows.append(row)
        if self.log:
            self.log(row)


@dataclass
class StageResult:
    stage: Stage
    unfrozen: list[str]
    trainable_params: int
    epochs: int
    best_epoch: int | None
    valid_loss: float
    train_seconds: float
    seconds: float
    compile_seconds: float = 0.0


def apply_stage(learn: Learner, stage: Stage) -> list[str]:
    """Freeze everything but the stage's groups; returns the names of the unfrozen groups."""
    names = group_names(learn.model)
    n = resolve_unfreeze(stage.unfreeze, names)
    if n >= len(names):
        learn.unfreeze()
    else:
        learn.freeze_to(-n)
    return names[-n:]


def stage_lrs(learn: Learner, n_unfrozen: int, lr: float, ratio: float) -> list[float]:
    """Per-group LRs: geometric from lr/ratio (earliest unfrozen group) to lr (head)."""
    n_groups = len(learn.opt.param_lists)
    live = np.geomspace(lr / ratio, lr, n_unfrozen) if n_unfrozen > 1 else np.array([lr])
    return [float(live[0])] * (n_groups - n_unfrozen) + live.tolist()


def run_stage(
    learn: Learner,
    stage: Stage,
    cfg: TrainConfig,
    history: list[dict],
    log: Callable[[dict], None] | None = None,
    resume: dict | None = None,
    checkpoint: Callable[[dict], None] | None = None,
) -> StageResult:
    """Fit one stage. `resume` (from a checkpoint) continues it after its last finished epoch;
    `checkpoint` receives the stage's state after every epoch."""
    unfrozen = apply_stage(learn, stage)
    trainable = count_params(learn.model)
    done = resume["epochs_done"] if resume else 0
    restore = RestoreBest(offset=done, initial=resume["restore"] if resume else None)
    hist = History(stage.name, history, log, offset=done)
    start = len(history) - done

    def on_epoch_end(stopping: bool) -> None:
        if checkpoint:
            checkpoint(
                {
                    "epochs_done": done + hist.epoch + 1,
                    "stopping": stopping,
                    "restore": (restore.best, restore.best_epoch, restore.best_state),
                    "early_stop": (early.best, early.wait),
                    "smooth_loss": smooth_loss_state(learn),
                }
            )

    early = ResumableEarlyStopping(
        cfg.patience, resume["early_stop"] if resume else None, on_epoch_end
    )
    cbs = [restore, early, hist]
    if resume and resume.get("smooth_loss"):
        cbs.append(ContinueSmoothLoss(*resume["smooth_loss"]))
    if cfg.freeze_style == "keras":
        cbs.append(FrozenBNEval())
    lrs = stage_lrs(learn, len(unfrozen), stage.lr, cfg.lr_ratio)
    remaining = 0 if resume and resume.get("stopping") else stage.max_epochs - done
    if resume and resume.get("opt"):
        learn.opt.set_hypers(lr=lrs)
        if "torch" in resume["opt"]:  # a torch optimizer (the fast path's fused AdamW)
            learn.opt.opt.load_state_dict(resume["opt"]["torch"])
        else:
            learn.opt.load_state_dict(
                {"state": resume["opt"]["state"], "hypers": L(resume["opt"]["hypers"])}
            )
    if remaining > 0:
        learn.fit(remaining, lr=lrs, wd=cfg.weight_decay, cbs=cbs)
    elif restore.initial and restore.initial[2] is not None:
        learn.model.load_state_dict(restore.initial[2])
    rows = history[start:]
    return StageResult(
        stage=stage,
        unfrozen=unfrozen,
        trainable_params=trainable,
        epochs=len(rows),
        best_epoch=None if restore.best_epoch is None else restore.best_epoch + 1,
        valid_loss=float(restore.best) if restore.best_epoch is not None else float("nan"),
        train_seconds=sum(r["train_seconds"] for r in rows),
        seconds=sum(r["seconds"] for r in rows),
        compile_seconds=sum(r.get("compile_seconds", 0.0) for r in rows),
    )


def plan(learn: Learner, stages: tuple[Stage, ...]) -> list[dict]:
    """Per stage: what it unfreezes and how many parameters train (no training)."""
    out = []
    for st in stages:
        unfrozen = apply_stage(learn, st)
        out.append(
            {
                "name": st.name,
                "unfreeze": st.unfreeze,
                "unfrozen": unfrozen,
                "trainable_params": count_params(learn.model),
                "max_epochs": st.max_epochs,
                "lr": st.lr,
            }
        )
    return out
