"""The learning-rate finder (issue 14, item 4): fastai's `lr_find` under each stage's freezing
and discriminative groups, `fastcxr lr-find`, and `--lr find` on the training commands.

The finder must leave the network as it found it (weights and optimizer state), sweep every
group at the stage's ratio, and report fastai's own valley/minimum for the curve it recorded;
`--lr find` trains each stage at the suggestion and records it in the run config."""

import copy
import json

import pytest
import torch
from fastai.callback.core import Callback
from fastai.callback.schedule import minimum, valley
from fastai.data.core import DataLoaders
from fastai.data.load import DataLoader
from fastai.learner import Learner
from fastai.losses import MSELossFlat
from tiny import TINY_TRAIN
from torch import nn
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.config import Stage, TrainConfig
from fastcxr.train.freezing import Freezing
from fastcxr.train.learner import silence
from fastcxr.train.lr_find import find_lr
from fastcxr.train.schedule import LR_FOUND, StageResume, _found_lr

runner = CliRunner()


def _learner(seed: int = 0) -> Learner:
    """Two parameter groups (body, head), as fastcxr's splitter gives a network."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 3, generator=g)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    items = [(x[i], y[i]) for i in range(64)]
    dls = DataLoaders(DataLoader(items[:48], bs=8, shuffle=True),
                      DataLoader(items[48:], bs=8), device="cpu")  # fmt: skip
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 1))

    def body_and_head(m):
        return [list(m[0].parameters()), list(m[2].parameters())]

    learn = Learner(dls, model, loss_func=MSELossFlat(), splitter=body_and_head)
    return silence(learn)


class _GroupRates(Callback):
    """Every group's learning rate at each batch, after the finder has set them."""

    order = 90

    def __init__(self):
        self.rates = []

    def before_batch(self):
        if self.training:
            self.rates.append([h["lr"] for h in self.opt.hypers])


def test_finder_restores_the_network_and_sweeps_groups_at_the_stage_ratio():
    learn = _learner()
    learn.unfreeze()
    learn.fit(1, lr=1e-2)  # an optimizer with state, as a later stage has
    before = {k: v.clone() for k, v in learn.model.state_dict().items()}
    opt_before = copy.deepcopy(learn.opt.state_dict())  # its tensors are updated in place
    seen = _GroupRates()
    with learn.added_cbs(seen):
        found = find_lr(learn, 2, Freezing("fastai", 10.0), num_it=30)
    after = learn.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights not restored"
    opt_after = learn.opt.state_dict()
    moments = 0
    for v, w in zip(opt_before["state"], opt_after["state"], strict=True):
        for name, t in v.items():
            if torch.is_tensor(t):
                assert torch.equal(t, w[name]), name
                moments += 1
    assert moments > 0, "the optimizer had no state to restore"
    # the body (group 0) swept at a tenth of the head (group 1), batch after batch
    assert len(seen.rates) >= 6
    for body, head in seen.rates:
        assert body == pytest.approx(head / 10, rel=1e-12)
    heads = [h for _, h in seen.rates]
    assert heads == sorted(heads) and heads[0] == pytest.approx(1e-7, rel=1e-9)
    assert found["lrs"] == pytest.approx(heads[: len(found["lrs"])], rel=1e-9)
    # fastai's own suggestion functions on the curve it recorded (lr_find's trimming)
    n = found["num_it"]
    lrs = torch.tensor(found["lrs"][n // 10 : -5])
    losses = torch.tensor(found["losses"][n // 10 : -5])
    assert found["valley"] == pytest.approx(float(valley(lrs, losses, n)[0]), rel=1e-6)
    assert found["minimum"] == pytest.approx(float(minimum(lrs, losses, n)[0]), rel=1e-6)
    assert found["used"] == found["valley"] and found["group_multipliers"] == [0.1, 1.0]


def test_frozen_body_stays_frozen_and_untouched():
    learn = _learner()
    learn.freeze_to(-1)  # head only
    before = learn.model[0].weight.clone()
    seen = _GroupRates()
    with learn.added_cbs(seen):
        find_lr(learn, 1, Freezing("fastai", 10.0), num_it=12)
    assert torch.equal(learn.model[0].weight, before)
    assert not learn.model[0].weight.requires_grad and learn.model[2].weight.requires_grad


def test_a_resumed_stage_keeps_the_rate_it_found():
    """An interrupted stage resumes at the rate its finder chose, not a new sweep's."""
    cfg = TrainConfig.from_options("demo", lr="find")
    stage = Stage("all", "all", lr="find")
    kept = {"valley": 0.0123, "minimum": 0.05, "used": 0.0123}

    class NoSweep:  # a learner whose finder must not run
        def lr_find(self, *a, **k):
            raise AssertionError("the finder ran again on resume")

    resume = StageResume(callbacks={LR_FOUND: kept}, opt=None)
    assert _found_lr(NoSweep(), stage, Freezing.of(cfg), 1, resume, None) is kept
    assert (
        _found_lr(NoSweep(), Stage("all", "all", lr=1e-3), Freezing.of(cfg), 1, None, None) is None
    )


@pytest.fixture(scope="module")
def lr_run(prepared, tmp_path_factory):
    runs = tmp_path_factory.mktemp("lr-runs")
    res = runner.invoke(app, ["train", "--formulation", "multilabel", "--data", str(prepared),
                              *TINY_TRAIN, "--epochs", "1", "--stages", "head,all",
                              "--no-pretrained", "--lr", "find", "--loader", "datablock",
                              "--precision", "fp32", "--runs", str(runs),
                              "--name", "lr"])  # fmt: skip
    assert res.exit_code == 0, res.output
    return runs / "lr"


@pytest.mark.slow
def test_train_lr_find_uses_and_records_the_suggestion(lr_run):
    cfg = json.loads((lr_run / "config.json").read_text())
    assert [s["lr"] for s in cfg["stages"]] == ["find", "find"]
    found = cfg["lr_find"]["edema+pleural_effusion"]
    metrics = json.loads((lr_run / "metrics.json").read_text())
    stages = metrics["networks"][0]["stages"]
    assert [s["name"] for s in stages] == ["head", "all"]
    for s in stages:
        f = found[s["name"]]
        assert f["used"] == f["valley"] and s["lr"] == f["used"] > 0
        assert s["lr_find"]["valley"] == f["valley"] and "lrs" not in f  # curves not in config
        assert f["start_lr"] < f["used"] < f["end_lr"]


def test_lr_find_command(prepared, tmp_path, monkeypatch):
    from fastcxr.data.datablock import NetworkData

    closed, close = [], NetworkData.close
    monkeypatch.setattr(NetworkData, "close", lambda nd: (closed.append(nd), close(nd)))
    out = tmp_path / "lrf"
    res = runner.invoke(app, ["lr-find", "--data", str(prepared), *TINY_TRAIN,
                              "--stages", "head,all", "--no-pretrained", "--loader",
                              "datablock", "--precision", "fp32", "--num-it", "12",
                              "--out", str(out), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout)
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["networks"] == result["networks"]
    assert (out / "lr_find.png").stat().st_size > 1000
    ((net, stages),) = result["networks"].items()
    assert net == "edema+pleural_effusion" and [s["stage"] for s in stages] == ["head", "all"]
    assert len(stages[0]["unfrozen"]) == 1 and len(stages[1]["unfrozen"]) > 1
    assert len(closed) == len(result["networks"])  # each network's loaders stopped after it
    for s in stages:
        assert s["iterations"] >= 6 and len(s["lrs"]) == len(s["losses"]) == s["iterations"]
        assert s["valley"] is None or 1e-7 <= s["valley"] <= 10
    res = runner.invoke(app, ["lr-find", "--data", str(prepared), *TINY_TRAIN, "--num-it", "3",
                              "--out", str(tmp_path / "x")])  # fmt: skip
    assert res.exit_code == 2 and "at least 6 iterations" in res.stderr


def test_bad_lr_is_one_line(prepared, tmp_path):
    res = runner.invoke(app, ["train", "--data", str(prepared), *TINY_TRAIN, "--lr", "fast",
                              "--runs", str(tmp_path)])  # fmt: skip
    assert res.exit_code == 2
    lines = [ln for ln in res.stderr.strip().splitlines() if ln.strip()]
    assert lines == ["error: --lr must be a positive number or 'find', not 'fast'"], res.stderr
