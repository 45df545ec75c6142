"""Run a schedule of stages on a fastai `Learner`: freeze, discriminative LRs, early stop.

Each stage freezes the network as `Freezing` says (the head and the last n-1 blocks train, at
learning rates spread geometrically from lr/lr_ratio to lr), trains up to `max_epochs`, stops
when validation loss has not improved for `patience` epochs, and restores the weights of its
best epoch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastai.learner import Learner
from torch import nn

from fastcxr.config import Stage, TrainConfig
from fastcxr.errors import UsageError
from fastcxr.models import block_groups, count_params, resolve_unfreeze
from fastcxr.train.callbacks import EpochEnd, Log, StageCallbacks
from fastcxr.train.checkpoint import load_optimizer
from fastcxr.train.freezing import Freezing, apply_stage
from fastcxr.train.lr_find import LR_FIND, find_lr


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
    lr_find: dict | None = None  # `--lr find`: the finder's suggestions and the rate used

    @property
    def lr(self) -> float:
        """The head's learning rate the stage trained with."""
        return self.lr_find["used"] if self.lr_find else self.stage.lr

    def to_dict(self) -> dict:
        """Its fields but the stage (a checkpoint stores the schedule apart)."""
        return {k: v for k, v in self.__dict__.items() if k != "stage"}


@dataclass
class StageResume:
    """Where an interrupted stage stopped: its callbacks' states and the optimizer's."""

    callbacks: dict[str, dict]
    opt: dict | None


def run_stage(
    learn: Learner,
    stage: Stage,
    cfg: TrainConfig,
    history: list[dict],
    log: Log | None = None,
    resume: StageResume | None = None,
    checkpoint: Callable[[dict[str, dict]], None] | None = None,
) -> StageResult:
    """Fit one stage, appending its epochs to `history`. `resume` continues it after its
    last finished epoch; `checkpoint` receives the callbacks' states after every epoch."""
    freezing = Freezing.of(cfg)
    unfrozen = freezing.unfreeze(learn, stage)
    trainable = count_params(learn.model)
    cbs = StageCallbacks.make(stage.name, cfg.patience, history, log)
    found = _found_lr(learn, stage, freezing, len(unfrozen), resume, log)
    lr = stage.lr if found is None else found["used"]
    lrs = freezing.lrs(learn, len(unfrozen), lr)
    if resume is not None:
        cbs.load_state_dict(resume.callbacks)
        load_optimizer(learn, resume.opt, lrs)
    start = len(history) - cbs.history.epochs_done
    remaining = 0 if cbs.early.stopping else stage.max_epochs - cbs.history.epochs_done
    extra = freezing.callbacks()
    if checkpoint is not None:  # the finder's result too: a resumed stage keeps its rate
        extra.append(EpochEnd(lambda: checkpoint({**cbs.state_dict(), LR_FOUND: found})))
    if remaining > 0:
        learn.fit(remaining, lr=lrs, wd=cfg.weight_decay, cbs=cbs.callbacks() + extra)
    else:  # the stage had finished: its best epoch's weights are the stage's model
        cbs.restore.restore(learn.model)
    rows = history[start:]
    best = cbs.restore.best_epoch
    return StageResult(
        stage=stage, unfrozen=unfrozen, trainable_params=trainable, epochs=len(rows),
        best_epoch=None if best is None else best + 1,
        valid_loss=float(cbs.restore.best) if best is not None else float("nan"),
        train_seconds=sum(r["train_seconds"] for r in rows),
        seconds=sum(r["seconds"] for r in rows),
        compile_seconds=sum(r.get("compile_seconds", 0.0) for r in rows), lr_find=found,
    )  # fmt: skip


LR_FOUND = "lr_find"  # the key of the finder's result among a stage's checkpointed states


def _found_lr(learn, stage: Stage, freezing: Freezing, n_unfrozen: int,
              resume: StageResume | None, log: Log | None) -> dict | None:  # fmt: skip
    """With `--lr find`, the finder's result at the stage's start (run now, or the one a
    resumed stage checkpointed); None for a fixed rate."""
    if stage.lr != LR_FIND:
        return None
    if resume is not None and resume.callbacks.get(LR_FOUND):
        return resume.callbacks[LR_FOUND]
    found = find_lr(learn, n_unfrozen, freezing)
    if log:
        log({"event": "lr_find", "stage": stage.name, "valley": found["valley"],
             "minimum": found["minimum"], "lr": found["used"]})  # fmt: skip
    return found


def check_stages(model: nn.Module, stages: tuple[Stage, ...], arch: str = "this network") -> None:
    """Refuse a schedule in which a stage unfreezes the same groups as the stage before it.

    Such a stage adds nothing to unfreeze: in Experiment I its row would repeat the one
    before under another name (on `resnet10`, with one block per stage, "conv5_block3" and
    "conv5" are both `conv5_block1`), and in a schedule it only trains the same parameters
    on. The message names both stages, the groups and the backbone parameters they hold
    (the head's depend on the formulation).
    """
    groups = block_groups(model)
    names = [n for n, _ in groups]
    ns = [resolve_unfreeze(st.unfreeze, names) for st in stages]
    for (a, na), (b, nb) in zip(zip(stages, ns), zip(stages[1:], ns[1:])):
        if na != nb:
            continue
        body = groups[-na:-1]
        n = sum(p.numel() for _, mods in body for m in mods for p in m.parameters())
        live = [g for g, _ in body]
        shown = ", ".join(live) if len(live) <= 3 else f"{len(live)} groups {live[0]} … {live[-1]}"
        what = f"{shown} and the head: {n:,} backbone parameters" if live else "the head only"
        # two specs, one set of groups: the network has fewer blocks than the specs name
        other = ", or choose an architecture with more blocks per stage"
        raise UsageError(
            f"stages {a.name} ({a.unfreeze}) and {b.name} ({b.unfreeze}) unfreeze the same "
            f"groups of {arch} ({what}), so {b.name} would add nothing; drop one of them "
            f"(--stages){other if a.unfreeze != b.unfreeze else ''}"
        )


def plan(learn: Learner, stages: tuple[Stage, ...], arch: str = "this network") -> list[dict]:
    """Per stage: what it unfreezes and how many parameters train (no training); a stage
    that unfreezes the same groups as the one before is refused (`check_stages`)."""
    check_stages(learn.model, stages, arch)
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
