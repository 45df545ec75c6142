"""The preprocessing of a fastcxr export, without fastcxr: pydicom, numpy and Pillow only.

`fastcxr predict RUN ... --export DIR` copies this file into DIR beside the model and its
`export.json`. It turns a radiograph (DICOM, PNG or JPG) into the uint8 size x size array the
exported model takes, pixel for pixel as fastcxr's own `predict` does (a test checks it on
DICOMs of both intensity modes):

    from preprocess import Preprocess
    prep = Preprocess.from_export("DIR")               # reads DIR/export.json
    x = prep.batch(["a.dcm", "b.dcm"])                 # (2, 1, size, size) uint8

    import onnxruntime as ort                          # --format onnx
    sess = ort.InferenceSession("DIR/model.onnx")
    probs = sess.run(None, {"image": x})[0]            # (2, findings) in export.json's order

    python preprocess.py DIR a.dcm b.dcm               # prints each file's array summary

The steps (fastcxr.dicom and fastcxr.preprocessing hold the commented originals):
1. DICOM: the stored pixel values (BitsStored low bits, sign-extended when signed);
2. intensity `voi`: Modality LUT, then the VOI LUT (a LUT sequence, else Window Center/Width
   with its VOI LUT Function, else the image's own min-max), inverted for MONOCHROME1 or a
   Presentation LUT Shape of INVERSE, rounded to 0..255; intensity `mimic-jpg` (how
   MIMIC-CXR-JPG was made): min-max of the stored values to 0..255, MONOCHROME1 inverted, then
   histogram equalisation with OpenCV's rounding;
   PNG/JPG: converted to 8-bit grayscale;
3. squashed to `cache_size` x `cache_size` (the prepared cache), then to `size` x `size` when
   the run trained at another size: Pillow's Lanczos with `reducing_gap=1.5`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.multival import MultiValue
from pydicom.pixels import apply_modality_lut, apply_voi_lut

DICOM_SUFFIXES = (".dcm", ".dicom", "")


class Preprocess:
    """Source file → the exported model's uint8 input."""

    def __init__(self, size: int, intensity: str = "voi", cache_size: int | None = None):
        if intensity not in ("voi", "mimic-jpg"):
            raise ValueError(f"unknown intensity mode {intensity!r}")
        self.size, self.intensity, self.cache_size = int(size), intensity, cache_size

    @classmethod
    def from_export(cls, folder: str | Path) -> Preprocess:
        p = json.loads((Path(folder) / "export.json").read_text())["preprocessing"]
        return cls(p["size"], p.get("intensity", "voi"), p.get("cache_size"))

    def __call__(self, path: str | Path) -> np.ndarray:
        """(size, size) uint8."""
        path = Path(path)
        first = self.cache_size or self.size
        if path.suffix.lower() in DICOM_SUFFIXES:
            img = dicom_display(path, self.intensity)
        else:
            with Image.open(path) as im:
                img = gray_u8(im)
        return squash(squash(img, first), self.size)

    def batch(self, paths) -> np.ndarray:
        """(n, 1, size, size) uint8, the model's input."""
        return np.stack([self(p) for p in paths])[:, None]


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


def dicom_display(path: str | Path, intensity: str = "voi") -> np.ndarray:
    ds = pydicom.dcmread(path)
    arr = stored_values(ds.pixel_array, ds)
    if intensity == "voi":
        return display_voi(arr, ds)
    return equalize_hist(mimic_scale(arr, ds))


def stored_values(arr: np.ndarray, ds) -> np.ndarray:
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if arr.dtype.kind not in "iu" or bits >= arr.dtype.itemsize * 8:
        return arr
    if arr.dtype.kind == "u" and int(ds.get("PixelRepresentation", 0)) == 0:
        return np.bitwise_and(arr, np.array((1 << bits) - 1, arr.dtype))
    v = arr.astype(np.int64) & ((1 << bits) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v.astype(np.int32)


def scale01(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    return np.clip((values.astype(np.float32) - lo) / (hi - lo), 0.0, 1.0)


def first_number(value) -> float | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, MultiValue)):
        return float(value[0]) if len(value) else None
    return float(value)


def window01(values: np.ndarray, center: float, width: float, function: str = "LINEAR"):
    x = np.asarray(values, np.float64)
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((x - center) / width + 0.5, 0.0, 1.0)
    if width == 1:
        return (x > center - 0.5).astype(np.float64)
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def display_voi(arr: np.ndarray, ds) -> np.ndarray:
    values = apply_modality_lut(arr, ds)
    center = first_number(ds.get("WindowCenter"))
    width = first_number(ds.get("WindowWidth"))
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        img = scale01(apply_voi_lut(values, ds, index=0, prefer_lut=True), 0.0, 2.0**bits - 1)
    elif center is not None and width is not None:
        function = str(ds.get("VOILUTFunction", "") or "LINEAR").strip().upper()
        img = window01(values, center, width, function).astype(np.float32)
    else:
        img = scale01(values, float(values.min()), float(values.max()))
    mono1 = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    inverse = str(ds.get("PresentationLUTShape", "") or "").strip().upper() == "INVERSE"
    if mono1 or inverse:
        img = 1.0 - img
    return np.rint(img * 255).astype(np.uint8)


def mimic_scale(arr: np.ndarray, ds) -> np.ndarray:
    img = np.rint(scale01(arr, float(arr.min()), float(arr.max())) * 255).astype(np.uint8)
    if str(ds.PhotometricInterpretation).strip() == "MONOCHROME1":
        img = 255 - img
    return img


def equalize_hist(img: np.ndarray) -> np.ndarray:
    hist = np.bincount(img.ravel(), minlength=256)
    first = int(np.flatnonzero(hist)[0])
    if hist[first] == img.size:
        return np.full_like(img, first)
    lut = np.zeros(256, np.float64)
    lut[first + 1 :] = np.cumsum(hist[first + 1 :]) * (255.0 / (img.size - hist[first]))
    return np.clip(np.rint(lut), 0, 255).astype(np.uint8)[img]


def squash(img: np.ndarray, size: int) -> np.ndarray:
    if img.shape == (size, size):
        return img
    pil = Image.fromarray(img)
    return np.asarray(pil.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=1.5))


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit("usage: python preprocess.py EXPORT_DIR IMAGE [IMAGE ...]")
    prep = Preprocess.from_export(sys.argv[1])
    for f in sys.argv[2:]:
        a = prep(f)
        print(f"{f}: {a.shape[0]}x{a.shape[1]} uint8, mean {a.mean():.2f}")
