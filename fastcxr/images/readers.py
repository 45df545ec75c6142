"""`read_image`: any supported image file as a uint8 `size` x `size` array — the one dispatch
of prepare, both training loaders and predict. DICOM (`.dcm`, `.dicom`, or no suffix, as
MIMIC-CXR's files) goes to `fastcxr.dicom` (header checked before the pixel data); PNG and JPG
to PIL. Both readers bound the declared size before decoding and refuse a shape that cannot be
a radiograph (`limits`), each with one error type naming the file: `DicomError`, `ImageError`.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from fastcxr.dicom import read_dicom
from fastcxr.errors import FastcxrError
from fastcxr.images.display import gray_u8, resize_u8
from fastcxr.images.limits import implausible_shape, too_large

DICOM_SUFFIXES = (".dcm", ".dicom", "")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg")
SUFFIXES = (".dcm", ".dicom", *PIL_SUFFIXES)  # what predict looks for in a folder


class ImageError(FastcxrError, ValueError):
    """A PNG/JPG source fastcxr cannot turn into a radiograph; the message names the file."""


def is_dicom(path: Path) -> bool:
    return Path(path).suffix.lower() in DICOM_SUFFIXES


def read_image(path: Path, size: int, mode: str = "voi", *, radiograph: bool = True) -> np.ndarray:
    """A DICOM, PNG or JPG file as a uint8 `size` x `size` array (DICOM in intensity `mode`).

    `radiograph=False` reads an image fastcxr wrote itself (a cache image, a square of the
    cache size, which may be smaller than a radiograph's least side): only the bound on the
    declared size applies to it."""
    path = Path(path)
    if path.exists() and not path.is_file():  # a FIFO would block the reader forever
        raise ImageError(f"{path}: not a regular file (a folder, FIFO or device); not read")
    if is_dicom(path):
        return read_dicom(path, mode=mode, size=size)
    return resize_u8(read_pil(path, radiograph=radiograph), size)


def read_pil(path: Path, *, radiograph: bool = True) -> np.ndarray:
    """A PNG/JPG file's pixels as 8-bit grey, at its own size. The declared size (read from
    the header, nothing decoded yet) is bounded as DICOM's is, so a decompression bomb is an
    unreadable file like any other (`ImageError`), not a crash."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            why = too_large(w, h) or (implausible_shape(h, w) if radiograph else None)
            if why:
                raise ImageError(f"{path}: {why}; not decoded")
            return gray_u8(im)
    except (ImageError, FileNotFoundError):
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"{path}: implausible image size, not decoded ({e})") from None
    except MemoryError:
        raise ImageError(f"{path}: out of memory decoding the image") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        raise ImageError(f"{path}: cannot read image ({_one_line(e)})") from None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


__all__ = [
    "DICOM_SUFFIXES", "PIL_SUFFIXES", "SUFFIXES", "ImageError", "is_dicom", "read_image",
    "read_pil",
]  # fmt: skip
