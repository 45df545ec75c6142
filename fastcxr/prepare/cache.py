"""Convert source images into the 8-bit image cache: parallel, resumable, atomic.

Each source image becomes `images/<key>.png` (8-bit grayscale, `size` x `size`). A file that
already exists and opens at the right size is not converted again; a file that cannot be read
is recorded in `failures.csv` (file, reason) and the batch goes on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fastcxr.dicom import DicomError, read_dicom, resize_u8


@dataclass(frozen=True)
class CacheResult:
    converted: int
    skipped: int
    failures: pd.DataFrame  # columns: file, reason


def load_source(path: Path, size: int, mode: str) -> np.ndarray:
    """Any supported source (DICOM, PNG, JPG) as a uint8 `size` x `size` array."""
    if path.suffix.lower() in (".dcm", ".dicom", ""):
        return read_dicom(path, mode=mode, size=size)
    with Image.open(path) as im:
        arr = np.asarray(im.convert("L"))
    return resize_u8(arr, size)


def _cached_ok(dst: Path, size: int) -> bool:
    try:
        with Image.open(dst) as im:
            return im.size == (size, size) and im.mode == "L"
    except Exception:
        return False


def _convert_one(args: tuple[str, str, int, str]) -> tuple[str, str | None, bool]:
    src, dst, size, mode = args
    dst_p = Path(dst)
    if dst_p.exists() and _cached_ok(dst_p, size):
        return src, None, False
    try:
        arr = load_source(Path(src), size, mode)
    except (DicomError, OSError, ValueError) as e:
        return src, str(e), False
    dst_p.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst_p.with_name(f".{dst_p.name}.{os.getpid()}.part")
    Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
    os.replace(tmp, dst_p)
    return src, None, True


def build_cache(
    sources: Sequence[Path],
    targets: Sequence[Path],
    size: int,
    mode: str = "voi",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheResult:
    """Convert `sources[i]` → `targets[i]` in parallel; returns counts and failures."""
    jobs = [(str(s), str(t), size, mode) for s, t in zip(sources, targets)]
    workers = workers or os.cpu_count() or 1
    converted = skipped = 0
    failures = []

    def consume(results):
        nonlocal converted, skipped
        for i, (src, err, did) in enumerate(results, 1):
            if err is not None:
                failures.append((src, err))
            elif did:
                converted += 1
            else:
                skipped += 1
            if progress:
                progress(i, len(jobs))

    if workers == 1 or len(jobs) < 8:
        consume(map(_convert_one, jobs))
    else:
        with ProcessPoolExecutor(workers) as ex:
            consume(ex.map(_convert_one, jobs, chunksize=16))
    return CacheResult(converted, skipped, pd.DataFrame(failures, columns=["file", "reason"]))
