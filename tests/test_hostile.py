"""Untrusted inputs: every bundled pydicom file, truncated and bit-flipped copies, absurd
headers — a batch converts the good ones and records the rest, never crashes."""

from pathlib import Path

import numpy as np
import pydicom
import pydicom.data

from fastcxr.prepare.cache import build_cache

BUNDLED = Path(pydicom.data.__file__).parent / "test_files"


def hostile_files(synthetic_tree, folder: Path) -> tuple[list[Path], list[Path]]:
    """(good synthetic DICOMs, hostile files) written into `folder`."""
    good = sorted(synthetic_tree.glob("files/**/*.dcm"))[:6]
    rng = np.random.default_rng(0)
    bad = []
    for i, src in enumerate(sorted(BUNDLED.glob("*.dcm")) + good[:3]):
        data = src.read_bytes()
        for kind in ("copy", "truncated", "flipped"):
            if kind == "copy" and src in good:
                continue
            blob = bytearray(data)
            if kind == "truncated":
                blob = blob[: max(1, len(blob) * int(rng.integers(1, 9)) // 10)]
            elif kind == "flipped":
                for pos in rng.integers(0, len(blob), size=max(1, len(blob) // 200)):
                    blob[pos] ^= 1 << int(rng.integers(0, 8))
            p = folder / f"{i:03d}_{kind}_{src.name}"
            p.write_bytes(bytes(blob))
            bad.append(p)
    huge = pydicom.dcmread(good[0])
    huge.Rows = huge.Columns = 65_535  # claims 4.3e9 pixels: must not allocate
    huge.save_as(folder / "huge_header.dcm")
    (folder / "empty.dcm").write_bytes(b"")
    return good, [*bad, folder / "huge_header.dcm", folder / "empty.dcm"]


def test_batch_survives_hostile_files(synthetic_tree, tmp_path):
    good, bad = hostile_files(synthetic_tree, tmp_path)
    srcs = good + bad
    res = build_cache(
        srcs, [tmp_path / "out" / f"{i}.png" for i in range(len(srcs))], 32, workers=2
    )
    failed = set(res.failures["file"])
    assert not failed & {str(g) for g in good}  # nothing lost from the good inputs
    assert res.converted + len(failed) == len(srcs)
    assert str(tmp_path / "huge_header.dcm") in failed and str(tmp_path / "empty.dcm") in failed
    reasons = dict(zip(res.failures["file"], res.failures["reason"]))
    assert "implausible image size" in reasons[str(tmp_path / "huge_header.dcm")]
