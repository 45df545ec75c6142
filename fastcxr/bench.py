"""Benchmarks that print a ratio against a baseline measured in the same run."""

from __future__ import annotations

import os
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from fastai.callback.core import Callback, CancelFitException, CancelValidException
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fastcxr.formulations import powerset_bits
from fastcxr.prepare.cache import convert_one, map_stoppable
from fastcxr.prepare.synthetic import encode_dicom, render_frontal
from fastcxr.stopping import Interrupted, check

# Every measurement loop checks `fastcxr.stopping.STOP` (set by the CLI on SIGTERM/SIGINT)
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

    from fastcxr.runs import write_csv

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
    from fastcxr.runs import write_atomic

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


def _sync_fn(device):
    from fastcxr.fastpath import synchronize

    return partial(synchronize, device)


def _free(device) -> None:
    import gc

    import torch

    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def _fresh_compile_cache() -> None:
    """Forget compiled graphs: the same architecture would otherwise reuse the previous
    measurement's graphs, and its compile time would read 0."""
    import torch._dynamo

    torch._dynamo.reset()


def _limit(cfg, speed, form, net, stages, warmup, steps, device) -> list[dict]:
    """The model-only limit: the same model, stage, precision, layout, compile and optimizer,
    trained by a bare PyTorch loop on random tensors already on the device."""
    import torch
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from fastcxr.fastpath import compiled_graphs, fused_adamw
    from fastcxr.models import block_splitter, build_model
    from fastcxr.schedule import apply_stage, frozen_bn_eval, stage_lrs

    model = build_model(cfg.arch, form.n_out(net), pretrained=False).to(device)
    if speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    g = torch.Generator(device=device).manual_seed(0)
    bs = cfg.batch_size
    x = torch.randn(bs, 1, cfg.size, cfg.size, device=device, generator=g)
    if speed.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = form.targets(np.random.default_rng(0).integers(0, 2, (bs, len(net.findings))))
    y = torch.as_tensor(y, device=device)
    loss_fn = form.loss(net, powerset_bits(len(net.findings)), device=device)
    learn = Learner(
        DataLoaders(), model, loss_func=loss_fn, splitter=block_splitter,
        opt_func=fused_adamw(speed), train_bn=cfg.freeze_style == "fastai",
    )  # fmt: skip
    if speed.compile:
        _fresh_compile_cache()
        model.compile(backend=speed.compile_backend, dynamic=False)
    sync = _sync_fn(device)
    dev_type = torch.device(device).type
    bf16 = speed.precision == "bf16"
    rows = []
    for st in stages:
        unfrozen = apply_stage(learn, st)
        learn.opt.set_hypers(lr=stage_lrs(learn, len(unfrozen), st.lr, cfg.lr_ratio))

        def step(opt=learn.opt.opt) -> None:
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=bf16):
                out = model(x)
            loss_fn(out.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        model.train()
        if cfg.freeze_style == "keras":
            frozen_bn_eval(model)
        what = f"bench (model-only limit, stage {st.name}, {cfg.freeze_style} freezing)"
        compiling = 0.0
        for _ in range(max(warmup, 1)):  # steps that compiled graphs count as compile time
            check(what)
            sync()
            t0, graphs = time.perf_counter(), compiled_graphs()
            step()
            sync()
            if compiled_graphs() != graphs:
                compiling += time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(steps):
            check(what)
            step()
        sync()
        rows.append({"img_s": steps * bs / (time.perf_counter() - t0), "compile_s": compiling})
    return rows


def _fastcxr(ds, cfg, speed, form, net, stages, warmup, steps, device) -> tuple[list[dict], float]:
    """fastcxr's real training loop (fast loader, `Accelerated`, its schedule's freezing) on
    the cache; returns per-stage throughput and evaluation (inference) img/s."""
    from fastcxr.data import apply_policy, network_data
    from fastcxr.schedule import FrozenBNEval, apply_stage, stage_lrs
    from fastcxr.study import make_learner, seed_everything

    df = apply_policy(ds.df, cfg, net.findings)
    if speed.compile:
        _fresh_compile_cache()
    seed_everything(cfg.seed, speed)
    nd = network_data(df, ds.root, form, net, cfg, device=device, speed=speed)
    learn = make_learner(nd, form, net, cfg)
    sync = _sync_fn(device)
    rows = []
    for st in stages:
        unfrozen = apply_stage(learn, st)
        what = f"bench (fastcxr, stage {st.name}, {cfg.freeze_style} freezing)"
        tp = Throughput(warmup, steps, sync, what)
        cbs = [tp] + ([FrozenBNEval()] if cfg.freeze_style == "keras" else [])
        before = learn.accelerated.compile_seconds
        lrs = stage_lrs(learn, len(unfrozen), st.lr, cfg.lr_ratio)
        learn.fit(10_000, lr=lrs, wd=cfg.weight_decay, cbs=cbs)
        rows.append({
            "img_s": tp.images / tp.seconds,
            "compile_s": learn.accelerated.compile_seconds - before,
        })  # fmt: skip
    check("bench (evaluation)")
    learn.get_preds(dl=nd.dls.valid)  # warm the evaluation path (and its compiled graph)
    sync()
    check("bench (evaluation)")
    t0 = time.perf_counter()
    learn.get_preds(dl=nd.dls.valid)
    sync()
    eval_ips = len(nd.valid) / (time.perf_counter() - t0)
    return rows, eval_ips


def _defaults(ds, cfg, form, net, stages, warmup, steps, device) -> list[dict]:
    """What a user would otherwise write: a plain image DataBlock (RGB PILImage, fastai's
    batch augmentation and ImageNet normalisation) and `vision_learner(...).to_bf16()` with
    fastai's defaults (Adam, train_bn=True, default workers); stages via the block splitter."""
    import torch
    from fastai.data.block import DataBlock
    from fastai.data.transforms import ColReader, ColSplitter, Normalize
    from fastai.vision.augment import aug_transforms
    from fastai.vision.core import imagenet_stats
    from fastai.vision.data import ImageBlock
    from fastai.vision.learner import vision_learner

    from fastcxr.data import apply_policy
    from fastcxr.fastpath import AUGMENT
    from fastcxr.models import TorchvisionArch, block_splitter
    from fastcxr.schedule import apply_stage, stage_lrs
    from fastcxr.study import silence

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
    dls = block.dataloaders(df, bs=cfg.batch_size, device=device)
    arch = TorchvisionArch(cfg.arch)  # torchvision's builder, as `vision_learner(dls, resnet152)`
    learn = vision_learner(
        dls, arch, n_out=form.n_out(net), pretrained=False, cut=arch.cut,
        loss_func=form.loss(net, powerset_bits(len(net.findings)), device=device),
        splitter=block_splitter, metrics=[],
    )  # fmt: skip
    if torch.device(device).type == "cuda":
        learn = learn.to_bf16()
    silence(learn)
    sync = _sync_fn(device)
    rows = []
    for st in stages:
        unfrozen = apply_stage(learn, st)
        tp = Throughput(warmup, steps, sync, f"bench (fastai defaults, stage {st.name})")
        learn.fit(10_000, lr=stage_lrs(learn, len(unfrozen), st.lr, cfg.lr_ratio), cbs=[tp])
        rows.append({"img_s": tp.images / tp.seconds})
    return rows


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
) -> dict:
    """Training img/s per stage and freezing style: model-only limit, fastcxr, fastai defaults.

    All three run in this process, one after another, on the same device, architecture, image
    size and batch size; the ratios fastcxr/limit and fastcxr/defaults are what to read.
    """
    import torch

    from fastcxr.fastpath import resolve_speed
    from fastcxr.formulations import get_formulation
    from fastcxr.study import Dataset, fastcxr_home

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    cfg = cfg.replace(loader="fast")
    speed = resolve_speed(cfg, device)
    form = get_formulation(formulation)
    net = form.networks(cfg.findings)[0]
    per_epoch = cfg.batch_size * (warmup + steps)
    images = images or int(per_epoch / 0.8) + 2 * cfg.batch_size  # train is 80% of the cache
    cache = Path(cache or fastcxr_home() / f"bench-{cfg.size}")

    def say(what: str) -> None:
        if log:
            log(what)

    say(f"image cache: {images} images at {cfg.size}px in {cache}")
    ds = Dataset.load(write_bench_cache(cache, images, cfg.size, speed.workers or None))

    rows, eval_ips = [], None
    # the limit and fastcxr with fastcxr's cuDNN setting; the defaults with torch's (off)
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = speed.cudnn_benchmark
    for style in freeze_styles:
        scfg = cfg.replace(freeze_style=style)
        say(f"model-only limit, {style} freezing")
        limit = _limit(scfg, speed, form, net, stages, warmup, steps, device)
        _free(device)  # the previous model's memory, before the next one is built
        say(f"fastcxr, {style} freezing")
        fast, e_ips = _fastcxr(ds, scfg, speed, form, net, stages, warmup, steps, device)
        _free(device)
        eval_ips = eval_ips or e_ips
        for st, lim, fc in zip(stages, limit, fast):
            rows.append({
                "stage": st.name, "unfreeze": st.unfreeze, "freeze_style": style,
                "limit_img_s": lim["img_s"], "fastcxr_img_s": fc["img_s"],
                "fastcxr_vs_limit": fc["img_s"] / lim["img_s"],
                "compile_s": {"limit": lim["compile_s"], "fastcxr": fc["compile_s"]},
            })  # fmt: skip
    if defaults:
        say("fastai defaults")
        torch.backends.cudnn.benchmark = False
        base = _defaults(ds, cfg, form, net, stages, warmup, steps, device)
        for r in rows:
            d = base[[s.name for s in stages].index(r["stage"])]["img_s"]
            r["defaults_img_s"] = d
            r["fastcxr_vs_defaults"] = r["fastcxr_img_s"] / d
    torch.backends.cudnn.benchmark = saved
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": cfg.arch, "size": cfg.size, "batch_size": cfg.batch_size,
        "formulation": formulation, "speed": speed.to_dict(), "warmup": warmup,
        "steps": steps, "cache": str(cache), "cache_images": images,
        "eval_img_s": eval_ips, "rows": rows,
        "projection": project_compare(rows, eval_ips, cfg.freeze_style, project_images),
    }  # fmt: skip
    return result


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
