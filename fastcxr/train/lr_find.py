"""Learning-rate finder per stage: fastai's `lr_find` under the stage's freezing and its
discriminative learning rates (`find_lr`), and the `fastcxr lr-find` command's job (`lr_find`).

fastai's finder (Smith 2015, "Cyclical learning rates for training neural networks") trains
`num_it` mini-batches while the learning rate grows exponentially from `start_lr` to `end_lr`,
records the smoothed training loss, and restores the weights and optimizer state it started
from. Here the rate it sweeps is the head's; every other unfrozen group follows at the stage's
discriminative ratio (`Freezing.lrs`), so the suggestion is the stage's `--lr` as
training applies it. Suggestions are fastai's `valley` (its default: the middle of the
longest descending stretch) and `minimum` (a tenth of the rate at the lowest loss).
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path

from fastai.callback.core import Callback
from fastai.learner import Learner

from fastcxr.config import LR_FIND
from fastcxr.errors import FastcxrError, UsageError
from fastcxr.runtime.progress import progress_end, progress_event
from fastcxr.train.callbacks import Log
from fastcxr.train.freezing import Freezing

SUGGESTIONS = ("valley", "minimum")
USED = "valley"  # what `--lr find` trains with: fastai's default suggestion
START_LR, END_LR, NUM_IT = 1e-7, 10.0, 100


class LRFindError(FastcxrError, RuntimeError):
    """The finder could not suggest a rate (e.g. the loss was NaN from the first batches)."""


class _SweepProgress(Callback):
    """The sweep's iterations as progress events for `log` (bar `lr_find`)."""

    order = 62
    run_valid = False

    def __init__(self, log, label: str, num_it: int):
        self.log, self.label, self.num_it = log, label, num_it

    def after_batch(self) -> None:
        done = min(self.train_iter, self.num_it)
        self.log(progress_event("lr_find", self.label, done, self.num_it, "it"))

    def after_fit(self) -> None:
        self.log(progress_end("lr_find"))


class _Discriminative(Callback):
    """Spread the rate LRFinder set on every group (order 60) over the groups at `mult`."""

    order = 61
    run_valid = False

    def __init__(self, mult: Sequence[float]):
        self.mult = list(mult)

    def before_batch(self) -> None:
        head = self.opt.hypers[-1]["lr"]
        self.opt.set_hyper("lr", [head * m for m in self.mult])


def _finite(v) -> float | None:
    v = float(v)
    return v if math.isfinite(v) and v > 0 else None


def find_lr(
    learn: Learner,
    n_unfrozen: int,
    freezing: Freezing,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    num_it: int = NUM_IT,
    progress: Log | None = None,
    label: str = "lr_find",
) -> dict:
    """fastai's `lr_find` on `learn` as its stage is frozen (call after `freezing.unfreeze`),
    the groups at the stage's discriminative rates (`freezing.lrs`). The weights and optimizer
    state are restored. `progress` receives the sweep's iterations as progress events, on a
    bar named `label`.

    Returns `valley`, `minimum`, `used` (the valley), the swept head rates `lrs` and the
    smoothed losses `losses`, and the settings."""
    from fastcxr.runtime.distributed import world_size

    if world_size() > 1:
        raise UsageError(
            "--lr find runs on one process: each would sweep its own shard and could suggest "
            "another rate; find the rates with `fastcxr lr-find` and pass them with --lr"
        )
    check_sweep(start_lr, end_lr, num_it)
    t0 = time.perf_counter()
    mult = freezing.lrs(learn, n_unfrozen, 1.0)
    found = _sweep(learn, mult, freezing, start_lr, end_lr, num_it, progress, label)
    lrs = [float(x) for x in learn.recorder.lrs]
    losses = [float(x) for x in learn.recorder.losses]
    out = {s: _finite(getattr(found, s)) for s in SUGGESTIONS}
    if out[USED] is None:
        raise LRFindError(
            f"the learning-rate finder's {USED} suggestion is not a positive number "
            f"({getattr(found, USED)!r}); pass --lr explicitly"
        )
    return {
        **out, "used": out[USED], "suggestion": USED, "lrs": lrs, "losses": losses,
        "start_lr": start_lr, "end_lr": end_lr, "num_it": num_it, "iterations": len(lrs),
        "lr_ratio": freezing.lr_ratio, "group_multipliers": mult,
        "seconds": time.perf_counter() - t0,  # the sweep's cost, not counted as training
    }  # fmt: skip


def _sweep(
    learn: Learner,
    mult,
    freezing: Freezing,
    start_lr: float,
    end_lr: float,
    num_it: int,
    progress,
    label: str,
):
    """fastai's `lr_find` with every group at `mult` times the head's rate, in a scratch
    folder (fastai saves the weights it restores there); its failure is an `LRFindError`."""
    from fastai.callback.schedule import minimum, valley

    old_path, old_dir = learn.path, learn.model_dir
    with ExitStack() as stack:
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="fastcxr-lr-find-"))
        learn.path, learn.model_dir = Path(tmp), "."  # fastai saves the weights it restores
        cbs = [_Discriminative(mult), *freezing.callbacks()]
        cbs += [_SweepProgress(progress, label, num_it)] if progress else []
        stack.enter_context(learn.added_cbs(cbs))
        try:
            return learn.lr_find(start_lr=start_lr, end_lr=end_lr, num_it=num_it,
                                    show_plot=False, suggest_funcs=(valley, minimum))  # fmt: skip
        except (IndexError, RuntimeError, ValueError) as e:
            if isinstance(e, FastcxrError):
                raise
            raise LRFindError(
                f"the learning-rate finder could not suggest a rate ({type(e).__name__}: {e}); "
                "the loss may diverge at once: try a lower start, more iterations or a "
                "larger batch"
            ) from None
        finally:
            learn.path, learn.model_dir = old_path, old_dir


def check_sweep(start_lr: float, end_lr: float, num_it: int) -> None:
    """The sweep's settings, checked before any data is read."""
    if not (0 < start_lr < end_lr) or not math.isfinite(end_lr) or num_it < 6:
        raise UsageError(
            f"the finder needs 0 < start ({start_lr:g}) < end ({end_lr:g}) and at least 6 "
            f"iterations, not {num_it}"
        )


def summary(found: dict | None) -> dict | None:
    """A stage's finder result without its curve (for summaries and the run config)."""
    if found is None:
        return None
    return {k: v for k, v in found.items() if k not in ("lrs", "losses")}


# -- the `fastcxr lr-find` command -------------------------------------------------------------
def lr_find(data, form, cfg, stages, start_lr=START_LR, end_lr=END_LR,
            num_it=NUM_IT, log=None) -> dict:  # fmt: skip
    """The finder at every stage of `stages` for every network of formulation `form`.

    Each stage's finder starts from the network's starting weights (ImageNet, --weights or
    random): no stage is trained here. A training run's later stages start from the previous
    stage's trained weights; `--lr find` on `train` runs the finder there."""
    from fastai.torch_basics import default_device

    from fastcxr.data import apply_policy, network_data
    from fastcxr.runtime.fastpath import resolve_speed
    from fastcxr.train.learner import make_learner, seed_everything

    df = apply_policy(data.df, cfg, cfg.findings)
    speed = resolve_speed(cfg, default_device())
    prep = data.preprocessing(cfg.size)
    freezing = Freezing.of(cfg)
    networks, nets = {}, form.networks(cfg.findings)
    swept, sweeps = 0, len(nets) * len(stages)
    for net in nets:
        seed_everything(cfg.seed, speed)
        nd = network_data(df, data.root, form, net, cfg, speed=speed, preprocessing=prep)
        try:  # a network's loader workers stop with its sweeps, as in training
            learn = make_learner(nd, form, net, cfg)
            start = {k: v.detach().clone() for k, v in learn.model.state_dict().items()}
            per_stage = []
            for st in stages:
                learn.model.load_state_dict(start)
                unfrozen = freezing.unfreeze(learn, st)
                if log:
                    log({"event": "lr_find", "network": net.name, "stage": st.name})
                    log(progress_event("sweeps", "stages swept", swept, sweeps, "stage"))
                found = find_lr(learn, len(unfrozen), freezing, start_lr, end_lr, num_it, log,
                                f"{net.name} · stage {st.name}")  # fmt: skip
                swept += 1
                per_stage.append({"stage": st.name, "unfreeze": st.unfreeze,
                                  "unfrozen": unfrozen, "configured_lr": st.lr,
                                  **found})  # fmt: skip
        finally:
            nd.close()
        networks[net.name] = per_stage
    if log:
        log(progress_end("sweeps"))
    return {
        "format": "fastcxr-lr-find-1", "formulation": form.name, "arch": cfg.arch,
        "size": cfg.size, "batch_size": cfg.batch_size, "freeze_style": cfg.freeze_style,
        "lr_ratio": cfg.lr_ratio, "data": data.describe(),
        "starting_weights": "the network's starting weights for every stage (no stage is "
                            "trained by lr-find)",
        "suggestion_used_by_lr_find": USED, "networks": networks,
    }  # fmt: skip


__all__ = ["LR_FIND", "LRFindError", "find_lr", "lr_find", "summary"]
