"""`prepare` against what goes wrong in practice: a corrupted cache, absurd sizes,
decompression bombs, SIGTERM/SIGINT/SIGKILL, a full or read-only disk."""

import contextlib
import errno
import multiprocessing
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom
import pytest
import torch
from PIL import Image
from tiny import fastcxr
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.dicom import read_dicom
from fastcxr.prepare import cache
from fastcxr.prepare.chexpert import prepare_chexpert
from fastcxr.prepare.mimic import mimic_table, prepare_mimic
from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

runner = CliRunner()
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def _parts(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith(".part")]


# -- 1. the cache is verified before it is trusted -----------------------------------------
def test_corrupted_cache_files_are_reconverted(synthetic_tree, tmp_path):
    out = tmp_path / "out"
    first = prepare_mimic(synthetic_tree, out, size=32, workers=2)
    table = pd.read_csv(out / "manifest.csv")
    n = len(table)
    assert first.converted == n and first.failures == 0
    truncated, garbage = out / table["image"].iloc[3], out / table["image"].iloc[10]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    size = garbage.stat().st_size
    garbage.write_bytes(np.random.default_rng(0).bytes(size))
    with Image.open(truncated) as im:  # the header still reads: opening it proves nothing
        assert im.size == (32, 32)

    again = prepare_mimic(synthetic_tree, out, size=32, workers=2)

    assert (again.converted, again.skipped, again.failures) == (2, n - 2, 0)
    # every cached image decodes and equals an independent conversion of its DICOM
    for img, src in zip(table["image"], table["source"]):
        with Image.open(out / img) as im:
            got = np.asarray(im)
        want = read_dicom(synthetic_tree / src, mode="voi", size=32)
        np.testing.assert_array_equal(got, want, err_msg=img)
    assert not _parts(out)


def _png_bytes(size=32, seed=0) -> bytes:
    path = Path(f"/tmp/fastcxr-test-{os.getpid()}-{seed}.png")
    arr = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)
    data = path.read_bytes()
    path.unlink()
    return data


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x10]) + data[at + 1 :]


CORRUPTIONS = {
    "truncated in the pixel data": lambda d: d[: len(d) // 2],
    "IEND missing": lambda d: d[:-12],
    "one bit flipped in the pixel data": lambda d: _flip(d, len(d) // 2),
    "zero-filled tail (crash before the data reached the disk)": lambda d: (
        d[:100] + bytes(len(d) - 100)
    ),
    "garbage of the same size": lambda d: np.random.default_rng(1).bytes(len(d)),
    "bytes after IEND": lambda d: d + b"junk",
    "empty": lambda d: b"",
}


@pytest.mark.parametrize("how", list(CORRUPTIONS))
def test_cache_check_finds_corruption(tmp_path, how):
    good = _png_bytes()
    p = tmp_path / "a.png"
    p.write_bytes(good)
    assert cache._cached_ok(p, 32)
    assert not cache._cached_ok(p, 16)  # another size: converted again
    p.write_bytes(CORRUPTIONS[how](good))
    assert not cache._cached_ok(p, 32)


def test_cache_check_wants_8bit_gray(tmp_path):
    p = tmp_path / "rgb.png"
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(p)
    assert not cache._cached_ok(p, 32)
    Image.fromarray(np.zeros((32, 32), np.uint16)).save(p)
    assert not cache._cached_ok(p, 32)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(p)
    assert cache._cached_ok(p, 32)


# -- 2. absurd sizes ------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -32, 7, 4097, 5000])
def test_absurd_size_is_refused_before_anything_is_written(synthetic_tree, tmp_path, size):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=rf"--size {size}: .*between 8 and 4096"):
        prepare_mimic(synthetic_tree, out, size=size, workers=1)
    assert not out.exists()
    res = runner.invoke(
        app, ["prepare", "mimic", str(synthetic_tree), "--out", str(out), "--size", str(size)]
    )
    assert res.exit_code == 2 and "between 8 and 4096" in res.stderr
    assert not out.exists()


def test_size_limits_are_inclusive():
    assert cache.check_size(8) == 8 and cache.check_size(4096) == 4096
    with pytest.raises(ValueError, match="whole number"):
        cache.check_size(32.5)


# -- 3. decompression bombs -----------------------------------------------------------------
def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def bomb_png(width: int, height: int) -> bytes:
    """A tiny PNG that declares `width` x `height` 8-bit gray pixels."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(b""))
        + _chunk(b"IEND", b"")
    )


BOMBS = {
    "bomb_pil.png": (20000, 20000),
    "bomb_pixels.png": (9000, 9000),
    "bomb_side.png": (17000, 8),
}
CHEXPERT_COLUMNS = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", "Edema", "Pleural Effusion"]


def test_bomb_png_is_a_failure_not_a_crash_in_prepare(tmp_path):
    root = tmp_path / "CheXpert-v1.0-small"
    rows, good = [], 0
    for p in range(12):
        rel = f"train/patient{p:05d}/study1/view1_frontal.jpg"
        (root / rel).parent.mkdir(parents=True)
        arr = np.random.default_rng(p).integers(0, 255, (40, 32), dtype=np.uint8)
        Image.fromarray(arr).save(root / rel, quality=90)
        rows.append([f"CheXpert-v1.0-small/{rel}", "Female", 60, "Frontal", "PA", 1.0, 0.0])
        good += 1
    for name, (w, h) in BOMBS.items():
        rel = f"train/patient09999/study1/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(bomb_png(w, h))
        assert (root / rel).stat().st_size < 100
        rows.append([f"CheXpert-v1.0-small/{rel}", "Male", 70, "Frontal", "AP", 0.0, 1.0])
    pd.DataFrame(rows, columns=CHEXPERT_COLUMNS).to_csv(root / "train.csv", index=False)
    pd.DataFrame(rows[:0], columns=CHEXPERT_COLUMNS).to_csv(root / "valid.csv", index=False)
    out = tmp_path / "out"

    rep = prepare_chexpert(root, out, size=16, workers=2)

    manifest = pd.read_csv(out / "manifest.csv")
    fails = pd.read_csv(out / "failures.csv")
    assert rep.failures == 3 and rep.images == good == len(manifest)
    assert not manifest["source"].str.contains("bomb").any()
    assert sorted(Path(f).name for f in fails["file"]) == sorted(BOMBS)
    for f, reason in zip(fails["file"], fails["reason"]):
        w, h = BOMBS[Path(f).name]
        assert "\n" not in reason and "implausible image size" in reason and f in reason
        if (w, h) != (20000, 20000):
            assert f"{w}x{h}" in reason


def test_bomb_png_is_listed_as_failed_by_predict(tmp_path):
    from fastcxr.dicom import resize_u8
    from fastcxr.models import build_model
    from fastcxr.predict import LoadedNetwork, Predictor, ProbabilityModel, collect_inputs, predict
    from fastcxr.preprocessing import Preprocessing

    findings = ("Edema", "Pleural Effusion")
    torch.manual_seed(0)
    pm = ProbabilityModel(build_model("resnet10", 2), "multilabel", 2, 0.449, 0.226).eval()
    pred = Predictor(
        tmp_path, findings, [LoadedNetwork(findings, pm, {})], Preprocessing(size=32),
        {"Edema": 0.5, "Pleural Effusion": 0.5}, torch.device("cpu"),
    )  # fmt: skip
    folder = tmp_path / "in"
    folder.mkdir()
    good = []
    for i in range(3):
        arr = np.random.default_rng(i).integers(0, 255, (48, 40), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"good{i}.png")
        good.append(folder / f"good{i}.png")
    for name, (w, h) in BOMBS.items():
        (folder / name).write_bytes(bomb_png(w, h))
    df, fails = predict(pred, collect_inputs([folder]), batch_size=2)

    assert df["file"].tolist() == [str(g) for g in good]
    assert sorted(Path(f).name for f in fails["file"]) == sorted(BOMBS)
    assert fails["reason"].str.contains("implausible image size").all()
    # the good files' probabilities: the network on their squashed pixels, bombs or not
    x = []
    for g in good:
        with Image.open(g) as im:
            x.append(resize_u8(np.asarray(im.convert("L")), 32).astype(np.float32))
    with torch.no_grad():
        want = pm(torch.from_numpy(np.stack(x))[:, None]).numpy()
    got = df[["p_Edema", "p_Pleural Effusion"]].to_numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)


# -- 4, 5. signals --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def slow_tree(tmp_path_factory):
    """A MIMIC-CXR tree whose conversion takes >10 s with 2 workers: every frontal image is a
    hard link to one 1536x1280 RLE-compressed DICOM (slow to decode, 0.4 MB on disk once)."""
    root = write_synthetic_mimic(
        tmp_path_factory.mktemp("slow"), SyntheticSpec(patients=150, seed=9, rows=96, cols=80)
    )
    sources = mimic_table(root)["source"].tolist()
    first = root / sources[0]
    ds = pydicom.dcmread(first)
    big = np.repeat(np.repeat(ds.pixel_array, 16, 0), 16, 1)
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.tobytes()
    ds.compress(pydicom.uid.RLELossless)
    ds.save_as(first)
    for s in sources[1:]:
        (root / s).unlink()
        os.link(first, root / s)
    return root


def _wait_for(cond, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _pngs(out: Path) -> list[Path]:
    return list((out / "images").glob("*.png")) if (out / "images").exists() else []


def _prepare_cmd(tree: Path, out: Path) -> list[str]:
    return fastcxr("prepare", "mimic", tree, "--out", out, "--size", "256", "--workers", "2")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signal_stops_prepare_quickly_and_it_resumes(slow_tree, tmp_path, sig):
    out = tmp_path / "out"
    total = len(mimic_table(slow_tree))
    proc = subprocess.Popen(
        _prepare_cmd(slow_tree, out), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        _wait_for(lambda: len(_pngs(out)) >= 6 or proc.poll() is not None, 180, "conversion")
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            _, err = proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"prepare still running 10 s after {signal.Signals(sig).name}")
        took = time.monotonic() - t0
    finally:
        _kill_tree(proc)
    assert proc.returncode == 143, err
    assert took < 10
    print(f"{signal.Signals(sig).name}: stopped {took:.2f} s after the signal")
    assert "stopped by request:" in err and "run the same prepare again to continue" in err
    done = _pngs(out)
    assert 0 < len(done) < total, "it did not stop early"
    assert f"{len(done)} of {total} images converted" in " ".join(err.split())
    assert not _parts(out) and not (out / "manifest.csv").exists()
    for p in done:  # every file left is whole
        with Image.open(p) as im:
            im.load()

    rep = prepare_mimic(slow_tree, out, size=256, workers=2)

    assert (rep.skipped, rep.converted, rep.failures) == (len(done), total - len(done), 0)
    reference = prepare_mimic(slow_tree, tmp_path / "ref", size=256, manifest_only=True)
    pd.testing.assert_frame_equal(
        pd.read_csv(out / "manifest.csv"), pd.read_csv(reference.manifest)
    )


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _kill_tree(proc: subprocess.Popen, kids: list[int] = ()) -> None:
    """End `proc` and its workers, should a test fail before they stop by themselves."""
    if proc.poll() is None:
        kids = [*kids, *_children(proc.pid)] if sys.platform.startswith("linux") else kids
        proc.kill()
        proc.wait()
    for k in kids:
        if _alive(k):
            with contextlib.suppress(ProcessLookupError):
                os.kill(k, signal.SIGKILL)


@linux_only
def test_workers_die_with_a_killed_prepare(slow_tree, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        _prepare_cmd(slow_tree, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    kids: list[int] = []
    try:
        _wait_for(lambda: len(_pngs(out)) >= 2 or proc.poll() is not None, 180, "conversion")
        kids = _children(proc.pid)
        assert len(kids) >= 2, kids
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(map(_alive, kids)):
            time.sleep(0.05)
        assert not [k for k in kids if _alive(k)], "workers outlived their parent"
    finally:
        _kill_tree(proc, kids)


# -- 6. full or read-only disk --------------------------------------------------------------
def _failing_save(code: int):
    """PIL's `Image.save` on a disk that fills up (or refuses) part-way through the file."""

    def save(self, fp, format=None, **params):
        Path(fp).write_bytes(b"\x89PNG\r\n\x1a\n partial")
        raise OSError(code, os.strerror(code), str(fp))

    return save


@pytest.mark.parametrize(
    ("code", "message"),
    [
        (errno.ENOSPC, "no space left on"),
        (errno.EROFS, "cannot write"),
        (errno.EACCES, "cannot write"),
    ],
)
@pytest.mark.parametrize("workers", [1, 2])
def test_unwritable_cache_stops_with_one_clear_line(
    synthetic_tree, tmp_path, monkeypatch, code, message, workers
):
    if workers > 1 and multiprocessing.get_start_method() != "fork":
        pytest.skip("the patched writer reaches workers only when they are forked")
    monkeypatch.setattr(Image.Image, "save", _failing_save(code))
    out = tmp_path / "out"
    with pytest.raises(ValueError) as e:  # a CacheWriteError
        prepare_mimic(synthetic_tree, out, size=32, workers=workers)
    msg = str(e.value)
    assert msg.startswith(f"{message} {out / 'images'}") and "\n" not in msg
    assert not _parts(out) and not (out / "manifest.csv").exists()
    assert not (out / "failures.csv").exists()  # not a per-image failure


def test_full_disk_is_one_line_exit_2_from_the_cli(synthetic_tree, tmp_path, monkeypatch):
    monkeypatch.setattr(Image.Image, "save", _failing_save(errno.ENOSPC))
    out = tmp_path / "out"
    res = runner.invoke(
        app,
        ["prepare", "mimic", str(synthetic_tree), "--out", str(out), "--size", "32",
         "--workers", "1"],
    )  # fmt: skip
    assert res.exit_code == 2
    assert "no space left on" in res.stderr and "Traceback" not in res.output
    assert not _parts(out)


def test_full_disk_while_writing_the_manifest(synthetic_tree, tmp_path, monkeypatch):
    from fastcxr.prepare import common

    def full(path, df, compression=None):
        path.parent.mkdir(parents=True, exist_ok=True)
        (path.parent / f".{path.name}.part").write_text("partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(common, "write_csv", full)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=f"no space left on {out}"):
        prepare_mimic(synthetic_tree, out, size=32, manifest_only=True)
    assert not _parts(out)
