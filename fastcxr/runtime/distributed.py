"""Data-parallel training through fastai's Accelerate integration, on GPUs or on CPUs (gloo).

Launch the usual way, e.g. ``torchrun --nproc_per_node 2 -m fastcxr train …`` or
``accelerate launch -m fastcxr train …``. Each process trains on its shard of every epoch
(fastai's `DistributedDL`), gradients are averaged by DDP, so the weights stay identical.
Validation and test inference are *not* sharded: every process evaluates the whole split, so
every process takes the same early-stopping decision and every metric is computed on the
whole set. Only rank 0 writes run records and checkpoints. (The trainer callback lives in
`fastcxr.train.ddp`, imported only when several processes run: it needs `accelerate`.)
"""

from __future__ import annotations

import contextlib
import os

import torch
from fastai.torch_core import num_distrib, rank_distrib
from torch import nn


def world_size() -> int:
    return max(num_distrib(), 1)


def is_main() -> bool:
    return rank_distrib() == 0


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def init() -> None:
    """Join the process group (and pick this process's GPU) when launched with several."""
    if world_size() > 1:
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    if world_size() > 1 and torch.distributed.is_initialized():
        torch.distributed.barrier()


@contextlib.contextmanager
def local_view():
    """Inference on the whole split in this process: fastai gathers every tensor across
    processes whenever WORLD_SIZE > 1, which would duplicate rows that each process already
    computed in full."""
    saved = os.environ.get("WORLD_SIZE")
    if saved is not None:
        os.environ["WORLD_SIZE"] = "1"
    try:
        yield
    finally:
        if saved is not None:
            os.environ["WORLD_SIZE"] = saved
