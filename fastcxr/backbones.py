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

import functools
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

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


@functools.lru_cache(maxsize=64)  # build_model asks again for each run, plan and predict
def _takes(name: str, size: int, **kw) -> bool:
    """Whether timm model `name`, built with `kw`, runs on a `size` x `size` image (traced on
    the meta device)."""
    try:
        with torch.device("meta"):
            _twin(name, **kw).eval()(torch.empty(1, 1, size, size))  # eval: BN on 1 image
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
    if _takes(name, size, img_size=size):
        return {"img_size": size}
    import timm

    own = timm.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224)
    if _takes(name, own[-1]):  # it runs at its own size only (EfficientFormer)
        raise UsageError(f"{name} runs at its own input size only ({own[-1]} px), and timm "
                         f"cannot build it for {size} px; use --size {own[-1]} or another "
                         "architecture")  # fmt: skip
    return {}  # the meta device cannot run it: the model as built


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
    classifier): the first convolution's input channels folded to 1 as timm folds them for
    `in_chans=1`, the classifier's weights dropped (with a LeViT head's norm, which `tm`
    without a classifier does not have)."""
    ours = tm.state_dict()
    sd = _resampled(tm, _for_one_channel(tm, sd, ours))
    return {k: v for k, v in sd.items() if k in ours or not _is_classifier(tm, k)}


def _is_classifier(tm: nn.Module, key: str) -> bool:
    heads = tm.default_cfg.get("classifier", "head")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    tops = {h.rpartition(".")[0] or h for h in heads}  # LeViT's `head.linear`: all of `head`
    return any(key == h or key.startswith(h + ".") for h in tops)


def _for_one_channel(tm: nn.Module, sd: dict, ours: dict) -> dict:
    """The first convolution of 3 input channels summed to 1 (TResNet's space-to-depth 48
    to 16), by timm's own `adapt_input_conv`, as its pretrained loading does for
    `in_chans=1`."""
    from timm.models import adapt_input_conv

    first = tm.default_cfg.get("first_conv")
    firsts = (first,) if isinstance(first, str) else tuple(first or ())
    out = dict(sd)
    for f in firsts:
        k = f"{f}.weight"
        w, want = out.get(k), ours.get(k)
        if w is None or want is None or w.ndim != 4 or w.shape[1] == want.shape[1]:
            continue
        try:
            out[k] = adapt_input_conv(1, w)
        except (AssertionError, NotImplementedError, RuntimeError):
            pass  # a layout timm cannot fold: `load_into` names it as mis-shaped
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
    parent = [f["module"].rpartition(".")[0] for f in info]
    stem = [q.split(".")[0] == "stem" for q in parent]  # BiT's `stem.conv`, VoVNet's `stem.1`
    if any(stem) and not any(stem[stem.index(False) :] if False in stem else []):
        info = info[stem.index(False) :] if False in stem else []
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
        raise _refuse(tm, f"its feature levels {paths} are not the children of one module")
    return [_module(tm, p) for p in staged], ""


def _blocks(stage: nn.Module, when: Callable[[nn.Module], int | None]) -> list[list[nn.Module]]:
    """A stage's blocks, each a list of modules, the block's own module first after any
    `_Loose`: the stage's other parts join its first block
    (a ConvNeXt stage's downsampling, parameters the stage holds itself) or, when they run
    after its blocks (`when`: first use; else registration order), its last (a PVT stage's
    norm)."""
    own = [(n, p) for n, p in stage.named_parameters(recurse=False)]
    extra = [_Loose(own)] if own else []
    inner = getattr(stage, "blocks", None)
    if isinstance(inner, (nn.Sequential, nn.ModuleList)) and len(inner):
        names = [n for n, _ in stage.named_children()]
        start = when(inner[0])

        def late(n: str, m: nn.Module) -> bool:
            t = when(m)
            return t > start if None not in (t, start) else names.index(n) > names.index("blocks")

        rest = [(n, m) for n, m in stage.named_children() if n != "blocks"]
        blocks = [[b] for b in inner]
        blocks[0] = [*extra, *blocks[0], *(m for n, m in rest if not late(n, m))]
        blocks[-1] = [*blocks[-1], *(m for n, m in rest if late(n, m))]
        return blocks
    kids = [m for m in stage.children() if any(True for _ in m.parameters())]
    if not kids:
        return [[stage]]
    blocks = [[k] for k in kids]
    blocks[0] = [*extra, *blocks[0]]
    return blocks


class _Uses(TorchFunctionMode):
    """Calls `note(name)` at each use of one of `watch`'s tensors (id → name)."""

    def __init__(self, watch: dict[int, str], note: Callable[[str], None]):
        super().__init__()
        self.watch, self.note = watch, note

    def __torch_function__(self, func, types, args=(), kwargs=None):
        for t in tree_leaves((args, kwargs or {})):
            if id(t) in self.watch:
                self.note(self.watch[id(t)])
        return func(*args, **(kwargs or {}))


@functools.lru_cache(maxsize=32)
def _traced(arch: str, kw: tuple, size: tuple, features: bool) -> tuple[str, ...] | None:
    order: dict[str, None] = {}  # first uses, in order

    def note(name: str) -> None:
        order.setdefault(name, None)

    try:
        with torch.device("meta"):
            twin = _twin(arch, **dict(kw)).eval()  # batch norm on 1x1 maps in eval mode too
            hooks = [m.register_forward_pre_hook(lambda m, i, p=path: note(p))
                     for path, m in twin.named_modules() if path]  # fmt: skip
            own = {id(p): f"param:{n}" for n, p in twin.named_parameters(recurse=False)}
            x = torch.empty(1, 1, *size)
            with _Uses(own, note):
                twin.forward_features(x) if features else twin(x)
    except Exception:  # noqa: BLE001 — ops meta tensors cannot run: the registration order
        return None
    del hooks  # the twin is thrown away with them
    return tuple(order)


def call_order(body: nn.Module) -> tuple[str, ...] | None:
    """The timm model's modules (by path) and own parameters (`param:NAME`: a ViT's class
    token, Visformer's `pos_embed2`) in the order fastai's `TimmBody` first uses them: traced
    on a copy built on the meta device (no memory, no compute); None where that cannot run."""
    tm = body.model
    kw, size = _built_kwargs(tm)
    return _traced(tm.default_cfg["architecture"], tuple(kw.items()), size, body.needs_pool)


def used_children(body: nn.Module) -> set[str] | None:
    """The names of the timm model's own children that fastai's `TimmBody` runs (a child is
    used when any module inside it runs: a ModuleList of blocks is never called itself)."""
    order = call_order(body)
    return None if order is None else {
        n.split(".")[0] for n in order if not n.startswith("param:")}  # fmt: skip


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


def _own(mods: list[nn.Module]) -> nn.Module:
    """A block's own module (`_blocks`): the first that holds no loose parameters."""
    return next(m for m in mods if not isinstance(m, _Loose))


def _first_use(order: tuple[str, ...] | None) -> dict[str, int] | None:
    """Each module path's first use in `order`: its own, or that of a module inside it (a
    ModuleList of blocks is never called itself, its blocks are)."""
    if order is None:
        return None
    first: dict[str, int] = {}
    for i, path in enumerate(order):
        parts = path.split(".")
        for k in range(1, len(parts) + 1):
            first.setdefault(".".join(parts[:k]), i)
    return first


def _place(rank: dict | None, item: str, heads: list, slots: list[str], top: list[str]):
    """Where a module or parameter outside the stages goes: `stem` (used before the first
    block), `neck` (after the last), or j (before block j: Visformer's `patch_embed3` and
    `pos_embed3` before stage 3, ConViT's class token before its first global block). By
    first use (`call_order`: `rank` of each path); by registration order where it was not
    traced (after the last stage: the neck)."""
    if rank is None or item not in rank:
        if item.startswith("param:") or item not in top:
            return "stem"
        return "neck" if top.index(item) > top.index(slots[-1]) else "stem"
    later = [j for j, h in enumerate(heads) if h in rank and rank[h] > rank[item]]
    if not later:
        return "neck"
    return "stem" if later[0] == 0 else later[0]


def timm_groups(body: nn.Module) -> list[tuple[str, list[nn.Module]]]:
    """(name, modules) per block group of fastai's `TimmBody` around a timm model, input to
    output, without the head: `stem`, `stage1_block1` … the last block (with what follows
    the last stage that the body uses); what the body uses between two blocks joins the
    later one (`_place`). Every parameter the body uses is in exactly one group, or the
    architecture is refused."""
    tm = body.model
    if getattr(tm, "output_fmt", "NCHW") not in ("NCHW", None):
        raise _refuse(tm, f"its features are {tm.output_fmt}, fastai's head takes NCHW")
    skip = {id(p) for m in unused_modules(body) for p in m.parameters()}
    stages, trunk = _stage_modules(tm)
    inside = {id(p) for s in stages for p in s.parameters()}
    top = [n for n, _ in tm.named_children()]
    slots = [trunk.split(".")[0]] if trunk else [
        next(n for n, m in tm.named_children() if m is s) for s in stages]  # fmt: skip
    paths = {id(m): p for p, m in tm.named_modules()}
    rank = _first_use(call_order(body))

    def when(m: nn.Module) -> int | None:
        return None if rank is None else rank.get(paths.get(id(m), ""))

    blocks = [(f"stage{k}_block{i}", mods) for k, stage in enumerate(stages, 1)
              for i, mods in enumerate(_blocks(stage, when), 1)]  # fmt: skip
    heads = [paths.get(id(_own(mods))) for _, mods in blocks]  # each block's own module
    units = [(n, m) for n, m in tm.named_children() if n not in slots]
    units += [(f"param:{n}", _Loose([(n, p)])) for n, p in tm.named_parameters(recurse=False)]
    placed: dict = {}
    for n, m in units:
        own = {id(p) for p in m.parameters()}
        if own and not own & (inside | skip):
            placed.setdefault(_place(rank, n, heads, slots, top), []).append(m)
    taken = inside | skip | {id(p) for w, ms in placed.items() if w != "stem" for m in ms
                             for p in m.parameters()}  # fmt: skip
    stem_named = [(n, p) for n, p in tm.named_parameters() if id(p) not in taken]
    groups = [("stem", [_Loose(stem_named)])] if stem_named else []
    groups += [(g, [*mods, *placed.get(j, [])]) for j, (g, mods) in enumerate(blocks)]
    groups[-1][1].extend(placed.get("neck", []))
    ids = [id(p) for _, mods in groups for m in mods for p in m.parameters()]
    if len(ids) != len(set(ids)):
        raise _refuse(tm, "modules shared between its blocks")
    if set(ids) | skip != {id(p) for p in tm.parameters()}:
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
        h, w = hw[0] // ph, hw[1] // pw  # CaiT adds its class token after these blocks
        if not isinstance(t, torch.Tensor) or t.ndim != 3 or t.shape[1] - h * w not in (0, prefix):
            raise UsageError(f"Grad-CAM: expected {h}x{w} tokens of {ph}x{pw} patches (and "
                             f"{prefix} class tokens), got {_what(t)}")  # fmt: skip
        return t[:, t.shape[1] - h * w :].transpose(1, 2).reshape(t.shape[0], -1, h, w)

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
