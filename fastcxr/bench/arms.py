"""The measured loops of `fastcxr bench` (its arms): the model-only limit, fastcxr's training
loop and fastai's defaults, each built once per freezing style and measured in interleaved
rounds (`run_rounds`)."""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
from fastai.callback.core import Callback, CancelFitException, CancelValidException

from fastcxr.formulations import powerset_bits
from fastcxr.runtime.stopping import check

# Every measurement loop checks `fastcxr.runtime.stopping.STOP` (set by the CLI on SIGTERM/SIGINT)
# between steps and raises `Interrupted`: a stopped benchmark records nothing.


class Throughput(Callback):
    """Times `steps` training batches after `warmup` ones (across epochs if needed), skipping
    validation; the fit is cancelled once they are done, and stopped (`Interrupted`) between
    batches when a stop is requested."""

    order = 100

    def __init__(self, warmup: int, steps: int, sync, what: str = "bench"):
        self.warmup, self.steps, self.sync, self.what = warmup, steps, sync, what
        self.seen, self.images, self.t0, self.seconds = 0, 0, None, None

    def before_batch(self):
        check(self.what)
        if self.seen == self.warmup:
            self.sync()
            self.t0 = time.perf_counter()

    def after_batch(self):
        check(self.what)
        self.seen += 1
        if self.seen > self.warmup:
            self.images += int(self.xb[0].shape[0])
        if self.seen == self.warmup + self.steps:
            self.sync()
            self.seconds = time.perf_counter() - self.t0
            raise CancelFitException

    def before_validate(self):
        raise CancelValidException


# -- the arms -----------------------------------------------------------------------
@dataclass(frozen=True)
class BenchJob:
    """What the arms of one freezing style measure: the same configuration (`cfg.freeze_style`
    is the style), speed settings, network, cache, batch counts and device."""

    cfg: Any  # fastcxr.config.TrainConfig, on the fast loader
    speed: Any  # fastcxr.runtime.fastpath.Speed
    form: Any  # fastcxr.formulations.Formulation
    net: Any  # fastcxr.formulations.Network
    ds: Any  # fastcxr.study.Dataset: the bench cache
    warmup: int
    steps: int
    device: Any  # torch.device

    @property
    def style(self) -> str:
        return self.cfg.freeze_style

    @property
    def freezing(self):
        """The freezing policy the arms of this style train under (`Freezing`)."""
        from fastcxr.train.freezing import Freezing

        return Freezing.of(self.cfg)

    def sync(self) -> None:
        from fastcxr.runtime.fastpath import synchronize

        synchronize(self.device)


class Arm:
    """One measured loop, built once and kept for the whole benchmark: `enter(stage)` freezes
    for a stage; `measure(what)` runs `warmup` untimed batches, then `steps` timed ones, and
    returns {"img_s", "compile_s"} (seconds of batches that compiled graphs; None when the arm
    does not compile); `close()` stops what it started. `cudnn` is (benchmark, deterministic)
    while it measures."""

    name = "arm"
    label = "arm"
    cudnn = (False, False)

    def enter(self, stage) -> None:
        raise NotImplementedError

    def measure(self, what: str) -> dict:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _fit_img_s(learn, job: BenchJob, what: str, lrs, cbs=(), **fit) -> float:
    """Training img/s of a fastai fit cancelled after `job.warmup` + `job.steps` batches."""
    tp = Throughput(job.warmup, job.steps, job.sync, what)
    learn.fit(10_000, lr=lrs, cbs=[tp, *cbs], **fit)
    return tp.images / tp.seconds


class LimitArm(Arm):
    """The model-only limit: the same model, stage, precision, layout, compile and optimizer,
    trained by a bare PyTorch loop on random tensors already on the device."""

    name = "limit"

    def __init__(self, job: BenchJob):
        import torch
        from fastai.data.core import DataLoaders
        from fastai.learner import Learner

        from fastcxr.models import block_splitter, build_model
        from fastcxr.runtime.fastpath import fused_adamw

        cfg, speed, form, net, device = job.cfg, job.speed, job.form, job.net, job.device
        self.job, self.label = job, f"model-only limit, {job.style} freezing"
        self.cudnn = (speed.cudnn_benchmark, not speed.cudnn_benchmark)
        model = build_model(cfg.arch, form.n_out(net), size=cfg.size).to(device)
        g = torch.Generator(device=device).manual_seed(0)
        x = torch.randn(cfg.batch_size, 1, cfg.size, cfg.size, device=device, generator=g)
        if speed.channels_last:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        y = np.random.default_rng(0).integers(0, 2, (cfg.batch_size, len(net.findings)))
        self.x, self.y = x, torch.as_tensor(form.targets(y), device=device)
        self.loss = form.loss(net, powerset_bits(len(net.findings)), device=device)
        self.learn = Learner(
            DataLoaders(), model, loss_func=self.loss, splitter=block_splitter,
            opt_func=fused_adamw(speed), train_bn=job.freezing.train_bn,
        )  # fmt: skip
        if speed.compile:
            model.compile(backend=speed.compile_backend, dynamic=False)
        self.model = model

    def enter(self, stage) -> None:
        freezing = self.job.freezing
        unfrozen = freezing.unfreeze(self.learn, stage)
        self.learn.opt.set_hypers(lr=freezing.lrs(self.learn, len(unfrozen), stage.lr))

    def _step(self) -> None:
        import torch

        bf16 = self.job.speed.precision == "bf16"
        with torch.autocast(self.job.speed.device_type, dtype=torch.bfloat16, enabled=bf16):
            out = self.model(self.x)
        self.loss(out.float(), self.y).backward()
        self.learn.opt.opt.step()
        self.learn.opt.opt.zero_grad(set_to_none=True)

    def measure(self, what: str) -> dict:
        from fastcxr.runtime.fastpath import compiled_graphs

        job = self.job
        self.model.train()
        job.freezing.settle(self.model)
        compiling = 0.0
        for _ in range(max(job.warmup, 1)):  # steps that compiled graphs count as compile time
            check(what)
            job.sync()
            t0, graphs = time.perf_counter(), compiled_graphs()
            self._step()
            job.sync()
            if compiled_graphs() != graphs:
                compiling += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(job.steps):
            check(what)
            self._step()
        job.sync()
        seconds = time.perf_counter() - t0
        return {"img_s": job.steps * job.cfg.batch_size / seconds, "compile_s": compiling}


class FastcxrArm(Arm):
    """fastcxr's real training loop (fast loader, `Accelerated`, its schedule's freezing) on
    the cache; also measures evaluation (inference) img/s."""

    name = "fastcxr"

    def __init__(self, job: BenchJob):
        from fastcxr.data import apply_policy, network_data
        from fastcxr.train.learner import make_learner, seed_everything

        cfg, speed = job.cfg, job.speed
        self.job, self.label = job, f"fastcxr, {job.style} freezing"
        self.cudnn = (speed.cudnn_benchmark, not speed.cudnn_benchmark)
        df = apply_policy(job.ds.df, cfg, job.net.findings)
        seed_everything(cfg.seed, speed)
        self.nd = network_data(
            df, job.ds.root, job.form, job.net, cfg, device=job.device, speed=speed
        )
        self.learn = make_learner(self.nd, job.form, job.net, cfg)

    def enter(self, stage) -> None:
        freezing = self.job.freezing
        unfrozen = freezing.unfreeze(self.learn, stage)
        self.lrs = freezing.lrs(self.learn, len(unfrozen), stage.lr)

    def measure(self, what: str) -> dict:
        cbs = self.job.freezing.callbacks()
        before = self.learn.accelerated.compile_seconds
        wd = self.job.cfg.weight_decay
        img_s = _fit_img_s(self.learn, self.job, what, self.lrs, cbs, wd=wd)
        return {"img_s": img_s, "compile_s": self.learn.accelerated.compile_seconds - before}

    def eval_img_s(self) -> float:
        """Evaluation img/s on the validation split (its second pass: the first warms it)."""
        valid = self.nd.dls.valid
        check("bench (evaluation)")
        self.learn.get_preds(dl=valid)  # warm the evaluation path (and its compiled graph)
        self.job.sync()
        check("bench (evaluation)")
        t0 = time.perf_counter()
        self.learn.get_preds(dl=valid)
        self.job.sync()
        return len(self.nd.valid) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.nd.close()


class DefaultsArm(Arm):
    """What a user would otherwise write: a plain image DataBlock (RGB PILImage, fastai's
    batch augmentation and ImageNet normalisation) and `vision_learner(...).to_bf16()` with
    fastai's defaults (Adam, train_bn=True, default workers, torch's cuDNN settings); stages
    via the block splitter. It does not depend on the freezing style: one arm serves both."""

    name, label = "defaults", "fastai defaults"

    def __init__(self, job: BenchJob):
        self.job = job
        self.learn = _defaults_learner(job)

    def enter(self, stage) -> None:
        freezing = self.job.freezing
        unfrozen = freezing.unfreeze(self.learn, stage)
        self.lrs = freezing.lrs(self.learn, len(unfrozen), stage.lr)

    def measure(self, what: str) -> dict:
        return {"img_s": _fit_img_s(self.learn, self.job, what, self.lrs), "compile_s": None}


def _defaults_learner(job: BenchJob):
    import fastai.callback.fp16  # noqa: F401  (adds `Learner.to_bf16`)
    import torch
    from fastai.data.block import DataBlock
    from fastai.data.transforms import ColReader, ColSplitter, Normalize
    from fastai.vision.augment import aug_transforms
    from fastai.vision.core import imagenet_stats
    from fastai.vision.data import ImageBlock
    from fastai.vision.learner import vision_learner

    from fastcxr.backbones import size_kwargs
    from fastcxr.data import apply_policy
    from fastcxr.models import ARCHS, TorchvisionArch, block_splitter
    from fastcxr.runtime.fastpath import AUGMENT
    from fastcxr.train.learner import silence

    cfg, form, net, ds = job.cfg, job.form, job.net, job.ds
    df = apply_policy(ds.df, cfg, net.findings)
    df = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    df["is_valid"] = df["split"] == "valid"
    df["_y"] = list(form.targets(df[list(net.findings)].to_numpy(int)))
    batch_tfms = [Normalize.from_stats(*imagenet_stats)]
    if cfg.augment:
        batch_tfms = aug_transforms(do_flip=False, max_warp=0.0, **AUGMENT) + batch_tfms
    block = DataBlock(
        blocks=(ImageBlock, form.block(net)),
        get_x=ColReader("image", pref=f"{ds.root}{os.sep}"),
        get_y=ColReader("_y"),
        splitter=ColSplitter("is_valid"),
        batch_tfms=batch_tfms,
    )
    dls = block.dataloaders(df, bs=cfg.batch_size, device=job.device)
    if cfg.arch in ARCHS:  # torchvision's builder, as `vision_learner(dls, resnet152)`
        arch = TorchvisionArch(cfg.arch)
        extra: dict = {"cut": arch.cut}
    else:  # a timm name, as `vision_learner(dls, "convnext_tiny")`; a ViT built for the size
        arch, extra = cfg.arch, size_kwargs(cfg.arch, cfg.size)
    learn = vision_learner(
        dls, arch, n_out=form.n_out(net), pretrained=False, **extra,
        loss_func=form.loss(net, powerset_bits(len(net.findings)), device=job.device),
        splitter=block_splitter, metrics=[],
    )  # fmt: skip
    if torch.device(job.device).type == "cuda":
        learn = learn.to_bf16()
    return silence(learn)


def _set_cudnn(benchmark: bool, deterministic: bool) -> None:
    import torch

    torch.backends.cudnn.benchmark = benchmark
    torch.backends.cudnn.deterministic = deterministic


@contextmanager
def restored_globals():
    """Leave the process's global settings as they were: cuDNN's benchmark and deterministic
    flags, fastai's default device, dynamo's graph limits and the Python, NumPy and torch
    random states (the arms seed them, set cuDNN per arm, and raise the graph limits)."""
    import random

    import torch
    from fastai.torch_core import defaults

    from fastcxr.runtime.adapters import compile_cache_limits, set_compile_cache_limits

    cudnn = torch.backends.cudnn
    flags = (cudnn.benchmark, cudnn.deterministic)
    use_cuda = getattr(defaults, "use_cuda", None)
    limits = compile_cache_limits()
    rngs = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        cudnn.benchmark, cudnn.deterministic = flags
        defaults.use_cuda = use_cuda
        set_compile_cache_limits(limits)
        random.setstate(rngs[0])
        np.random.set_state(rngs[1])
        torch.set_rng_state(rngs[2])
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def build_arms(jobs: list[BenchJob], defaults: bool, say) -> dict:
    """{(arm name, style or None): Arm}, in the order every round measures them: per style the
    limit then fastcxr, then (one for both styles) the fastai defaults. All are alive together
    (each holds its model, optimizer state and loader workers)."""
    arms: dict = {}
    try:
        for job in jobs:
            say(f"building the limit and fastcxr loops, {job.style} freezing")
            check("bench (building its loops)")
            arms["limit", job.style] = LimitArm(job)
            check("bench (building its loops)")
            arms["fastcxr", job.style] = FastcxrArm(job)
        if defaults:
            say("building the fastai-defaults loop")
            check("bench (building its loops)")
            arms["defaults", None] = DefaultsArm(jobs[0])
    except BaseException:
        close_arms(arms)
        raise
    return arms


def close_arms(arms: dict) -> None:
    for arm in arms.values():
        arm.close()


def run_rounds(
    arms: dict, stages, rounds: int, fresh_compile: bool, say, progress=None
) -> dict[str, list]:
    """{stage name: [{arm key: measured} per round]}. Per stage every arm enters the stage;
    then each round measures every arm, in `arms` order, so that drift of a shared machine
    reaches the arms of a round alike.

    Every round repeats the warmup: each is a new fit, whose loader refills its queue. With
    `fresh_compile`, each arm's first round of a stage starts from an empty compile cache, so
    its compile time is that of a fresh run (the arms' graphs are alike and would otherwise be
    reused); a later round's warmup may recompile what another arm's fresh start discarded,
    untimed. `progress(done, total)` hears of each measurement done (arms × rounds × stages)."""
    import torch

    out: dict[str, list] = {}
    total, done = len(stages) * rounds * len(arms), 0
    for st in stages:
        for arm in arms.values():
            arm.enter(st)
        out[st.name] = []
        for r in range(rounds):
            got = {}
            for key, arm in arms.items():
                what = f"{arm.label}, stage {st.name}, round {r + 1} of {rounds}"
                say(what)
                if fresh_compile and r == 0:
                    torch.compiler.reset()
                _set_cudnn(*arm.cudnn)
                got[key] = arm.measure(f"bench ({what})")
                done += 1
                if progress:
                    progress(done, total)
            out[st.name].append(got)
    return out
