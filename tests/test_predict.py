"""`fastcxr predict`: same numbers as the run record, broken files reported, CAMs, export."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.export import load_exported
from fastcxr.predict import Predictor, grad_cam

runner = CliRunner()


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    res = runner.invoke(
        app,
        [
            "train",
            "--formulation",
            "multiclass",
            "--data",
            str(prepared),
            *TINY_TRAIN,
            "--epochs",
            "1",
            "--stages",
            "all",
            "--runs",
            str(runs),
            "--name",
            "mc",
        ],
    )
    assert res.exit_code == 0, res.output
    return runs / "mc"


@pytest.mark.slow
def test_predict_on_dicoms_matches_the_run_record(trained, prepared, synthetic_tree, tmp_path):
    manifest = pd.read_csv(prepared / "manifest.csv")
    rec = pd.read_csv(trained / "predictions.csv")
    test = rec[rec["split"] == "test"].merge(manifest[["image", "source"]], on="image")
    folder = tmp_path / "dicoms"
    folder.mkdir()
    for src in test["source"]:
        shutil.copy(synthetic_tree / src, folder)
    shutil.copy(synthetic_tree / test["source"].iloc[0], folder / "broken.dcm")
    (folder / "broken.dcm").write_bytes((folder / "broken.dcm").read_bytes()[:300])
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(trained), str(folder), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["predicted"] == len(test) and summary["failed"] == 1
    assert summary["failures"][0]["file"].endswith("broken.dcm")
    got = pd.read_csv(out)
    got["dicom"] = got["file"].str.rsplit("/", n=1).str[-1]
    test["dicom"] = test["source"].str.rsplit("/", n=1).str[-1]
    m = test.merge(got, on="dicom", suffixes=("_rec", ""))
    assert len(m) == len(test)
    side = json.loads((trained / "model-edema+pleural_effusion.json").read_text())
    for f in ("Edema", "Pleural Effusion"):
        np.testing.assert_allclose(m[f"p_{f}"], m[f"p_{f}_rec"], atol=1e-4)
        # decisions at the threshold chosen on validation, not at 0.5
        assert (m[f"pred_{f}"] == (m[f"p_{f}"] >= side["thresholds"][f])).all()


@pytest.mark.slow
def test_predict_uses_the_runs_bf16_and_matches_its_record(prepared, tmp_path):
    """A run evaluated in bf16 (fast path) is predicted in bf16: same numbers as its record."""
    res = runner.invoke(
        app,
        ["train", "--formulation", "multilabel", "--data", str(prepared), *TINY_TRAIN,
         "--epochs", "1", "--stages", "all", "--loader", "fast", "--precision", "bf16",
         "--runs", str(tmp_path), "--name", "bf"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp_path / "bf"
    pred = Predictor.load(run, device="cpu")
    assert pred.precision == "bf16"
    rec = pd.read_csv(run / "predictions.csv").query("split == 'test'")
    imgs = np.stack([pred.load_image(prepared / p) for p in rec["image"]])
    got = pred.probabilities(imgs)
    for i, f in enumerate(("Edema", "Pleural Effusion")):
        np.testing.assert_allclose(got[:, i], rec[f"p_{f}"], atol=1e-4)
    pred.precision = "fp32"
    assert np.abs(pred.probabilities(imgs) - got).max() > 0  # bf16 was really used


def test_cam_and_export(trained, prepared, tmp_path):
    manifest = pd.read_csv(prepared / "manifest.csv")
    one = prepared / manifest["image"].iloc[0]
    res = runner.invoke(
        app,
        [
            "predict",
            str(trained),
            str(one),
            "--out",
            str(tmp_path / "o.csv"),
            "--cam",
            str(tmp_path / "cam"),
            "--export",
            str(tmp_path / "x"),
        ],
    )
    assert res.exit_code == 0, res.output
    assert len(list((tmp_path / "cam").glob("*.png"))) == 2  # one per finding
    pred = Predictor.load(trained, device="cpu")
    img = pred.load_image(one)
    cam = grad_cam(pred.networks[0].model, img, 0)
    assert cam.shape == img.shape and 0 <= cam.min() and cam.max() <= 1
    run = load_exported(tmp_path / "x")
    x = torch.from_numpy(np.stack([img, img[::-1].copy()])).float()[:, None]
    np.testing.assert_allclose(run(x), pred.probabilities(np.stack([img, img[::-1]])), atol=1e-5)


def test_incomplete_run_is_refused(tmp_path):
    res = runner.invoke(app, ["predict", str(tmp_path), str(tmp_path)])
    assert res.exit_code == 2 and "not a complete run" in res.stderr


# -- outputs that would destroy something (#22 items 9, 10) --------------------------------------
def _images(prepared, k=3):
    return sorted(prepared.rglob("*.png"))[:k]


def _refused(res, *words):
    assert res.exit_code == 2, res.output
    line = res.stderr.strip().splitlines()[-1]
    assert line.startswith("error:") and all(w in line for w in words), line


def test_predict_never_replaces_a_run_file_or_an_input(trained, prepared, tmp_path, monkeypatch):
    imgs = [str(p) for p in _images(prepared)]
    own = trained / "predictions.csv"
    before = own.read_bytes()
    # the default --out, run from inside the run folder
    monkeypatch.chdir(trained)
    _refused(
        runner.invoke(app, ["predict", str(trained), *imgs]), "would replace a file of the run"
    )
    weights = next(trained.glob("*.pth"))
    w_before = weights.read_bytes()
    _refused(runner.invoke(app, ["predict", str(trained), *imgs, "--out", str(weights)]),
             "would replace a file of the run")  # fmt: skip
    _refused(runner.invoke(app, ["predict", str(trained), *imgs, "--out", imgs[0]]),
             "is one of the input images")  # fmt: skip
    assert own.read_bytes() == before and weights.read_bytes() == w_before
    assert open(imgs[0], "rb").read(4) == b"\x89PNG"
    # a new file name beside the run's is fine, and so is replacing one's own earlier CSV
    monkeypatch.chdir(tmp_path)
    for _ in range(2):
        res = runner.invoke(app, ["predict", str(trained), *imgs, "--out", "mine.csv"])
        assert res.exit_code == 0, res.output
    assert len(pd.read_csv(tmp_path / "mine.csv")) == len(imgs)
    # a CSV predict did not write (here a manifest) is not replaced
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path,subject_id,Edema\na.png,1,1\n")
    m_before = manifest.read_bytes()
    _refused(runner.invoke(app, ["predict", str(trained), *imgs, "--out", str(manifest)]),
             "not a CSV written by predict")  # fmt: skip
    assert manifest.read_bytes() == m_before


def test_export_refuses_a_non_empty_folder_and_overwrite_replaces_an_export(trained, prepared,
                                                                            tmp_path):  # fmt: skip
    imgs = [str(p) for p in _images(prepared, 1)]
    out = tmp_path / "exp"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    args = ["predict", str(trained), *imgs, "--out", str(tmp_path / "p.csv"), "--export", str(out)]
    _refused(runner.invoke(app, args), "is not empty")
    _refused(runner.invoke(app, [*args, "--overwrite"]), "not an export")
    assert (out / "notes.txt").read_text() == "mine"
    out2 = tmp_path / "exp2"
    args2 = [*args[:-1], str(out2)]
    assert runner.invoke(app, args2).exit_code == 0
    (out2 / "stale.pt2").write_bytes(b"from another run")
    (out2 / "README.txt").write_text("my notes on this export")
    _refused(runner.invoke(app, args2), "is not empty")
    res = runner.invoke(app, [*args2, "--overwrite"])
    assert res.exit_code == 0, res.output
    assert not (out2 / "stale.pt2").exists() and (out2 / "export.json").exists()
    assert (out2 / "README.txt").read_text() == "my notes on this export"  # not an export file


def test_predict_fails_when_no_input_is_readable(trained, tmp_path):
    bad = [tmp_path / "a.png", tmp_path / "b.png"]
    for b in bad:
        b.write_bytes(b"not a png")
    out = tmp_path / "p.csv"
    _refused(runner.invoke(app, ["predict", str(trained), *map(str, bad), "--out", str(out)]),
             "none of the 2 input file(s) could be read", "p_failures.csv")  # fmt: skip
    assert not out.exists() and len(pd.read_csv(tmp_path / "p_failures.csv")) == 2


def test_folders_follow_symlinks_once_and_skip_no_fifo(trained, prepared, tmp_path):
    """#22 items 15, 17: a symlinked subfolder was skipped without a word; a FIFO named x.png
    blocked predict forever."""
    import os

    src = _images(prepared, 3)
    top = tmp_path / "in"
    (top / "real").mkdir(parents=True)
    shutil.copyfile(src[0], top / "real" / "a.png")
    other = tmp_path / "elsewhere"
    other.mkdir()
    shutil.copyfile(src[1], other / "b.png")
    (top / "linked").symlink_to(other, target_is_directory=True)
    (top / "real" / "loop").symlink_to(top, target_is_directory=True)  # a link back up
    os.mkfifo(top / "x.png")
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(trained), str(top), "--out", str(out), "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    read = sorted(os.path.basename(f) for f in pd.read_csv(out)["file"])
    assert read == ["a.png", "b.png"]  # the linked folder's image too, the loop walked once
    assert got["failed"] == 1 and "not a regular file" in got["failures"][0]["reason"]


def test_grad_cam_inputs_with_one_stem_get_one_overlay_each(trained, prepared, tmp_path):
    src = _images(prepared, 2)
    for d, s in (("a", src[0]), ("b", src[1])):
        (tmp_path / d).mkdir()
        shutil.copyfile(s, tmp_path / d / "x.png")
    cams = tmp_path / "cams"
    res = runner.invoke(app, ["predict", str(trained), str(tmp_path / "a" / "x.png"),
                              str(tmp_path / "b" / "x.png"), "--out", str(tmp_path / "p.csv"),
                              "--cam", str(cams), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    written = sorted(p.name for p in cams.glob("*.png"))
    assert json.loads(res.stdout)["cams"] == len(written) and len(written) == 2 * 2
    assert {n.split("__")[0] for n in written} == {"a_x_png", "b_x_png"}


def test_a_cam_folder_that_cannot_be_written_is_one_line(trained, prepared, tmp_path, monkeypatch):
    """#22 item 22: --cam into a read-only or full folder gave a traceback."""
    import errno

    from matplotlib.figure import Figure

    def refuse(self, fname, *a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Figure, "savefig", refuse)
    img = str(_images(prepared, 1)[0])
    cams = tmp_path / "cams"
    res = runner.invoke(app, ["predict", str(trained), img, "--out", str(tmp_path / "p.csv"),
                              "--cam", str(cams)])  # fmt: skip
    _refused(res, f"cannot write {cams} (Read-only file system)")
    assert not list(cams.glob("*"))
