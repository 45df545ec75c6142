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
from collections.abc import Callable
from dataclasses import dataclass

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


def timm_model(
    name: str, n_out: int, pretrained: bool = False, size: int | None = None
) -> nn.Module:
    """fastai's body (1 input channel, `TimmBody`) + head for the timm model `name`, as
    `vision_learner(dls, name)` builds it, for `size` x `size` images (`size_kwargs`); timm's
    own head, which the body never calls, frozen (`unused_modules`). A weights file is loaded
    by `models.build_model` (`timm_state`)."""
    from fastai.vision.learner import create_timm_model

    kw = size_kwargs(name, size)
    model, _ = create_timm_model(name, n_out, pretrained=pretrained, n_in=1, **kw)
    for m in unused_modules(model[0]):
        m.requires_grad_(False)
    return model


def _twin(name: str, **kw) -> nn.Module:
    """timm model `name` (1 channel, no classifier) on the meta device: no memory, no compute."""
    import timm

    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=1, **kw)


def _takes(name: str, size: int, **kw) -> bool:
    """Whether timm model `name`, built with `kw`, runs on a `size` x `size` image (traced on
    the meta device)."""
    try:
        with torch.device("meta"):
            _twin(name, **kw)(torch.empty(1, 1, size, size))
    except Exception:  # noqa: BLE001 — any failure means: not as built
        return False
    return True


def size_kwargs(name: str, size: int | None) -> dict:
    """timm's `img_size=size` for a model built for one image size (a vision transformer's
    patch grid and position embedding: ViT, DeiT, EVA, MLP-Mixer) that cannot take `size` x
    `size` images as built; {} for one that can (a convolutional network). timm resamples
    pretrained position embeddings to the new grid, as `timm_state` does for a weights file."""
    if size is None or _takes(name, size):
        return {}
    return {"img_size": size} if _takes(name, size, img_size=size) else {}


def _patch_embed(tm: nn.Module) -> nn.Module | None:
    from timm.layers import PatchEmbed

    return next((m for m in tm.modules() if isinstance(m, PatchEmbed)), None)


def _built_kwargs(tm: nn.Module) -> tuple[dict, tuple[int, int]]:
    """The `img_size` timm model `tm` was built with where it is not its default, and the
    image size it takes."""
    size = tuple(tm.default_cfg.get("input_size", (3, 224, 224))[-2:])
    built = getattr(_patch_embed(tm), "img_size", None)
    if built is not None and tuple(built) != size:
        return {"img_size": tuple(built)}, tuple(built)
    return {}, size


def timm_state(tm: nn.Module, sd: dict) -> dict:
    """A timm state dict of `tm`'s architecture made loadable into `tm` (1 input channel, no
    classifier): a 3-channel first convolution summed to 1 channel, the classifier's weights
    dropped."""
    sd = _resampled(tm, _for_one_channel(tm, sd))
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


def _resampled(tm: nn.Module, sd: dict) -> dict:
    """A vision transformer's position embedding resampled to `tm`'s patch grid (a 224 px
    checkpoint on a model built for 512 px), as timm does for its own pretrained weights."""
    pos, ours = sd.get("pos_embed"), getattr(tm, "pos_embed", None)
    pe = _patch_embed(tm)
    if pos is None or not isinstance(ours, torch.Tensor) or pos.shape == ours.shape:
        return sd
    if pos.ndim != 3 or ours.ndim != 3 or pe is None:
        return sd  # another layout: `load_into` names it as mis-shaped
    from timm.layers import resample_abs_pos_embed

    npt = 0 if getattr(tm, "no_embed_class", False) else getattr(tm, "num_prefix_tokens", 1)
    new = resample_abs_pos_embed(pos, new_size=list(pe.grid_size), num_prefix_tokens=npt)
    return {**sd, "pos_embed": new}


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
    tm = body.model
    kw, size = _built_kwargs(tm)
    try:
        with torch.device("meta"):
            twin = _twin(tm.default_cfg["architecture"], **kw)
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


@dataclass(frozen=True)
class CamLayer:
    """Where Grad-CAM reads a backbone: `module`'s output (its input when `pre`: a vision
    transformer's tokens entering its last block), and `to_map(activation, (H, W))`, which
    makes an activation (or its gradient) a (B, C, h, w) map or raises a `UsageError`."""

    module: nn.Module
    pre: bool
    to_map: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor]


def nchw(channels: int | None = None) -> Callable:
    """`to_map` of a feature map: (B, C, h, w), or channels-last (B, h, w, C) permuted (VOLO's
    stages), told apart by the level's `channels`."""

    def to_map(t, hw):
        if not isinstance(t, torch.Tensor) or t.ndim != 4:
            raise UsageError("Grad-CAM needs a feature map (B, C, h, w); this backbone's "
                             f"stage gives {_what(t)}")  # fmt: skip
        if channels is not None and t.shape[1] != channels and t.shape[-1] == channels:
            return t.permute(0, 3, 1, 2)
        return t

    return to_map


def _what(t) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _tokens(tm: nn.Module) -> Callable:
    """`to_map` of a transformer's tokens (B, N, C): its prefix tokens (class, distillation,
    registers) dropped, the patch tokens laid out on the patch grid of the image."""
    prefix = getattr(tm, "num_prefix_tokens", 0) or 0
    ph, pw = _patch_embed(tm).patch_size

    def to_map(t, hw):
        h, w = hw[0] // ph, hw[1] // pw
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[1] != prefix + h * w:
            raise UsageError(f"Grad-CAM: expected {prefix} + {h}x{w} tokens of "
                             f"{ph}x{pw} patches, got {_what(t)}")  # fmt: skip
        return t[:, prefix:].transpose(1, 2).reshape(t.shape[0], -1, h, w)

    return to_map


def cam_layers(tm: nn.Module) -> list[CamLayer]:
    """Grad-CAM's layers of timm model `tm`, the last first: a convolutional network's last
    two feature levels (the one before is used where the last one's map is too small); a
    vision transformer's tokens as they enter its last block (with a class token, the last
    block's own patch tokens reach no output, so their gradient is zero)."""
    stages, _ = _stage_modules(tm)
    if len(stages) == 1 and _patch_embed(tm) is not None:  # one stage of transformer blocks
        return [CamLayer(list(stages[0].children())[-1], True, _tokens(tm))]
    levels = [f for f in tm.feature_info if "." in f["module"] or _container(
        _module(tm, f["module"]))][::-1][:2]  # fmt: skip
    return [CamLayer(_module(tm, f["module"]), False, nchw(f["num_chs"])) for f in levels]


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
    "CamLayer",
    "cam_layers",
    "nchw",
    "size_kwargs",
    "timm_state",
    "is_timm_arch",
    "timm_available",
    "timm_groups",
    "timm_model",
]
