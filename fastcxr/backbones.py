"""timm backbones (#24): any timm architecture by name, its stages and blocks found from the
model itself, so Experiment I (progressive unfreezing) runs on ConvNeXt, EfficientNet, RegNet
or a vision transformer as on ResNet152.

The stages are the modules timm's `feature_info` names (`stages.3`, `blocks.6`, `s4`,
`layer4`): where they are children of one container, every child of it is a stage (the
container's children between two feature levels too, as EfficientNet's `blocks.3`); a
transformer whose feature levels are its blocks, all at one reduction, is one stage of those
blocks. A stage's blocks are its `blocks` (ConvNeXt, its downsampling joined to the first) or
its children. What comes before the first stage (stem, patch embedding, class token, position
embedding) is the `stem` group; what comes after the last (final norm, head convolution) joins
the last block, as DenseNet's `norm5` does. Groups are named `stageK_blockI`, K from 1; the
study's ResNet names (`conv5`, `conv4_block-3`) are aliases counted from the last stage
(`conv5` is the last stage, `conv4` the one before), so its stage list runs unchanged.

timm is optional (`pip install 'fastcxr[timm]'`); nothing here imports it until a timm
architecture is asked for.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from fastcxr.errors import UsageError


def timm_available() -> bool:
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def is_timm_arch(name: str) -> bool:
    """Whether `name` is a timm model (and timm is installed)."""
    if not timm_available():
        return False
    import timm

    return bool(timm.is_model(name))


def timm_model(name: str, n_out: int, pretrained: bool = False) -> nn.Module:
    """fastai's body (1 input channel, `TimmBody`) + head for the timm model `name`, as
    `vision_learner(dls, name)` builds it; timm's own head, which the body never calls,
    frozen (`unused_modules`). A weights file is loaded by `models.build_model` (`timm_state`)."""
    from fastai.vision.learner import create_timm_model

    model, _ = create_timm_model(name, n_out, pretrained=pretrained, n_in=1)
    for m in unused_modules(model[0]):
        m.requires_grad_(False)
    return model


def timm_state(tm: nn.Module, sd: dict) -> dict:
    """A timm state dict of `tm`'s architecture made loadable into `tm` (1 input channel, no
    classifier): a 3-channel first convolution summed to 1 channel, the classifier's weights
    dropped."""
    sd = _for_one_channel(tm, sd)
    ours = tm.state_dict()
    return {k: v for k, v in sd.items() if k in ours or not _is_classifier(tm, k)}


def _is_classifier(tm: nn.Module, key: str) -> bool:
    heads = tm.default_cfg.get("classifier", "head")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    return any(key == h or key.startswith(h + ".") for h in heads)


def _for_one_channel(tm: nn.Module, sd: dict) -> dict:
    """A 3-channel first convolution summed over its input channels (what timm's own
    pretrained loading does for `in_chans=1`)."""
    first = tm.default_cfg.get("first_conv")
    firsts = (first,) if isinstance(first, str) else tuple(first or ())
    out = dict(sd)
    for f in firsts:
        k = f"{f}.weight"
        if k in out and out[k].ndim == 4 and out[k].shape[1] == 3:
            out[k] = out[k].sum(dim=1, keepdim=True)
    return out


class _Loose(nn.Module):
    """Parameters a model holds directly (a ViT's class token, position embedding), as one
    module of a group: shared, not copied; the model's own state dict is unchanged."""

    def __init__(self, named: list[tuple[str, nn.Parameter]]):
        super().__init__()
        for n, p in named:
            self.register_parameter(n.replace(".", "_"), p)


def _module(root: nn.Module, path: str) -> nn.Module:
    try:
        return root.get_submodule(path) if path else root
    except AttributeError:
        raise UsageError(
            f"{type(root).__name__}: its feature_info names {path!r}, which is not one of its "
            "modules; fastcxr cannot find its stages (choose another architecture)"
        ) from None


def _container(m: nn.Module) -> bool:
    """A module of modules with parameters (a stage or a block), not a single layer."""
    return any(any(True for _ in c.parameters()) for c in m.children())


def _refuse(tm: nn.Module, why: str) -> UsageError:
    return UsageError(f"{type(tm).__name__}: fastcxr cannot find its stages ({why}); choose "
                      "another architecture")  # fmt: skip


def _stage_modules(tm: nn.Module) -> tuple[list[nn.Module], str]:
    """The stage modules of timm model `tm`, input to output, and the path of their container
    ('' when they are the model's own children). Feature levels that are single layers (a
    stem's `act1`, `bn1`) are the stem's, not stages."""
    info = [f for f in tm.feature_info if "." in f["module"]]
    parents = {f["module"].rpartition(".")[0] for f in info}
    if len(info) >= 2 and len(parents) == 1:
        trunk = parents.pop()
        kids = [c for c in _module(tm, trunk).children() if any(True for _ in c.parameters())]
        if not all(_container(c) for c in kids):
            raise _refuse(tm, f"{trunk} holds single layers, not stages or blocks")
        if len({f["reduction"] for f in info}) == 1 and len(info) == len(kids) > 1:
            return [_module(tm, trunk)], trunk  # a transformer: its blocks are one stage
        return kids, trunk
    paths = [f["module"] for f in tm.feature_info]
    staged = [p for p in paths if "." not in p and re.fullmatch(r"[a-z_]*\d+", p)]
    staged = [p for p in staged if _container(_module(tm, p))]
    if len(staged) < 2:
        raise _refuse(tm, f"feature levels {paths}")
    return [_module(tm, p) for p in staged], ""


def _blocks(stage: nn.Module) -> list[list[nn.Module]]:
    """A stage's blocks, each a list of modules (the first with the stage's other parts:
    a ConvNeXt stage's downsampling, parameters the stage holds itself)."""
    own = [(n, p) for n, p in stage.named_parameters(recurse=False)]
    extra = [_Loose(own)] if own else []
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, nn.Sequential) and len(inner):
        rest = [m for n, m in stage.named_children() if n != "blocks"]
        blocks = [[b] for b in inner]
        blocks[0] = [*extra, *rest, *blocks[0]]
        return blocks
    kids = [m for m in stage.children() if any(True for _ in m.parameters())]
    if not kids:
        return [[stage]]
    blocks = [[k] for k in kids]
    blocks[0] = [*extra, *blocks[0]]
    return blocks


def used_children(body: nn.Module) -> set[str] | None:
    """The names of the timm model's own children that fastai's `TimmBody` calls: traced on a
    copy built on the meta device (no memory, no compute); None where that cannot run."""
    import timm

    tm = body.model
    size = tm.default_cfg.get("input_size", (3, 224, 224))[-2:]
    try:
        with torch.device("meta"):
            twin = timm.create_model(tm.default_cfg["architecture"], pretrained=False,
                                     num_classes=0, in_chans=1)  # fmt: skip
            called: set[str] = set()
            hooks = [m.register_forward_hook(lambda m, i, o, n=n: called.add(n))
                     for n, m in twin.named_children()]  # fmt: skip
            x = torch.empty(1, 1, *size)
            twin.forward_features(x) if body.needs_pool else twin(x)
    except Exception:  # noqa: BLE001 — ops meta tensors cannot run: the classifier rule only
        return None
    del hooks  # the twin is thrown away with them
    return called


def unused_modules(body: nn.Module) -> list[nn.Module]:
    """timm's own modules fastai's `TimmBody` never calls (a classifier head, MobileNet's
    `conv_head`, VGG's `pre_logits`, when the body pools itself): in no group, frozen."""
    tm = body.model
    if not body.needs_pool:
        return []
    called = used_children(body)
    if called is None:  # the classifier by name
        name = tm.default_cfg.get("classifier") or "head"
        top = (name if isinstance(name, str) else name[0]).split(".")[0]
        return [m for n, m in tm.named_children() if n == top]
    return [m for n, m in tm.named_children()
            if n not in called and any(True for _ in m.parameters())]  # fmt: skip


def timm_groups(body: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per block group of fastai's `TimmBody` around a timm model, input to
    output, without the head: `stem`, `stage1_block1` … the last block (with what follows
    the last stage that the body uses). Every parameter the body uses is in exactly one
    group, or the architecture is refused."""
    tm = body.model
    if getattr(tm, "output_fmt", "NCHW") not in ("NCHW", None):
        raise _refuse(tm, f"its features are {tm.output_fmt}, fastai's head takes NCHW")
    skip = unused_modules(body)
    skip_ids = {id(p) for m in skip for p in m.parameters()}
    stages, trunk = _stage_modules(tm)
    inside = {id(p) for s in stages for p in s.parameters()}
    top = [n for n, _ in tm.named_children()]
    anchor = trunk.split(".")[0] if trunk else None
    # the last stage's top-level position: what comes after it is the neck
    last = anchor if anchor else next(n for n, m in tm.named_children() if m is stages[-1])
    after = top[top.index(last) + 1 :]
    neck = [m for n, m in tm.named_children()
            if n in after and all(m is not k for k in skip)]  # fmt: skip
    neck_ids = {id(p) for m in neck for p in m.parameters()}
    stem_named = [(n, p) for n, p in tm.named_parameters()
                  if id(p) not in inside | neck_ids | skip_ids]  # fmt: skip
    groups = [("stem", [_Loose(stem_named)])] if stem_named else []
    for k, stage in enumerate(stages, 1):
        groups += [(f"stage{k}_block{i}", mods) for i, mods in enumerate(_blocks(stage), 1)]
    groups[-1][1].extend(neck)
    ids = [id(p) for _, mods in groups for m in mods for p in m.parameters()]
    if len(ids) != len(set(ids)):
        raise _refuse(tm, "modules shared between its blocks")
    if set(ids) | skip_ids != {id(p) for p in tm.parameters()}:
        raise _refuse(tm, "parameters outside its stages and blocks")
    return groups


def cam_stages(tm: nn.Module) -> list[nn.Module]:
    """Grad-CAM's modules: the last stage, then the one before it (used when the last one's
    map is too small)."""
    stages, _ = _stage_modules(tm)
    return stages[::-1][:2]


def alias(spec: str, names: list[str]) -> str:
    """The study's ResNet spec (`conv5`, `conv5_block-1`, `conv4_block3`) on a network whose
    groups are `stageK_blockI`: conv5 is the last stage, conv4 the one before, and so on."""
    m = re.fullmatch(r"conv(\d)(_block.*)?", spec)
    stages = sorted({int(n[5:].split("_")[0]) for n in names if n.startswith("stage")})
    if not m or not stages or any(n.startswith("conv") for n in names):
        return spec
    k = stages[-1] - (5 - int(m[1]))
    if k < 1:
        raise UsageError(
            f"unfreeze spec {spec!r}: this network has {stages[-1]} stage(s) "
            f"(stage1 … stage{stages[-1]}); conv5 is its last stage"
        )
    return f"stage{k}{m[2] or ''}"


__all__ = [
    "alias",
    "cam_stages",
    "timm_state",
    "is_timm_arch",
    "timm_available",
    "timm_groups",
    "timm_model",
]
