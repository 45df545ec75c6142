"""`NetworkState`: one network's checkpoint, typed — what a killed run needs to continue as
if it had never stopped.

It is written (rank 0, atomically) after every epoch and every stage, and once more when the
network is finished; `train_formulation` removes the checkpoints once the run record is
complete. Besides the weights and the optimizer it holds the schedule position, the current
stage's callback states (`StageCallbacks.state_dict`), the finished stages' results and
probabilities, the history, and every RNG training draws from.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastcore.foundation import L

from fastcxr.runtime.distributed import unwrap
from fastcxr.runtime.runs import TORCH_LOAD_ERRORS, RunError, save_torch

FORMAT = "fastcxr-network-state-2"


@dataclass
class NetworkState:
    """One network's training state. `stage_index` is the stage to run next (or the one
    `callbacks` belong to, when the checkpoint was written inside a stage)."""

    stage_index: int
    model: dict[str, torch.Tensor]
    rng: dict
    opt: dict | None = None
    callbacks: dict[str, dict] | None = None  # the current stage's, mid-stage only
    results: list[dict] = field(default_factory=list)  # StageResult fields per finished stage
    history: list[dict] = field(default_factory=list)
    test_probs: dict[str, torch.Tensor] = field(default_factory=dict)  # per stage (n, k_net)
    valid_probs: dict[str, torch.Tensor] = field(default_factory=dict)
    complete: bool = False
    summary: dict | None = None

    def save(self, path: Path) -> None:
        save_torch(
            path, {"format": FORMAT, **{f.name: getattr(self, f.name) for f in fields(self)}}
        )

    @classmethod
    def load(cls, path: Path) -> NetworkState | None:
        """The state at `path`; None when there is none; a clear error when unreadable."""
        if not path.exists():
            return None

        def unreadable(why: str) -> RunError:
            return RunError(
                f"{path}: unreadable checkpoint ({why}); delete it to train this network afresh"
            )

        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except TORCH_LOAD_ERRORS as e:
            raise unreadable(f"{type(e).__name__}: {e}") from e
        if not isinstance(raw, dict):
            raise unreadable(f"a {type(raw).__name__}, not a dict")
        if raw.get("format") is None and "stage_probs" in raw:  # fastcxr before #13
            try:
                raw = _from_untyped(raw)
            except (KeyError, TypeError, ValueError) as e:
                raise unreadable(f"an older checkpoint, malformed: {type(e).__name__}: {e}") from e
        if raw.get("format") != FORMAT:
            raise unreadable(f"format {raw.get('format')!r}, expected {FORMAT}")
        missing = [f.name for f in fields(cls) if f.name not in raw]
        if missing:
            raise unreadable(f"no {', '.join(missing)}")
        return cls(**{f.name: raw[f.name] for f in fields(cls)})

    @property
    def stage_started(self) -> bool:
        return self.callbacks is not None


def _ran(probs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The stages that produced probabilities (the untyped layout kept NaN for the rest)."""
    return {k: v for k, v in probs.items() if not bool(torch.isnan(v).all())}


def _from_untyped(raw: dict) -> dict:
    """An interrupted run's checkpoint from fastcxr before `NetworkState` (a plain dict with
    positional tuples), in this layout, so that such a run still resumes."""
    stage, callbacks = raw.get("stage"), None
    if stage:
        best, best_epoch, best_state = stage["restore"]
        es_best, wait = stage["early_stop"]
        count, val = stage.get("smooth_loss", (0, 0.0))
        callbacks = {
            "restore": {"best": float(best), "best_epoch": best_epoch, "best_state": best_state,
                        "epochs": int(stage["epochs_done"])},
            "early_stop": {"best": float(es_best), "wait": int(wait),
                           "stopping": bool(stage["stopping"])},
            "history": {"epochs_done": int(stage["epochs_done"])},
            "smooth_loss": {"count": int(count), "val": float(val)},
        }  # fmt: skip
    history = [{k: v for k, v in r.items() if k != "network"} for r in raw["history"]]
    return {
        "format": FORMAT, "stage_index": raw["stage_index"], "model": raw["model"],
        "rng": raw["rng"], "opt": raw["opt"], "callbacks": callbacks, "results": raw["results"],
        "history": history, "test_probs": _ran(raw["stage_probs"]),
        "valid_probs": _ran(raw["valid_probs"]), "complete": bool(raw["complete"]),
        "summary": raw.get("summary"),
    }  # fmt: skip


def optimizer_state(learn: Learner) -> dict | None:
    """fastai's optimizer state (or the wrapped torch optimizer's, on the fast path)."""
    if isinstance(learn.opt, OptimWrapper):  # the fast path's torch AdamW
        return {"torch": learn.opt.opt.state_dict()}
    if learn.opt is None:
        return None
    sd = learn.opt.state_dict()
    return {"state": list(sd["state"]), "hypers": [dict(h) for h in sd["hypers"]]}


def load_optimizer(learn: Learner, opt: dict | None, lrs: list[float]) -> None:
    """Continue the optimizer of an interrupted stage (its LRs set first, as `fit` would)."""
    if not opt:
        return
    learn.opt.set_hypers(lr=lrs)
    if "torch" in opt:
        learn.opt.opt.load_state_dict(opt["torch"])
    else:
        learn.opt.load_state_dict({"state": opt["state"], "hypers": L(opt["hypers"])})


def model_state(learn: Learner) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in unwrap(learn.model).state_dict().items()}


def get_rng(learn: Learner | None = None) -> dict:
    """Every RNG training draws from: torch (CPU and CUDA), Python, NumPy, and the training
    loader's own `random.Random` (fastai's DataLoader shuffles with it, not the global one)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss),
                  float(cached)],
    }  # fmt: skip
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    rng = loader_rng(learn)
    if rng is not None:
        out["train_loader"] = rng.getstate()
    return out


def set_rng(rng: dict, learn: Learner | None = None) -> None:
    """Put back every RNG `get_rng` saved."""
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    own = loader_rng(learn)
    if own is not None and "train_loader" in rng:
        v, state, gauss = rng["train_loader"]
        own.setstate((v, tuple(state), gauss))
    v, state, gauss = rng["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


def loader_rng(learn: Learner | None) -> random.Random | None:
    """The training loader's shuffling RNG (under DDP, the wrapped loader's)."""
    dl = learn.dls.train if learn is not None else None
    for _ in range(3):
        if dl is None:
            return None
        rng = dl.__dict__.get("rng")
        if isinstance(rng, random.Random):
            return rng
        dl = dl.__dict__.get("dl")
    return None
