"""Hostile use of training, predict and evaluate (#22 items 6-25): each test reproduces what a
hostile user did on main and checks the fix."""

import shutil

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.data import check_files
from fastcxr.data.datablock import DataError
from fastcxr.leakage import same_files
from fastcxr.manifest import ManifestError, validate_manifest

runner = CliRunner()
FAST = [*TINY_TRAIN, "--no-pretrained", "--loader", "datablock", "--precision", "fp32"]


def _one_line_error(res, *words: str) -> str:
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines[-1].startswith("error:"), res.stderr
    for w in words:
        assert w in lines[-1], lines[-1]
    return lines[-1]


def test_a_diverged_run_stops_with_a_clear_error_and_is_not_complete(prepared, tmp_path):
    """Item 8: `--lr 1e9` gave NaN losses and a run recorded as complete."""
    res = runner.invoke(app, ["train", "--data", str(prepared), *FAST, "--stages", "all",
                              "--epochs", "2", "--lr", "1e9", "--runs", str(tmp_path),
                              "--name", "d"])  # fmt: skip
    line = _one_line_error(res, "training diverged at stage all, epoch 1", "is nan", "--lr")
    assert "Exception occured" not in line
    run = tmp_path / "d"
    assert not (run / "record.json").exists() and not (run / "metrics.json").exists()
    assert not list((run / "checkpoints").glob("*.pt"))  # the NaN epoch was not checkpointed
    res = runner.invoke(app, ["report", str(run), "--out", str(tmp_path / "rep")])
    assert res.exit_code == 2, res.output  # an incomplete run is refused, not read as numbers


# -- leakage the split check missed (#22 item 7) --------------------------------------------------
def _manifest_df(rows):
    return pd.DataFrame(rows, columns=["image", "patient_id", "split"])


@pytest.mark.parametrize("other", ["10035354.0", "010035354", " 10035354 "])
def test_one_patient_spelled_two_ways_in_two_splits_is_leakage(other):
    df = _manifest_df([("a.png", "10035354", "train"), ("b.png", other, "test"),
                       ("c.png", "20000001", "valid")])  # fmt: skip
    with pytest.raises(ManifestError, match="1 patient.*more than one split.*10035354"):
        validate_manifest(df)


def test_distinct_patients_that_look_alike_are_not_merged():
    df = _manifest_df([("a.png", "patient001", "train"), ("b.png", "patient01", "test"),
                       ("c.png", "1.5", "valid"), ("d.png", "15", "test")])  # fmt: skip
    validate_manifest(df)  # ids that are not whole numbers are compared as written


def _png(path, seed):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)).save(path)


@pytest.mark.parametrize("how", ["symlink", "copy"])
def test_a_training_image_in_test_under_another_name_is_refused(tmp_path, how):
    for i in range(4):
        _png(tmp_path / f"img{i}.png", i)
    if how == "symlink":
        (tmp_path / "dup.png").symlink_to(tmp_path / "img1.png")
    else:
        shutil.copyfile(tmp_path / "img1.png", tmp_path / "dup.png")
    df = _manifest_df([("img0.png", "1", "train"), ("img1.png", "1", "train"),
                       ("img2.png", "2", "valid"), ("img3.png", "3", "test"),
                       ("dup.png", "4", "test")])  # fmt: skip
    want = "same file" if how == "symlink" else "identical content"
    with pytest.raises(
        DataError, match=f"1 image.*dup.png \\(test\\) = img1.png \\(train\\): {want}"
    ):
        check_files(df, tmp_path)
    check_files(df[df["image"] != "dup.png"], tmp_path)  # without it: nothing to say


def test_same_size_different_images_are_not_called_copies(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 70_000 + b"1")  # same size, same 64 KiB head, different tail
    b.write_bytes(b"x" * 70_000 + b"2")
    assert same_files([a], [b]) == []
    b.write_bytes(a.read_bytes())
    assert same_files([a], [b]) == [(str(a), str(b), "identical content")]


# -- images that are not what they seem (#22 items 13, 14) ---------------------------------------
def test_a_16_bit_copy_of_an_8_bit_png_reads_as_the_8_bit_image(tmp_path):
    from fastcxr.prepare.cache import load_source

    a = np.random.default_rng(0).integers(0, 256, (64, 48), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / "a8.png")
    Image.fromarray(a.astype(np.uint16) * 257).save(tmp_path / "a16.png")
    assert Image.open(tmp_path / "a16.png").mode.startswith("I")
    got8, got16 = (load_source(tmp_path / f, 32, "voi") for f in ("a8.png", "a16.png"))
    assert np.array_equal(got8, got16)
    assert abs(float(got16.mean()) - float(a.mean())) < 3  # not saturated (PIL's "L" gives ~253)


@pytest.mark.parametrize("bits", [10, 12, 14])
def test_a_12_bit_image_in_a_16_bit_png_is_scaled_by_its_bit_depth(tmp_path, bits):
    """#22 checker item 7: values < 4096 were divided by 257 (a 16-bit range): the radiograph
    came out 16-fold darker, max 16 of 255."""
    from fastcxr.images.display import gray_u8
    from fastcxr.images.readers import read_image

    top = 2**bits - 1
    a = np.random.default_rng(bits).integers(0, top + 1, (64, 48)).astype(np.uint16)
    a[0, 0] = top  # the full range of its bit depth is used
    Image.fromarray(a).save(tmp_path / "x.png")
    want = np.clip(np.floor(a.astype(np.float64) * 255 / top + 0.5), 0, 255).astype(np.uint8)
    with Image.open(tmp_path / "x.png") as im:
        got = gray_u8(im)
    assert int(got.max()) == 255
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1  # rint vs round-half-up
    squared = read_image(tmp_path / "x.png", 32)  # the reader the cache and predict use
    assert abs(float(squared.mean()) - float(want.mean())) < 3


@pytest.mark.parametrize(("h", "w", "why"), [(1, 1, "too small"), (1, 5000, "too small"),
                                              (40, 400, "too elongated")])  # fmt: skip
def test_implausibly_small_or_elongated_images_are_unreadable(tmp_path, h, w, why):
    from fastcxr.prepare.cache import ImageError, load_source

    Image.fromarray(np.full((h, w), 128, np.uint8)).save(tmp_path / "x.png")
    with pytest.raises(ImageError, match=f"{h}x{w} is {why}"):
        load_source(tmp_path / "x.png", 32, "voi")


# -- one-line errors naming the value (#22 items 16, 18, 23, 24, 25 and the small ones) -----------
@pytest.mark.parametrize(("args", "words"), [
    (["--intensity", "bogus"], ["--intensity must be one of voi, mimic-jpg", "'bogus'"]),
    (["--views", "bogus"], ["--views bogus keeps no image", "AP", "PA"]),
    (["--views", ""], ["--views must name views"]),
    (["--workers", "-3"], ["--workers must be 1 or more", "-3"]),
])  # fmt: skip
def test_prepare_mimic_refuses_bad_options_before_writing(synthetic_tree, tmp_path, args, words):
    out = tmp_path / "out"
    res = runner.invoke(app, ["prepare", "mimic", str(synthetic_tree), "--out", str(out),
                              "--size", "32", *args])  # fmt: skip
    _one_line_error(res, *words)
    assert not (out / "manifest.csv").exists()


@pytest.mark.parametrize("value", ["1.5", "-1", "0", "1"])
def test_prepare_chexpert_refuses_a_test_fraction_outside_0_1(tmp_path, value):
    res = runner.invoke(app, ["prepare", "chexpert", str(tmp_path), "--out", str(tmp_path / "o"),
                              "--test-fraction", value])  # fmt: skip
    _one_line_error(res, "--test-fraction must be a fraction between 0 and 1", value)


def test_a_seed_too_large_for_the_generators_is_refused(prepared, tmp_path):
    res = runner.invoke(app, ["train", "--data", str(prepared), *FAST, "--seed",
                              "99999999999999999999", "--runs", str(tmp_path)])  # fmt: skip
    _one_line_error(
        res, "--seed must be a whole number from -9223372036854775808 to 9223372036854775807"
    )


def test_a_later_seed_out_of_range_is_refused_before_the_first_trains(prepared, tmp_path):
    """#22 checker item 8: `--seeds 0,2**64` trained seed 0 (minutes to hours), then failed."""
    res = runner.invoke(app, ["train", "--data", str(prepared), *FAST, "--seeds",
                              f"0,{2**64}", "--runs", str(tmp_path)])  # fmt: skip
    _one_line_error(
        res, f"--seeds: each seed must be a whole number from {-(2**63)} to {2**63 - 1}"
    )
    assert str(2**64) in res.stderr
    assert not any(tmp_path.rglob("*.pth"))  # nothing was trained


def test_a_name_too_long_for_the_file_system_is_refused(prepared, tmp_path):
    res = runner.invoke(app, ["train", "--data", str(prepared), *FAST, "--name", "a" * 260,
                              "--runs", str(tmp_path)])  # fmt: skip
    _one_line_error(res, "--name is 260 bytes long; at most 120")
    assert not any(tmp_path.iterdir())


def test_lr_find_checks_its_output_folder_before_the_sweep(prepared, tmp_path):
    target = tmp_path / "a-file"
    target.write_text("x")
    res = runner.invoke(app, ["lr-find", "--data", str(prepared), *FAST, "--stages", "head",
                              "--num-it", "6", "--out", str(target)])  # fmt: skip
    _one_line_error(res, f"cannot write {target}: it is a file")
    assert "lr_find: network" not in res.stderr  # refused before anything was swept


def test_predict_refuses_batch_size_0_and_fails_when_nothing_is_readable(prepared, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    run = tmp_path / "no-run"  # the checks come first: no run is needed to see them
    res = runner.invoke(app, ["predict", str(run), str(bad), "--batch-size", "0"])
    _one_line_error(res, "--batch-size must be 1 or more, not 0")
