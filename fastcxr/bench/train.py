"""Benchmarks that print a ratio against a baseline measured in the same run.

`bench_prepare` (`bench.prepare`): DICOM → cache conversion, fastcxr's converter against a
plain one.
`bench_train`: training img/s of three arms — the model-only limit, fastcxr's loop, fastai's
defaults — measured in interleaved rounds (limit, fastcxr, defaults, repeated), so that drift
of a shared machine reaches every arm of a round alike; each ratio is the median of the per-round
ratios, with its range (`summarise`), and a row whose range is too wide (`WIDE`) says so.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from fastcxr.bench.arms import BenchJob, build_arms, close_arms, restored_globals, run_rounds
from fastcxr.errors import UsageError
from fastcxr.prepare.cache import map_stoppable
from fastcxr.prepare.synthetic import render_frontal
from fastcxr.results import BenchResult
from fastcxr.runtime.runs import writable_folder
from fastcxr.runtime.stopping import Interrupted

# Every measurement loop checks `fastcxr.runtime.stopping.STOP` (set by the CLI on SIGTERM/SIGINT)
# between steps and raises `Interrupted`: a stopped benchmark records nothing.

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
    writable_folder(folder / "images")  # --cache a file or a read-only place: one line
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


# -- interleaved rounds ---------------------------------------------------------------------
WIDE = 0.25
"""A row is too wide to trust when, for either of its ratios, (max − min) / median over the
rounds exceeds `WIDE`: the ratio then moves by more than a quarter with the machine's drift
(two identical CPU runs once read conv5 fastcxr/limit 1.12 and 0.73)."""
MIN_ROUNDS = 3  # fewer rounds show no spread worth trusting: such a row is always "wide"


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
) -> BenchResult:
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
    return BenchResult.from_json({
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": cfg.arch, "size": cfg.size, "batch_size": cfg.batch_size,
        "formulation": formulation, "speed": speed.to_dict(), "warmup": warmup,
        "steps": steps, "rounds": rounds, "wide_threshold": WIDE, "cache": str(cache),
        "cache_images": images, "eval_img_s": eval_ips, "rows": rows,
        "projection": project_compare(rows, eval_ips, cfg.freeze_style, project_images),
    })  # fmt: skip


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
