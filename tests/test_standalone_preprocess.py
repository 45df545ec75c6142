"""The `preprocess.py` an export ships: with pydicom, numpy and Pillow alone (no fastcxr in
the process), the very pixels fastcxr's own preprocessing gives, for DICOMs of both intensity
modes (windows, rescale, a VOI LUT sequence, MONOCHROME1, signed data, no VOI at all), PNGs,
and a cache size that differs from the run's size. Done by hand with pydicom's VOI and PIL's
Lanczos the probabilities differed by up to 0.19."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from test_dicom import make_dicom

import fastcxr
from fastcxr.preprocessing import Preprocessing

STANDALONE = Path(fastcxr.__file__).parent / "standalone" / "preprocess.py"


def _sources(tmp_path, synthetic_tree) -> list[Path]:
    rng = np.random.default_rng(1)
    px = rng.integers(100, 3900, (90, 70)).astype(np.uint16)
    lut = np.rint(np.linspace(0, 1, 4096) ** 2 * 4095).astype(np.uint16)
    item = pydicom.Dataset()
    item.add_new(0x00283002, "US", [4096, 0, 12])
    item.add_new(0x00283006, "US", lut.tolist())
    d = tmp_path / "src"
    d.mkdir()
    made = [
        make_dicom(d / "win.dcm", px, WindowCenter=2000, WindowWidth=1500),
        make_dicom(
            d / "rescale.dcm",
            px,
            "MONOCHROME1",
            RescaleSlope=2,
            RescaleIntercept=-1000,
            WindowCenter=1500,
            WindowWidth=3000,
        ),  # fmt: skip
        make_dicom(
            d / "sigmoid.dcm", px, WindowCenter=2000, WindowWidth=1000, VOILUTFunction="SIGMOID"
        ),  # fmt: skip
        make_dicom(d / "lutseq.dcm", px, VOILUTSequence=pydicom.Sequence([item])),
        make_dicom(d / "plain.dcm", px),
        make_dicom(d / "signed.dcm", (px[::-1].astype(np.int32) - 2000), signed=True),
        make_dicom(
            d / "inverse.dcm",
            px,
            PresentationLUTShape="INVERSE",
            WindowCenter=2048,
            WindowWidth=4096,
        ),  # fmt: skip
    ]
    made += sorted(synthetic_tree.rglob("*.dcm"))[:4]
    png = d / "photo.png"
    Image.fromarray(rng.integers(0, 255, (60, 50), dtype=np.uint8)).save(png)
    png12, png16 = d / "twelve_bit.png", d / "eight_bit_x257.png"  # 16-bit PNGs
    Image.fromarray(rng.integers(0, 4096, (60, 50)).astype(np.uint16)).save(png12)
    Image.fromarray(rng.integers(0, 256, (60, 50)).astype(np.uint16) * 257).save(png16)
    return [*made, png, png12, png16]


@pytest.mark.parametrize(
    ("intensity", "cache_size", "size"), [("voi", 48, 32), ("mimic-jpg", None, 40), ("voi", 64, 64)]
)
def test_standalone_preprocess_equals_fastcxrs(tmp_path, synthetic_tree, intensity, cache_size,
                                               size):  # fmt: skip
    files = _sources(tmp_path, synthetic_tree)
    prep = Preprocessing(size=size, intensity=intensity, cache_size=cache_size)
    want = np.stack([prep.image(f) for f in files])
    export = tmp_path / "export"
    export.mkdir()
    shutil.copyfile(STANDALONE, export / "preprocess.py")
    (export / "export.json").write_text(json.dumps({"preprocessing": prep.to_dict()}))
    code = (
        "import sys, numpy as np; sys.path.insert(0, sys.argv[1]); import preprocess; "
        "x = preprocess.Preprocess.from_export(sys.argv[1]).batch(sys.argv[3:]); "
        "assert not any(m.split('.')[0] == 'fastcxr' for m in sys.modules), 'fastcxr imported'; "
        "np.save(sys.argv[2], x)"
    )
    # -I: isolated (no site-packages path tricks beyond the environment, no cwd on sys.path)
    r = subprocess.run([sys.executable, "-I", "-c", code, export, tmp_path / "got.npy", *files],
                       capture_output=True, text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr
    got = np.load(tmp_path / "got.npy")
    assert got.shape == (len(files), 1, size, size) and got.dtype == np.uint8
    np.testing.assert_array_equal(got[:, 0], want)
    # the cases differ from each other (mimic-jpg ignores the window and LUT tags by design)
    distinct = len({a.tobytes() for a in want})
    assert distinct == len(files) if intensity == "voi" else distinct >= 6
