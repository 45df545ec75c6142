"""Hostile use of training, predict and evaluate (#22 items 6-25): each test reproduces what a
hostile user did on main and checks the fix."""

from tiny import TINY_TRAIN
from typer.testing import CliRunner

from fastcxr.cli import app

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
