"""fastai's Accelerate trainer adapted for fastcxr (see `fastcxr.distributed`)."""

from __future__ import annotations

import torch
from fastai.distributed import DistributedDL, DistributedTrainer


class ShardedDL(DistributedDL):
    """fastai's `DistributedDL` with a broadcast that also works on CPU (gloo); fastai's moves
    the index list to CUDA unconditionally."""

    def _broadcast(self, t, rank):
        obj = [list(t)]
        torch.distributed.broadcast_object_list(obj, src=rank)
        return obj[0]


class DataParallel(DistributedTrainer):
    """fastai's `DistributedTrainer` (Accelerate), sharding only the training loader."""

    def __init__(self):
        cuda = torch.cuda.is_available()
        super().__init__(sync_bn=cuda, cpu=not cuda)  # SyncBatchNorm needs CUDA

    def _wrap_dl(self, dl):
        return dl if isinstance(dl, DistributedDL) else ShardedDL(dl, device=self.learn.dls.device)

    def before_fit(self):
        super().before_fit()
        self.learn.dls.loaders = [self.learn.dls.loaders[0], *self.old_dls[1:]]

    def before_validate(self):  # the whole validation split on every process
        pass
