"""The fast path's loader: batches of uint8 images from the cache, normalised and augmented
on the device (`CacheDL`, a fastai `DataLoader`), and the (train, valid, test) loaders of a
network (`cache_loaders`).

Each worker decodes cached 8-bit PNGs into a uint8 batch (N, 1, H, W) — no per-item float
conversion, no 3-channel copies, no fastai type dispatch — pinned, then moved to the device,
where it is converted to float, augmented (small rotation/zoom, lighting) and normalised in
one pass per batch. fastai's and torch's internals it relies on are reached through
`fastcxr.runtime.adapters` only.
"""

from __future__ import annotations

import math
import os
import weakref
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from fastai.data.load import DataLoader
from fastcore.basics import chunked

from fastcxr.images.readers import read_image
from fastcxr.preprocessing import GRAY_MEAN, GRAY_STD, read_cached
from fastcxr.runtime import adapters
from fastcxr.runtime.fastpath import AUGMENT, Speed


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
        # a cache image (fastcxr's own square, maybe under a radiograph's least side) or a
        # source the manifest names: the declared size is bounded either way
        return read_image(path, self.size, self.mode, radiograph=False)

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
                # Starting the workers draws their base seed from this generator; torch's
                # global one would advance once more in a resumed run (whose workers start
                # again mid-schedule) than in the uninterrupted run, and every later shuffle
                # and augmentation would differ. The workers only decode: nothing random.
                generator=torch.Generator().manual_seed(0),
            )
            # fastai's loaders sit in a reference cycle, so they are freed by the cyclic
            # collector, which tears torch's worker queues down in no useful order: each worker
            # then takes 5 s to time out. Stop the workers first, in order.
            weakref.finalize(self, _stop_workers_of, os.getpid(), self._loader)
            _LIVE.add(self._loader)
            _OWNERS.add(self)
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


__all__ = ["CacheDL", "cache_loaders", "close_loaders", "gpu_augment"]


# Every torch loader with persistent workers in this process: a worker forked later inherits
# a copy of each, and must not stop their workers when it frees the copy (`_disown_all`).
_LIVE: weakref.WeakSet = weakref.WeakSet()
# The `CacheDL`s holding one of them: in a forked child each forgets it, so that iterating the
# copy there starts the child's own workers instead of reading from the parent's.
_OWNERS: weakref.WeakSet = weakref.WeakSet()


def _disown_all() -> None:
    for loader in list(_LIVE):
        adapters.disown_workers(loader)
    for dl in list(_OWNERS):
        dl._loader = None
    _LIVE.clear()
    _OWNERS.clear()


os.register_at_fork(after_in_child=_disown_all)


def close_loaders(*loaders) -> None:
    """Stop the worker processes of those of `loaders` that hold some (the fast path's
    `CacheDL`; fastai's own loaders start new workers each epoch and stop them after it)."""
    for dl in loaders:
        if isinstance(dl, CacheDL):
            dl.close()


def _stop_workers_of(owner_pid: int, loader) -> None:
    """The finalizer: stop the workers, in the process that started them only (a process
    forked from it inherits the finalizer but cannot test, or stop, another's children)."""
    if os.getpid() == owner_pid:
        adapters.stop_workers(loader)
