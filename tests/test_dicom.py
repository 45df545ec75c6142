"""DICOM reading: values checked against the standard's formulas, computed here by hand."""

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, generate_uid

from fastcxr.dicom import DicomError, equalize_hist, read_dicom

BUNDLED = Path(pydicom.data.__file__).parent / "test_files"


def make_dicom(path, pixels, photometric="MONOCHROME2", bits_stored=12, signed=False, **tags):
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    fm.MediaStorageSOPInstanceUID = generate_uid()
    fm.TransferSyntaxUID = tags.pop("transfer_syntax", ExplicitVRLittleEndian)
    ds = pydicom.Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, bits_stored, bits_stored - 1
    ds.PixelRepresentation = int(signed)
    for k, v in tags.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.astype(np.int16 if signed else np.uint16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def linear_window(x, center, width, ymin, ymax):
    """DICOM PS3.3 C.11.2.1.2.1 linear VOI function, written out from the standard."""
    x = np.asarray(x, float)
    lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = ((x - (center - 0.5)) / (width - 1) + 0.5) * (ymax - ymin) + ymin
    return np.where(x <= lo, ymin, np.where(x > hi, ymax, y))


@pytest.fixture
def ramp():
    return np.arange(0, 4096, 16, dtype=np.uint16).reshape(16, 16)


def test_window_matches_standard_formula(tmp_path, ramp):
    p = make_dicom(tmp_path / "a.dcm", ramp, WindowCenter=2000, WindowWidth=1500)
    got = read_dicom(p)
    y = linear_window(ramp, 2000, 1500, 0, 4095)  # output range = the 12-bit stored range
    assert np.abs(got.astype(int) - np.rint(y / 4095 * 255)).max() <= 1
    assert got.min() == 0 and got.max() == 255  # the window clips both ends of this ramp


def test_rescale_then_window(tmp_path, ramp):
    p = make_dicom(
        tmp_path / "a.dcm",
        ramp,
        RescaleSlope=2,
        RescaleIntercept=-1000,
        WindowCenter=1500,
        WindowWidth=3000,
    )
    hu = ramp * 2.0 - 1000
    y = linear_window(hu, 1500, 3000, -1000, 4095 * 2 - 1000)
    expect = np.rint((y + 1000) / (4095 * 2) * 255)
    assert np.abs(read_dicom(p).astype(int) - expect).max() <= 1


def test_monochrome1_is_inverted(tmp_path, ramp):
    m2 = read_dicom(make_dicom(tmp_path / "2.dcm", ramp, WindowCenter=2048, WindowWidth=4096))
    m1 = read_dicom(
        make_dicom(tmp_path / "1.dcm", ramp, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    )
    assert np.abs(m1.astype(int) - (255 - m2.astype(int))).max() <= 1
    assert m2[0, 0] < m2[-1, -1] and m1[0, 0] > m1[-1, -1]


def test_bits_stored_high_bits_are_ignored(tmp_path, ramp):
    clean = read_dicom(make_dicom(tmp_path / "c.dcm", ramp))
    dirty = read_dicom(make_dicom(tmp_path / "d.dcm", ramp | 0xA000))  # garbage above bit 12
    np.testing.assert_array_equal(clean, dirty)


def test_signed_pixels_without_window_use_min_max(tmp_path):
    px = np.linspace(-2048, 2047, 64).astype(np.int16).reshape(8, 8)
    got = read_dicom(make_dicom(tmp_path / "s.dcm", px, signed=True))
    expect = np.rint((px.astype(float) + 2048) / 4095 * 255)
    assert np.abs(got - expect).max() <= 1


def test_voi_lut_sequence(tmp_path, ramp):
    item = pydicom.Dataset()
    lut = np.rint(np.linspace(0, 1, 4096) ** 2 * 4095).astype(np.uint16)  # 12-bit gamma LUT
    item.add_new(0x00283002, "US", [4096, 0, 12])  # LUTDescriptor: entries, first value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    p = make_dicom(tmp_path / "l.dcm", ramp, VOILUTSequence=pydicom.Sequence([item]))
    expect = np.rint(lut[ramp] / 4095 * 255)
    assert np.abs(read_dicom(p).astype(int) - expect).max() <= 1


def test_resize(tmp_path, ramp):
    assert read_dicom(make_dicom(tmp_path / "r.dcm", ramp), size=8).shape == (8, 8)


def test_equalize_hist_hand_worked():
    # hist: 0→2, 1→1, 2→1; scale = 255/(4-2); lut = [0, 127.5→128, 255] (OpenCV rounding)
    img = np.array([[0, 0], [1, 2]], np.uint8)
    np.testing.assert_array_equal(equalize_hist(img), [[0, 0], [128, 255]])
    assert (equalize_hist(np.full((3, 3), 7, np.uint8)) == 7).all()


def test_mimic_jpg_mode_is_monotonic_and_equalised(tmp_path, ramp):
    got = read_dicom(make_dicom(tmp_path / "m.dcm", ramp), mode="mimic-jpg")
    assert (np.diff(got.ravel().astype(int)) >= 0).all() and got.max() == 255


@pytest.mark.parametrize("case, message", [
    ("no_pixels", "no pixel data"), ("truncated", "truncated"), ("multiframe", "multi-frame"),
    ("rgb", "colour"), ("jpegls", "pip install"), ("huge", "implausible"),
    ("not_dicom", "not a DICOM"),
])  # fmt: skip
def test_unreadable_files_raise_one_error_type(tmp_path, ramp, case, message):
    p = tmp_path / f"{case}.dcm"
    if case == "not_dicom":
        p.write_bytes(b"hello, not a DICOM at all" * 10)
    else:
        make_dicom(p, ramp)
        ds = pydicom.dcmread(p)
        if case == "no_pixels":
            del ds.PixelData
        elif case == "truncated":
            ds.PixelData = ds.PixelData[:100]
        elif case == "multiframe":
            ds.NumberOfFrames = 2
        elif case == "rgb":
            ds.PhotometricInterpretation, ds.SamplesPerPixel = "RGB", 3
        elif case == "jpegls":
            ds.file_meta.TransferSyntaxUID = JPEGLSLossless
            from pydicom.encaps import encapsulate

            ds.PixelData = encapsulate([b"\xff\xd8fake\xff\xd9"])
        elif case == "huge":
            ds.Rows = ds.Columns = 60000  # header claims 3.6 billion pixels
        ds.save_as(p)
    with pytest.raises(DicomError, match=message):
        read_dicom(p)


def test_pydicom_bundled_files_read_or_fail_cleanly():
    files = sorted(BUNDLED.glob("*.dcm"))  # pydicom's bundled files (no download)
    assert len(files) > 20
    read = 0
    for f in files:
        try:
            img = read_dicom(f, size=32)
        except DicomError:
            continue
        assert img.dtype == np.uint8 and img.shape == (32, 32)
        read += 1
    assert read >= 10
    with pytest.raises(DicomError, match="truncated|cannot decode"):
        read_dicom(BUNDLED / "MR_truncated.dcm")
    ct = read_dicom(BUNDLED / "CT_small.dcm")
    assert ct.shape == (128, 128) and ct.std() > 10
    with pytest.raises(DicomError, match="colour"):
        read_dicom(BUNDLED / "SC_rgb_jpeg.dcm")


@pytest.mark.parametrize("mode", ["voi", "mimic-jpg"])
def test_lookup_table_path_equals_the_per_pixel_pipeline(tmp_path, mode):
    from fastcxr.dicom import display_mimic_jpg, display_voi, stored_values, to_display

    rng = np.random.default_rng(0)
    px = rng.integers(100, 3900, (40, 30)).astype(np.uint16)
    cases = [
        dict(WindowCenter=2000, WindowWidth=1500),
        dict(RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=1500, WindowWidth=3000),
        dict(),
    ]
    for i, tags in enumerate(cases):
        for photometric in ("MONOCHROME1", "MONOCHROME2"):
            ds = pydicom.dcmread(
                make_dicom(tmp_path / f"{i}{photometric}.dcm", px, photometric, **tags)
            )
            arr = stored_values(ds.pixel_array, ds)
            ref = display_voi(arr, ds) if mode == "voi" else display_mimic_jpg(arr, ds)
            np.testing.assert_array_equal(to_display(arr, ds, mode), ref)
