"""Each stage callback's state survives a round trip (state_dict → load_state_dict) and a
callback loaded with a state continues from it, as an uninterrupted stage would."""

import math

import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from torch import nn

from fastcxr.train.callbacks import EarlyStop, History, RestoreBest, SmoothLoss, StageCallbacks
from fastcxr.train.learner import silence


def _learner(seed: int = 0, lr_scale: float = 1.0) -> Learner:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    items = [(x[i], y[i]) for i in range(32)]
    dls = DataLoaders(DataLoader(items[:24], bs=8), DataLoader(items[24:], bs=8), device="cpu")
    torch.manual_seed(seed)
    return silence(Learner(dls, nn.Linear(3, 1), loss_func=MSELossFlat()))


def test_restore_best_round_trip_and_continue():
    learn = _learner()
    a = RestoreBest()
    learn.fit(2, lr=0.05, cbs=[a])
    s = a.state_dict()
    assert s["epochs"] == 2 and s["best_epoch"] in (0, 1) and s["best_state"] is not None
    b = RestoreBest()
    b.load_state_dict(s)
    assert b.state_dict()["best"] == s["best"] and b.state_dict()["epochs"] == 2
    # Continued with a learning rate that can only make the loss worse: the loaded best
    # epoch stays the best and its weights are restored at the end of the fit.
    learn.fit(1, lr=1e3, cbs=[b])
    assert b.epochs == 3 and b.best_epoch == s["best_epoch"]
    restored = {k: v for k, v in learn.model.state_dict().items()}
    for k, v in s["best_state"].items():
        assert torch.equal(restored[k], v)


def test_restore_best_fresh_fit_forgets_nothing_it_was_not_given():
    learn = _learner()
    cb = RestoreBest()
    learn.fit(1, lr=0.05, cbs=[cb])
    assert cb.epochs == 1 and cb.best_epoch == 0 and math.isfinite(cb.best)


def test_early_stop_continues_its_wait():
    learn = _learner()
    patience = 3
    cb = EarlyStop(patience)
    cb.load_state_dict({"best": -1.0, "wait": patience - 1, "stopping": False})  # unbeatable
    assert cb.state_dict() == {"best": -1.0, "wait": patience - 1, "stopping": False}
    hist_rows: list[dict] = []
    learn.fit(5, lr=0.01, cbs=[cb, History("s", hist_rows)])
    # one more epoch without improvement reaches the patience; the fit ends before the next
    assert len(hist_rows) == 1
    assert cb.state_dict() == {"best": -1.0, "wait": patience, "stopping": True}


def test_early_stop_fresh_counts_from_zero():
    learn = _learner()
    cb = EarlyStop(2)
    rows: list[dict] = []
    learn.fit(3, lr=0.05, cbs=[cb, History("s", rows)])
    losses = [r["valid_loss"] for r in rows]
    best, wait = math.inf, 0  # computed here, independently of the callback
    for v in losses:
        wait = 0 if v < best else wait + 1
        best = min(best, v)
    assert cb.state_dict() == {"best": best, "wait": wait, "stopping": wait >= 2}


def test_history_numbers_epochs_after_a_resume():
    learn = _learner()
    rows = [{"stage": "s", "epoch": 1}, {"stage": "s", "epoch": 2}]
    h = History("s", rows)
    h.load_state_dict({"epochs_done": 2})
    learn.fit(2, lr=0.05, cbs=[h])
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert h.state_dict() == {"epochs_done": 4}


def test_smooth_loss_round_trip_continues_the_average():
    learn = _learner()
    a = SmoothLoss()
    learn.fit(1, lr=0.05, cbs=[a])
    s = a.state_dict()
    assert s["count"] == 3  # 24 training items, batches of 8
    b = SmoothLoss()
    b.load_state_dict(s)
    seen = {}

    def grab(learner):  # right after before_fit: the loaded value is in place
        sl = learner.recorder.smooth_loss
        seen.update(count=int(sl.count), val=float(sl.val))

    from fastai.callback.core import Callback

    class Grab(Callback):
        order = SmoothLoss.order + 1

        def before_fit(self):
            grab(self.learn)

    learn.fit(1, lr=0.05, cbs=[b, Grab()])
    assert seen == s


def test_stage_callbacks_state_round_trip():
    learn = _learner()
    rows: list[dict] = []
    cbs = StageCallbacks.make("s", 2, rows)
    saved = []
    from fastcxr.train.callbacks import EpochEnd

    learn.fit(2, lr=0.05, cbs=cbs.callbacks() + [EpochEnd(lambda: saved.append(cbs.state_dict()))])
    assert len(saved) == 2
    assert set(saved[-1]) == {"restore", "early_stop", "history", "smooth_loss"}
    other = StageCallbacks.make("s", 2, list(rows))
    other.load_state_dict(saved[-1])
    got = other.state_dict()
    assert got["history"] == saved[-1]["history"] and got["early_stop"] == saved[-1]["early_stop"]
    assert got["restore"]["best_epoch"] == saved[-1]["restore"]["best_epoch"]
