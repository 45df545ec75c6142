"""timm backbones (#24): stages found from the model, parameter counts per stage against counts
taken from the model's own modules, Keras-style freezing with no backward pass through frozen
blocks (LayerNorm kept in eval mode too), a ViT built for the image size with its Grad-CAM on
tokens, and train → predict → Grad-CAM → ONNX / torch.export, lr-find and bench on each
family."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN
from torch import nn
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.config import DEMO, Stage
from fastcxr.errors import UsageError
from fastcxr.export import export, load_exported
from fastcxr.models import block_groups, build_model
from fastcxr.predict import Predictor
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
    vit = (Stage("head", "head"), Stage("b1", "conv5_block-1"), Stage("b4", "stage1_block-4"),
           Stage("all", "all"))  # fmt: skip
    plan = ablation_plan(DEMO.replace(arch="vit_tiny_patch16_224", size=48, ablation_stages=vit))
    model = build_model("vit_tiny_patch16_224", 2, size=48)  # its plan at 48 px: 3x3 patches
    tm, head = model[0].model, n(model[1])
    last = head + n(tm.norm, tm.fc_norm, tm.head)  # what follows the blocks joins the last one
    assert [s.trainable_params for s in plan.stages] == [
        head,
        last + n(tm.blocks[11]),
        last + n(*tm.blocks[8:]),
        n(model),
    ]
    assert plan.total_params == n(model) and tm.pos_embed.shape[1] == 1 + 9


def test_what_runs_between_two_stages_joins_the_first_block_of_the_later_one():
    """Visformer embeds patches (and adds a position embedding it holds itself) before each
    stage: unfreezing stage 3 unfreezes its patch embedding, which comes before its first
    block, as ConvNeXt's downsampling joins its stage's first block."""
    model = build_model("visformer_tiny", 2, size=64)
    tm = model[0].model
    got = {g: n(*mods) for g, mods in block_groups(model)}
    assert got["stem"] == n(tm.stem, tm.patch_embed1) + tm.pos_embed1.numel()
    for k in (2, 3):
        embed, pos = tm.get_submodule(f"patch_embed{k}"), getattr(tm, f"pos_embed{k}")
        first = tm.get_submodule(f"stage{k}")[0]
        assert got[f"stage{k}_block1"] == n(embed, first) + pos.numel()
    assert got["stage3_block4"] == n(tm.stage3[3], tm.norm)
    assert sum(got.values()) == n(model)


def test_a_module_list_of_blocks_is_split_and_a_stage_norm_joins_its_last_block():
    """PVT v2 keeps its blocks in a ModuleList and ends each stage with a norm: one group per
    block, the downsampling with the first, the norm (it runs last) with the last."""
    model = build_model("pvt_v2_b0", 2, size=64)
    stages = model[0].model.stages
    got = {g: n(*mods) for g, mods in block_groups(model)}
    for k, st in enumerate(stages, 1):
        assert len(st.blocks) == 2 and f"stage{k}_block3" not in got
        down = [] if st.downsample is None else [st.downsample]  # stage 1: the patch embed
        assert got[f"stage{k}_block1"] == n(*down, st.blocks[0])
        assert got[f"stage{k}_block2"] == n(st.blocks[1], st.norm)
    tm = model[0].model
    assert got["stem"] == n(tm.patch_embed)
    assert sum(got.values()) == n(model) - n(tm.head)  # timm's unused classifier


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


def test_weights_files_of_heads_with_norms_and_space_to_depth_stems_load(tmp_path):
    """LeViT's classifier has a norm (`head.bn`) besides its linear layer; TResNet's first
    convolution takes 48 channels (3 colours x 4x4 space-to-depth), folded to 16."""
    src = timm.create_model("levit_128s", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "levit.pth")
    got = build_model("levit_128s", 2, weights_file=tmp_path / "levit.pth")[0].model
    assert torch.equal(got.stages[2].blocks[0].attn.qkv.linear.weight,
                       src.stages[2].blocks[0].attn.qkv.linear.weight)  # fmt: skip
    src = timm.create_model("tresnet_m", pretrained=False)
    torch.save(src.state_dict(), tmp_path / "tresnet.pth")
    got = build_model("tresnet_m", 2, weights_file=tmp_path / "tresnet.pth")[0].model
    w = src.body.conv1.conv.weight  # (64, 48, 3, 3): 16 positions x 3 colours
    want = w.reshape(64, 16, 3, 3, 3).sum(dim=2)
    assert torch.allclose(got.body.conv1.conv.weight, want)


def test_models_built_for_one_size_are_rebuilt_or_refused_in_one_line():
    """LeViT (batch norm over tokens) is rebuilt by timm for 64 px; EfficientFormer runs at
    224 px only: refused before anything is built, naming the size it takes."""
    levit = build_model("levit_128s", 2, size=64).eval()
    assert levit(torch.randn(2, 1, 64, 64)).shape == (2, 2)
    with pytest.raises(UsageError, match=r"efficientformer_l1 runs at its own input size only "
                       r"\(224 px\).*--size 224"):  # fmt: skip
        build_model("efficientformer_l1", 2, size=64)


def test_a_stem_feature_level_inside_a_stem_module_is_the_stem():
    """BiT's first feature level is `stem.conv`, the rest `stages.K`: four stages, its stem
    the stem group."""
    model = build_model("resnetv2_50x1_bit", 2)
    tm = model[0].model
    groups = dict(block_groups(model))
    assert n(*groups["stem"]) == n(tm.stem)
    assert [sum(g.startswith(f"stage{k}_") for g in groups) for k in (1, 2, 3, 4)] == [
        len(st.blocks) for st in tm.stages]  # fmt: skip


def test_grad_cam_of_cait_reads_its_patch_tokens_before_the_class_token_joins():
    from fastcxr.predict import ProbabilityModel, grad_cam

    torch.manual_seed(0)
    pm = ProbabilityModel(build_model("cait_xxs24_224", 2, size=64), "multilabel", 2, 0.5,
                          0.25).eval()  # fmt: skip
    tm = pm.net[0].model
    seen = []
    h = tm.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    cam = grad_cam(pm, image, 0)
    h.remove()
    assert seen[0].shape[1] == 16  # a 4x4 grid of 16 px patches, no class token yet
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)


def test_an_unknown_architecture_names_the_choices():
    with pytest.raises(UsageError, match="unknown architecture 'convnext_nope'.*timm model"):
        build_model("convnext_nope", 2)


FAMILIES = ["convnext_atto", "efficientnet_b0", "regnetx_002", "vit_tiny_patch16_224"]


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_train_predict_cam_and_export_on_a_timm_family(prepared, tmp_path, name):
    """Each family at 32 px (a ViT built for it: a 2x2 patch grid): train, predict with
    Grad-CAM, then ONNX and torch.export exports that give the predictor's probabilities."""
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
    assert len(list((tmp_path / "cam").rglob("*.png"))) == 2 * len(pred)  # one per finding
    p = Predictor.load(run, device="cpu")
    manifest = pd.read_csv(prepared / "manifest.csv")
    imgs = np.stack([p.load_image(prepared / f) for f in manifest["image"][:8]])
    want = p.probabilities(imgs)
    np.testing.assert_allclose(pred.filter(like="p_").to_numpy()[:8], want, atol=1e-5)
    export(p, tmp_path / "t2")  # torch.export
    for folder in (tmp_path / "x", tmp_path / "t2"):
        got = load_exported(folder)(imgs[:, None].astype(np.float32))
        np.testing.assert_allclose(got, want, atol=1e-4)


def _cam_by_hand(pm, image: np.ndarray, index: int) -> np.ndarray:
    """Grad-CAM of a ViT written out here: the tokens entering the last block, class token
    dropped, on the patch grid; gradient-weighted channels, ReLU, bilinear upsampling."""
    tm = pm.net[0].model
    seen = []
    h = tm.blocks[-1].register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    try:
        prob = pm(torch.tensor(image, dtype=torch.float32)[None, None])[0, index]
        (g,) = torch.autograd.grad(prob, seen[0])
    finally:
        h.remove()
    side = image.shape[0] // 16
    a = seen[0][0, 1:].T.reshape(-1, side, side)  # (C, side, side), row-major patches
    w = g[0, 1:].mean(dim=0)  # the mean gradient of each channel over the patches
    cam = torch.relu((w[:, None, None] * a).sum(0))[None, None]
    cam = nn.functional.interpolate(cam, size=image.shape, mode="bilinear")[0, 0].detach()
    return (cam / cam.max()).numpy()


def test_grad_cam_of_a_vision_transformer_reads_the_tokens_entering_its_last_block():
    from fastcxr.predict import ProbabilityModel, grad_cam

    torch.manual_seed(0)
    pm = ProbabilityModel(build_model("vit_tiny_patch16_224", 2, size=64), "multilabel", 2,
                          0.5, 0.25).eval()  # fmt: skip
    image = np.random.default_rng(0).integers(0, 256, (64, 64)).astype(np.uint8)
    cam = grad_cam(pm, image, 1)
    assert cam.shape == (64, 64) and cam.max() == pytest.approx(1.0)
    np.testing.assert_allclose(cam, _cam_by_hand(pm, image, 1), atol=1e-5)
    # the last block's own patch tokens reach no output through the class token: a map read
    # there would be all zero
    seen = []
    h = pm.net[0].model.blocks[-1].register_forward_hook(lambda m, a, o: seen.append(o))
    prob = pm(torch.tensor(image, dtype=torch.float32)[None, None])[0, 1]
    h.remove()
    (g,) = torch.autograd.grad(prob, seen[0])
    assert g[0, 1:].abs().max() == 0 and g[0, 0].abs().max() > 0


def test_a_vision_transformer_is_built_for_the_image_size_and_takes_224px_weights(tmp_path):
    model = build_model("vit_tiny_patch16_224", 2, size=48)  # a 3x3 grid of 16 px patches
    tm = model[0].model
    assert tuple(tm.pos_embed.shape) == (1, 1 + 9, 192)
    assert model(torch.randn(2, 1, 48, 48)).shape == (2, 2)
    conv = build_model("convnext_atto", 2, size=48)  # a convnet takes any size as built
    assert conv(torch.randn(2, 1, 48, 48)).shape == (2, 2)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "w.pth")  # a 224 px ImageNet-shaped checkpoint
    got = build_model("vit_tiny_patch16_224", 2, weights_file=tmp_path / "w.pth", size=48)
    pos, ours = src.pos_embed.detach(), got[0].model.pos_embed.detach()
    assert torch.equal(ours[:, :1], pos[:, :1])  # the class token's embedding as it was
    grid = pos[0, 1:].T.reshape(1, 192, 14, 14)  # the 14x14 grid, resampled to 3x3 here
    want = nn.functional.interpolate(grid, size=(3, 3), mode="bicubic", antialias=True)
    torch.testing.assert_close(ours[0, 1:].T.reshape(1, 192, 3, 3), want)
    assert torch.equal(got[0].model.blocks[5].mlp.fc2.weight, src.blocks[5].mlp.fc2.weight)


@pytest.mark.slow
def test_lr_find_sweeps_each_stage_of_a_timm_network(prepared, tmp_path):
    res = CliRunner().invoke(app, ["lr-find", "--data", str(prepared), *TINY_TRAIN, "--arch",
                                   "convnext_atto", "--stages", "head,conv5_block-1,conv5",
                                   "--no-pretrained", "--num-it", "8", "--out",
                                   str(tmp_path / "lr"), "--json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    ((net, stages),) = json.loads(res.stdout)["networks"].items()
    assert [s["stage"] for s in stages] == ["head", "conv5_block-1", "conv5"]
    names = [g for g, _ in block_groups(build_model("convnext_atto", 2))]
    n_last = sum(g.startswith("stage4_") for g in names)  # convnext_atto: 2 blocks in stage 4
    assert [s["unfrozen"] for s in stages] == [["head"], [names[-2], "head"],
                                               names[-1 - n_last :]]  # fmt: skip
    for s in stages:
        assert s["iterations"] >= 6 and len(s["lrs"]) == len(s["losses"]) == s["iterations"]
        assert all(np.isfinite(s["losses"]))


@pytest.mark.slow
def test_bench_measures_a_timm_architecture_against_fastai_defaults(tmp_path, monkeypatch):
    """bench on convnext_atto: each arm is a ConvNeXt (the fastai-defaults arm is
    `vision_learner(dls, "convnext_atto")`, as a user writes it), each row's ratios are its
    img/s divided."""
    import fastcxr.bench.arms as arms
    from fastcxr.bench import bench_train
    from fastcxr.config import parse_stages

    built, make = [], arms._defaults_learner
    monkeypatch.setattr(arms, "_defaults_learner", lambda job: built.append(make(job)) or built[-1])
    cfg = DEMO.replace(arch="convnext_atto", size=32, batch_size=4, workers=0)
    res = bench_train(cfg, parse_stages("head,conv5"), freeze_styles=("keras",), warmup=1,
                      steps=2, rounds=1, cache=tmp_path / "cache")  # fmt: skip
    assert res.arch == "convnext_atto" and [r.stage for r in res.rows] == ["head", "conv5"]
    for r in res.rows:
        assert min(r.limit_img_s, r.fastcxr_img_s, r.defaults_img_s) > 0
        assert r.fastcxr_vs_limit == pytest.approx(r.fastcxr_img_s / r.limit_img_s)
        assert r.fastcxr_vs_defaults == pytest.approx(r.fastcxr_img_s / r.defaults_img_s)
    (learn,) = built
    assert type(learn.model[0].model).__name__ == "ConvNeXt"
    assert learn.model[0].model.stem[0].in_channels == 3  # fastai's RGB PILImage default
