"""The fast training path: what "rapid training" needs between the image cache and the GPU.

* **Loader** (`CacheDL`, a fastai `DataLoader`): each worker decodes cached 8-bit PNGs into a
  uint8 batch (N, 1, H, W) — no per-item float conversion, no 3-channel copies, no fastai
  type dispatch — pinned, then moved to the device, where it is converted to float,
  augmented (small rotation/zoom, lighting) and normalised in one pass per batch.
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

import math
import os
import time
import weakref
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback
from fastai.data.load import DataLoader
from fastai.learner import AvgSmoothLoss
from fastai.optimizer import OptimWrapper, set_item_pg
from fastcore.basics import chunked

from fastcxr import adapters
from fastcxr.errors import UsageError
from fastcxr.prepare.cache import load_source
from fastcxr.preprocessing import GRAY_MEAN, GRAY_STD, read_cached

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


# -- loader ---------------------------------------------------------------------------------
def gpu_augment(
    x: torch.Tensor,
    max_rotate=AUGMENT["max_rotate"],
    max_zoom=AUGMENT["max_zoom"],
    max_lighting=AUGMENT["max_lighting"],
    p=0.75,
):
    """fastai's `aug_transforms(do_flip=False, max_warp=0)` on a float batch in 0..1, on its
    device: per image, with probability `p`, a rotation in ±max_rotate degrees and a zoom in
    1..max_zoom (bilinear, reflection padding); with probability `p`, brightness and contrast
    changes on the logit scale (fastai's lighting transforms)."""
    n = x.shape[0]
    dev = x.device
    u = partial(torch.rand, n, device=dev)
    on = (u() < p).float()
    ang = (u() * 2 - 1) * math.radians(max_rotate) * on
    scale = 1 / (1 + (max_zoom - 1) * u() * on)  # zoom in: sample a smaller window
    cos, sin = torch.cos(ang) * scale, torch.sin(ang) * scale
    zero = torch.zeros_like(cos)
    theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    lit = (u() < p).float()[:, None, None, None]
    bright = 0.5 * (1 + max_lighting * (u() * 2 - 1))  # fastai Brightness: logit(change)
    contrast = torch.exp(
        (u() * 2 - 1) * -math.log(1 - max_lighting)
    )  # fastai Contrast: log-uniform
    eps = 1e-4
    logit = torch.logit(x.clamp(eps, 1 - eps))
    moved = torch.sigmoid(
        logit * contrast[:, None, None, None] + torch.logit(bright)[:, None, None, None]
    )
    return torch.lerp(x, moved, lit)


class _CacheBatches(torch.utils.data.Dataset):
    """Map-style view for torch's DataLoader: a list of indices → one uint8 batch. Holds only
    plain data, so it is cheap to send to worker processes however they start."""

    def __init__(self, files: list[str], targets: np.ndarray, size: int, mode: str):
        self.files, self.targets, self.size, self.mode = files, targets, size, mode

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, path: Path) -> np.ndarray:
        return load_source(path, self.size, self.mode)

    def __getitem__(self, idxs):
        x = np.stack([read_cached(Path(self.files[i]), self._load) for i in idxs])
        return torch.from_numpy(x[:, None]), torch.from_numpy(self.targets[list(idxs)])


class _BatchOrder(torch.utils.data.Sampler):
    """The epoch's batches (lists of indices), set by the main process before each epoch."""

    def __init__(self):
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class CacheDL(DataLoader):
    """Batches of (uint8 images → normalised float on the device, targets) from the cache.

    `files` are cached PNG/JPGs (or DICOMs, decoded with `mode`), resized to `size` only when
    they are not already that size; `targets` are float (n, k) 0/1 or int (n,) class indices.

    Iteration goes through one torch `DataLoader` kept for the life of this object: its workers
    persist across epochs (fastai builds a new one, with new workers, every epoch), the batch
    order is drawn in the main process every epoch (fastai's seeded shuffle), each worker
    builds whole batches, and pinned batches are copied to the device without blocking.
    """

    def __init__(
        self,
        files,
        targets: np.ndarray,
        size: int,
        mode: str = "voi",
        augment: bool = False,
        channels_last: bool = False,
        mean: float = GRAY_MEAN,
        std: float = GRAY_STD,
        **kwargs,
    ):
        self.files = [str(f) for f in files]
        self.targets = np.asarray(targets)
        self.size, self.mode, self.augment = size, mode, augment
        self.channels_last, self.mean, self.std = channels_last, mean, std
        self._batches = _CacheBatches(self.files, self.targets, size, mode)
        self._loader = None
        kwargs.pop("dataset", None)
        kwargs.pop("n", None)
        super().__init__(dataset=None, n=len(self.files), indexed=True, **kwargs)
        adapters.worker_settings(self)  # fails here, not mid-training, if fastai changed it

    @property
    def workers(self) -> tuple[int, bool]:
        """(worker processes, persistent?) as fastai holds them; 0 workers during
        `one_batch`."""
        return adapters.worker_settings(self)

    def new(self, **kwargs):
        workers, persistent = self.workers
        cur = dict(
            num_workers=workers,
            pin_memory=self.pin_memory,
            bs=self.bs,
            shuffle=self.shuffle,
            drop_last=self.drop_last,
            device=self.device,
            persistent_workers=persistent,
        )
        return CacheDL(
            self.files,
            self.targets,
            self.size,
            self.mode,
            self.augment,
            self.channels_last,
            self.mean,
            self.std,
            **{**cur, **kwargs},
        )

    def create_item(self, i):
        return i  # decoding happens per batch, in `_CacheBatches`

    def create_batch(self, idxs):  # also what fastai's `DistributedDL` calls
        return self._batches[list(idxs)]

    def retain(self, res, b):
        return res  # plain tensors on purpose

    def __getstate__(self):  # a worker never needs the loader (nor its processes)
        return {**self.__dict__, "_loader": None}

    def _torch_loader(self):
        if self._loader is None:
            workers, persistent = self.workers
            self._loader = torch.utils.data.DataLoader(
                self._batches,
                batch_size=None,
                sampler=_BatchOrder(),
                num_workers=workers,
                pin_memory=self.pin_memory,
                persistent_workers=workers > 0 and persistent,
                prefetch_factor=2 if workers > 0 else None,
            )
            # fastai's loaders sit in a reference cycle, so they are freed by the cyclic
            # collector, which tears torch's worker queues down in no useful order: each worker
            # then takes 5 s to time out. Stop the workers first, in order.
            weakref.finalize(self, adapters.stop_workers, self._loader)
        return self._loader

    def close(self) -> None:
        """Stop this loader's worker processes now (the next iteration starts new ones)."""
        if self._loader is not None:
            adapters.stop_workers(self._loader)
            self._loader = None

    def __iter__(self):
        self.randomize()
        self.before_iter()
        for b in self.serve(self.get_idxs()):  # in the main process: seeded, reshuffled
            yield self.after_batch(b)
        self.after_iter()

    def serve(self, idxs):
        """The batches of `idxs` (in `bs` chunks), on the device, before `after_batch`: from
        the persistent workers, or in this process when there are none."""
        batches = [list(b) for b in chunked(list(idxs), self.bs, drop_last=self.drop_last)]
        if self.workers[0] == 0:  # also `one_batch`, which switches workers off
            source = (self._batches[b] for b in batches)
        else:
            loader = self._torch_loader()
            loader.sampler.batches = batches
            source = iter(loader)
        for x, y in source:
            if self.device is not None:
                x = x.to(self.device, non_blocking=self.pin_memory)
                y = y.to(self.device, non_blocking=self.pin_memory)
            yield x, y

    def after_batch(self, b):
        x, y = b
        x = x.float().div_(255)
        if self.augment:  # the training loader only
            x = gpu_augment(x)
        x = x.sub_(self.mean).div_(self.std)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, y


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
            rec.smooth_loss = DeviceSmoothLoss(rec.smooth_loss.beta)

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


def cache_loaders(
    train: tuple,
    valid: tuple,
    test: tuple,
    size: int,
    batch_size: int,
    augment: bool,
    speed: Speed,
    device,
    mode: str = "voi",
):
    """(train, valid, test) `CacheDL`s from (files, targets) pairs; evaluation loaders use
    twice the batch size."""
    cuda = speed.device_type == "cuda"
    common = dict(
        size=size,
        mode=mode,
        channels_last=speed.channels_last,
        num_workers=speed.workers,
        pin_memory=cuda,
        persistent_workers=speed.workers > 0,
        device=device,
    )
    train_dl = CacheDL(
        *train, augment=augment, bs=batch_size, shuffle=True, drop_last=True, **common
    )
    valid_dl = CacheDL(*valid, bs=2 * batch_size, **common)
    test_dl = CacheDL(*test, bs=2 * batch_size, **common)
    return train_dl, valid_dl, test_dl


__all__ = [
    "AUGMENT",
    "Accelerated",
    "CacheDL",
    "DeviceSmoothLoss",
    "GroupedAdamW",
    "Speed",
    "cache_loaders",
    "compiled_graphs",
    "default_workers",
    "fused_adamw",
    "gpu_augment",
    "resolve_speed",
    "synchronize",
]
