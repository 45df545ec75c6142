"""What a user sees is fastcxr's own words: a short train, `lr-find` and `predict --cam` run
with every UserWarning and FutureWarning turned into an error (`-W error::...`), and print none.

Before: fastai's import printed torch's `torch.jit.script` deprecation four times in every run
(now ignored for that message from that module of torch alone; `guarded` no longer hides every
FutureWarning), `predict --cam` printed torch's "non-writable NumPy array" warning (the
Grad-CAM input is now a copy), and the fast path printed fastai's "You are shadowing an
attribute (smooth_loss)" (tests/test_fastpath.py)."""

import subprocess
import sys

import pytest
from tiny import TINY_TRAIN, fastcxr

STRICT = (sys.executable, "-W", "error::UserWarning", "-W", "error::FutureWarning")


def _quiet(*args, timeout=300) -> subprocess.CompletedProcess:
    r = subprocess.run(fastcxr(*args, launch=STRICT), capture_output=True, text=True,
                       timeout=timeout)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr and "warn(" not in r.stderr, r.stderr
    return r


@pytest.fixture(scope="module")
def trained(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("quiet")
    _quiet("train", "--data", prepared, *TINY_TRAIN, "--stages", "head,all", "--epochs", "1",
           "--runs", runs, "--name", "q")  # fmt: skip
    return runs / "q"


@pytest.mark.slow
def test_lr_find_prints_no_warning(prepared, tmp_path):
    _quiet("lr-find", "--data", prepared, *TINY_TRAIN, "--stages", "head", "--num-it", "8",
           "--out", tmp_path / "lr")  # fmt: skip
    assert (tmp_path / "lr" / "lr_find.json").exists()


@pytest.mark.slow
def test_predict_with_grad_cam_prints_no_warning(trained, prepared, tmp_path):
    images = sorted((prepared / "images").rglob("*.png"))[:3]
    _quiet("predict", trained, *images, "--out", tmp_path / "p.csv", "--cam", tmp_path / "cam")
    assert len(list((tmp_path / "cam").glob("*.png"))) == 3 * 2  # per image and finding
