"""Benchmarks that print a ratio against a baseline measured in the same run.

`bench_prepare`: DICOM → cache conversion, fastcxr's converter against a plain one.
`bench_train`: training img/s of three arms — the model-only limit, fastcxr's loop, fastai's
defaults — measured in interleaved rounds (limit, fastcxr, defaults, repeated), so that drift
of a shared machine reaches every arm of a round alike; each ratio is the median of the per-round
ratios, with its range (`summarise`), and a row whose range is too wide (`WIDE`) says so.
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fastcxr.errors import UsageError
from fastcxr.formulations import powerset_bits
from fastcxr.prepare.cache import convert_one, map_stoppable
from fastcxr.prepare.synthetic import encode_dicom, render_frontal
from fastcxr.runtime.stopping import Interrupted, check

# Every measurement loop checks `fastcxr.runtime.stopping.STOP` (set by the CLI on SIGTERM/SIGINT)
# between steps and raises `Interrupted`: a stopped benchmark records nothing.

MIMIC_IMAGES = 377_110  # DICOMs in MIMIC-CXR v2.0.0


def write_mimic_sized(folder: Path, n: int, rows: int = 3050, cols: int = 2539) -> list[Path]:
    """`n` radiograph-like 12-bit DICOMs of MIMIC-CXR's typical size."""
    paths = []
    for i in range(n):
        check("bench-prepare (writing its DICOMs)")
        rng = np.random.default_rng(i)
        small = render_frontal(rng, rows // 8, cols // 8, 0.5, (0.4, 0.0))
        big = np.asarray(Image.fromarray(small).resize((cols, rows), Image.Resampling.BILINEAR))
        big = np.clip(big + rng.normal(0, 0.01, big.shape), 0, 1)
        p = folder / f"img{i:03d}.dcm"
        encode_dicom(
            rng,
            big,
            "PA",
            {
                "subject_id": 10000000 + i,
                "study_id": 50000000 + i,
                "StudyDate": "21100101",
                "StudyTime": "120000",
            },
            p,
        )
        paths.append(p)
    return paths


def baseline_convert(src: Path, dst: Path, size: int) -> None:
    """What one writes without fastcxr: pydicom read, LUTs, float rescale, PIL resize, PNG."""
    ds = pydicom.dcmread(src)
    v = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float32)
    v = (v - v.min()) / max(float(v.max() - v.min()), 1e-6)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        v = 1.0 - v
    Image.fromarray((v * 255).astype(np.uint8)).resize((size, size)).save(dst)


def bench_prepare(
    n: int = 8, size: int = 512, repeats: int = 2, rows: int = 3050, cols: int = 2539
) -> dict:
    """Images per second per core: baseline vs fastcxr's converter, one process each."""
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        srcs = write_mimic_sized(tmp, n, rows, cols)
        shape = pydicom.dcmread(srcs[0], stop_before_pixels=True)

        def timed(fn) -> float:
            best = float("inf")
            for r in range(repeats):
                outs = [tmp / f"out{r}_{i}.png" for i in range(n)]
                for o in outs:
                    o.unlink(missing_ok=True)
                t0 = time.perf_counter()
                for s, o in zip(srcs, outs):
                    check("bench-prepare")
                    fn(s, o)
                best = min(best, time.perf_counter() - t0)
            return n / best

        base = timed(lambda s, o: baseline_convert(s, o, size))
        fast = timed(lambda s, o: convert_one((str(s), str(o), size, "voi")))
    cores = os.cpu_count() or 1
    return {
        "images": n, "rows": int(shape.Rows), "cols": int(shape.Columns),
        "bits_stored": int(shape.BitsStored), "size": size,
        "baseline_images_per_s_per_core": base, "fastcxr_images_per_s_per_core": fast,
        "ratio": fast / base,
        "mimic_minutes_on_16_cores": MIMIC_IMAGES / (fast * 16) / 60,
        "mimic_minutes_on_this_machine": MIMIC_IMAGES / (fast * cores) / 60, "cores": cores,
    }  # fmt: skip


# -- training throughput (`fastcxr bench`) --------------------------------------------------
BENCH_STAGES = "head,conv5_block3=conv5_block-1,conv5,conv4_last3=conv4_block-3,all"


def write_bench_cache(folder: Path, n: int, size: int, workers: int | None = None) -> Path:
    """`n` synthetic radiographs as a `size` x `size` 8-bit PNG cache + manifest (reused when
    one with the same n and size is complete). Returns the manifest path."""
    import pandas as pd

    from fastcxr.runtime.runs import write_csv

    folder = Path(folder)
    manifest = folder / "manifest.csv"
    stamp = folder / ".complete"
    if stamp.exists() and stamp.read_text().strip() == f"{n} {size}":
        return manifest
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    edema, effusion = rng.random(n) < 0.5, rng.random(n) < 0.5
    jobs = [(folder, i, size, bool(edema[i]), bool(effusion[i])) for i in range(n)]
    done = [0]

    def count(i: int, result) -> None:
        done[0] += 1

    def stopped() -> Interrupted:
        return Interrupted(
            f"stopped by request while writing the bench cache ({done[0]} of {n} images "
            f"written to {folder}); nothing was measured"
        )

    map_stoppable(_bench_image, jobs, workers or os.cpu_count() or 1, count, stopped)
    split = np.where(
        np.arange(n) % 10 == 8, "valid", np.where(np.arange(n) % 10 == 9, "test", "train")
    )
    df = pd.DataFrame({
        "image": [f"images/{i:06d}.png" for i in range(n)],
        "patient_id": [f"p{i}" for i in range(n)], "study_id": [f"s{i}" for i in range(n)],
        "view": "PA", "split": split,
        "Edema": edema.astype(float), "Pleural Effusion": effusion.astype(float),
    })  # fmt: skip
    write_csv(manifest, df)
    stamp.write_text(f"{n} {size}\n")
    return manifest


def _bench_image(job) -> None:
    from fastcxr.runtime.runs import write_atomic

    folder, i, size, edema, effusion = job
    rng = np.random.default_rng(i + 1)
    img = render_frontal(rng, size, size, 0.7 * edema, (0.7 * effusion, 0.0))
    arr = (np.clip(img, 0, 1) * 255).astype(np.uint8)

    def save(tmp: Path) -> None:
        Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)

    write_atomic(folder / "images" / f"{i:06d}.png", save)


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


# -- interleaved rounds -----------------------------------------------------------------------
WIDE = 0.25
"""A row is too wide to trust when, for either of its ratios, (max − min) / median over the
rounds exceeds `WIDE`: the ratio then moves by more than a quarter with the machine's drift
(two identical CPU runs once read conv5 fastcxr/limit 1.12 and 0.73)."""
MIN_ROUNDS = 3  # fewer rounds show no spread worth trusting: such a row is always "wide"


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
        model = build_model(cfg.arch, form.n_out(net), pretrained=False).to(device)
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

    from fastcxr.data import apply_policy
    from fastcxr.models import TorchvisionArch, block_splitter
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
    arch = TorchvisionArch(cfg.arch)  # torchvision's builder, as `vision_learner(dls, resnet152)`
    learn = vision_learner(
        dls, arch, n_out=form.n_out(net), pretrained=False, cut=arch.cut,
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


def _ratio_spread(ratios: np.ndarray) -> tuple[float, list[float], float]:
    """(median, [min, max], (max − min) / median) of per-round ratios."""
    med = float(np.median(ratios))
    lo, hi = float(ratios.min()), float(ratios.max())
    return med, [lo, hi], (hi - lo) / med


_IMG_S = ("limit_img_s", "fastcxr_img_s", "defaults_img_s")


def summarise(per_round: list[dict]) -> dict:
    """A row's numbers from its rounds (each {"limit_img_s", "fastcxr_img_s"} and, when the
    defaults were measured, "defaults_img_s"): each arm's median img/s (`*_img_s`); per ratio
    the quotient of those medians (`fastcxr_vs_limit`, as the row's columns read), the median
    of the per-round ratios (`fastcxr_vs_limit_median`: each round's arms ran back to back, so
    the machine's drift cancels in it — the figure the table shows) and their [min, max]
    (`*_range`); `wide` (with `wide_reason`) when fewer than `MIN_ROUNDS` rounds ran or a
    ratio's (max − min) / median exceeds `WIDE`."""
    n = len(per_round)
    img = {k: np.array([r[k] for r in per_round], float) for k in _IMG_S if k in per_round[0]}
    fast = img["fastcxr_img_s"]
    spreads = {"fastcxr/limit": _ratio_spread(fast / img["limit_img_s"])}
    row = {
        "limit_img_s": float(np.median(img["limit_img_s"])),
        "fastcxr_img_s": float(np.median(fast)),
    }
    row["fastcxr_vs_limit"] = row["fastcxr_img_s"] / row["limit_img_s"]
    row["fastcxr_vs_limit_median"] = spreads["fastcxr/limit"][0]
    if "defaults_img_s" in img:
        spreads["fastcxr/defaults"] = _ratio_spread(fast / img["defaults_img_s"])
        row["defaults_img_s"] = float(np.median(img["defaults_img_s"]))
        row["fastcxr_vs_defaults"] = row["fastcxr_img_s"] / row["defaults_img_s"]
        row["fastcxr_vs_defaults_median"] = spreads["fastcxr/defaults"][0]
    reasons = _wide_reasons(n, spreads)
    return {
        **row, "rounds": n, "fastcxr_vs_limit_range": spreads["fastcxr/limit"][1],
        "fastcxr_vs_defaults_range": spreads.get("fastcxr/defaults", (None, None))[1],
        "wide": bool(reasons), "wide_reason": "; ".join(reasons) or None,
    }  # fmt: skip


def _wide_reasons(n: int, spreads: dict) -> list[str]:
    """Why a row's ratios are too wide to trust (none: they are not)."""
    reasons = []
    if n < MIN_ROUNDS:
        reasons.append(f"{n} round{'s' * (n != 1)}: at least {MIN_ROUNDS} show the spread")
    for name, (med, (lo, hi), width) in spreads.items():
        if width > WIDE:
            reasons.append(
                f"{name} ranges {lo:.2f} to {hi:.2f} over {n} rounds, {width:.0%} of its "
                f"median {med:.2f} (more than {WIDE:.0%})"
            )
    return reasons


def _rows(stages, styles, measured: dict, defaults: bool) -> list[dict]:
    """The result's rows, per style then stage (the order `bench` has always reported)."""
    rows = []
    for style in styles:
        for st in stages:
            per_round = []
            for m in measured[st.name]:
                rec = {"limit_img_s": m["limit", style]["img_s"]}
                rec["fastcxr_img_s"] = m["fastcxr", style]["img_s"]
                if defaults:
                    rec["defaults_img_s"] = m["defaults", None]["img_s"]
                rec["compile_s"] = {a: m[a, style]["compile_s"] for a in ("limit", "fastcxr")}
                per_round.append(rec)
            rows.append({
                "stage": st.name, "unfreeze": st.unfreeze, "freeze_style": style,
                **summarise(per_round), "compile_s": per_round[0]["compile_s"],
                "per_round": per_round,
            })  # fmt: skip
    return rows


def check_rounds(rounds) -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UsageError(f"--rounds must be a whole number of at least 1, not {rounds!r}")
    return rounds


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def measure_all(jobs: list[BenchJob], stages, rounds: int, defaults: bool, say, progress=None):
    """(`run_rounds`'s measurements, evaluation img/s of the first style's fastcxr loop), with
    the process's global settings restored afterwards and every arm closed."""
    compiled = jobs[0].speed.compile
    with restored_globals():
        if compiled:
            from fastcxr.runtime.adapters import raise_compile_cache_limits

            raise_compile_cache_limits()  # every arm's graphs of a stage, cached together
        arms = build_arms(jobs, defaults, say)
        try:
            measured = run_rounds(arms, stages, rounds, compiled, say, progress)
            eval_ips = arms["fastcxr", jobs[0].style].eval_img_s()
        finally:
            close_arms(arms)
            del arms
            _free(jobs[0].device)
    return measured, eval_ips


def bench_train(
    cfg,
    stages,
    freeze_styles: tuple[str, ...] = ("keras", "fastai"),
    warmup: int = 5,
    steps: int = 20,
    images: int | None = None,
    cache: Path | None = None,
    defaults: bool = True,
    formulation: str = "multilabel",
    device=None,
    project_images: int = 34_000,
    log=None,
    rounds: int = 3,
    progress=None,
) -> dict:
    """Training img/s per stage and freezing style: model-only limit, fastcxr, fastai defaults.

    All run in this process on the same device, architecture, image size and batch size, in
    `rounds` interleaved rounds per stage (`run_rounds`); each row reports the median img/s of
    each arm, the median and range of the per-round ratios fastcxr/limit and fastcxr/defaults
    (what to read), and whether the range is too wide to trust (`WIDE`). Leaves the process's
    global settings as it found them (`restored_globals`). `log(message)` hears what is
    measured; `progress(done, total)` counts the measurements (arms × rounds × stages).
    """
    import torch

    from fastcxr.data.dataset import Dataset, fastcxr_home
    from fastcxr.formulations import get_formulation
    from fastcxr.runtime.fastpath import resolve_speed

    check_rounds(rounds)
    say = log or (lambda what: None)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = cfg.replace(loader="fast")
    speed = resolve_speed(cfg, device)
    form = get_formulation(formulation)
    net = form.networks(cfg.findings)[0]
    per_epoch = cfg.batch_size * (warmup + steps)
    images = images or int(per_epoch / 0.8) + 2 * cfg.batch_size  # train is 80% of the cache
    cache = Path(cache or fastcxr_home() / f"bench-{cfg.size}")
    say(f"image cache: {images} images at {cfg.size}px in {cache}")
    ds = Dataset.load(write_bench_cache(cache, images, cfg.size, speed.workers or None))
    jobs = [
        BenchJob(cfg.replace(freeze_style=s), speed, form, net, ds, warmup, steps, device)
        for s in freeze_styles
    ]
    measured, eval_ips = measure_all(jobs, stages, rounds, defaults, say, progress)
    rows = _rows(stages, freeze_styles, measured, defaults)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": cfg.arch, "size": cfg.size, "batch_size": cfg.batch_size,
        "formulation": formulation, "speed": speed.to_dict(), "warmup": warmup,
        "steps": steps, "rounds": rounds, "wide_threshold": WIDE, "cache": str(cache),
        "cache_images": images, "eval_img_s": eval_ips, "rows": rows,
        "projection": project_compare(rows, eval_ips, cfg.freeze_style, project_images),
    }  # fmt: skip


def project_compare(rows: list[dict], eval_ips: float, style: str, train_images: int) -> dict:
    """Projected time of `fastcxr compare --preset paper` from measured stage throughputs:
    4 networks (2 single, multilabel, multiclass) × the paper's 4 stages × 10 epochs (early
    stopping can only shorten it), each epoch `train_images` trained + 10% as many evaluated."""
    from fastcxr.config import PAPER_STAGES

    by_unfreeze = {r["unfreeze"]: r["fastcxr_img_s"] for r in rows if r["freeze_style"] == style}
    missing = [s.unfreeze for s in PAPER_STAGES if s.unfreeze not in by_unfreeze]
    if missing:
        return {"available": False, "missing_stages": missing}
    valid = train_images // 10
    epoch_s = [train_images / by_unfreeze[s.unfreeze] + valid / eval_ips for s in PAPER_STAGES]
    networks, epochs = 4, PAPER_STAGES[0].max_epochs
    seconds = networks * epochs * sum(epoch_s)
    return {
        "available": True, "train_images": train_images, "valid_images": valid,
        "networks": networks, "epochs_per_stage": epochs, "freeze_style": style,
        "epoch_seconds": dict(zip([s.name for s in PAPER_STAGES], epoch_s)),
        "hours": seconds / 3600,
    }  # fmt: skip
