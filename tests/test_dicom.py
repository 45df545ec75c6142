"""DICOM reading: values checked against the standard's formulas, computed here by hand."""

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGExtended12Bit, JPEGLSLossless, generate_uid

from fastcxr.dicom import (
    RADIOGRAPH_MODALITIES,
    DicomError,
    NotARadiograph,
    equalize_hist,
    read_dicom,
    read_modality,
)

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
    px = np.linspace(-2048, 2047, 256).astype(np.int16).reshape(16, 16)
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


def _only_pillow_decodes_12bit_jpeg():
    return set(get_decoder(JPEGExtended12Bit).available_plugins) <= {"pillow"}


CASES = [
    ("no_pixels", "no pixel data"), ("truncated", "truncated"), ("multiframe", "multi-frame"),
    ("rgb", "colour"), ("jpegls", "pip install"),
    ("huge", "implausible image size 60000x60000 declared"),
    ("not_dicom", "not a DICOM"), ("missing", "no such file"),
    ("jpeg12", r"12-bit JPEG Extended \(1\.2\.840\.10008\.1\.2\.4\.51\): no installed decoder "
               r"supports it .*; try pip install 'fastcxr\[codecs\]'"),
    ("j2k_file_cut", "truncated file"), ("j2k_codestream_cut", "truncated JPEG 2000"),
    ("j2k_larger_than_header", "codestream declares a 64x64 image"),
    ("ct", "modality CT is not a projection radiograph"),
]  # fmt: skip


def make_case(tmp_path, ramp, case):
    """A file that fastcxr must refuse, one per way of being unreadable."""
    p = tmp_path / f"{case}.dcm"
    if case == "not_dicom":
        p.write_bytes(b"hello, not a DICOM at all" * 10)
    elif case == "missing":
        pass
    elif case == "jpeg12":  # pydicom's bundled 12-bit JPEG Extended (Process 4) file
        if not _only_pillow_decodes_12bit_jpeg():
            pytest.skip("a 12-bit JPEG decoder is installed here")
        p.write_bytes((BUNDLED / "JPEG-lossy.dcm").read_bytes())
    elif case == "j2k_file_cut":  # a download cut short inside the JPEG 2000 fragment
        data = (BUNDLED / "MR_small_jp2klossless.dcm").read_bytes()
        p.write_bytes(data[: len(data) - 2000])
    elif case in ("j2k_codestream_cut", "j2k_larger_than_header"):
        ds = pydicom.dcmread(BUNDLED / "MR_small_jp2klossless.dcm")  # 64x64 JPEG 2000
        if case == "j2k_codestream_cut":  # the container is whole, the codestream is not
            frame = next(generate_frames(ds.PixelData, number_of_frames=1))
            ds.PixelData = encapsulate([frame[: len(frame) // 2]])
        else:  # the header says 16x16: the codestream's 64x64 is not decoded
            ds.Rows = ds.Columns = 16
        ds.save_as(p)
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
            ds.PixelData = encapsulate([b"\xff\xd8fake\xff\xd9"])
        elif case == "huge":
            ds.Rows = ds.Columns = 60000  # header claims 3.6 billion pixels
        elif case == "ct":
            ds.Modality = "CT"
        ds.save_as(p)
    return p


@pytest.mark.parametrize("case, message", CASES)
def test_unreadable_files_raise_one_error_type(tmp_path, ramp, case, message):
    p = make_case(tmp_path, ramp, case)
    modalities = RADIOGRAPH_MODALITIES if case == "ct" else None
    with pytest.raises(DicomError, match=message) as e:
        read_dicom(p, modalities=modalities)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("case", [c for c, _ in CASES])
def test_every_error_message_is_one_line(tmp_path, ramp, case):
    """failures.csv gets one row a file: pydicom's multi-line decoder report is summarised."""
    p = make_case(tmp_path, ramp, case)
    with pytest.raises(DicomError) as e:
        read_dicom(p, modalities=RADIOGRAPH_MODALITIES)
    msg = str(e.value)
    assert len(msg.splitlines()) == 1 and "\n" not in msg and "\r" not in msg, msg


def test_bundled_files_refused_with_one_line_messages():
    for f in sorted(BUNDLED.glob("*.dcm")):
        try:
            read_dicom(f, size=16)
        except DicomError as e:
            assert len(str(e).splitlines()) == 1, str(e)


def test_jpeg12_message_names_the_transfer_syntax_and_the_fix():
    if not _only_pillow_decodes_12bit_jpeg():
        pytest.skip("a 12-bit JPEG decoder is installed here")
    with pytest.raises(DicomError) as e:
        read_dicom(BUNDLED / "JPEG-lossy.dcm")
    msg = str(e.value)
    assert "Unable to decode" not in msg and "pillow" in msg  # summarised, the plugin named
    assert msg.startswith(f"{BUNDLED / 'JPEG-lossy.dcm'}: 12-bit JPEG Extended")


def test_truncated_jpeg2000_is_not_reported_as_missing_pixel_data(tmp_path, ramp):
    for case in ("j2k_file_cut", "j2k_codestream_cut"):
        with pytest.raises(DicomError) as e:
            read_dicom(make_case(tmp_path, ramp, case))
        assert "truncated" in str(e.value) and "no pixel data" not in str(e.value)


def test_missing_file_says_no_such_file(tmp_path):
    p = tmp_path / "nowhere" / "x.dcm"
    with pytest.raises(DicomError) as e:
        read_dicom(p)
    assert str(e.value) == f"no such file: {p}"
    assert isinstance(e.value, FileNotFoundError)  # callers that catch that still do


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


def test_modality_lut_sequence_then_window_spans_0_to_255(tmp_path, ramp):
    """A Modality LUT Sequence (here 12-bit stored → 16-bit output, as pydicom's mlut_18.dcm)
    then a window in the LUT's output units: PS3.3 C.11.2.1.2.1 computed here by hand."""
    lut = (1000 + 10 * np.arange(4096)).astype(np.uint16)  # 1000 … 41950
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 16])  # LUTDescriptor: entries, first value, bits
    item.add_new(0x00283006, "US", lut.tolist())  # LUTData
    item.ModalityLUTType = "US"
    lo, hi = int(lut[ramp].min()), int(lut[ramp].max())
    for center, width in (((lo + hi) / 2, hi - lo + 1), (20000, 20000)):
        p = make_dicom(
            tmp_path / "mlut.dcm",
            ramp,
            ModalityLUTSequence=pydicom.Sequence([item]),
            WindowCenter=center,
            WindowWidth=width,
        )
        got = read_dicom(p)
        expect = np.rint(linear_window(lut[ramp], center, width, 0.0, 1.0) * 255)
        assert np.abs(got.astype(int) - expect).max() <= 1
        assert got.min() == 0 and got.max() == 255  # the window covers (or clips) the data


def test_presentation_lut_shape_inverse(tmp_path, ramp):
    """INVERSE shows low values bright, as MONOCHROME1 does. The standard pairs the two
    (PS3.3 C.7.6.1.1.6 / C.8.11.7: INVERSE "shall be used if Photometric Interpretation is
    MONOCHROME1"), so together they are one inversion, not two."""
    w = dict(WindowCenter=2048, WindowWidth=4096)
    m2 = read_dicom(make_dicom(tmp_path / "a.dcm", ramp, **w))
    m2_inv = read_dicom(make_dicom(tmp_path / "b.dcm", ramp, PresentationLUTShape="INVERSE", **w))
    m1 = read_dicom(make_dicom(tmp_path / "c.dcm", ramp, "MONOCHROME1", **w))
    m1_inv = read_dicom(
        make_dicom(tmp_path / "d.dcm", ramp, "MONOCHROME1", PresentationLUTShape="INVERSE", **w)
    )
    m2_id = read_dicom(make_dicom(tmp_path / "e.dcm", ramp, PresentationLUTShape="IDENTITY", **w))
    expect = np.rint(linear_window(ramp, 2048, 4096, 0.0, 1.0) * 255)
    assert np.abs(m2.astype(int) - expect).max() <= 1
    assert np.abs(m2_inv.astype(int) - (255 - expect)).max() <= 1
    np.testing.assert_array_equal(m1_inv, m1)
    np.testing.assert_array_equal(m2_id, m2)
    assert m2_inv[0, 0] > m2_inv[-1, -1]


def test_modality_filter_reads_only_the_header(tmp_path, ramp):
    ct = make_dicom(tmp_path / "ct.dcm", ramp, Modality="CT")
    ds = pydicom.dcmread(ct)
    ds.PixelData = ds.PixelData[:10]  # unreadable pixels: refused for its modality first
    ds.save_as(ct)
    with pytest.raises(NotARadiograph) as e:
        read_dicom(ct, modalities=RADIOGRAPH_MODALITIES)
    assert str(e.value) == (
        f"{ct}: modality CT is not a projection radiograph (--modalities CR,DX,DR to change)"
    )
    assert read_modality(ct) == "CT"
    none = make_dicom(tmp_path / "none.dcm", ramp)
    ds = pydicom.dcmread(none)
    del ds.Modality
    ds.save_as(none)
    assert read_modality(none) == ""
    assert read_dicom(none, modalities=RADIOGRAPH_MODALITIES).shape == ramp.shape  # kept
    cr = make_dicom(tmp_path / "cr.dcm", ramp, Modality="CR")
    assert read_dicom(cr, modalities=RADIOGRAPH_MODALITIES).shape == ramp.shape
    ok = make_dicom(tmp_path / "ct_ok.dcm", ramp, Modality="CT")
    assert read_dicom(ok).shape == ramp.shape  # no filter unless asked for


def test_a_file_that_is_not_dicom_gets_fastcxrs_words_not_pydicoms_advice(tmp_path):
    p = tmp_path / "notes.dcm"
    p.write_bytes(b"these are a radiologist's notes, not an image\n" * 20)
    with pytest.raises(DicomError) as e:
        read_dicom(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: not a DICOM file (") and msg.endswith(")")
    assert "force" not in msg.lower()  # pydicom's hint to its programmers


def test_pydicoms_warnings_name_the_file(tmp_path):
    """#22: pydicom's UserWarnings printed without the file they were about."""
    import warnings

    from fastcxr.dicom import DicomWarning

    px = (np.arange(32 * 32) % 4096).reshape(32, 32)
    p = make_dicom(tmp_path / "padded.dcm", px)
    ds = pydicom.dcmread(p)
    ds.PixelData = ds.PixelData + b"\0" * 128  # excess padding: pydicom warns, then reads
    ds.save_as(p, enforce_file_format=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = read_dicom(p)
    ours = [w for w in caught if w.category is DicomWarning]
    assert ours and all(str(w.message).startswith(f"{p}: ") for w in ours)
    assert "padding" in str(ours[0].message)
    assert not [w for w in caught if w.category is UserWarning]  # none without the file
    assert got.shape == (32, 32)
