"""A prepare run killed part-way and run again: same manifest, nothing converted twice."""

import json
import signal
import subprocess
import time

import pandas as pd
import pytest
from tiny import fastcxr

from fastcxr.bench import bench_prepare
from fastcxr.prepare.mimic import prepare_mimic
from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic


@pytest.mark.slow
def test_killed_prepare_resumes(tmp_path):
    raw = write_synthetic_mimic(
        tmp_path / "raw", SyntheticSpec(patients=80, seed=5, rows=384, cols=448)
    )
    out = tmp_path / "out"
    cmd = fastcxr("prepare", "mimic", raw, "--out", out, "--size", "64", "--workers", "1")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("images/*.png"))) < 10:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(list(out.glob("images/*.png")))
    assert 0 < done_before and not (out / "manifest.csv").exists()
    res = subprocess.run([*cmd, "--json"], capture_output=True, text=True, check=True)
    rep = json.loads(res.stdout)
    assert rep["converted"] == rep["images"] - done_before  # nothing converted twice
    assert rep["skipped"] == done_before
    clean = prepare_mimic(raw, tmp_path / "clean", size=64, workers=1)
    a = pd.read_csv(out / "manifest.csv")
    b = pd.read_csv(clean.manifest)
    pd.testing.assert_frame_equal(a, b)


def test_bench_prepare_runs_small():
    r = bench_prepare(n=2, size=32, repeats=1, rows=300, cols=254).to_json()
    assert r["baseline_images_per_s_per_core"] > 0 and r["fastcxr_images_per_s_per_core"] > 0
    assert r["ratio"] == r["fastcxr_images_per_s_per_core"] / r["baseline_images_per_s_per_core"]
