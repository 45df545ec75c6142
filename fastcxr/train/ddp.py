"""fastai's Accelerate trainer adapted for fastcxr (see `fastcxr.runtime.distributed`)."""

from __future__ import annotations

import torch
from fastai.distributed import DistributedDL, DistributedTrainer

from fastcxr.data.cache_loader import CacheDL
from fastcxr.runtime import adapters


class ShardedDL(DistributedDL):
    """fastai's `DistributedDL` with a broadcast that also works on CPU (gloo); fastai's moves
    the index list to CUDA unconditionally (fastai 2.8.12's private `_broadcast`, checked by
    `fastcxr.runtime.adapters`)."""

    def __init__(self, *args, **kwargs):
        adapters.check_hooks(("fastai.distributed", "DistributedDL", "_broadcast"))
        super().__init__(*args, **kwargs)

    def _broadcast(self, t, rank):
        obj = [list(t)]
        torch.distributed.broadcast_object_list(obj, src=rank)
        return obj[0]


class ShardedCacheDL(ShardedDL):
    """This process's shard of a fast `CacheDL`, served by that loader's own persistent
    workers. fastai's `DistributedDL` iterates through a new torch loader, with new worker
    processes, every epoch; here the shard's indices (rank 0's shuffle, padded and sliced by
    fastai) go to the workers that the wrapped loader keeps for its whole life."""

    def __iter__(self):
        self.randomize()
        self.before_iter()
        for b in self.dl.serve(self.get_idxs()):
            yield self.after_batch(b)  # counts the shard's position, then the device transforms
        self.after_iter()


class DataParallel(DistributedTrainer):
    """fastai's `DistributedTrainer` (Accelerate), sharding only the training loader (its
    private `_wrap_dl` and `old_dls`, fastai 2.8.12, through `fastcxr.runtime.adapters`)."""

    def __init__(self):
        adapters.check_hooks(("fastai.distributed", "DistributedTrainer", "_wrap_dl"))
        cuda = torch.cuda.is_available()
        super().__init__(sync_bn=cuda, cpu=not cuda)  # SyncBatchNorm needs CUDA

    def _wrap_dl(self, dl):
        if isinstance(dl, DistributedDL):
            return dl
        shard = ShardedCacheDL if isinstance(dl, CacheDL) else ShardedDL
        return shard(dl, device=self.learn.dls.device)

    def before_fit(self):
        super().before_fit()
        self.learn.dls.loaders = [self.learn.dls.loaders[0], *adapters.original_loaders(self)[1:]]

    def before_validate(self):  # the whole validation split on every process
        pass
