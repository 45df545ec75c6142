"""The image-reader layer (#23 item 3): one dispatch and one size guard for prepare, both
training loaders and predict. Expected values come from PIL and numpy directly."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fastcxr.images.readers import SUFFIXES, ImageError, read_image
from fastcxr.preprocessing import CacheError, Preprocessing


def _declaring(path: Path, w: int, h: int) -> Path:
    """A valid 16x16 PNG whose header then declares w x h (CRC fixed): nothing to decode
    unless a reader trusts the header."""
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    at = data.index(b"IHDR")
    data[at + 4 : at + 12] = struct.pack(">II", w, h)
    crc = zlib.crc32(bytes(data[at : at + 17]))
    data[at + 17 : at + 21] = struct.pack(">I", crc)
    path.write_bytes(bytes(data))
    return path


def test_a_small_cache_image_is_read_by_the_loaders_but_is_no_radiograph(tmp_path):
    """`prepare --size 8` writes 8x8 cache images (8 is its least size): the training loaders
    read them; as a source to predict on, 8x8 cannot be a radiograph."""
    a = np.random.default_rng(0).integers(0, 256, (8, 8), dtype=np.uint8)
    p = tmp_path / "c.png"
    Image.fromarray(a).save(p)
    assert np.array_equal(read_image(p, 8, radiograph=False), a)
    assert np.array_equal(Preprocessing(8, cache_size=8).load(p), a)  # the DataBlock path
    with pytest.raises(ImageError, match="too small to be a radiograph"):
        read_image(p, 8)


def test_a_cache_image_declaring_a_huge_size_is_refused_before_decoding(tmp_path):
    p = _declaring(tmp_path / "bomb.png", 64, 16_385)  # 64 wide, 16385 high: over a side
    with pytest.raises(ImageError, match="implausible image size 64x16385 declared"):
        read_image(p, 32, radiograph=False)
    with pytest.raises(CacheError, match="implausible image size"):  # the DataBlock path
        Preprocessing(32, cache_size=32).load(p)


def test_one_dispatch_by_suffix(tmp_path):
    a = np.arange(64 * 48, dtype=np.uint16).reshape(64, 48) % 251
    for suffix in (".png", ".jpg", ".JPEG"):
        p = tmp_path / f"x{suffix}"
        Image.fromarray(a.astype(np.uint8)).save(p, format="PNG" if suffix == ".png" else "JPEG")
        want = np.asarray(Image.open(p).convert("L").resize((32, 32), Image.Resampling.LANCZOS,
                                                              reducing_gap=1.5))  # fmt: skip
        assert np.array_equal(read_image(p, 32), want), suffix
    assert {".dcm", ".dicom", ".png", ".jpg", ".jpeg"} == set(SUFFIXES)
    with pytest.raises(Exception, match="not a DICOM|DICM|cannot|preamble|read"):  # DICOM path
        (tmp_path / "y.dcm").write_bytes(b"not a dicom at all")
        read_image(tmp_path / "y.dcm", 32)
