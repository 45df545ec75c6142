"""The callbacks of one stage, each the owner of its state.

Every callback here that a resumed stage must continue has `state_dict()` and
`load_state_dict(state)` (as Lightning's callbacks do): a checkpoint stores their states by
name (`StageCallbacks.state_dict`) and a resumed stage loads them back before its fit, so it
continues from the epoch it was interrupted after and produces the uninterrupted run's
history, weights and decisions.

* `RestoreBest`: keeps the best epoch's weights in memory and loads them when the stage ends.
* `EarlyStop`: counts epochs without a better validation loss; at `patience` it decides to
  stop, and the fit ends before the next epoch starts (so the decision is checkpointed first).
* `History`: one row per epoch (stage, losses, seconds).
* `SmoothLoss`: fastai's smoothed training loss, which `Recorder` resets at every fit.
* `EpochEnd`: after every epoch, hands the stage's state to a function (the checkpoint).
* `FrozenBNEval`: Keras-style freezing (no state).
* `EpochProgress`: the stage's epochs and each epoch's images as progress events for `log`
  (no state, changes nothing in training).

Progress events are described in `fastcxr.runtime.progress`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from fastai.callback.core import Callback, CancelFitException
from fastai.callback.tracker import TrackerCallback
from fastai.learner import Recorder
from fastai.torch_core import find_bs
from torch import nn

from fastcxr.errors import Diverged
from fastcxr.runtime.distributed import unwrap
from fastcxr.runtime.progress import progress_end, progress_event

Log = Callable[[dict], None]


class FrozenBNEval(Callback):
    """Keras-style freezing: BatchNorm layers whose parameters are frozen run in eval mode."""

    order = 1  # after TrainEvalCallback (order -10) has put the model in train mode

    def before_train(self):
        frozen_bn_eval(self.learn.model)


NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)  # timm's LayerNorm2d too


def frozen_bn_eval(model: nn.Module) -> None:
    """Put every normalisation layer (BatchNorm; LayerNorm and GroupNorm of a ConvNeXt or a
    vision transformer) whose parameters are frozen in eval mode."""
    for m in model.modules():
        if isinstance(m, NORMS) and getattr(m, "weight", None) is not None:
            if not m.weight.requires_grad:
                m.eval()


def cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the (unwrapped) model's weights on the CPU."""
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


class RestoreBest(TrackerCallback):
    """Keep the best epoch's weights in memory; load them when the stage ends.

    State: `best` (validation loss), `best_epoch` (0-based, counted over the whole stage),
    `best_state` (weights) and `epochs` (epochs of the stage seen so far).
    """

    def __init__(self, monitor: str = "valid_loss"):
        super().__init__(monitor=monitor)
        self.best, self.best_epoch, self.best_state, self.epochs = float("inf"), None, None, 0
        self._loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"best": float(self.best), "best_epoch": self.best_epoch,
                "best_state": self.best_state, "epochs": self.epochs}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state)
        self._apply(self._loaded)

    def _apply(self, s: dict) -> None:
        self.best, self.best_epoch = float(s["best"]), s["best_epoch"]
        self.best_state, self.epochs = s["best_state"], int(s["epochs"])

    def before_fit(self):
        super().before_fit()  # resets `best`
        self._apply(self._loaded or {"best": float("inf"), "best_epoch": None,
                                     "best_state": None, "epochs": 0})  # fmt: skip

    def after_epoch(self):
        super().after_epoch()
        if self.new_best:
            self.best_epoch, self.best_state = self.epochs, cpu_state(self.learn.model)
        self.epochs += 1

    def after_fit(self):
        super().after_fit()
        self.restore(self.learn.model)

    def restore(self, model: nn.Module) -> None:
        """Load the best epoch's weights into `model` (nothing when no epoch was seen)."""
        if self.best_state is not None:
            unwrap(model).load_state_dict(self.best_state)


class EarlyStop(TrackerCallback):
    """fastai's early stopping, resumable: after each epoch it updates `wait` and decides
    `stopping`; the fit is cancelled when the next epoch would start, so that `EpochEnd`
    checkpoints the decision first. State: `best`, `wait`, `stopping`."""

    order = TrackerCallback.order + 3  # as fastai's EarlyStoppingCallback

    def __init__(self, patience: int, monitor: str = "valid_loss"):
        super().__init__(monitor=monitor)
        self.patience, self.wait, self.stopping = patience, 0, False
        self._loaded: dict | None = None

    def state_dict(self) -> dict:
        return {"best": float(self.best), "wait": int(self.wait), "stopping": self.stopping}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state)
        self.best, self.wait, self.stopping = state["best"], state["wait"], state["stopping"]

    def before_fit(self):
        super().before_fit()
        s = self._loaded or {"best": self.best, "wait": 0, "stopping": False}
        self.best, self.wait, self.stopping = float(s["best"]), int(s["wait"]), s["stopping"]

    def after_epoch(self):
        super().after_epoch()
        self.wait = 0 if self.new_best else self.wait + 1
        self.stopping = self.wait >= self.patience

    def before_epoch(self):
        if self.stopping:
            raise CancelFitException


class SmoothLoss(Callback):
    """fastai's smoothed training loss (`Recorder.smooth_loss`), carried over a resume:
    `Recorder` resets it when a fit starts, so a resumed stage sets it back to where the
    interrupted fit left it. State: `count`, `val` (as of the last finished epoch)."""

    order = Recorder.order + 1

    def __init__(self):
        self.count, self.val, self._loaded = 0, 0.0, False

    def state_dict(self) -> dict:
        return {"count": self.count, "val": self.val}

    def load_state_dict(self, state: dict) -> None:
        self.count, self.val, self._loaded = int(state["count"]), float(state["val"]), True

    def before_fit(self):
        if self._loaded:
            sl = self.learn.recorder.smooth_loss
            sl.count, sl.val = self.count, torch.tensor(self.val)

    def after_epoch(self):
        sl = self.learn.recorder.smooth_loss
        self.count, self.val = int(sl.count), float(sl.val)


class History(Callback):
    """Per-epoch rows (stage, epoch, losses, seconds) appended to `rows`, passed to `log`.

    State: `epochs_done`, the stage's epochs already in `rows` (the rows themselves are the
    network's history and are saved with it)."""

    order = Recorder.order + 1

    def __init__(self, stage: str, rows: list[dict], log: Log | None = None):
        self.stage, self.rows, self.log, self.epochs_done = stage, rows, log, 0

    def state_dict(self) -> dict:
        return {"epochs_done": self.epochs_done}

    def load_state_dict(self, state: dict) -> None:
        self.epochs_done = int(state["epochs_done"])

    def _compiling(self) -> float:
        acc = getattr(self.learn, "accelerated", None)  # fastcxr.runtime.fastpath.Accelerated
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
        self.epochs_done += 1
        row = {
            "stage": self.stage,
            "epoch": self.epochs_done,
            "train_loss": float(vals[0]),
            "valid_loss": float(vals[1]),
            "train_seconds": self.train_seconds,
            "seconds": time.perf_counter() - self.t0 - (self._compiling() - self.c0),
            "compile_seconds": self._compiling() - self.c0,
        }
        self.rows.append(row)
        if self.log:
            self.log(row)
        bad = [k for k in ("train_loss", "valid_loss") if not np.isfinite(row[k])]
        if bad:  # before the best epoch is kept or a checkpoint written: they stay finite
            raise Diverged(
                f"training diverged at stage {self.stage}, epoch {self.epochs_done}: "
                + ", ".join(f"{k.replace('_', ' ')} is {row[k]}" for k in bad)
                + " — lower --lr (or use --lr find) and run again with --overwrite; "
                "the run is not recorded as complete"
            )


class EpochEnd(Callback):
    """After every epoch and every callback's decision on it: `fn()` (write a checkpoint;
    it may raise `Interrupted` to stop)."""

    order = EarlyStop.order + 10

    def __init__(self, fn: Callable[[], None]):
        self.fn = fn

    def after_epoch(self):
        self.fn()


class EpochProgress(Callback):
    """Progress events for `log`: bar `stage` counts the stage's epochs (those of a resumed
    stage's earlier fit included), bar `epoch` the images of the current epoch's training,
    then of its validation. No state: a resumed stage reads its epochs from `History`."""

    order = Recorder.order + 2

    def __init__(self, stage: str, log: Log, history: History):
        self.stage, self.log, self.history = stage, log, history

    def before_fit(self):
        self.done = self.history.epochs_done
        self.total = self.done + self.n_epoch
        self._stage()

    def _stage(self) -> None:
        self.log(progress_event("stage", f"stage {self.stage}", self.done, self.total, "epoch"))

    def before_train(self):
        self.images = 0

    def before_validate(self):
        self.images = 0

    def after_batch(self):
        bs = find_bs(self.learn.yb)
        self.images += bs
        phase = "train" if self.training else "valid"
        total = self.images + (self.n_iter - self.iter - 1) * bs
        label = f"{self.stage} · epoch {self.done + 1}/{self.total} · {phase}"
        self.log(progress_event("epoch", label, self.images, total, "img"))

    def after_epoch(self):
        self.done += 1
        self._stage()

    def after_fit(self):
        self.log(progress_end("epoch"))
        self.log(progress_end("stage"))


@dataclass
class StageCallbacks:
    """The stateful callbacks of one stage, saved and loaded together by name (and, with a
    log, its progress events, which have no state)."""

    restore: RestoreBest
    early: EarlyStop
    history: History
    smooth: SmoothLoss
    progress: EpochProgress | None = None

    @classmethod
    def make(cls, stage: str, patience: int, rows: list[dict], log: Log | None = None):
        history = History(stage, rows, log)
        progress = EpochProgress(stage, log, history) if log else None
        return cls(RestoreBest(), EarlyStop(patience), history, SmoothLoss(), progress)

    def state_dict(self) -> dict[str, dict]:
        return {name: cb.state_dict() for name, cb in self._named().items()}

    def load_state_dict(self, state: dict[str, dict]) -> None:
        for name, cb in self._named().items():
            cb.load_state_dict(state[name])

    def _named(self) -> dict:
        return {"restore": self.restore, "early_stop": self.early,
                "history": self.history, "smooth_loss": self.smooth}  # fmt: skip

    def callbacks(self) -> list[Callback]:
        return list(self._named().values()) + ([self.progress] if self.progress else [])
