"""`fastcxr bench-prepare`: DICOM → cache conversion, fastcxr's converter against a plain one
measured in the same run."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fastcxr.prepare.cache import convert_one
from fastcxr.prepare.synthetic import encode_dicom, render_frontal
from fastcxr.results import PrepareBench
from fastcxr.runtime.stopping import check

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
) -> PrepareBench:
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
    return PrepareBench.from_json({
        "images": n, "rows": int(shape.Rows), "cols": int(shape.Columns),
        "bits_stored": int(shape.BitsStored), "size": size,
        "baseline_images_per_s_per_core": base, "fastcxr_images_per_s_per_core": fast,
        "ratio": fast / base,
        "mimic_minutes_on_16_cores": MIMIC_IMAGES / (fast * 16) / 60,
        "mimic_minutes_on_this_machine": MIMIC_IMAGES / (fast * cores) / 60, "cores": cores,
    })  # fmt: skip
