import numpy as np
import pytest
import torch
import torchvision
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from torch import nn

from fastcxr.config import PAPER_STAGES, Stage
from fastcxr.models import (
    TorchvisionArch,
    block_splitter,
    build_model,
    count_params,
    group_names,
    load_state_dict,
    resolve_unfreeze,
)
from fastcxr.train.callbacks import FrozenBNEval
from fastcxr.train.freezing import apply_stage, stage_lrs


def nparams(m):
    return sum(p.numel() for p in m.parameters())


def learner(model, train_bn):
    return Learner(
        DataLoaders(),
        model,
        loss_func=nn.BCEWithLogitsLoss(),
        splitter=block_splitter,
        train_bn=train_bn,
    )


@pytest.fixture(scope="module")
def r152():
    return build_model("resnet152", 2)


def test_resnet152_block_groups(r152):
    names = group_names(r152)
    counts = {
        s: sum(n.startswith(s + "_") for n in names) for s in ("conv2", "conv3", "conv4", "conv5")
    }
    assert counts == {"conv2": 3, "conv3": 8, "conv4": 36, "conv5": 3}
    assert names[0] == "stem" and names[-1] == "head" and len(names) == 52
    # every parameter in exactly one group
    ids = [id(p) for g in block_splitter(r152) for p in g]
    assert len(ids) == len(set(ids)) == len(list(r152.parameters()))


def test_stages_train_exactly_the_blocks_they_add(r152):
    tv = torchvision.models.resnet152()  # independent reference for block sizes
    head = nparams(r152[1])
    expect = [
        head,
        head + nparams(tv.layer4[2]),
        head + nparams(tv.layer4),
        head + nparams(tv.layer4) + sum(nparams(b) for b in tv.layer3[-3:]),
    ]
    learn = learner(r152, train_bn=False)
    for st, n in zip(PAPER_STAGES, expect):
        apply_stage(learn, st)
        assert count_params(learn.model) == n, st.name


def test_fastai_style_keeps_batchnorm_trainable():
    m = build_model("resnet18", 2)
    learn = learner(m, train_bn=True)
    apply_stage(learn, Stage("head", "head"))
    bn = sum(
        p.numel()
        for mod in m[0].modules()
        if isinstance(mod, nn.BatchNorm2d)
        for p in mod.parameters()
    )
    assert count_params(m) == nparams(m[1]) + bn


def test_keras_style_puts_frozen_batchnorm_in_eval():
    m = build_model("resnet18", 2)
    learn = learner(m, train_bn=False)
    apply_stage(learn, Stage("c5", "conv5_block-1"))
    m.train()
    cb = FrozenBNEval()
    cb.learn = learn
    cb.before_train()
    assert not m[0][1].training  # stem BN: frozen → eval
    assert m[0][7][1].bn1.training  # conv5_block2 (last block of resnet18): trainable


def test_resolve_unfreeze_specs():
    names = [
        "stem",
        "conv2_block1",
        "conv3_block1",
        "conv4_block1",
        "conv4_block2",
        "conv5_block1",
        "conv5_block2",
        "head",
    ]
    assert resolve_unfreeze("head", names) == 1
    assert resolve_unfreeze("conv5_block-1", names) == 2
    assert resolve_unfreeze("conv5", names) == 3
    assert resolve_unfreeze("conv4_block-3", names) == 5  # clamps to all of conv4
    assert resolve_unfreeze("conv4_block2", names) == 4
    assert resolve_unfreeze("all", names) == 8
    with pytest.raises(ValueError, match="matches no group"):
        resolve_unfreeze("conv9", names)
    # a block that does not exist is refused with the stage's range, not clamped (#22 item 12)
    for spec in ("conv5_block9", "conv5_block0", "conv5_block-0", "conv4_block37"):
        with pytest.raises(ValueError) as e:
            resolve_unfreeze(spec, names)
        stage = spec.partition("_block")[0]
        assert f"{stage}_block1 … {stage}_block2 (2)" in str(e.value)
        assert f"{stage}_block-1 … {stage}_block-2" in str(e.value)


def test_a_stage_naming_a_missing_block_is_refused_before_training(prepared, tmp_path):
    from typer.testing import CliRunner

    from fastcxr.cli import app

    res = CliRunner().invoke(app, ["train", "--data", str(prepared), "--arch", "resnet22n",
                                   "--no-pretrained", "--stages", "head,conv5_block9",
                                   "--runs", str(tmp_path), "--name", "x"])  # fmt: skip
    assert res.exit_code == 2, res.output
    assert "conv5_block1 … conv5_block3 (3)" in res.stderr
    assert not (tmp_path / "x").exists()


def test_discriminative_lrs_are_geometric_over_unfrozen_groups():
    learn = learner(build_model("resnet18", 2), train_bn=False)
    unfrozen = apply_stage(learn, Stage("c5", "conv5"))
    lrs = stage_lrs(learn, len(unfrozen), 1e-3, 10)
    assert len(lrs) == len(learn.opt.param_lists)
    np.testing.assert_allclose(lrs[-3:], [1e-4, 10**-3.5, 1e-3])


def test_densenet_groups_cover_every_parameter():
    m = build_model("densenet121", 3)
    ids = [id(p) for g in block_splitter(m) for p in g]
    assert len(ids) == len(set(ids)) == len(list(m.parameters()))
    assert sum(n.startswith("conv5_") for n in group_names(m)) == 16  # denseblock4 layers


def test_local_weights_file_sums_rgb_stem(tmp_path):
    ref = torchvision.models.resnet18()
    torch.save(ref.state_dict(), tmp_path / "r18.pth")
    m = build_model("resnet18", 2, weights_file=tmp_path / "r18.pth")
    torch.testing.assert_close(m[0][0].weight, ref.conv1.weight.sum(1, keepdim=True))
    torch.testing.assert_close(m[0][4][0].conv1.weight, ref.layer1[0].conv1.weight)


def test_online_weights_path_uses_torch_hub_cache(tmp_path, monkeypatch):
    """pretrained=True takes torchvision's ImageNet weights; served here from a filled cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = torchvision.models.resnet18()
    url = torchvision.models.ResNet18_Weights.DEFAULT.url
    ckpt = tmp_path / "hub" / "checkpoints"
    ckpt.mkdir(parents=True)
    torch.save(ref.state_dict(), ckpt / url.rsplit("/", 1)[-1])
    m = TorchvisionArch("resnet18")(pretrained=True)
    torch.testing.assert_close(m.fc.weight, ref.fc.weight)


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": nn.Linear(2, 2)}, tmp_path / "evil.pth")  # a pickled module
    with pytest.raises(ValueError, match="weights_only"):
        load_state_dict(tmp_path / "evil.pth")
