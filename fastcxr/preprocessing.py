"""The one preprocessing a network sees, recorded once and carried everywhere.

`prepare` turns each source image into the cache with an intensity mode (`voi` or
`mimic-jpg`, see `fastcxr.dicom`) and a squash to `cache_size` (box reduction + Lanczos,
`dicom.resize_u8`); it writes that into `prepare.json`. Both training loaders read the cache
through `from_cache` (another squash when the run's `--size` differs from the cache's). The
same value goes into the run record and every weights sidecar, so `predict` rebuilds exactly
the pixels the network was trained and evaluated on, from the source DICOM.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from fastcxr.errors import FastcxrError, UsageError
from fastcxr.images.display import INTENSITY_MODES, resize_u8
from fastcxr.images.readers import is_dicom, read_image, read_pil

GRAY_MEAN, GRAY_STD = 0.449, 0.226  # ImageNet RGB statistics averaged: a summed 1-channel stem


class CacheError(FastcxrError, ValueError):
    """A cached image that cannot be read while training; the message names the file."""


def read_cached(path: Path, read) -> np.ndarray:
    """`read(path)`, with any failure to decode the image reported as a `CacheError` naming
    the file and the fix."""
    try:
        return read(path)
    except CacheError:
        raise
    except (OSError, ValueError, SyntaxError) as e:  # PIL's and fastcxr.dicom's errors
        why = " ".join(str(e).split()) or type(e).__name__
        raise CacheError(
            f"{path}: unreadable image ({why}); run the same `fastcxr prepare` again to "
            "rebuild the cache (it reconverts what does not verify)"
        ) from None


@dataclass(frozen=True)
class Preprocessing:
    """Source image → the uint8 `size` x `size` array a network takes (before normalisation).

    `cache_size` is None when the manifest names the images themselves (no `prepare.json`):
    they are then resized straight to `size`.
    """

    size: int
    intensity: str = "voi"
    cache_size: int | None = None
    resize: str = "squish (box reduction, then Lanczos)"  # aspect not kept, as the study's
    mean: float = GRAY_MEAN
    std: float = GRAY_STD
    source: str = "manifest images"  # or the prepare.json it was read from

    def __post_init__(self):
        if self.intensity not in INTENSITY_MODES:
            raise UsageError(
                f"unknown intensity mode {self.intensity!r}; choose from {INTENSITY_MODES}"
            )

    @classmethod
    def of_dataset(cls, manifest: Path, size: int) -> Preprocessing:
        """What a run at `size` on `manifest` does (its `prepare.json`, if it has one)."""
        info = Path(manifest).parent / "prepare.json"
        if not info.exists():
            return cls(size=size)
        try:
            d = json.loads(info.read_text())
            return cls(size, d["intensity"], int(d["size"]), source=str(info))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"{info}: unreadable preparation record ({e})") from e

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        """From a sidecar; sidecars written before this record are VOI at `size`."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def to_dict(self) -> dict:
        return asdict(self)

    def image(self, path: Path) -> np.ndarray:
        """A source file (DICOM, PNG, JPG) as the network's uint8 input."""
        first = self.cache_size or self.size
        arr = read_image(Path(path), first, self.intensity)  # as `prepare` made the cache
        return self.from_cache(arr)

    def from_cache(self, arr: np.ndarray) -> np.ndarray:
        """A cache image as the loader hands it to the network."""
        if arr.shape == (self.size, self.size):
            return arr
        return resize_u8(arr, self.size)

    def load(self, path: Path) -> np.ndarray:
        """What both training loaders read: a cache image, or a source DICOM named directly
        by the manifest."""
        path = Path(path)
        if is_dicom(path):
            return read_cached(path, self.image)
        return self.from_cache(read_cached(path, _cached))


def _cached(path: Path) -> np.ndarray:
    """A cache image (or a PNG/JPG the manifest names) at its own size, its declared size
    bounded before decoding; a cache image may be smaller than a radiograph's least side."""
    return read_pil(path, radiograph=False)


__all__ = ["GRAY_MEAN", "GRAY_STD", "CacheError", "Preprocessing", "read_cached"]
