"""Run records that cannot lie (issue 12): one run per folder, locked while written, never
overwritten unless asked; resume equal to the uninterrupted run; inputs that would falsify a
result refused before training, each with a one-line error."""

import json
import os
import signal
import subprocess

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN, fastcxr, wait_for
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.manifest import ManifestError, read_manifest
from fastcxr.predict import Predictor
from fastcxr.runtime.runs import RunLock

runner = CliRunner()
TINY = [*TINY_TRAIN, "--epochs", "1", "--stages", "all", "--no-pretrained"]
FINDINGS = ("Edema", "Pleural Effusion")


def _train(prepared, runs, name, *extra):
    return runner.invoke(
        app, ["train", "--data", str(prepared), *TINY, "--runs", str(runs), "--name", name,
              *map(str, extra)],
    )  # fmt: skip


def _one_line_error(res, *words):
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.stderr, res.stderr
    msg = res.stderr.strip().splitlines()[-1]  # progress lines may come before it
    assert msg.startswith("error:"), res.stderr
    for w in words:
        assert w in msg, msg


# -- one run, one folder ------------------------------------------------------------------------
@pytest.mark.slow
def test_a_complete_run_is_not_overwritten_and_predict_loads_only_its_networks(prepared, tmp_path):
    assert _train(prepared, tmp_path, "mix", "--formulation", "single").exit_code == 0
    before = (tmp_path / "mix" / "record.json").read_text()
    _one_line_error(
        _train(prepared, tmp_path, "mix", "--formulation", "multilabel"),
        "complete run",
        "--overwrite",
    )
    assert (tmp_path / "mix" / "record.json").read_text() == before  # untouched
    res = _train(prepared, tmp_path, "mix", "--formulation", "multilabel", "--overwrite")
    assert res.exit_code == 0, res.output
    run = tmp_path / "mix"
    assert sorted(p.name for p in run.glob("model-*.pth")) == ["model-edema+pleural_effusion.pth"]
    # a leftover network put back into the folder is never mixed in
    single = tmp_path / "other"
    assert _train(prepared, tmp_path, "other", "--formulation", "single").exit_code == 0
    for suffix in (".pth", ".json"):
        (run / f"model-edema{suffix}").write_bytes((single / f"model-edema{suffix}").read_bytes())
    pred = Predictor.load(run, device="cpu")
    assert [n.findings for n in pred.networks] == [FINDINGS]
    rec = pd.read_csv(run / "predictions.csv").query("split == 'test'")
    got = pred.probabilities(np.stack([pred.load_image(prepared / p) for p in rec["image"]]))
    np.testing.assert_allclose(got, rec[[f"p_{f}" for f in FINDINGS]].to_numpy(), atol=1e-4)


def test_an_interrupted_run_needs_resume_or_overwrite(prepared, tmp_path):
    (tmp_path / "half" / "checkpoints").mkdir(parents=True)
    (tmp_path / "half" / "checkpoints" / "x.pt").write_bytes(b"")
    _one_line_error(_train(prepared, tmp_path, "half"), "interrupted run", "--resume")


def test_a_folder_being_trained_into_is_locked(prepared, tmp_path):
    with RunLock(tmp_path / "busy"):  # as another process holding it would
        res = _train(prepared, tmp_path, "busy")
    _one_line_error(res, "another fastcxr process", f"pid {os.getpid()}")
    assert _train(prepared, tmp_path, "busy").exit_code == 0  # released: free again


@pytest.mark.slow
def test_two_concurrent_trains_into_one_name(prepared, tmp_path):
    cmd = fastcxr("train", "--data", prepared, *TINY, "--runs", tmp_path, "--name", "same")
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    outs = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 2], outs
    err = next(e for (_, e), p in zip(outs, procs) if p.returncode == 2)
    assert "pid" in err or "complete run" in err, err


def test_runs_that_is_not_a_writable_folder(prepared, tmp_path):
    (tmp_path / "afile").write_text("x")
    _one_line_error(_train(prepared, tmp_path / "afile", "r"), "cannot write")


# -- inputs that falsify results ----------------------------------------------------------------
def test_the_same_image_in_two_splits_is_leakage(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv", dtype=str)
    test_row = df.index[df["split"] == "test"][0]
    train_img = df.loc[df["split"] == "train", "image"].iloc[0]
    df.loc[test_row, "image"] = "./" + train_img  # the same file, spelled differently
    df.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="listed more than once"):
        read_manifest(tmp_path / "manifest.csv")


def test_the_same_image_twice_in_one_split(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv", dtype=str)
    df = pd.concat([df, df[df["split"] == "train"].iloc[:1]], ignore_index=True)
    df.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(ManifestError, match="listed more than once"):
        read_manifest(tmp_path / "manifest.csv")


def test_blank_image_cell(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv", dtype=str)
    df.loc[4, "image"] = None
    df.to_csv(tmp_path / "manifest.csv", index=False)
    _one_line_error(_train(tmp_path, tmp_path, "b"), "blank 'image'", "rows 6")


def test_a_missing_image_is_found_before_training(prepared, tmp_path):
    df = pd.read_csv(prepared / "manifest.csv", dtype=str)
    df.loc[df.index[df["split"] == "test"][0], "image"] = "images/not-there.png"
    manifest = prepared / f"manifest-missing-{os.getpid()}.csv"  # beside the real images
    df.to_csv(manifest, index=False)
    try:
        res = _train(manifest, tmp_path, "m")
    finally:
        manifest.unlink()
    _one_line_error(res, "do not exist", "images/not-there.png")
    assert " epoch " not in res.stderr


@pytest.mark.parametrize(
    "option, words",
    [
        (["--epochs", "0"], ["--epochs", "at least 1"]),
        (["--lr", "-1"], ["--lr", "positive"]),
        (["--batch-size", "0"], ["--batch-size"]),
        (["--batch-size", "-4"], ["--batch-size"]),
        (["--workers", "-1"], ["--workers"]),
        (["--size", "0"], ["--size"]),
        (["--precision", "bogus"], ["precision 'bogus'"]),
        (["--loader", "bogus"], ["loader 'bogus'"]),
        (["--arch", "bogus"], ["architecture 'bogus'"]),
        (["--stages", "bogus"], ["stage bogus", "matches no group"]),
        (["--stages", ""], ["--stages is empty"]),
        (["--stages", "all,all"], ["repeats a stage name"]),
        (["--findings", ""], ["unknown finding ''"]),
    ],
)
def test_nonsense_options_are_one_line_errors(prepared, tmp_path, option, words):
    _one_line_error(_train(prepared, tmp_path, "x", *option), *words)
    assert not (tmp_path / "x").exists()  # nothing written that would block the name


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", ".hidden", ""])
def test_a_run_name_is_a_folder_inside_runs(prepared, tmp_path, name):
    _one_line_error(_train(prepared, tmp_path / "runs", name), "--name must be a plain folder")
    assert not (tmp_path / "escape").exists()


@pytest.mark.slow
def test_resume_with_another_config_is_refused(prepared, tmp_path):
    run = tmp_path / "r"
    # an interrupted run: start one and stop it after its first epoch
    cmd = fastcxr("train", "--data", prepared, *TINY_TRAIN, "--epochs", "3", "--stages", "all",
                  "--patience", "5", "--runs", tmp_path, "--name", "r")  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(run / "checkpoints" / "edema+pleural_effusion.pt", 1, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    args = [str(a) for a in cmd[3:]]  # the same command line, run in this process (faster)
    for change in (["--seed", "1"], ["--lr", "0.01"], ["--formulation", "multiclass"]):
        res = runner.invoke(app, [*args, *change, "--resume"])
        assert res.exit_code == 2, res.stderr
        assert "another configuration" in res.stderr, res.stderr
        if change[0] == "--seed":
            assert "seed: 0 → 1" in res.stderr
    res = runner.invoke(app, [*args, "--resume"])
    assert res.exit_code == 0, res.output
    assert json.loads((run / "record.json").read_text())["complete"] is True


# -- resume is invisible ------------------------------------------------------------------------
RESUME = [*TINY_TRAIN, "--patience", "10", "--formulation", "multilabel", "--stages", "head,all",
          "--epochs", "2"]  # fmt: skip


def _record(run):
    h = pd.read_csv(run / "history.csv").drop(columns=["train_seconds", "seconds",
                                                       "compile_seconds"])  # fmt: skip
    m = json.loads((run / "metrics.json").read_text())
    m = {k: m[k] for k in ("findings", "per_stage", "thresholds", "selected_stage", "epochs")}
    return h, pd.read_csv(run / "predictions.csv"), m


@pytest.fixture(scope="module")
def uninterrupted(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("ref")
    r = subprocess.run(fastcxr("train", "--data", prepared, *RESUME, "--runs", runs, "--name",
                               "ref"), capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    return _record(runs / "ref")


@pytest.mark.parametrize(
    "kills", [[1], [2], [3], [1, 3]], ids=lambda k: "kill@" + "+".join(map(str, k))
)
@pytest.mark.slow
def test_resume_after_sigkill_equals_the_uninterrupted_run(
    prepared, tmp_path, uninterrupted, kills
):
    """SIGKILL once the k-th epoch is checkpointed (each epoch of a 2 x 2 schedule, and twice
    in a row), then --resume: history, predictions and metrics are exactly the same."""
    base = fastcxr("train", "--data", prepared, *RESUME, "--runs", tmp_path, "--name", "k")
    ckpt = tmp_path / "k" / "checkpoints" / "edema+pleural_effusion.pt"
    for i, k in enumerate(kills):
        proc = subprocess.Popen([*base, *(["--resume"] if i else [])], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        wait_for(ckpt, k, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert not (tmp_path / "k" / "record.json").exists()
    res = subprocess.run([*base, "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    h, p, m = _record(tmp_path / "k")
    pd.testing.assert_frame_equal(h, uninterrupted[0])
    pd.testing.assert_frame_equal(p, uninterrupted[1])
    assert m == uninterrupted[2]


@pytest.mark.slow
def test_resume_after_sigterm_equals_the_uninterrupted_run(prepared, tmp_path, uninterrupted):
    base = fastcxr("train", "--data", prepared, *RESUME, "--runs", tmp_path, "--name", "t")
    proc = subprocess.Popen(base, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(tmp_path / "t" / "checkpoints" / "edema+pleural_effusion.pt", 1, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    res = subprocess.run([*base, "--resume"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    h, p, m = _record(tmp_path / "t")
    pd.testing.assert_frame_equal(h, uninterrupted[0])
    pd.testing.assert_frame_equal(p, uninterrupted[1])
    assert m == uninterrupted[2]


# -- clear one-line errors ----------------------------------------------------------------------
def test_weights_of_another_architecture_say_what_they_are(prepared, tmp_path):
    import torchvision

    w = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), w)
    res = _train(prepared, tmp_path, "w", "--weights", w)  # TINY trains a resnet10
    _one_line_error(res, "weights of a resnet18, not of resnet10")


def test_user_text_is_never_markup(prepared, tmp_path):
    _one_line_error(_train(prepared, tmp_path, "f", "--findings", "[/]"), "'[/]'")
    res = _train(prepared, tmp_path, "g", "--findings", "Edema,[red]Effusion")
    _one_line_error(res, "[red]Effusion")


def test_a_corrupt_cached_image_during_training_names_the_file(prepared, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(prepared, data)
    df = pd.read_csv(data / "manifest.csv")
    bad = df.loc[df["split"] == "train", "image"].iloc[3]
    (data / bad).write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    res = _train(data, tmp_path, "c")
    _one_line_error(res, bad, "fastcxr prepare")


@pytest.mark.slow
def test_an_edited_sidecar_arch_is_refused(prepared, tmp_path):
    assert _train(prepared, tmp_path, "s").exit_code == 0
    side = tmp_path / "s" / "model-edema+pleural_effusion.json"
    meta = json.loads(side.read_text())
    side.write_text(json.dumps({**meta, "arch": "resnet18"}))
    res = runner.invoke(app, ["predict", str(tmp_path / "s"), str(prepared / "images")])
    _one_line_error(res, "model-edema+pleural_effusion.pth", "resnet18")


def test_a_full_disk_leaves_no_partial_file(tmp_path, monkeypatch):
    import errno

    from fastcxr.runtime.runs import RunError, save_torch

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"x" * 1000)  # half written, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match=f"no space left on {tmp_path}"):
        save_torch(tmp_path / "model.pth", {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_torchs_unexpected_pos_on_a_full_disk_is_a_one_line_error(tmp_path, monkeypatch):
    """#22 item 21: torch's zip writer reports a full disk as RuntimeError("... unexpected
    pos ..."), which a 115-line traceback showed."""
    from fastcxr.runtime.runs import RunError, save_torch

    def full(obj, f, *a, **k):
        with open(f, "wb") as fh:
            fh.write(b"x" * 100)
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter "
                           "failed writing file data/0: file write failed; unexpected pos "
                           "1234 vs 1000")  # fmt: skip

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(RunError, match=f"cannot write {tmp_path}|no space left on {tmp_path}"):
        save_torch(tmp_path / "model.pth", {"a": torch.zeros(3)})
    assert list(tmp_path.iterdir()) == []


def test_another_runtime_error_while_writing_is_not_hidden(tmp_path, monkeypatch):
    from fastcxr.runtime.runs import save_torch

    def bug(obj, f, *a, **k):
        raise RuntimeError("Can't pickle local object")

    monkeypatch.setattr(torch, "save", bug)
    with pytest.raises(RuntimeError, match="pickle"):
        save_torch(tmp_path / "model.pth", {"a": torch.zeros(3)})


def test_a_read_only_folder_fails_with_one_line_even_when_cleanup_fails(tmp_path, monkeypatch):
    """#22 item 22: removing the partial file raised EROFS from the cleanup itself."""
    import errno

    from fastcxr.runtime.runs import RunError, write_atomic

    def read_only(tmp):
        raise OSError(errno.EROFS, "Read-only file system")

    real_unlink = type(tmp_path).unlink

    def unlink(self, missing_ok=False):
        if self.name.endswith(".part"):
            raise OSError(errno.EROFS, "Read-only file system")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(type(tmp_path), "unlink", unlink)
    with pytest.raises(RunError, match=f"cannot write {tmp_path} \\(Read-only file system\\)"):
        write_atomic(tmp_path / "x.json", read_only)
