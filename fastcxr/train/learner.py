"""The fastai `Learner` of one network: `vision_learner` with fastcxr's stem, splitter, loss,
optimizer and speed settings."""

from __future__ import annotations

import torch
from fastai.callback.progress import ProgressCallback
from fastai.learner import Learner
from fastai.optimizer import Adam
from fastai.torch_basics import set_seed
from fastai.vision.learner import vision_learner

from fastcxr.backbones import is_timm_arch
from fastcxr.config import TrainConfig
from fastcxr.data import NetworkData
from fastcxr.formulations import Formulation, Network
from fastcxr.models import ARCHS, TorchvisionArch, block_splitter, build_model
from fastcxr.runtime.distributed import world_size
from fastcxr.runtime.fastpath import Accelerated, Speed, fused_adamw
from fastcxr.train.freezing import Freezing


def make_learner(nd: NetworkData, form: Formulation, net: Network, cfg: TrainConfig) -> Learner:
    """`vision_learner` with a 1-channel stem, the block splitter and the formulation's loss;
    on the fast path also bf16/channels_last/compile (`Accelerated`) and a fused AdamW."""
    fast = nd.speed.loader == "fast"
    if cfg.arch not in ARCHS and is_timm_arch(cfg.arch):
        learn = _timm_learner(nd, form, net, cfg, fast)
    else:
        learn = _torchvision_learner(nd, form, net, cfg, fast)
    if fast:
        learn.add_cb(Accelerated(nd.speed))
    if world_size() > 1:
        from fastcxr.train.ddp import DataParallel

        learn.add_cb(DataParallel())
    return silence(learn)


def _timm_learner(nd, form, net, cfg: TrainConfig, fast: bool) -> Learner:
    """What `vision_learner(dls, name)` builds for a timm `name` (fastai's `TimmBody` and
    head), built by fastcxr so that `--weights FILE` and 1 input channel work the same."""
    pretrained = cfg.pretrained or bool(cfg.weights)
    model = build_model(cfg.arch, form.n_out(net), cfg.pretrained, cfg.weights, cfg.size)
    learn = Learner(
        nd.dls, model, loss_func=form.loss(net, nd.y_train, device=nd.dls.device),
        opt_func=fused_adamw(nd.speed) if fast else Adam, splitter=block_splitter,
        metrics=[], train_bn=Freezing.of(cfg).train_bn,
    )  # fmt: skip
    if pretrained:
        learn.freeze()  # as vision_learner does
    return learn


def _torchvision_learner(nd, form, net, cfg: TrainConfig, fast: bool) -> Learner:
    arch = TorchvisionArch(cfg.arch, cfg.weights)
    return vision_learner(
        nd.dls, arch, n_out=form.n_out(net), pretrained=cfg.pretrained or bool(cfg.weights),
        loss_func=form.loss(net, nd.y_train, device=nd.dls.device), splitter=block_splitter,
        cut=arch.cut, n_in=1, normalize=False, metrics=[],
        opt_func=fused_adamw(nd.speed) if fast else Adam,
        train_bn=Freezing.of(cfg).train_bn,
    )  # fmt: skip


def silence(learn: Learner) -> Learner:
    """No progress bars and no per-epoch printing (fastcxr reports through `log`)."""
    if ProgressCallback in [type(c) for c in learn.cbs]:
        learn.remove_cb(ProgressCallback)
    learn.logger = _quiet
    return learn


def _quiet(*args, **kwargs) -> None:
    """fastai's Recorder prints each epoch; fastcxr reports epochs through `log` instead."""


def seed_everything(seed: int, speed: Speed) -> None:
    """Seed every RNG. The plain path is also bit-reproducible (deterministic cuDNN); the fast
    path lets cuDNN pick its fastest (non-deterministic) kernels."""
    set_seed(seed, reproducible=not speed.cudnn_benchmark)
    if speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
