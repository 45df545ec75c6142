"""The fast training path: what "rapid training" needs between the image cache and the GPU.

* **Loader** (`fastcxr.data.cache_loader.CacheDL`): uint8 batches from the cache, moved to
  the device, where they are converted to float, augmented and normalised in one pass.
* **Precision and layout** (`Accelerated`, a callback): bf16 autocast and channels_last on a
  GPU; the model sees plain tensors (fastai's `TensorBase` subclasses add Python overhead to
  every op of a 500-layer forward and backward).
* **Optimizer**: torch's fused AdamW (fastai's Adam steps each parameter in Python), with the
  hyper-parameters of fastai's Adam (betas 0.9/0.99, eps 1e-5, decoupled weight decay), so the
  schedule's discriminative learning rates and `freeze_to` work unchanged.
* **torch.compile** (`--compile`): the model is compiled in place (its state-dict keys do not
  change); batches during which new graphs were compiled are timed as compile time, apart
  from training time.

`resolve_speed` turns a `TrainConfig` ("auto" everywhere) into the settings for a device; the
run records them. Validation and test inference go through the same loader and callback: no
gradient, bf16, twice the training batch size.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from functools import partial

import torch
from fastai.callback.core import Callback
from fastai.learner import AvgSmoothLoss
from fastai.optimizer import OptimWrapper, set_item_pg

from fastcxr.errors import UsageError
from fastcxr.runtime import adapters

# Training augmentation, shared by the fast path and fastai's `aug_transforms` (no flips: the
# heart's side is anatomy, not noise; no warp).
AUGMENT = {"max_rotate": 5.0, "max_zoom": 1.1, "max_lighting": 0.2}


@dataclass(frozen=True)
class Speed:
    """Resolved speed settings for one device (recorded with every run)."""

    loader: str  # "fast" | "datablock"
    precision: str  # "bf16" | "fp32"
    channels_last: bool
    compile: bool
    compile_backend: str
    fused_optimizer: bool
    cudnn_benchmark: bool
    workers: int
    device: str

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type


def default_workers(fast: bool) -> int:
    """Loader processes: every core but one on the fast path (decoding must keep up with the
    GPU); at most 8 for the plain DataBlock path. Under torchrun or `accelerate launch` the
    node's training processes share its cores (`LOCAL_WORLD_SIZE`), each keeping one."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    share = max(cores // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1) - 1, 0)
    return share if fast else min(8, share)


def resolve_speed(cfg, device: torch.device | str | None = None) -> Speed:
    """`auto` → the fast path with bf16 and channels_last on CUDA; the plain fastai DataBlock
    path in fp32 on a CPU (where bf16 autocast is rarely faster)."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = device.type == "cuda"
    loader = cfg.loader if cfg.loader != "auto" else ("fast" if cuda else "datablock")
    if loader not in ("fast", "datablock"):
        raise UsageError(f"unknown loader {cfg.loader!r}; choose auto, fast or datablock")
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if cuda else "fp32")
    if precision not in ("bf16", "fp32"):
        raise UsageError(f"unknown precision {cfg.precision!r}; choose auto, bf16 or fp32")
    if precision == "bf16" and cuda and not torch.cuda.is_bf16_supported():
        raise UsageError("this GPU does not support bfloat16; use --precision fp32")
    if loader == "datablock" and (cfg.compile or precision == "bf16"):
        raise UsageError("--compile and bf16 need the fast loader (--loader fast)")
    fast = loader == "fast"
    workers = cfg.workers if cfg.workers is not None else default_workers(fast)
    return Speed(
        loader=loader,
        precision=precision,
        channels_last=fast and cuda,
        compile=bool(cfg.compile),
        compile_backend=cfg.compile_backend,
        fused_optimizer=fast,
        cudnn_benchmark=fast and cuda,
        workers=workers,
        device=str(device),
    )


# -- learner --------------------------------------------------------------------------------
class DeviceSmoothLoss(AvgSmoothLoss):
    """fastai's smoothed training loss, kept on the device: fastai's copies every batch's loss
    to the CPU, a GPU synchronisation per batch that leaves the GPU idle while Python queues
    the next one. This one is read (synchronised) once per epoch."""

    def accumulate(self, learn):
        self.count += 1
        loss = learn.loss.detach().mean().float()
        self.val = torch.lerp(loss, self.val.to(loss.device), self.beta)


class Accelerated(Callback):
    """Autocast (bf16) around forward and loss, channels_last model, float predictions;
    with `compile`, the model is compiled once and batches that compiled graphs are timed
    apart (`compile_seconds`)."""

    order = -5  # before every callback that looks at the prediction

    def __init__(self, speed: Speed):
        self.speed = speed
        self.autocast = None
        self.compile_seconds = 0.0
        self._compiled = False

    def before_fit(self):
        self._prepare()
        rec = getattr(self.learn, "recorder", None)
        if rec is not None and type(rec.smooth_loss) is AvgSmoothLoss:
            # the Recorder's own attribute, replaced: fastai's `Callback.__setattr__` would warn
            # that it shadows `learn.smooth_loss` (which is this very attribute, forwarded)
            object.__setattr__(rec, "smooth_loss", DeviceSmoothLoss(rec.smooth_loss.beta))

    def before_validate(self):  # also reached by `get_preds` without a fit
        self._prepare()

    def _prepare(self):
        model = self.learn.model
        device = getattr(self.dls, "device", None)
        if device is not None:
            model.to(device)
        if self.speed.channels_last:
            model.to(memory_format=torch.channels_last)
        if self.speed.compile and not self._compiled:
            # each stage (which parameters train), train/eval mode and last-batch size is a
            # graph of its own; past dynamo's default limit of 8 it would silently run eager
            adapters.raise_compile_cache_limits()
            model.compile(backend=self.speed.compile_backend, dynamic=False)
            self._compiled = True

    def before_batch(self):
        self._graphs = compiled_graphs() if self.speed.compile else 0
        self._t0 = time.perf_counter()
        if self.speed.precision == "bf16":
            self.autocast = torch.autocast(self.speed.device_type, dtype=torch.bfloat16)
            self.autocast.__enter__()

    def after_pred(self):
        self.learn.pred = self.pred.float()

    def after_loss(self):
        self._exit()

    def after_batch(self):
        self._exit()
        if self.speed.compile and compiled_graphs() != self._graphs:
            synchronize(self.speed.device)
            self.compile_seconds += time.perf_counter() - self._t0

    def after_cancel_batch(self):
        self._exit()

    def _exit(self):
        if self.autocast is not None:
            self.autocast.__exit__(None, None, None)
            self.autocast = None


def compiled_graphs() -> int:
    """A counter that moves whenever dynamo captures (compiles) something."""
    return adapters.compile_count()


def synchronize(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): for timing."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


class GroupedAdamW(OptimWrapper):
    """torch AdamW behind fastai's optimizer interface, with fastai's weight-decay rule.

    fastai's Adam skips weight decay for normalisation parameters and biases (its default
    `wd_bn_bias=False`); a plain `OptimWrapper` would decay them. Each fastai parameter group
    (one per block, for `freeze_to` and discriminative LRs) becomes two torch groups — decayed
    (weights) and not decayed (1-D tensors: norm weights/biases and biases) — while fastai keeps
    seeing one group per block."""

    def __init__(self, params, **kwargs):
        adapters.check_hooks(("fastai.optimizer", "OptimWrapper", "_set_hyper"))
        groups = [list(g["params"] if isinstance(g, dict) else g) for g in params]
        if groups and isinstance(groups[0], torch.Tensor):  # a flat list of parameters
            groups = [groups]
        torch_groups = []
        for g in groups:
            torch_groups.append({"params": [p for p in g if p.ndim > 1]})
            torch_groups.append({"params": [p for p in g if p.ndim <= 1], "no_wd": True})
        super().__init__(opt=torch.optim.AdamW(torch_groups, **kwargs))

    @property
    def param_lists(self):
        pgs = self.opt.param_groups
        return [pgs[i]["params"] + pgs[i + 1]["params"] for i in range(0, len(pgs), 2)]

    @param_lists.setter
    def param_lists(self, v):
        raise AttributeError("GroupedAdamW's parameter groups are fixed at construction")

    @property
    def hypers(self):
        return super().hypers[::2]

    def _set_hyper(self, k, v):
        key = adapters.torch_hyper_key(self, k)
        for i, v_ in enumerate(v):
            for pg in self.opt.param_groups[2 * i : 2 * i + 2]:
                value = 0.0 if key == "weight_decay" and pg.get("no_wd") else v_
                set_item_pg(pg, key, value)


def fused_adamw(speed: Speed):
    """`opt_func` for fastai: torch AdamW (fused on CUDA) with fastai Adam's defaults (betas
    0.9/0.99, eps 1e-5, decoupled weight decay, none on norm parameters and biases)."""
    cuda = speed.device_type == "cuda"
    return partial(
        GroupedAdamW,
        betas=(0.9, 0.99),
        eps=1e-5,
        fused=True if cuda else None,
        foreach=None if cuda else True,
    )


__all__ = [
    "AUGMENT",
    "Accelerated",
    "DeviceSmoothLoss",
    "GroupedAdamW",
    "Speed",
    "compiled_graphs",
    "default_workers",
    "fused_adamw",
    "resolve_speed",
    "synchronize",
]
