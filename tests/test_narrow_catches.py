"""#23 item 7: the library catches the errors of what it calls (pydicom, torch.load, a file the
user named) where they arise and names the path; a bug of fastcxr's own is a traceback, not a
one-line "expected" error. The command line no longer maps every FileNotFoundError or
PermissionError to exit 2."""

import os

import numpy as np
import pytest
import torch
from test_dicom import make_dicom
from typer.testing import CliRunner

from fastcxr import dicom
from fastcxr.cli import app
from fastcxr.cli.guard import expected_message
from fastcxr.errors import FastcxrError, MissingFile
from fastcxr.models import load_state_dict
from fastcxr.train.checkpoint import NetworkState

runner = CliRunner()


def test_a_stray_file_error_is_a_bug_not_an_expected_error():
    assert expected_message(FileNotFoundError(2, "No such file or directory", "/x")) is None
    assert expected_message(PermissionError(13, "Permission denied", "/x")) is None
    assert expected_message(MissingFile("/x: no such weights file")) == "/x: no such weights file"
    assert isinstance(MissingFile("m"), FileNotFoundError)  # library callers may catch either


@pytest.mark.parametrize("seed", range(12))
def test_corrupt_weights_are_one_usage_error_naming_the_file(tmp_path, seed):
    rng = np.random.default_rng(seed)
    good = tmp_path / "good.pth"
    torch.save({"w": torch.zeros(4)}, good)
    data = bytearray(good.read_bytes())
    if seed % 3 == 0:
        data = bytearray(rng.integers(0, 256, 2000, dtype=np.uint8).tobytes())
    else:
        for i in rng.integers(0, len(data), 1 + seed):
            data[i] = int(rng.integers(0, 256))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(bytes(data))
    try:
        sd = load_state_dict(bad)
    except FastcxrError as e:
        assert str(bad) in str(e)
    else:  # a flipped byte the zip's payload tolerates: still a dict of tensors
        assert all(isinstance(v, torch.Tensor) for v in sd.values())


def test_missing_weights_and_checkpoints_name_the_file(tmp_path):
    with pytest.raises(MissingFile, match="no such weights file"):
        load_state_dict(tmp_path / "none.pth")
    ck = tmp_path / "net.ckpt"
    torch.save([1, 2, 3], ck)
    with pytest.raises(FastcxrError, match=r"unreadable checkpoint \(a list, not a dict\)"):
        NetworkState.load(ck)
    torch.save({"format": "fastcxr-network-state-1"}, ck)
    with pytest.raises(FastcxrError, match="unreadable checkpoint"):
        NetworkState.load(ck)


def test_a_malformed_window_is_a_dicom_error_but_a_bug_in_display_is_not(tmp_path, monkeypatch):
    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    import pydicom

    bad = make_dicom(tmp_path / "w.dcm", px, VOILUTSequence=[pydicom.Dataset()])  # no LUT in it
    with pytest.raises(dicom.DicomError, match=r"cannot apply display tags \(VOI LUT: "):
        dicom.read_dicom(bad, size=32)
    good = make_dicom(tmp_path / "g.dcm", px, WindowCenter="2048", WindowWidth="4096")

    def buggy(*args, **kwargs):
        return undefined_name  # noqa: F821  (a bug: NameError)

    monkeypatch.setattr(dicom, "to_display", buggy)
    with pytest.raises(NameError):
        dicom.read_dicom(good, size=32)


def test_a_missing_template_is_one_line(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path), "--template", str(tmp_path / "no.md"),
                              "--out", str(tmp_path / "out")])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "--template" in res.stderr and "no such file" in res.stderr
    assert not os.path.exists(tmp_path / "out")  # refused before anything was written


def test_every_cut_and_a_fuzzed_deflated_dicom_is_a_dicom_error(tmp_path):
    """The checker's finds: a DICOM cut inside its meta header raised pydicom's
    BytesLengthException (an Exception, no ValueError), a damaged deflated one zlib.error."""
    import glob
    import random

    import pydicom

    px = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4096
    whole = make_dicom(tmp_path / "w.dcm", px).read_bytes()
    deflated = glob.glob(os.path.join(os.path.dirname(pydicom.__file__),
                                      "data", "test_files", "image_dfl.dcm"))  # fmt: skip
    cases = [whole[:n] for n in range(0, 400)]
    if deflated:
        rng, src = random.Random(1), bytearray(open(deflated[0], "rb").read())
        for _ in range(150):
            c = bytearray(src)
            for _ in range(8):
                c[rng.randrange(300, len(c))] = rng.randrange(256)
            cases.append(bytes(c))
    others = []
    for i, data in enumerate(cases):
        p = tmp_path / f"c{i}.dcm"
        p.write_bytes(data)
        try:
            dicom.read_dicom(p, size=32)
        except dicom.DicomError:
            pass
        except Exception as e:  # noqa: BLE001  (what the test looks for)
            others.append((i, type(e).__name__))
    assert others == []


def test_bad_output_paths_and_damaged_run_files_are_one_line(tmp_path):
    """The checker's finds: `report --out` onto a file, a damaged config.json of a run given
    to predict, a damaged checkpoints/run.json on --resume were tracebacks."""
    from fastcxr.runtime.runs import RunError, read_record_json, same_config

    afile = tmp_path / "results.md"
    afile.write_text("mine")
    res = runner.invoke(app, ["report", str(tmp_path), "--out", str(afile)])
    assert res.exit_code == 2 and "it is a file" in res.stderr, res.output
    assert afile.read_text() == "mine"
    for text in ("{not json", "[1, 2]"):
        bad = tmp_path / "config.json"
        bad.write_text(text)
        with pytest.raises(RunError, match="config.json"):
            read_record_json(bad)
        with pytest.raises(RunError, match="config.json"):
            same_config(bad, {"a": 1}, "the run")
    with pytest.raises(RunError, match="unreadable run file"):
        read_record_json(tmp_path / "gone.json")
