"""Architectures, weights, and the block-level splitter that progressive unfreezing needs.

fastai's ResNet splitter gives only 3 parameter groups (`body[:6]`, `body[6:]`, head), so
`freeze_to(-n)` cannot unfreeze "conv5 block 3" alone. `block_groups` cuts the body into one
group per residual block (ResNet) or dense layer (DenseNet), named Keras-style after the
study (`conv5_block3` = torchvision `layer4[2]`), so `freeze_to(-n)` unfreezes the head and
the last n-1 blocks.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from fastai.torch_core import params
from fastai.vision.learner import create_vision_model
from torch import nn
from torchvision.models.resnet import BasicBlock, ResNet

from fastcxr.backbones import (
    alias,
    is_timm_arch,
    timm_available,
    timm_groups,
    timm_model,
    timm_state,
)
from fastcxr.errors import MissingFile, UsageError
from fastcxr.runtime.runs import TORCH_LOAD_ERRORS


def resnet10(weights=None, **kwargs) -> ResNet:
    """torchvision's ResNet with one BasicBlock per stage: the CPU demo's architecture.

    No ImageNet weights exist for it; it is here so the whole pipeline (splitter, stages,
    formulations) runs in minutes on a laptop CPU.
    """
    if weights is not None:
        raise UsageError("resnet10 has no pretrained weights; use --no-pretrained")
    return ResNet(BasicBlock, [1, 1, 1, 1], **kwargs)


class NarrowResNet(ResNet):
    """torchvision's BasicBlock ResNet with stage widths `widths` instead of 64/128/256/512.

    The same modules, names and forward as `ResNet` (so `block_groups` splits it the same
    way); only the channel counts differ. Initialised as torchvision initialises a ResNet.
    """

    def __init__(self, layers: list[int], widths=(32, 64, 128, 256), num_classes: int = 1000):
        nn.Module.__init__(self)  # ResNet.__init__ fixes the widths; the rest is the same
        self._norm_layer, self.dilation, self.groups, self.base_width = nn.BatchNorm2d, 1, 1, 64
        self.inplanes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(BasicBlock, widths[0], layers[0])
        self.layer2 = self._make_layer(BasicBlock, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(BasicBlock, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(BasicBlock, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(widths[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)


def resnet22n(weights=None, **kwargs) -> ResNet:
    """A narrow ResNet-22 (BasicBlocks [2, 2, 3, 3], half of torchvision's widths): the CPU
    demo's architecture.

    Three blocks in conv5 and in conv4, as in the study's ResNet152, so each of the study's
    stages (conv5 block 3; all of conv5; the last 3 blocks of conv4) unfreezes something the
    one before did not; at half width it trains faster on a CPU than `resnet10` (4.5 M
    parameters). No ImageNet weights exist for it.
    """
    if weights is not None:
        raise UsageError("resnet22n has no pretrained weights; use --no-pretrained")
    return NarrowResNet([2, 2, 3, 3], **kwargs)


ARCHS: dict[str, Callable[..., nn.Module]] = {
    "resnet10": resnet10,
    "resnet22n": resnet22n,
    **{n: getattr(torchvision.models, n) for n in
       ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
        "densenet121", "densenet161", "densenet169", "densenet201")},
}  # fmt: skip
_CUT = {"resnet": -2, "densenet": -1}  # drop avgpool+fc / the classifier


class TorchvisionArch:
    """An `arch` for `vision_learner` that builds a torchvision model with the chosen weights.

    `weights_file` (a torchvision state dict, e.g. resnet152-394f9c45.pth) serves offline
    machines; otherwise `pretrained=True` loads torchvision's ImageNet weights (downloaded once
    into the torch hub cache).
    """

    def __init__(self, name: str, weights_file: str | Path | None = None):
        if name not in ARCHS:
            raise UsageError(unknown_arch(name))
        self.name, self.weights_file = name, weights_file
        self.__name__ = name

    @property
    def cut(self) -> int:
        return _CUT["densenet" if self.name.startswith("densenet") else "resnet"]

    def __call__(self, pretrained: bool = False) -> nn.Module:
        build = ARCHS[self.name]
        if self.weights_file is not None:
            model = build(weights=None)
            load_into(model, load_state_dict(self.weights_file), self.weights_file, self.name)
            return model
        return build(weights="DEFAULT" if pretrained else None)


def unknown_arch(name: str) -> str:
    timm = "any timm model name"
    if not timm_available():
        timm = f"with `pip install 'fastcxr[timm]'`, {timm}"
    return f"unknown architecture {name!r}; choose from {list(ARCHS)}, or {timm}"


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from `path`, loaded without unpickling arbitrary objects."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise MissingFile(f"{path}: no such weights file") from None
    except TORCH_LOAD_ERRORS as e:
        raise UsageError(
            f"{path}: not a plain state dict loadable with weights_only=True "
            f"({type(e).__name__}: {e})"
        ) from e
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{path}: expected a dict of tensors (a state dict)")
    return sd


def _shapes(sd: dict) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in sd.items()}


def looks_like(sd: dict[str, torch.Tensor]) -> str | None:
    """The torchvision architecture whose parameters have exactly these names and shapes
    (a classifier of another size allowed), or None. Built on the meta device: no memory."""
    want = _shapes(sd)
    head = ("fc.", "classifier.")
    trunk = {k: v for k, v in want.items() if not k.startswith(head)}
    for name, build in ARCHS.items():
        with torch.device("meta"):
            have = _shapes(build(weights=None).state_dict())
        if trunk == {k: v for k, v in have.items() if not k.startswith(head)}:
            return name
    return None


def load_into(model: nn.Module, sd: dict, source, arch: str) -> None:
    """`model.load_state_dict(sd)`, or a one-line error saying what `sd` looks like."""
    try:
        model.load_state_dict(sd)
    except RuntimeError:
        theirs, ours = _shapes(sd), _shapes(model.state_dict())
        missing = len(set(ours) - set(theirs))
        unexpected = len(set(theirs) - set(ours))
        wrong = sum(1 for k in set(ours) & set(theirs) if ours[k] != theirs[k])
        guess = looks_like(sd)
        what = f"the weights of a {guess}" if guess else "weights of no known architecture"
        raise UsageError(
            f"{source}: {what}, not of {arch} ({missing} missing, {unexpected} unexpected, "
            f"{wrong} mis-shaped parameters)"
        ) from None


def build_model(
    arch: str,
    n_out: int,
    pretrained: bool = False,
    weights_file: str | Path | None = None,
    size: int | None = None,
) -> nn.Module:
    """fastai's body (1 input channel) + head, as `vision_learner` would build it: a
    torchvision architecture (`ARCHS`) or any timm model (`fastcxr.backbones`), the latter
    built for `size` x `size` images where it is built for one size (a vision transformer)."""
    if arch not in ARCHS and is_timm_arch(arch):
        model = timm_model(arch, n_out, pretrained and weights_file is None, size)
        if weights_file is not None:
            tm = model[0].model
            load_into(tm, timm_state(tm, load_state_dict(weights_file)), weights_file, arch)
        return model
    a = TorchvisionArch(arch, weights_file)
    return create_vision_model(
        a, n_out, pretrained=pretrained or weights_file is not None, cut=a.cut, n_in=1
    )


# -- block-level groups ---------------------------------------------------------------------
def block_groups(model: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per parameter group, input to output; the last is the head."""
    body, head = model[0], model[1]
    if hasattr(body, "model") and hasattr(body.model, "feature_info"):  # fastai's TimmBody
        return [*timm_groups(body), ("head", [head])]
    if isinstance(body[0], nn.Conv2d) and len(body) == 8:  # ResNet: conv1 bn1 relu pool l1..l4
        groups = [("stem", [body[0], body[1]])]
        for stage, layer in enumerate(body[4:], start=2):
            groups += [(f"conv{stage}_block{i}", [blk]) for i, blk in enumerate(layer, 1)]
    elif hasattr(body[0], "denseblock1"):  # DenseNet: features
        f = body[0]
        groups = [("stem", [f.conv0, f.norm0])]
        pending: list[nn.Module] = []  # a transition joins the first layer of the next block
        for stage in range(1, 5):
            for i, layer in enumerate(getattr(f, f"denseblock{stage}").children(), 1):
                groups.append((f"conv{stage + 1}_block{i}", [*pending, layer]))
                pending = []
            if stage < 4:
                pending = [getattr(f, f"transition{stage}")]
        groups[-1][1].append(f.norm5)
    else:
        raise ValueError(
            f"no block splitter for {type(body[0]).__name__}; ResNet, DenseNet or a timm model"
        )
    return [*groups, ("head", [head])]


def block_splitter(model: nn.Module) -> list[list[nn.Parameter]]:
    """fastai splitter: one parameter group per block (see `block_groups`)."""
    return [[p for m in mods for p in params(m)] for _, mods in block_groups(model)]


def group_names(model: nn.Module) -> list[str]:
    return [n for n, _ in block_groups(model)]


def resolve_unfreeze(spec: str, names: list[str]) -> int:
    """How many groups from the end a stage unfreezes (the n of `freeze_to(-n)`).

    `spec` is `head`, `all`, a group name (`conv5_block3`: from that block on), a stage
    (`conv5`: all of its blocks), or a stage with a negative block index (`conv4_block-3`:
    the last 3 blocks of conv4, and everything after them). Negative indices past the start
    of a stage clamp to its first block, so a stage list written for ResNet152 runs on smaller
    nets (the stage's `unfrozen` groups are recorded); a block number that does not exist
    (`conv5_block9` on a stage of 3 blocks, `block0`, `block-0`) is refused with the range.
    """
    spec = alias(spec, names)  # conv5, conv4_block-3 … on a timm network's stages
    if spec == "head":
        return 1
    if spec == "all":
        return len(names)
    if spec in names:
        return len(names) - names.index(spec)
    stage, _, block = spec.partition("_block")
    members = [i for i, n in enumerate(names) if n.startswith(stage + "_block")]
    if not members:
        raise UsageError(
            f"unfreeze spec {spec!r} matches no group; groups: {names[0]} … {names[-1]}"
        )
    if not block:
        first = members[0]
    else:
        try:
            k = int(block)
        except ValueError:
            raise UsageError(
                f"unfreeze spec {spec!r}: the block after _block must be a number, e.g. "
                f"{stage}_block3 or {stage}_block-3"
            ) from None
        blocks = f"{names[members[0]]} … {names[members[-1]]}"
        if k == 0 or block.strip() in ("-0", "+0") or k > len(members):
            raise UsageError(
                f"unfreeze spec {spec!r}: {stage} has blocks {blocks} ({len(members)}); "
                f"name one of them, or count from the end with {stage}_block-1 … "
                f"{stage}_block-{len(members)}"
            )
        first = members[max(len(members) + k, 0)] if k < 0 else members[k - 1]
    return len(names) - first


def count_params(model: nn.Module, trainable_only: bool = True) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "ARCHS",
    "NarrowResNet",
    "TorchvisionArch",
    "block_groups",
    "block_splitter",
    "build_model",
    "count_params",
    "group_names",
    "load_state_dict",
    "resolve_unfreeze",
    "resnet10",
    "resnet22n",
]
