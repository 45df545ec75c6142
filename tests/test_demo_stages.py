"""Issue 20, items 8 and 9: the demo's Experiment I shows four different stages (a narrow
ResNet-22 with three blocks in conv4 and conv5), a stage that unfreezes the same groups as
the one before is refused naming both, and a finished ablation is shown again, not refused.

Parameter counts are summed here from the models' own modules (torchvision's `layer3` /
`layer4` blocks and fastai's head), not read from fastcxr's groups."""

import json

import pytest
from tiny import TINY_TRAIN
from torch import nn
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.config import DEMO, PAPER_STAGES, Stage
from fastcxr.errors import UsageError
from fastcxr.models import build_model, resnet10, resnet22n
from fastcxr.study import ablation_plan, check_schedule
from fastcxr.train.schedule import check_stages

runner = CliRunner()


def n(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _blocks(m: nn.Module) -> dict[str, int]:
    return {name: len(getattr(m, name)) for name in ("layer1", "layer2", "layer3", "layer4")}


def test_resnet10_is_unchanged_and_the_demo_uses_a_net_with_blocks_to_unfreeze():
    assert _blocks(resnet10()) == {"layer1": 1, "layer2": 1, "layer3": 1, "layer4": 1}
    assert resnet10().layer4[0].conv1.out_channels == 512  # torchvision's widths
    net = resnet22n()
    assert _blocks(net) == {"layer1": 2, "layer2": 2, "layer3": 3, "layer4": 3}
    assert [net.layer1[0].conv1.out_channels, net.layer4[0].conv1.out_channels] == [32, 256]
    assert DEMO.arch == "resnet22n" and not DEMO.pretrained
    with pytest.raises(UsageError, match="no pretrained weights"):
        resnet22n(weights="DEFAULT")


def test_the_demo_plan_unfreezes_four_different_sets_of_blocks():
    """`unfreeze-ablation --dry-run` (preset demo): each stage trains exactly what it names."""
    plan = ablation_plan(DEMO).stages
    assert [s.name for s in plan] == [s.name for s in PAPER_STAGES]
    ref = resnet22n()  # independent reference for block sizes
    head = n(build_model("resnet22n", 2)[1])  # multilabel: two outputs
    assert [s.trainable_params for s in plan] == [
        head,
        head + n(ref.layer4[2]),
        head + n(ref.layer4),
        head + n(ref.layer4) + n(ref.layer3),  # conv4 has 3 blocks: its last 3 are all of it
    ]
    assert plan[1].unfrozen == ["conv5_block3", "head"]
    assert len({s.trainable_params for s in plan}) == 4


def test_a_stage_unfreezing_the_same_groups_as_the_one_before_is_refused():
    """On resnet10 (one block per stage) the study's conv5_block3 and conv5 are one block."""
    cfg = DEMO.replace(arch="resnet10")
    with pytest.raises(UsageError) as e:
        ablation_plan(cfg)
    msg = str(e.value)
    assert "stages conv5_block3 (conv5_block-1) and conv5 (conv5)" in msg
    assert "groups of resnet10 (conv5_block1 and the head: " in msg
    assert f"{n(resnet10().layer4):,} backbone parameters" in msg
    # the dry run's count with the head, as the issue quotes it (4,201,472 both)
    plan = ablation_plan(DEMO.replace(arch="resnet22n"))  # (resnet10's is refused)
    assert plan.stages[0].trainable_params == n(build_model("resnet22n", 2)[1])
    with pytest.raises(UsageError, match="stages conv5_block3 .* and conv5 "):
        check_schedule(cfg, cfg.ablation_stages)  # train/compare/ablation: before any folder
    # named by what they unfreeze, not by their names: two specs for one group are refused too
    twice = (Stage("head", "head"), Stage("a", "conv5_block1"), Stage("b", "conv5"))
    with pytest.raises(UsageError, match="stages a .* and b "):
        check_stages(build_model("resnet22n", 2), twice, "resnet22n")


def test_other_schedules_pass():
    m = build_model("resnet10", 2)
    check_stages(m, (Stage("head", "head"), Stage("all", "all")))
    check_stages(m, (Stage("all", "all"), Stage("head", "head")))  # fewer is not the same
    check_stages(m, (Stage("head", "head"), Stage("c5", "conv5"), Stage("c4", "conv4")))
    check_stages(build_model("resnet22n", 2), PAPER_STAGES)
    check_stages(build_model("resnet18", 2), PAPER_STAGES)  # 2 blocks per stage: clamped
    check_stages(m, (Stage("all", "all"),))


def test_the_command_line_refuses_it_in_one_line_before_any_folder(prepared, tmp_path):
    res = runner.invoke(app, ["unfreeze-ablation", "--arch", "resnet10", "--dry-run"])
    assert res.exit_code == 2, res.output
    assert res.stderr.strip().startswith("error: stages conv5_block3"), res.stderr
    assert "Traceback" not in res.stderr
    args = [*TINY_TRAIN, "--epochs", "1", "--no-pretrained", "--runs", tmp_path, "--name", "x"]
    for cmd in (
        ["train", "--stages", "head,a=conv5_block-1,b=conv5"],
        ["compare", "--stages", "head,a=conv5_block-1,b=conv5"],
        ["compare", "--seeds", "1,2", "--stages", "head,a=conv5_block-1,b=conv5"],
        ["unfreeze-ablation"],  # the demo's stage list on resnet10
    ):
        res = runner.invoke(app, [str(a) for a in [*cmd, "--data", prepared, *args]])
        assert res.exit_code == 2, res.output
        assert "unfreeze the same groups of resnet10" in res.stderr.strip().splitlines()[-1]
        assert not (tmp_path / "x").exists(), cmd


@pytest.mark.slow
def test_a_finished_ablation_is_shown_again_and_another_config_is_listed(prepared, tmp_path):
    """`make ablation` twice: the second shows the finished run, as `make demo` does."""
    args = ["unfreeze-ablation", "--data", prepared, *TINY_TRAIN, "--epochs", "1",
            "--stages", "head,all", "--no-pretrained", "--runs", tmp_path, "--name", "a",
            "--json"]  # fmt: skip
    args = [str(a) for a in args]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    record = (tmp_path / "a" / "record.json").read_text()
    history = (tmp_path / "a" / "history.csv").read_text()
    again = runner.invoke(app, args)
    assert again.exit_code == 0, again.output
    assert "skipped (complete run found)" in again.stderr
    assert json.loads(again.stdout) == json.loads(first.stdout)
    assert (tmp_path / "a" / "record.json").read_text() == record  # not retrained
    assert (tmp_path / "a" / "history.csv").read_text() == history
    table = runner.invoke(app, args[:-1])  # the table, as `make ablation` prints it
    assert table.exit_code == 0 and "★" in table.stdout, table.output
    other = runner.invoke(app, [*args[:-1], "--epochs", "2"])
    assert other.exit_code == 2, other.output
    msg = other.stderr.strip().splitlines()[-1]
    assert "another configuration" in msg and "--overwrite" in msg, msg
    assert (tmp_path / "a" / "record.json").read_text() == record
    redo = runner.invoke(app, [*args, "--overwrite"])
    assert redo.exit_code == 0 and "skipped" not in redo.stderr, redo.output
