"""Progress on long work (#20 item 6): the library reports epochs, images, finder iterations
and bootstrap resamples as events; the command line shows them as bars on stderr when it is a
terminal, and nothing extra with --json or when piped. `COLUMNS` sets the width of both
streams when they are not terminals."""

import io
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from rich.console import Console
from tiny import TINY_TRAIN
from torch import nn
from typer.testing import CliRunner

from fastcxr.cli import app, console
from fastcxr.evaluate import stats
from fastcxr.train.callbacks import StageCallbacks
from fastcxr.train.freezing import Freezing
from fastcxr.train.learner import silence
from fastcxr.train.lr_find import find_lr

runner = CliRunner()


def _learner() -> Learner:
    """24 training and 8 validation items in batches of 8; two parameter groups."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 3, generator=g)
    items = [(x[i], x[i] @ torch.tensor([1.0, -2.0, 0.5])[:, None]) for i in range(32)]
    dls = DataLoaders(DataLoader(items[:24], bs=8), DataLoader(items[24:], bs=8), device="cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def body_and_head(m):
        return [list(m[0].parameters()), list(m[2].parameters())]

    return silence(Learner(dls, model, loss_func=MSELossFlat(), splitter=body_and_head))


def _progress(events: list[dict], key: str) -> list:
    """(label, done, total) of bar `key`'s events, "end" for its end."""
    return [
        "end" if e.get("end") else (e["label"], e["done"], e["total"])
        for e in events
        if e.get("event") == "progress" and e["id"] == key
    ]


def terminal() -> Console:
    return Console(file=io.StringIO(), force_terminal=True, width=100, color_system=None)


# -- the library's events ------------------------------------------------------------------------
def test_a_stage_reports_its_epochs_and_each_epochs_images_and_trains_the_same():
    events: list[dict] = []
    learn = _learner()
    cbs = StageCallbacks.make("head", 3, [], events.append)
    learn.fit(2, lr=0.05, cbs=cbs.callbacks())
    assert _progress(events, "stage") == [
        ("stage head", 0, 2), ("stage head", 1, 2), ("stage head", 2, 2), "end"
    ]  # fmt: skip
    epoch = _progress(events, "epoch")
    assert epoch[:4] == [
        ("head · epoch 1/2 · train", 8, 24),
        ("head · epoch 1/2 · train", 16, 24),
        ("head · epoch 1/2 · train", 24, 24),
        ("head · epoch 1/2 · valid", 8, 8),
    ]
    assert epoch[4][0] == "head · epoch 2/2 · train" and epoch[-1] == "end" and len(epoch) == 9
    # no `epoch` key: a log that prints epoch rows (the CLI's) passes them by
    assert not any("epoch" in e for e in events if e.get("event") == "progress")
    rows = [e for e in events if "epoch" in e]
    assert [r["epoch"] for r in rows] == [1, 2]
    # the same training without a log (and so without the progress callback)
    quiet_rows: list[dict] = []
    quiet = _learner()
    quiet_cbs = StageCallbacks.make("head", 3, quiet_rows)
    assert quiet_cbs.progress is None and len(quiet_cbs.callbacks()) == 4
    quiet.fit(2, lr=0.05, cbs=quiet_cbs.callbacks())
    for k, v in learn.model.state_dict().items():
        assert torch.equal(v, quiet.model.state_dict()[k]), k
    assert [r["valid_loss"] for r in rows] == [r["valid_loss"] for r in quiet_rows]
    assert cbs.state_dict().keys() == quiet_cbs.state_dict().keys()  # nothing new checkpointed


def test_a_resumed_stage_counts_its_earlier_epochs():
    events: list[dict] = []
    cbs = StageCallbacks.make("conv5", 3, [{"stage": "conv5", "epoch": 1}], events.append)
    cbs.history.load_state_dict({"epochs_done": 1})
    _learner().fit(1, lr=0.05, cbs=cbs.callbacks())
    assert _progress(events, "stage") == [
        ("stage conv5", 1, 2), ("stage conv5", 2, 2), "end"
    ]  # fmt: skip
    assert _progress(events, "epoch")[0][0] == "conv5 · epoch 2/2 · train"


def test_the_finder_reports_its_iterations():
    events: list[dict] = []
    learn = _learner()
    learn.unfreeze()
    learn.create_opt()
    find_lr(learn, 2, Freezing("fastai", 10.0), num_it=12, progress=events.append,
            label="edema · stage head")  # fmt: skip
    sweep = _progress(events, "lr_find")
    assert sweep[-1] == "end" and len(sweep) >= 7
    assert {s[0] for s in sweep[:-1]} == {"edema · stage head"}
    done = [s[1] for s in sweep[:-1]]
    assert done == sorted(done) and done[0] == 1 and done[-1] <= 12
    assert {s[2] for s in sweep[:-1]} == {12}


@pytest.mark.parametrize("stat", ["auc", "pr_auc"])
def test_a_bootstrap_reports_its_resamples_and_finds_the_same_interval(stat):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = rng.random(300) + 0.3 * y
    groups = np.arange(300) // 3
    calls: list[tuple[int, int]] = []
    got = stats.patient_bootstrap(y, s, groups, stat, 200, progress=lambda *a: calls.append(a))
    assert got == stats.patient_bootstrap(y, s, groups, stat, 200)
    assert len(calls) == 20 and calls[-1] == (200, 200)
    assert [i for i, _ in calls] == sorted(i for i, _ in calls)


def test_an_evaluation_reports_each_findings_bootstraps_and_finds_the_same_numbers():
    import pandas as pd

    from fastcxr.evaluate.evaluation import EvalConfig, evaluate

    rng = np.random.default_rng(1)
    n = 240
    y = rng.integers(0, 2, (n, 2))
    pred = pd.DataFrame({
        "split": np.repeat(["valid", "test"], n // 2), "patient_id": np.arange(n) // 2,
        "y_a": y[:, 0], "p_a": rng.random(n) * 0.5 + 0.4 * y[:, 0],
        "y_b": y[:, 1], "p_b": rng.random(n) * 0.5 + 0.4 * y[:, 1],
    })  # fmt: skip
    cfg = EvalConfig(n_boot=100)
    events: list[dict] = []
    got = evaluate(pred, ["a", "b"], cfg, log=events.append)
    assert got == evaluate(pred, ["a", "b"], cfg)
    bars = _progress(events, "bootstrap")
    labels = [b[0] for b in bars if b != "end"]
    assert list(dict.fromkeys(labels)) == ["a: AUC bootstrap", "a: PR AUC bootstrap",
                                           "b: AUC bootstrap", "b: PR AUC bootstrap"]  # fmt: skip
    assert bars.count("end") == 2 and bars[-1] == "end"
    assert ("a: AUC bootstrap", 100, 100) in bars  # every resample counted, to the last


def test_an_audit_counts_its_subgroups_and_finds_the_same_numbers():
    from fastcxr.evaluate.audit import score_finding
    from fastcxr.evaluate.evaluation import EvalConfig

    rng = np.random.default_rng(2)
    n = 300
    y = rng.integers(0, 2, n)
    p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
    pats = np.arange(n) // 2
    sex = np.where(pats % 2, "F", "M")
    age = np.array(["0-39", "40-59", "60+"], object)[pats % 3]
    masks = {"sex": {s: sex == s for s in "FM"}, "age": {a: age == a for a in set(age)}}
    cfg = EvalConfig(n_boot=50)
    calls: list[tuple[int, int]] = []
    got = score_finding(y, p, pats, masks, 0.5, cfg, 20, lambda *a: calls.append(a))
    assert got == score_finding(y, p, pats, masks, 0.5, cfg, 20)
    assert calls == [(i, 6) for i in range(1, 7)]  # the whole set, then 2 + 3 subgroups


def test_bench_counts_its_measurements():
    from fastcxr.bench import run_rounds

    class Arm:
        def __init__(self, label):
            self.label, self.cudnn, self.seen = label, (False, False), []

        def enter(self, st):
            self.seen.append(st.name)

        def measure(self, what):
            return 1.0

    stages = [SimpleNamespace(name="head"), SimpleNamespace(name="all")]
    calls: list[tuple[int, int]] = []
    out = run_rounds({"a": Arm("a"), "b": Arm("b")}, stages, 3, False, lambda m: None,
                     lambda *a: calls.append(a))  # fmt: skip
    assert calls == [(i, 12) for i in range(1, 13)]
    assert len(out["head"]) == len(out["all"]) == 3


# -- the bars -------------------------------------------------------------------------------------
def _event(done, total=10, label="head · epoch 1/2 · train", unit="img"):
    return {"event": "progress", "id": "epoch", "label": label, "done": done, "total": total,
            "unit": unit}  # fmt: skip


def test_bars_on_a_terminal_show_count_rate_and_label():
    c = terminal()
    with console.reporting(console=c) as bars:
        for done in (2, 4, 6):  # a rate needs two steps after the first
            assert console.report(_event(done))
            time.sleep(0.1)
        bars.bar.refresh()
        assert not console.report({"event": "data", "message": "x"})  # not a progress event
        console.report({"event": "progress", "id": "epoch", "end": True})
        assert bars.tasks == {}
    shown = c.file.getvalue()
    assert "head · epoch 1/2 · train" in shown and "6/10" in shown
    assert re.search(r"\d+\.\d img/s", shown)


def test_slow_work_shows_seconds_per_unit():
    rate = next(c for c in console.progress(console=terminal()).columns if "Rate" in repr(c))
    assert str(rate.render(SimpleNamespace(speed=0.25, fields={"unit": "epoch"}))) == (
        "4.0 s/epoch"
    )
    assert str(rate.render(SimpleNamespace(speed=212.34, fields={}))) == "212.3 img/s"
    assert str(rate.render(SimpleNamespace(speed=None, fields={"unit": "it"}))) == "– it/s"


def test_no_bars_with_json_or_when_piped_or_outside_a_command():
    off, piped = terminal(), Console(file=io.StringIO(), width=100)
    assert not piped.is_terminal
    for c, enabled in ((off, False), (piped, True)):
        with console.reporting(enabled, console=c):
            console.report(_event(2))
            console.report(_event(4, label="head · epoch 1/2 · valid"))
        assert c.file.getvalue() == ""
    assert console.report(_event(3))  # no `reporting` block: taken, shown nowhere


# -- the commands ---------------------------------------------------------------------------------
@pytest.fixture
def stderr_terminal(monkeypatch):
    """stderr as a terminal: what the bars draw is kept."""
    c = terminal()
    monkeypatch.setattr(console, "err", c)
    return c.file


@pytest.mark.slow
def test_lr_find_shows_bars_on_a_terminal_only(prepared, tmp_path, stderr_terminal):
    args = ["lr-find", "--data", str(prepared), *TINY_TRAIN, "--stages", "head",
            "--no-pretrained", "--loader", "datablock", "--precision", "fp32",
            "--num-it", "6"]  # fmt: skip
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    drawn = stderr_terminal.getvalue()
    assert "stages swept" in drawn and "· stage head" in drawn and "/6" in drawn
    stderr_terminal.truncate(0)
    res = runner.invoke(app, [*args, "--out", str(tmp_path / "b"), "--json"])
    assert res.exit_code == 0, res.output
    assert stderr_terminal.getvalue() == ""
    assert "lr_find: network" in res.stderr  # the log lines stay as they were


@pytest.mark.slow
def test_train_shows_stage_and_epoch_bars_on_a_terminal_only(prepared, tmp_path, stderr_terminal):
    args = ["train", "--data", str(prepared), *TINY_TRAIN, "--stages", "head,all",
            "--epochs", "1", "--no-pretrained", "--loader", "datablock", "--precision", "fp32",
            "--formulation", "multilabel", "--runs", str(tmp_path)]  # fmt: skip
    res = runner.invoke(app, [*args, "--name", "a"])
    assert res.exit_code == 0, res.output
    drawn = stderr_terminal.getvalue()
    # the stage bar counts epochs, the epoch bar images of the training then validation pass
    assert "stage head" in drawn and "stage all" in drawn and "epoch" in drawn
    assert "head · epoch 1/1 · train" in drawn and "all · epoch 1/1 · valid" in drawn
    assert " img/s" in drawn
    assert re.search(r"train\s+[0-9.]+\s+valid", res.stderr)  # the epoch rows stay as they were
    stderr_terminal.truncate(0)
    stderr_terminal.seek(0)
    res = runner.invoke(app, [*args, "--name", "b", "--json"])
    assert res.exit_code == 0, res.output
    assert stderr_terminal.getvalue() == ""
    assert "· epoch" not in res.stderr and "progress" not in res.stderr


def _fake_prepare(monkeypatch):
    """`prepare mimic` whose conversion reports 5 images (the real one is timed elsewhere)."""
    from fastcxr.prepare import common, mimic

    def prepare(root, out, progress=None, **kw):
        for i in range(1, 6):
            time.sleep(0.05)
            progress(i, 5)
        return common.PrepareReport("m.csv", 5, 5, 0, 0, 32, "voi", ("PA",), {"train": 5})

    monkeypatch.setattr(mimic, "prepare_mimic", prepare)


def test_prepare_shows_a_bar_on_a_terminal_only(tmp_path, monkeypatch, stderr_terminal):
    _fake_prepare(monkeypatch)
    res = runner.invoke(app, ["prepare", "mimic", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "converting" in stderr_terminal.getvalue() and "/5" in stderr_terminal.getvalue()
    stderr_terminal.truncate(0)
    res = runner.invoke(app, ["prepare", "mimic", str(tmp_path), "--out", str(tmp_path / "o"),
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert stderr_terminal.getvalue() == "" and '"converted": 5' in res.stdout


def test_prepare_piped_shows_no_bar(tmp_path, monkeypatch):
    _fake_prepare(monkeypatch)
    res = runner.invoke(app, ["prepare", "mimic", str(tmp_path), "--out", str(tmp_path / "o")])
    assert res.exit_code == 0, res.output
    assert "converting" not in res.stderr and res.stderr.strip() == ""


# -- the width ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("columns", "want"), [(None, "120 120"), ("220", "220 220"),
                                                ("100", "100 100")])  # fmt: skip
def test_piped_output_is_120_columns_unless_columns_says(columns, want):
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    if columns:
        env["COLUMNS"] = columns
    got = subprocess.run(
        [sys.executable, "-c", "from fastcxr.cli.console import out, err; "
         "print(out.width, err.width)"],
        capture_output=True, text=True, env=env, check=True,
    )  # fmt: skip
    assert got.stdout.split() == want.split()
