"""timm backbones (#24): stages found from the model, parameter counts per stage against counts
taken from the model's own modules, Keras-style freezing with no backward pass through frozen
blocks (LayerNorm kept in eval mode too), and train → predict → ONNX on three families."""

import json

import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN
from torch import nn
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.config import DEMO, Stage
from fastcxr.errors import UsageError
from fastcxr.models import block_groups, build_model
from fastcxr.study import ablation_plan
from fastcxr.train.freezing import Freezing

timm = pytest.importorskip("timm")  # the dev set-up installs it (fastcxr[timm])

STAGES = (Stage("head", "head"), Stage("c5b1", "conv5_block-1"), Stage("c5", "conv5"),
          Stage("c4b2", "conv4_block-2"))  # fmt: skip
STAGES_1 = (Stage("head", "head"), Stage("c5", "conv5"), Stage("c4b1", "conv4_block-1"),
            Stage("c4b2", "conv4_block-2"))  # fmt: skip


def n(*mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


_HEADS = {"convnext_atto": "head", "efficientnet_b0": "classifier", "regnetx_002": "head"}


def _expected(name: str, model: nn.Module) -> list[int]:
    """Trainable parameters of STAGES, from the timm model's own attributes (written per
    family here, not by the discovery code)."""
    tm, head = model[0].model, n(model[1])
    if name == "convnext_atto":
        last, before, neck = tm.stages[3].blocks, tm.stages[2].blocks, [tm.norm_pre]
        whole = tm.stages[3]
    elif name == "efficientnet_b0":
        last, before = tm.blocks[6], tm.blocks[5]
        neck, whole = [tm.conv_head, tm.bn2], tm.blocks[6]
    elif name == "regnetx_002":
        last, before = list(tm.s4.children()), list(tm.s3.children())
        neck, whole = [tm.final_conv], tm.s4
    else:
        raise AssertionError(name)
    if name == "efficientnet_b0":  # its last stage is one block: STAGES_1 (conv5, conv4 …)
        c5 = head + n(whole, *neck)
        return [head, c5, c5 + n(list(before)[-1]), c5 + n(*list(before)[-2:])]
    c5b1 = head + n(list(last)[-1], *neck)
    if name == "convnext_atto":  # a stage's downsampling joins its first block
        c5b1 += n(tm.stages[3].downsample) if len(last) == 1 else 0
    c5 = head + n(whole, *neck)
    return [head, c5b1, c5, c5 + n(*list(before)[-2:])]


@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_the_plan_counts_what_each_stage_unfreezes(name):
    stages = STAGES_1 if name == "efficientnet_b0" else STAGES
    cfg = DEMO.replace(arch=name, size=64, ablation_stages=stages)
    plan = ablation_plan(cfg)
    model = build_model(name, 2)
    assert [s.trainable_params for s in plan.stages] == _expected(name, model)
    assert plan.total_params == n(model)
    names = [g for g, _ in block_groups(model)]
    assert names[0] == "stem" and names[-1] == "head"
    # every parameter the network uses is in exactly one group; timm's own classifier head,
    # which fastai's body never calls (it pools itself), in none, and never trained
    tm = model[0].model
    unused = {id(p) for p in tm.get_submodule(_HEADS[name]).parameters()}
    ids = [id(p) for _, mods in block_groups(model) for m in mods for p in m.parameters()]
    assert len(ids) == len(set(ids)) and not unused & set(ids)
    assert set(ids) | unused == {id(p) for p in model.parameters()}
    assert not any(p.requires_grad for p in tm.get_submodule(_HEADS[name]).parameters())


def test_a_vision_transformer_is_one_stage_of_its_blocks_with_its_tokens_in_the_stem():
    model = build_model("vit_tiny_patch16_224", 2)
    tm = model[0].model
    groups = block_groups(model)
    names = [g for g, _ in groups]
    assert names == ["stem", *[f"stage1_block{i}" for i in range(1, 13)], "head"]
    stem = {id(p) for m in groups[0][1] for p in m.parameters()}
    assert {id(tm.cls_token), id(tm.pos_embed)} <= stem
    assert n(*groups[0][1]) == n(tm.patch_embed) + tm.cls_token.numel() + tm.pos_embed.numel()
    assert n(*groups[-2][1]) == n(tm.blocks[11], tm.norm, tm.fc_norm, tm.head)
    cfg = DEMO.replace(arch="vit_tiny_patch16_224", ablation_stages=STAGES)
    with pytest.raises(UsageError, match="this network has 1 stage"):
        ablation_plan(cfg)  # conv4 names a stage a ViT does not have


@pytest.mark.parametrize("name", ["convnext_atto", "vit_tiny_patch16_224"])
def test_keras_freezing_runs_no_backward_through_frozen_blocks(name):
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from fastcxr.models import block_splitter

    model = build_model(name, 2)
    learn = Learner(DataLoaders(), model, loss_func=nn.BCEWithLogitsLoss(),
                    splitter=block_splitter, train_bn=False)  # fmt: skip
    learn.create_opt()
    freezing = Freezing("keras")
    live = freezing.unfreeze(learn, Stage("s", "conv5_block-1"))
    groups = block_groups(model)
    frozen = [mods for g, mods in groups if g not in live]
    calls = []
    hooks = [m.register_full_backward_hook(lambda *a: calls.append(1))
             for mods in frozen for m in mods if isinstance(m, nn.Module)]  # fmt: skip
    model.train()
    freezing.settle(model)
    size = 224 if name.startswith("vit") else 64
    out = model(torch.randn(2, 1, size, size))
    nn.BCEWithLogitsLoss()(out, torch.ones_like(out)).backward()
    for h in hooks:
        h.remove()
    assert calls == []  # no backward pass through any frozen block
    assert all(p.grad is None for mods in frozen for m in mods for p in m.parameters())
    assert all(p.grad is not None for g, mods in groups if g in live for m in mods
               for p in m.parameters() if p.requires_grad)  # fmt: skip
    norms = [m for mods in frozen for x in mods for m in x.modules()
             if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))]  # fmt: skip
    assert norms and not any(m.training for m in norms)  # frozen norms in eval mode


def test_weights_file_of_the_architecture_loads_and_another_is_refused(tmp_path):
    src = timm.create_model("convnext_atto", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")  # a 3-channel ImageNet-shaped file
    model = build_model("convnext_atto", 2, weights_file=tmp_path / "w.pth")
    stem = model[0].model.stem[0].weight
    assert torch.allclose(stem, src.stem[0].weight.sum(dim=1, keepdim=True))
    assert torch.equal(model[0].model.stages[3].blocks[1].mlp.fc2.weight,
                       src.stages[3].blocks[1].mlp.fc2.weight)  # fmt: skip
    other = timm.create_model("regnetx_002", pretrained=False)
    torch.save(other.state_dict(), tmp_path / "o.pth")
    with pytest.raises(UsageError, match="not of convnext_atto"):
        build_model("convnext_atto", 2, weights_file=tmp_path / "o.pth")


def test_an_unknown_architecture_names_the_choices():
    with pytest.raises(UsageError, match="unknown architecture 'convnext_nope'.*timm model"):
        build_model("convnext_nope", 2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["convnext_atto", "efficientnet_b0", "regnetx_002"])
def test_train_predict_and_onnx_on_a_timm_family(prepared, tmp_path, name):
    pytest.importorskip("onnxruntime")
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--data", str(prepared), *TINY_TRAIN, "--arch", name,
                              "--stages", "head,conv5", "--epochs", "1", "--no-pretrained",
                              "--runs", str(tmp_path), "--name", "t"])  # fmt: skip
    assert res.exit_code == 0, res.output
    run = tmp_path / "t"
    assert json.loads((run / "config.json").read_text())["train"]["arch"] == name
    out = tmp_path / "p.csv"
    res = runner.invoke(app, ["predict", str(run), str(prepared / "manifest.csv"), "--out",
                              str(out), "--export", str(tmp_path / "x"), "--format", "onnx",
                              "--cam", str(tmp_path / "cam")])  # fmt: skip
    assert res.exit_code == 0, res.output
    pred = pd.read_csv(out)
    assert len(pred) and pred.filter(like="p_").apply(lambda c: c.between(0, 1).all()).all()
    assert (tmp_path / "x" / "model.onnx").exists() and any((tmp_path / "cam").iterdir())


def test_bench_says_it_measures_torchvision_architectures(tmp_path):
    from fastcxr.bench import bench_train
    from fastcxr.config import parse_stages

    with pytest.raises(UsageError, match="bench measures torchvision architectures"):
        bench_train(DEMO.replace(arch="convnext_atto"), parse_stages("head"), cache=tmp_path)
    assert not any(tmp_path.iterdir())  # nothing written
