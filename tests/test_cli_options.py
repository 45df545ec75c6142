"""The training options as one bundle (#23 item 1): every training command offers each shared
option once, and what a user types reaches `TrainConfig` (and `study.run`) unchanged."""

from __future__ import annotations

import json

import typer.main
from typer.testing import CliRunner

from fastcxr import study
from fastcxr.cli import app
from fastcxr.cli.options import SHARED, SWEEP, TRAINING, Training
from fastcxr.config import TrainConfig
from fastcxr.results import TrainResult

runner = CliRunner()


def _options(command: str) -> list[str]:
    group = typer.main.get_command(app)
    return [p.name for p in group.commands[command].params]


def test_each_training_command_offers_every_shared_option_once():
    for command, own in (("compare", {"formulations"}), ("train", {"formulation"}),
                         ("unfreeze-ablation", {"formulation", "dry_run"})):  # fmt: skip
        names = _options(command)
        assert len(names) == len(set(names)), command
        assert set(names) == set(TRAINING) | own, command
        assert names[-5:] == ["name", "resume", "overwrite", "runs", "json_out"], command
    sweep = _options("lr-find")
    assert set(SWEEP) <= set(sweep) and "epochs" not in sweep and "name" not in sweep


def test_the_bundle_gives_the_config_from_options():
    given = dict(arch="resnet18", size=64, batch_size=4, epochs=3, lr="1e-3", lr_ratio=4.0,
                 stages="head,all", no_pretrained=True, freeze_style="fastai",
                 findings="Edema", seed=7, compile=True, threshold="sensitivity",
                 target=0.9)  # fmt: skip
    o = Training(**{**{n: d for n, (_, d) in SHARED.items()}, **given})
    want = TrainConfig.from_options(
        "demo", arch="resnet18", size=64, batch_size=4, epochs=3, lr=1e-3, stages="head,all",
        pretrained=False, freeze_style="fastai", findings="Edema", seed=7, compile=True,
        threshold="sensitivity", target=0.9,
    ).replace(lr_ratio=4.0)  # fmt: skip
    assert o.config() == want
    assert Training(**{n: d for n, (_, d) in SHARED.items()}).config() == TrainConfig.from_options(
        "demo"
    )


def test_what_a_command_gets_reaches_study_run(monkeypatch, tmp_path):
    """`train --lr-ratio 3 --seeds 0,1 ...`: study.run receives the kind, the config with the
    option, the seeds and the run folder (the data and training are stubbed out)."""
    seen = {}

    def fake_run(kind, data, cfg, run_dir, **job):
        seen.update(kind=kind, cfg=cfg, run_dir=run_dir, **job)
        return TrainResult.from_json({"fake": True})

    monkeypatch.setattr(study, "run", fake_run)
    monkeypatch.setattr("fastcxr.cli.training._dataset",
                        lambda data, cfg, log: type("D", (), {"synthetic": True})())  # fmt: skip
    res = runner.invoke(app, ["train", "--formulation", "single", "--lr-ratio", "3",
                              "--seeds", "0,1", "--name", "x", "--runs", str(tmp_path),
                              "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert seen["kind"] == "train" and seen["formulation"] == "single"
    assert seen["cfg"].lr_ratio == 3.0 and seen["seeds"] == (0, 1)
    assert seen["run_dir"] == tmp_path / "x" and not seen["resume"]
    assert json.loads(res.stdout)["synthetic"] is True
    res = runner.invoke(app, ["train", "--lr-ratio", "0.5"])
    assert res.exit_code == 2 and "--lr-ratio" in res.stderr


def test_study_run_refuses_an_unknown_experiment(tmp_path):
    import pytest

    from fastcxr.errors import UsageError

    with pytest.raises(UsageError, match="one of train, compare, ablation"):
        study.run("ablate", None, TrainConfig.from_options("demo"), tmp_path)
