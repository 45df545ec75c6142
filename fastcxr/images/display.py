"""Pixels for display: a DICOM's stored values as 8-bit grey in one of the two intensity modes
(`voi`: the DICOM display pipeline; `mimic-jpg`: how MIMIC-CXR-JPG was made, see
`fastcxr.dicom`), an image file's greys as 8 bits, and the resize to the network's size."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from fastcxr.errors import FastcxrError

INTENSITY_MODES = ("voi", "mimic-jpg")

# What a tag of the wrong form raises, read by us (float(), an index) or applied by pydicom's
# LUT functions: a value that is no number, a sequence too short, an item without its tag.
TAG_ERRORS = (ValueError, TypeError, IndexError, KeyError, AttributeError, OverflowError)


class TagError(FastcxrError, ValueError):
    """A display tag (Modality LUT, VOI LUT, window) that cannot be applied; the reader adds
    the file's path."""


@contextlib.contextmanager
def _tags(what: str) -> Iterator[None]:
    try:
        yield
    except TAG_ERRORS as e:
        raise TagError(f"{what}: {type(e).__name__}: {e}") from e


def to_display(arr: np.ndarray, ds: pydicom.Dataset, mode: str = "voi") -> np.ndarray:
    """`display_voi` / `display_mimic_jpg`, computed once per stored value as a lookup table.

    Every step before equalisation maps one stored value to one display value, so the table
    (at most 2^16 entries for 12–16-bit data) gives the very same pixels as the per-pixel
    float pipeline at a fraction of the cost on a 3000x2500 radiograph.
    """
    fn = display_voi if mode == "voi" else _mimic_scale
    lo, hi = (int(arr.min()), int(arr.max())) if arr.size else (0, 0)
    no_mlut = "ModalityLUTSequence" not in ds
    if arr.dtype.kind == "u" and 0 <= lo <= hi < 1 << 16 and no_mlut:
        table = np.zeros(hi + 1, np.uint8)
        table[lo:] = fn(np.arange(lo, hi + 1, dtype=np.int64), ds)
        img = np.take(table, arr)  # indexes straight by the stored value
    elif arr.dtype.kind in "iu" and hi - lo <= 1 << 16 and no_mlut:
        img = fn(np.arange(lo, hi + 1, dtype=np.int64), ds)[arr.astype(np.int64) - lo]
    else:
        img = fn(arr, ds)
    return equalize_hist(img) if mode == "mimic-jpg" else img


def _mimic_scale(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    img = np.rint(_scale01(arr, float(arr.min()), float(arr.max())) * 255).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        img = 255 - img
    return img


def _first_number(value) -> float | None:
    """A DS/IS value, or the first of several (VM > 1); None when empty."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def window01(values: np.ndarray, center: float, width: float, function: str = "LINEAR"):
    """The VOI window (PS3.3 C.11.2.1.2) onto 0..1, whatever range the Modality LUT output
    spans: LINEAR (C.11.2.1.2.1), LINEAR_EXACT (C.11.2.1.3.2) or SIGMOID (C.11.2.1.3.1)."""
    x = np.asarray(values, np.float64)
    if function == "SIGMOID":
        if width <= 0:
            raise TagError(f"Window Width {width} must be > 0 for SIGMOID")
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        if width <= 0:
            raise TagError(f"Window Width {width} must be > 0 for LINEAR_EXACT")
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if function != "LINEAR":
        raise TagError(f"unknown VOI LUT Function {function!r}")
    if width < 1:
        raise TagError(f"Window Width {width} must be >= 1 for LINEAR")
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def _inverted(ds: pydicom.Dataset) -> bool:
    """Whether low values are shown bright. MONOCHROME1 says so, and so does a Presentation
    LUT Shape of INVERSE; the standard pairs the two (PS3.3 C.7.6.1.1 / C.8.11.7: INVERSE
    "shall be used if Photometric Interpretation is MONOCHROME1"), so together they are one
    inversion, not two."""
    mono1 = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    return mono1 or inverse


def display_voi(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored values → uint8 via Modality LUT, VOI LUT/window and inversion (MONOCHROME1 or
    Presentation LUT Shape INVERSE)."""
    with _tags("Modality LUT"):
        values = apply_modality_lut(arr, ds)
    with _tags("window"):
        center = _first_number(ds.get("WindowCenter"))
        width = _first_number(ds.get("WindowWidth"))
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        with _tags("VOI LUT"):
            bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
            lut = apply_voi_lut(values, ds, index=0, prefer_lut=True)
        img = _scale01(lut, 0.0, 2.0**bits - 1)
    elif center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        img = window01(values, center, width, function).astype(np.float32)
    else:  # no VOI information: the full range of this image
        img = _scale01(values, float(values.min()), float(values.max()))
    if _inverted(ds):
        img = 1.0 - img  # low values are bright; flip so that dense tissue is bright
    return np.rint(img * 255).astype(np.uint8)


def display_mimic_jpg(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """The MIMIC-CXR-JPG conversion: min-max → 0..255, MONOCHROME1 inverted, equalised."""
    return equalize_hist(_mimic_scale(arr, ds))


def _scale01(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def equalize_hist(img: np.ndarray) -> np.ndarray:
    """Histogram equalisation with OpenCV's `equalizeHist` rounding (imgproc/histogram.cpp)."""
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    total = img.size
    if hist[first] == total:
        return np.full_like(img, first)
    scale = 255.0 / (total - hist[first])
    lut = np.zeros(256, np.float64)
    lut[first + 1 :] = np.cumsum(hist[first + 1 :]) * scale
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)[img]


def gray_u8(im: Image.Image) -> np.ndarray:
    """An image file's pixels as 8-bit grey. 16-bit greys (PNG "I;16", or "I") are scaled
    to 0..255 by their bit depth, where PIL's `convert("L")` would clip them to 255: a 16-bit
    copy of an 8-bit image (every value a multiple of 257) gives the 8-bit image back; other
    values are read as the fewest of 8, 10, 12, 14 or 16 bits that hold the largest value (a
    12-bit radiograph stored in 16 bits, values < 4096, is scaled by 255/4095, not darkened
    16-fold by 255/65535). Other modes (RGB, palette, 8-bit grey) convert as PIL does."""
    if im.mode.startswith("I;16") or im.mode == "I":
        a = np.asarray(im).astype(np.float64)
        if a.size and not (a % 257).any():
            return np.clip(a / 257.0, 0, 255).astype(np.uint8)
        top = float(a.max()) if a.size else 0.0
        bits = next((b for b in (8, 10, 12, 14) if top < 2**b), 16)
        return np.clip(np.rint(a * (255.0 / (2**bits - 1))), 0, 255).astype(np.uint8)
    if im.mode == "F":
        return np.clip(np.rint(np.asarray(im, np.float64)), 0, 255).astype(np.uint8)
    return np.asarray(im.convert("L"))


def resize_u8(img: np.ndarray, size: int) -> np.ndarray:
    """Squash to `size` x `size` (as the study's 512x512), antialiased: a box reduction by
    an integer factor while the image is over 1.5x the target, then Lanczos."""
    if img.shape == (size, size):
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=1.5))


__all__ = [
    "INTENSITY_MODES", "TAG_ERRORS", "TagError", "display_mimic_jpg", "display_voi",
    "equalize_hist", "gray_u8", "resize_u8", "to_display", "window01",
]  # fmt: skip
