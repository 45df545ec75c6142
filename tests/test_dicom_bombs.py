"""Decompression bombs: files whose pixel data would inflate to gigabytes are refused from
their header, in a few MB of memory. The bombs are built here (deflate of zeros, written as
one 16 MiB block repeated: a full flush makes each copy independent, so a 1 GiB bomb takes
well under a second to write)."""

import json
import re
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

from fastcxr.dicom import DicomError, read_dicom

DICOM_PY = Path(__file__).resolve().parents[1] / "fastcxr" / "dicom.py"
BLOCK = 1 << 24
PEAK_LIMIT_KB = 400 * 1024  # the reader's interpreter + numpy + pydicom is ~60 MB


def _element(group: int, elem: int, vr: bytes, length: int) -> bytes:
    return struct.pack("<HH2sHI", group, elem, vr, 0, length)  # explicit VR, 4-byte length


def write_deflated_bomb(
    path: Path, rows: int, cols: int, *, pixel_bytes: int | None = None, padding: int = 0
) -> int:
    """A Deflated Explicit VR Little Endian file declaring `rows` x `cols` 16-bit pixels,
    `pixel_bytes` of zeros (the declared size by default), then `padding` zero bytes of
    Data Set Trailing Padding (FFFC,FFFC). Returns the inflated size of the dataset."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, fm, enforce_standard=True)
    n = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    zero_block = None
    total = 0

    def zeros(f, count):
        nonlocal zero_block
        if zero_block is None:
            zero_block = z.compress(bytes(BLOCK)) + z.flush(zlib.Z_FULL_FLUSH)
        for _ in range(count // BLOCK):
            f.write(zero_block)
        f.write(z.compress(bytes(count % BLOCK)) + z.flush(zlib.Z_FULL_FLUSH))

    with open(path, "wb") as f:
        f.write(b"\0" * 128 + b"DICM" + meta.getvalue())
        head = body.getvalue() + _element(0x7FE0, 0x0010, b"OW", n)
        f.write(z.compress(head) + z.flush(zlib.Z_FULL_FLUSH))
        zeros(f, n)
        total = len(head) + n
        if padding:
            f.write(z.compress(_element(0xFFFC, 0xFFFC, b"OB", padding)))
            f.write(z.flush(zlib.Z_FULL_FLUSH))
            zeros(f, padding)
            total += 12 + padding
        f.write(z.flush())
    return total


def _inflated_size(path: Path) -> int:
    """Independent check that the bomb is what it claims: inflate it in 16 MiB steps."""
    data = path.read_bytes()
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    start = data.index(b"DICM") + 4
    meta = pydicom.filereader.read_file_meta_info(path)
    start += 12 + int(meta.FileMetaInformationGroupLength)
    src, total = data[start:], 0
    while src:
        total += len(d.decompress(src, BLOCK))
        src = d.unconsumed_tail
    return total


def _read_in_child(path: Path) -> tuple[str, int]:
    """Read `path` with fastcxr.dicom in a fresh interpreter (the reader alone: no torch,
    which would bring ~1 GB); return (outcome, the reader's peak RSS in KB),
    measured as RUSAGE_CHILDREN of a wrapper process that runs only that reader."""
    reader = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(DICOM_PY.parents[1])!r})
        import fastcxr.dicom as m
        assert "torch" not in sys.modules  # the reader alone
        try:
            img = m.read_dicom(sys.argv[1], size=16)
            print(json.dumps("read " + str(img.shape)))
        except m.DicomError as e:
            print(json.dumps("DicomError: " + str(e)))
    """)
    wrapper = textwrap.dedent(f"""
        import resource, subprocess, sys
        out = subprocess.run([sys.executable, "-c", {reader!r}, sys.argv[1]],
                             capture_output=True, text=True)
        print(out.stdout.strip() or repr(out.stderr[-2000:]))
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
    """)
    res = subprocess.run(
        [sys.executable, "-c", wrapper, str(path)], capture_output=True, text=True, timeout=300
    )
    outcome, peak = res.stdout.strip().rsplit("\n", 1)
    return json.loads(outcome) if outcome.startswith('"') else outcome, int(peak)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    made = {}
    # ~1 MB on disk, 65535 x 8192 x 16 bit = 1 GiB inflated: refused from the declared size.
    made["huge_declared"] = (d / "huge.dcm", write_deflated_bomb(d / "huge.dcm", 65535, 8192))
    # A plausible 512 x 512 header whose pixel data element says 1 GiB.
    made["oversized_element"] = (
        d / "element.dcm",
        write_deflated_bomb(d / "element.dcm", 512, 512, pixel_bytes=1 << 30),
    )
    # A plausible, correct 512 x 512 image followed by 1 GiB of trailing padding.
    made["trailing_padding"] = (
        d / "padding.dcm",
        write_deflated_bomb(d / "padding.dcm", 512, 512, padding=1 << 30),
    )
    return made


def test_bombs_are_what_they_claim(bombs):
    for path, inflated in bombs.values():
        assert path.stat().st_size < 3 << 20 and inflated > 10**9  # ~1 MB → over 1 GB
        assert _inflated_size(path) == inflated


@pytest.mark.parametrize(
    "name, message",
    [
        ("huge_declared", r"implausible image size 65535x8192 declared"),
        ("oversized_element", r"pixel data element declares 1073741824 bytes.*512x512 16-bit"),
        ("trailing_padding", r"inflates past \d+ bytes.*512x512 16-bit.*decompression bomb"),
    ],
)
def test_deflate_bomb_is_refused_before_inflating(bombs, name, message):
    path, _ = bombs[name]
    outcome, peak_kb = _read_in_child(path)
    assert outcome.startswith("DicomError: "), outcome
    assert re.search(message, outcome), outcome
    assert peak_kb < PEAK_LIMIT_KB, f"peak RSS {peak_kb / 1024:.0f} MB reading {name}"


def test_deflated_radiograph_still_reads(tmp_path):
    """A genuine deflated file reads as its uncompressed twin does; a cut one is truncated."""
    rng = np.random.default_rng(0)
    px = rng.integers(0, 4096, (300, 200)).astype(np.uint16)
    paths = {}
    for name, ts in (("plain", pydicom.uid.ExplicitVRLittleEndian),
                     ("deflated", DeflatedExplicitVRLittleEndian)):  # fmt: skip
        fm = FileMetaDataset()
        fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        fm.MediaStorageSOPInstanceUID = generate_uid()
        fm.TransferSyntaxUID = ts
        ds = pydicom.Dataset()
        ds.file_meta = fm
        ds.SOPClassUID = fm.MediaStorageSOPClassUID
        ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns = "CR", *px.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME1"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.WindowCenter, ds.WindowWidth = 2000, 3000
        ds.PixelData = px.tobytes()
        paths[name] = tmp_path / f"{name}.dcm"
        ds.save_as(paths[name], enforce_file_format=True)
    assert paths["deflated"].stat().st_size < paths["plain"].stat().st_size
    np.testing.assert_array_equal(read_dicom(paths["deflated"]), read_dicom(paths["plain"]))
    data = paths["deflated"].read_bytes()
    cut = tmp_path / "cut.dcm"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(DicomError, match="truncated"):
        read_dicom(cut)


def test_an_ordinary_read_measured_the_same_way(tmp_path):
    """The measurement itself: a real 2500 x 2000 16-bit radiograph is read (not refused) in
    the child, and its peak is above the bare interpreter's but within the limit."""
    rng = np.random.default_rng(1)
    px = rng.integers(0, 4096, (2500, 2000)).astype(np.uint16)
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", *px.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = px.tobytes()
    p = tmp_path / "big.dcm"
    ds.save_as(p, enforce_file_format=True)
    outcome, peak_kb = _read_in_child(p)
    assert outcome == "read (16, 16)", outcome
    assert 20 * 1024 < peak_kb < PEAK_LIMIT_KB


def test_uncompressed_file_far_larger_than_its_image_is_refused(tmp_path):
    """Not deflated, but the same rule: what follows the header is bounded by the declared
    image (here 64 x 64, 8 KB, then 40 MB of Data Set Trailing Padding)."""
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", 64, 64
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = np.arange(64 * 64, dtype=np.uint16).tobytes()
    p = tmp_path / "padded.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert read_dicom(p).shape == (64, 64)
    with open(p, "ab") as f:
        f.write(_element(0xFFFC, 0xFFFC, b"OB", 40 << 20) + bytes(40 << 20))
    with pytest.raises(DicomError, match=r"bytes follow the header.*64x64 16-bit.*8192 bytes"):
        read_dicom(p)
