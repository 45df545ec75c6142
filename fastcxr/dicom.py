"""Read a radiograph DICOM as a display-ready 8-bit grayscale array.

Two intensity modes, recorded with every prepared dataset and model:

* ``voi`` — the DICOM display pipeline (PS3.3 C.11): stored values with unused high bits
  removed (BitsStored), Modality LUT (RescaleSlope/Intercept or a LUT sequence), VOI LUT or
  WindowCenter/WindowWidth, then shown so that dense tissue is bright: MONOCHROME1 or a
  Presentation LUT Shape of INVERSE is inverted.
* ``mimic-jpg`` — how MIMIC-CXR-JPG was made from the DICOMs (MIT-LCP/mimic-cxr issue #16):
  raw ``pixel_array`` min-max scaled to 0..255, MONOCHROME1 inverted, then histogram
  equalisation (OpenCV's ``equalizeHist``). No VOI LUT. A model trained on the JPG release
  sees the same images when fed DICOMs in this mode.

Reading is defensive, because a prepared dataset is a batch of hundreds of thousands of files
from many sources: the header is read and checked first (modality, frames, photometric
interpretation, declared size, decoder) and only then the pixel data, so that a file that
declares a huge image — a deflated "decompression bomb", an oversized element, a compressed
codestream larger than its header says — is refused before it is inflated or decoded. Every
refusal is a `DicomError` whose message is one line, naming the file and the reason.
"""

from __future__ import annotations

import os
import re
import struct
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import FileDataset
from pydicom.encaps import generate_frames
from pydicom.errors import BytesLengthException, InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_dataset, read_partial, read_preamble
from pydicom.pixels import get_decoder
from pydicom.uid import DeflatedExplicitVRLittleEndian

from fastcxr.errors import FastcxrError, UsageError
from fastcxr.images.codestream import codestream_geometry, has_end_marker

# also fastcxr.dicom's names, as before the images package
from fastcxr.images.display import (  # noqa: F401
    INTENSITY_MODES,
    TAG_ERRORS,
    TagError,
    display_mimic_jpg,
    display_voi,
    equalize_hist,
    gray_u8,
    resize_u8,
    to_display,
    window01,
)  # fmt: skip
from fastcxr.images.limits import (  # noqa: F401
    MAX_ASPECT,
    MAX_PIXELS,
    MAX_SIDE,
    MIN_SIDE,
    implausible_shape,
    too_large,
)  # fmt: skip

# The dataset before the pixel data, inflated: a radiograph's header is tens of KB.
MAX_HEADER_BYTES = 16 << 20
# Room for what may follow the pixel data (padding, signatures, private elements).
TRAILER_BYTES = 16 << 20
# Projection radiography: Computed Radiography, Digital X-Ray, and the retired DR.
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")

# Pixel Data, Float Pixel Data, Double Float Pixel Data: where a header ends.
_PIXEL_TAGS = {0x7FE00010: "pixel data", 0x7FE00008: "float pixel data"} | {
    0x7FE00009: "float pixel data"
}
_UNDEFINED = 0xFFFFFFFF

# What to install for each family of compressed transfer syntax (pydicom's plugins). The
# first key found in the transfer syntax's name wins, so JPEG 2000 and JPEG-LS come first.
_CODEC_HINTS = {
    "JPEG 2000": "pip install 'fastcxr[codecs]' (pylibjpeg + pylibjpeg-openjpeg)",
    "JPEG-LS": "pip install 'fastcxr[codecs]' (pylibjpeg + pylibjpeg-libjpeg), or pyjpegls",
    "JPEG": "pip install 'fastcxr[codecs]' (pylibjpeg + pylibjpeg-libjpeg)",
    "RLE": "pip install pylibjpeg pylibjpeg-rle",
}
_UNSUPPORTED = re.compile(r"does ?n[o']t support|not supported|unsupported|no .*support", re.I)


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


# What pydicom's readers and decoders (and our checks of header values) raise for malformed
# data; MemoryError, NameError (a bug) and the like propagate.
PARSE_ERRORS = (*TAG_ERRORS, ZeroDivisionError, struct.error, EOFError, NotImplementedError,
                RuntimeError, OSError, BytesLengthException, zlib.error)  # fmt: skip


class DicomError(FastcxrError, ValueError):
    """A DICOM file fastcxr cannot turn into a radiograph; the one-line message says why."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(_one_line(str(message)), *args)


class NotARadiograph(DicomError):
    """A DICOM file of another modality (CT, MR, US, …) where a projection radiograph is
    expected; refused from its header alone."""


class DicomFileNotFound(DicomError, FileNotFoundError):
    """No file at the path (also a `FileNotFoundError`, for callers that catch that)."""


def read_dicom(
    path: str | Path,
    *,
    mode: str = "voi",
    size: int | None = None,
    modalities: tuple[str, ...] | None = None,
) -> np.ndarray:
    """Read `path` as a uint8 (H, W) display image, resized to `size` x `size` if given.

    With `modalities` (e.g. `RADIOGRAPH_MODALITIES`) a file whose Modality tag is set to
    anything else raises `NotARadiograph` before its pixel data is read; a file without a
    Modality tag is kept.
    """
    if mode not in INTENSITY_MODES:
        raise UsageError(f"unknown intensity mode {mode!r}; choose from {INTENSITY_MODES}")
    with _named_warnings(path):
        ds = _read_dataset(path, modalities)
        arr = _decode(ds, path)
    try:
        img = to_display(arr, ds, mode)
    except TagError as e:  # e.g. a VOI LUT or window tag that cannot be applied
        raise DicomError(f"{path}: cannot apply display tags ({e})") from e
    return resize_u8(img, size) if size else img


class DicomWarning(UserWarning):
    """Something pydicom noticed in a file it could still read, with the file named."""


@contextmanager
def _named_warnings(path):
    """pydicom's warnings about a file (excess padding, a VR it corrected) say which file:
    caught while it reads `path` and warned again as `DicomWarning("PATH: …")`, once each
    (also when the file is then refused)."""
    caught: list = []
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        seen = dict.fromkeys(str(c.message) for c in caught if issubclass(c.category, UserWarning))
        for msg in seen:
            warnings.warn(f"{path}: {msg}", DicomWarning, stacklevel=3)


def read_header(path: str | Path) -> pydicom.FileDataset:
    """The dataset up to (not including) the pixel data: no pixel data is read or inflated."""
    with _open(path) as f:
        return _Reader(f, path).header()


def read_modality(path: str | Path) -> str:
    """The file's Modality tag (upper case, '' when absent), from its header alone."""
    return _modality(read_header(path))


def not_a_radiograph_reason(modality: str, modalities: tuple[str, ...]) -> str:
    return (
        f"modality {modality} is not a projection radiograph "
        f"(--modalities {','.join(modalities)} to change)"
    )


def _modality(ds: pydicom.Dataset) -> str:
    return str(ds.get("Modality", "") or "").strip().upper()


# --- reading: header first, then the pixel data --------------------------------------------


def _open(path: str | Path):
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise DicomFileNotFound(f"no such file: {path}") from None
    except OSError as e:
        raise DicomError(f"{path}: cannot open ({e.strerror or e})") from e


class _Tracked:
    """A file wrapper that notes a read cut short by the end of the file (a truncated file)."""

    def __init__(self, f, name: str) -> None:
        self._f, self.name, self.short = f, name, False

    def read(self, n: int | None = -1) -> bytes:
        b = self._f.read(n)
        if n is not None and n > 0 and 0 < len(b) < n:
            self.short = True
        return b

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()


class _TooLarge(Exception):
    pass


class _Inflated(_Tracked):
    """A deflated dataset (PS3.5 A.5) as a seekable stream, inflated only as far as it is
    read and never past `limit` bytes — pydicom itself inflates the whole file at once."""

    def __init__(self, raw, name: str, limit: int) -> None:
        super().__init__(raw, name)
        self.limit, self.over, self.cut = limit, False, False
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._ended = False

    def _fill(self, n: int) -> None:
        target = min(n, self.limit + 1)
        while len(self._buf) < target and not self._ended:
            src = self._z.unconsumed_tail or self._f.read(1 << 16)
            if not src:  # the compressed input is used up
                self._buf += self._z.flush()
                self._ended, self.cut = True, not self._z.eof
                break
            self._buf += self._z.decompress(src, max(1, min(target - len(self._buf), 1 << 24)))
            self._ended = self._z.eof
        if len(self._buf) > self.limit:
            self.over = True
            raise _TooLarge

    def read(self, n: int | None = -1) -> bytes:
        self._fill(self.limit + 1 if n is None or n < 0 else self._pos + n)
        end = len(self._buf) if n is None or n < 0 else min(self._pos + n, len(self._buf))
        with memoryview(self._buf) as view:
            out = bytes(view[self._pos : end])
        if n is not None and n > 0 and 0 < len(out) < n:
            self.short = True
        self._pos = max(self._pos, end)
        return out

    def seek(self, offset: int, whence: int = 0) -> int:
        if whence == 2:
            self._fill(self.limit + 1)
        base = (0, self._pos, len(self._buf))[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def tell(self) -> int:
        return self._pos


class _PixelStop:
    """`stop_when` for pydicom: stop at the top-level pixel data element; remember it."""

    def __init__(self) -> None:
        self.tag: int | None = None
        self.length = 0

    def __call__(self, tag, vr, length) -> bool:
        if int(tag) in _PIXEL_TAGS:
            self.tag, self.length = int(tag), int(length)
            return True
        return False


class _Reader:
    def __init__(self, f, path: str | Path) -> None:
        self.f, self.path, self.name = f, path, str(path)
        self.stop = _PixelStop()
        self.fp: _Tracked | None = None
        self.deflated = False
        self.pixel_offset = 0

    def header(self) -> FileDataset:
        """Read up to the pixel data element and stop there (`self.stop` says which)."""
        path = self.path
        try:
            preamble = read_preamble(self.f, False)
            file_meta = _read_file_meta_info(self.f)
            self.deflated = file_meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian
            if self.deflated:
                self.fp = _Inflated(self.f, self.name, MAX_HEADER_BYTES)
                dataset = read_dataset(self.fp, False, True, stop_when=self.stop)
                ds = FileDataset(self.name, dataset, preamble, file_meta, False, True)
                ds.set_original_encoding(False, True, dataset.original_character_set)
            else:
                self.f.seek(0)
                self.fp = _Tracked(self.f, self.name)
                ds = read_partial(self.fp, stop_when=self.stop)  # type: ignore[arg-type]
        except InvalidDicomError as e:
            # pydicom's "Use force=True …" hint is advice to a pydicom programmer, not to us
            why = str(e).split(" Use force=True")[0].rstrip(" .")
            raise DicomError(f"{path}: not a DICOM file ({why})") from e
        except _TooLarge:
            raise DicomError(
                f"{path}: the deflated header inflates past {MAX_HEADER_BYTES >> 20} MB "
                "before any pixel data; refused (a decompression bomb, or not a radiograph)"
            ) from None
        except PARSE_ERRORS as e:  # truncated headers raise a variety of errors inside pydicom
            if self._cut():
                raise DicomError(f"{path}: truncated file (it ends inside the header)") from e
            raise DicomError(f"{path}: unreadable DICOM header ({type(e).__name__}: {e})") from e
        if self.stop.tag is None and self._cut():
            raise DicomError(f"{path}: truncated file (it ends inside the header)")
        self.pixel_offset = self.fp.tell()
        return ds

    def _cut(self) -> bool:
        fp = self.fp
        return fp is not None and (fp.short or getattr(fp, "cut", False))

    def rest(self, ds: FileDataset, expected: int) -> None:
        """Read the pixel data (and anything after it) into `ds`, at most what a declared
        image of `expected` bytes can need."""
        assert self.fp is not None
        if isinstance(self.fp, _Inflated):  # element header (12 bytes) + pixels + trailer
            self.fp.limit = self.pixel_offset + 12 + expected + TRAILER_BYTES
        else:
            size = os.fstat(self.f.fileno()).st_size
            if size - self.pixel_offset > 2 * expected + TRAILER_BYTES:
                raise DicomError(
                    f"{self.path}: {size - self.pixel_offset} bytes follow the header, far more "
                    f"than the declared {_geometry(ds)} image needs ({expected} bytes); refused"
                )
        self.fp.seek(self.pixel_offset)
        implicit, little = ds.original_encoding
        try:
            rest = read_dataset(
                self.fp, bool(implicit), bool(little), parent_encoding=ds.original_character_set
            )
        except _TooLarge:
            limit = getattr(self.fp, "limit", 0)
            raise DicomError(
                f"{self.path}: the deflated data inflates past {limit} bytes, more than "
                f"the declared {_geometry(ds)} image needs ({expected} bytes); refused "
                "(a decompression bomb)"
            ) from None
        except PARSE_ERRORS as e:
            if self.fp.short or getattr(self.fp, "cut", False):
                return  # the pixel data is missing or short; reported by the caller
            raise DicomError(f"{self.path}: unreadable pixel data ({type(e).__name__}: {e})") from e
        ds.update(rest)


def _read_dataset(path: str | Path, modalities: tuple[str, ...] | None = None) -> FileDataset:
    with _open(path) as f:
        reader = _Reader(f, path)
        ds = reader.header()
        try:
            _check_header(ds, path, reader.stop.tag, reader.stop.length, modalities)
            expected = _expected_bytes(ds)
        except DicomError:
            raise
        except PARSE_ERRORS as e:  # a header value of the wrong type or form
            raise DicomError(f"{path}: malformed header ({type(e).__name__}: {e})") from e
        reader.rest(ds, expected)
    try:
        _check_pixels(ds, path)
    except DicomError:
        raise
    except PARSE_ERRORS as e:
        raise DicomError(f"{path}: malformed pixel data ({type(e).__name__}: {e})") from e
    return ds


def _geometry(ds: pydicom.Dataset) -> str:
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    return f"{rows}x{cols} {int(ds.get('BitsAllocated', 16) or 16)}-bit"


def _expected_bytes(ds: pydicom.Dataset) -> int:
    """Bytes of uncompressed pixel data the header declares (PS3.5 8.1.1)."""
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 16) or 16)
    return (rows * cols * frames * spp * bits + 7) // 8


def _transfer_syntax(ds: pydicom.Dataset):
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _short_name(ts) -> str:
    return str(ts.name).split(" (")[0]


def _codec_hint(ts) -> str | None:
    return next((h for k, h in _CODEC_HINTS.items() if k in ts.name), None)


def _check_header(
    ds: pydicom.Dataset,
    path: str | Path,
    pixel_tag: int | None,
    pixel_length: int,
    modalities: tuple[str, ...] | None = None,
) -> None:
    """Everything that can be refused from the header alone, before any pixel data is read."""
    modality = _modality(ds)
    if modalities is not None and modality and modality not in {m.upper() for m in modalities}:
        raise NotARadiograph(f"{path}: {not_a_radiograph_reason(modality, tuple(modalities))}")
    if pixel_tag != 0x7FE00010:
        kind = _PIXEL_TAGS.get(pixel_tag or 0, "no pixel data")
        raise DicomError(f"{path}: {kind} (not an image, or a structured report / presentation)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomError(f"{path}: multi-frame image ({frames} frames); radiographs have one")
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    spp = int(ds.get("SamplesPerPixel", 1) or 1)
    if spp != 1 or photometric not in ("MONOCHROME1", "MONOCHROME2"):
        raise DicomError(
            f"{path}: colour or unsupported photometric interpretation "
            f"({photometric or 'missing'}, {spp} samples per pixel); expected MONOCHROME1/2"
        )
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    big = too_large(rows, cols)
    if big:
        raise DicomError(f"{path}: {big}; refused before reading the pixel data")
    why = implausible_shape(rows, cols)
    if why:
        raise DicomError(f"{path}: {why}; not read")
    bits = int(ds.get("BitsAllocated", 16) or 16)
    if bits not in (1, 8, 16, 32):
        raise DicomError(f"{path}: unsupported BitsAllocated {bits} (expected 1, 8, 16 or 32)")
    expected = _expected_bytes(ds)
    ts = _transfer_syntax(ds)
    if ts is not None and ts.is_compressed:
        decoder = get_decoder(ts)
        if not decoder.is_available:
            hint = _codec_hint(ts) or "; ".join(decoder.missing_dependencies)
            raise DicomError(f"{path}: no decoder installed for {ts.name} ({ts}); try {hint}")
    elif pixel_length != _UNDEFINED:
        if pixel_length < expected:
            raise DicomError(f"{path}: truncated pixel data ({pixel_length} of {expected} bytes)")
        if pixel_length > expected + TRAILER_BYTES:
            raise DicomError(
                f"{path}: the pixel data element declares {pixel_length} bytes; the declared "
                f"{_geometry(ds)} image needs {expected}; refused"
            )


def _first_frame(ds: pydicom.Dataset) -> bytes | None:
    try:
        return next(generate_frames(ds.PixelData, number_of_frames=1))
    except PARSE_ERRORS:
        return None  # malformed encapsulation: the decoder will say so


def _check_pixels(ds: pydicom.Dataset, path: str | Path) -> None:
    """What needs the pixel data itself: present, long enough, codestream as declared."""
    ts = _transfer_syntax(ds)
    encapsulated = ts is not None and ts.is_compressed
    what = f"{_short_name(ts)} " if encapsulated else ""
    if "PixelData" not in ds:
        raise DicomError(f"{path}: truncated file (it ends inside the {what}pixel data)")
    rows, cols = int(ds.Rows), int(ds.Columns)
    if not encapsulated:
        expected = _expected_bytes(ds)
        if len(ds.PixelData) < expected:
            raise DicomError(
                f"{path}: truncated pixel data ({len(ds.PixelData)} of {expected} bytes)"
            )
        return
    frame = _first_frame(ds)
    if not frame:
        return
    geo = codestream_geometry(frame)
    if geo is not None:
        r, c, n, _ = geo
        if r > MAX_SIDE or c > MAX_SIDE or r * c * n > rows * cols * int(ds.SamplesPerPixel):
            raise DicomError(
                f"{path}: the {_short_name(ts)} codestream declares a {r}x{c} image with {n} "
                f"component(s), larger than the header's {rows}x{cols}; refused before decoding"
            )
    if "JPEG 2000" in ts.name and not has_end_marker(frame):
        raise DicomError(
            f"{path}: truncated JPEG 2000 data (the codestream has no end-of-codestream "
            f"marker; {len(frame)} bytes)"
        )


def check_supported(ds: pydicom.Dataset, path: str | Path = "<dataset>") -> None:
    """Raise `DicomError` unless the (fully read) `ds` is a single-frame grayscale image we can
    decode."""
    pixel = next((t for t in _PIXEL_TAGS if t in ds), None)
    length = _UNDEFINED
    if pixel == 0x7FE00010 and not ds["PixelData"].is_undefined_length:
        length = len(ds.PixelData)
    _check_header(ds, path, pixel, length)
    _check_pixels(ds, path)


def _decoder_failure(ds: pydicom.Dataset, path: str | Path, e: Exception) -> DicomError:
    """One line for pydicom's per-plugin decode failures (a multi-line message)."""
    text = str(e)
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    ts = _transfer_syntax(ds)
    if not (ts is not None and ts.is_compressed):
        return DicomError(f"{path}: cannot decode pixel data ({type(e).__name__}: {text})")
    tried = lines[1:] if len(lines) > 1 and "plugins" in lines[0] else lines
    summary = "; ".join(tried)[:300] or type(e).__name__
    frame = _first_frame(ds)
    geo = codestream_geometry(frame) if frame else None
    bits = geo[3] if geo else int(ds.get("BitsStored", ds.get("BitsAllocated", 16)) or 16)
    name = f"{bits}-bit {_short_name(ts)} ({ts})"
    if tried and all(_UNSUPPORTED.search(t) for t in tried):
        hint = _codec_hint(ts) or "pip install 'fastcxr[codecs]'"
        return DicomError(
            f"{path}: {name}: no installed decoder supports it (tried {summary}); try {hint}"
        )
    if frame and not has_end_marker(frame):
        return DicomError(f"{path}: truncated {name} data: the codestream has no end marker")
    return DicomError(f"{path}: cannot decode {name} pixel data ({summary})")


def _decode(ds: pydicom.Dataset, path: str | Path) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except PARSE_ERRORS as e:
        try:
            err = _decoder_failure(ds, path, e)
        except PARSE_ERRORS:
            err = DicomError(f"{path}: cannot decode pixel data ({type(e).__name__}: {e})")
        raise err from e
    if arr.ndim != 2:
        raise DicomError(f"{path}: expected a 2-D image, decoded shape {arr.shape}")
    try:
        return stored_values(arr, ds)
    except PARSE_ERRORS as e:
        raise DicomError(f"{path}: malformed pixel description ({type(e).__name__}: {e})") from e


def stored_values(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Keep only the BitsStored low bits (PS3.5 8.1.1), sign-extended for signed data.

    Bits above BitsStored may hold overlays or garbage on old modalities; they are not pixel
    data. Idempotent, so it is safe whether or not the decoder already did it.
    """
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if arr.dtype.kind not in "iu" or bits >= arr.dtype.itemsize * 8:
        return arr
    if arr.dtype.kind == "u" and int(ds.get("PixelRepresentation", 0)) == 0:
        return np.bitwise_and(arr, np.array((1 << bits) - 1, arr.dtype))  # one native pass
    v = arr.astype(np.int64) & ((1 << bits) - 1)
    if int(ds.get("PixelRepresentation", 0)) == 1:
        v = np.where(v >= 1 << (bits - 1), v - (1 << bits), v)
    return v.astype(np.int32)
