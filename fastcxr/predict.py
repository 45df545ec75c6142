"""Apply a trained run to new radiographs, explain with Grad-CAM, export without fastai.

Preprocessing is exactly what the run recorded (its weights' sidecar): DICOM display pipeline
and intensity mode, squash to size x size (the cache's resize), 1 channel, normalisation.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fastcxr.backbones import CamLayer, cam_layers, nchw
from fastcxr.dicom import DicomError
from fastcxr.errors import UsageError
from fastcxr.formulations import powerset_bits
from fastcxr.images.readers import SUFFIXES, ImageError
from fastcxr.models import build_model, load_state_dict
from fastcxr.preprocessing import Preprocessing
from fastcxr.runtime.runs import RunError, is_complete, read_record_json, write_atomic
from fastcxr.runtime.stopping import check

IMAGE_SUFFIXES = SUFFIXES  # what a folder is searched for


class ProbabilityModel(nn.Module):
    """Network + normalisation + activation: uint8-range (B, 1, H, W) → (B, k) probabilities.

    For the label-powerset formulation the outputs are the per-finding marginals.
    """

    def __init__(self, net: nn.Module, formulation: str, k: int, mean: float, std: float):
        super().__init__()
        self.net, self.formulation = net, formulation
        self.register_buffer("mean", torch.tensor(mean * 255.0))
        self.register_buffer("std", torch.tensor(std * 255.0))
        bits = torch.tensor(powerset_bits(k), dtype=torch.float32)
        self.register_buffer("bits", bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.net((x - self.mean) / self.std)
        if self.formulation == "multiclass":
            return torch.softmax(logits.float(), dim=1) @ self.bits
        return torch.sigmoid(logits.float())


@dataclass
class LoadedNetwork:
    findings: tuple[str, ...]
    model: ProbabilityModel
    sidecar: dict


@dataclass
class Predictor:
    """All networks of a run; together they give one probability per finding."""

    run_dir: Path
    findings: tuple[str, ...]
    networks: list[LoadedNetwork]
    preprocessing: Preprocessing
    thresholds: dict[str, float | None]
    device: torch.device
    precision: str = "fp32"  # the run's own evaluation precision, so results match its record

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None) -> Predictor:
        run_dir = Path(run_dir)
        if not is_complete(run_dir):
            raise RunError(_not_one_run(run_dir))
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = read_record_json(run_dir / "config.json")
        findings = tuple(cfg["train"]["findings"])
        nets = []
        for p in _weights_of(run_dir, cfg):
            try:
                side = json.loads(p.with_suffix(".json").read_text())
            except (OSError, ValueError) as e:
                raise RunError(f"{p.with_suffix('.json')}: unreadable sidecar ({e})") from None
            try:
                size = side.get("preprocessing", {}).get("size")
                net = build_model(side["arch"], side["n_out"], size=size)
            except (KeyError, ValueError, AttributeError) as e:
                raise RunError(f"{p.with_suffix('.json')}: unusable sidecar ({e})") from None
            try:
                net.load_state_dict(load_state_dict(p))
            except RuntimeError:
                raise RunError(
                    f"{p}: the weights do not fit the sidecar's arch {side['arch']!r} with "
                    f"{side['n_out']} outputs: the sidecar was edited or belongs to other weights"
                ) from None
            try:
                pre = side["preprocessing"]
                pm = ProbabilityModel(
                    net, side["formulation"], len(side["findings"]), pre["mean"], pre["std"]
                )
            except (KeyError, TypeError) as e:
                raise RunError(f"{p.with_suffix('.json')}: unusable sidecar (no {e})") from None
            nets.append(LoadedNetwork(tuple(side["findings"]), pm.to(device).eval(), side))
        if not nets:
            raise RunError(f"{run_dir}: no model-*.pth weights")
        preps = {json.dumps(n.sidecar["preprocessing"], sort_keys=True) for n in nets}
        if len(preps) > 1:
            raise RunError(f"{run_dir}: its networks were trained on different preprocessing")
        prep = Preprocessing.from_dict(nets[0].sidecar["preprocessing"])
        thresholds: dict[str, float | None] = {}
        for n in nets:
            thresholds.update(n.sidecar.get("thresholds", {}))
        missing = [f for f in findings if f not in thresholds]
        if missing:
            raise RunError(f"{run_dir}: no decision threshold recorded for {missing}")
        precision = nets[0].sidecar.get("inference_precision", "fp32")
        return cls(run_dir, findings, nets, prep, thresholds, device, precision)

    @property
    def size(self) -> int:
        return self.preprocessing.size

    @property
    def intensity(self) -> str:
        return self.preprocessing.intensity

    def load_image(self, path: Path) -> np.ndarray:
        """A file as the uint8 size x size array the network was trained on: the run's own
        preprocessing (the cache's intensity mode and size, then the run's size). A file
        that cannot be read (or declares an implausible size) raises `DicomError` or
        `ImageError`, both ValueErrors naming the file."""
        try:
            return self.preprocessing.image(Path(path))
        except (DicomError, ImageError):
            raise
        except MemoryError:
            raise DicomError(f"{path}: out of memory reading the image") from None
        except (OSError, ValueError) as e:
            raise DicomError(f"{path}: cannot read image ({e})") from e

    @torch.no_grad()
    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        """(B, H, W) uint8 → (B, k) per-finding probabilities."""
        x = torch.from_numpy(np.array(batch, np.float32)).unsqueeze(1).to(self.device)
        out = np.zeros((len(batch), len(self.findings)))
        bf16 = self.precision == "bf16"
        for n in self.networks:
            cols = [self.findings.index(f) for f in n.findings]
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
                out[:, cols] = n.model(x).float().cpu().numpy()
        return out


def _not_one_run(run_dir: Path) -> str:
    """Why `run_dir` cannot predict: not a complete run, or a folder of several (a compare
    run's formulations, a `--seeds` run's seeds), which it names."""
    inside = sorted(
        str(p.parent.relative_to(run_dir))
        for pattern in ("*/record.json", "*/*/record.json")
        for p in run_dir.glob(pattern)
        if is_complete(p.parent)
    )
    if not inside:
        return f"{run_dir}: not a complete run (no complete record.json)"
    what = "a compare run" if (run_dir / "compare.json").exists() else "a folder"
    return (
        f"{run_dir} is {what} of {len(inside)} trained runs ({', '.join(inside)}): predict "
        f"with one of them, e.g. fastcxr predict {run_dir / inside[0]} ..."
    )


def _weights_of(run_dir: Path, cfg: dict) -> list[Path]:
    """Exactly the weight files of the networks the run record lists; never a leftover."""
    if "networks" not in cfg:  # a record written before networks were listed
        return sorted(run_dir.glob("model-*.pth"))
    paths = [run_dir / f"model-{n}.pth" for n in cfg["networks"]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RunError(f"{run_dir}: the record lists networks whose weights are missing: {missing}")
    return paths


def _walk(folder: Path) -> list[Path]:
    """Image files under `folder`, symlinked subfolders followed (each real folder once, so a
    link back up does not loop), in a stable order. Anything with an image suffix is listed,
    regular file or not: a FIFO or a device is then reported as unreadable, never opened."""
    seen, found = set(), []
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        found += [Path(top) / f for f in files if Path(f).suffix.lower() in IMAGE_SUFFIXES]
    return sorted(found)


def cam_names(files: Sequence[Path]) -> dict[Path, str]:
    """The overlay name stem of each input: its file stem, or, where several inputs share a
    stem, their paths below the folder they share (`a/x.png`, `b/x.png` → `a_x_png`,
    `b_x_png`)."""
    by_stem: dict[str, list[Path]] = {}
    for f in files:
        by_stem.setdefault(Path(f).stem, []).append(Path(f))
    names = {}
    for stem, group in by_stem.items():
        if len(set(group)) == 1:
            names[group[0]] = stem
            continue
        common = Path(os.path.commonpath([str(g.resolve().parent) for g in group]))
        for g in group:
            rel = g.resolve().relative_to(common)
            names[g] = "_".join(rel.parts).replace(".", "_")
    return names


def collect_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursive) and manifests → image paths, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += _walk(p)
        elif p.suffix.lower() == ".csv":
            try:
                df = pd.read_csv(p, dtype={"image": str})
            except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
                raise UsageError(f"{p}: not a readable CSV ({e})") from None
            if "image" not in df.columns:
                raise UsageError(f"{p}: a manifest needs an 'image' column")
            out += [p.parent / i for i in df["image"]]
        else:
            out.append(p)
    return out


def predict(
    pred: Predictor,
    files: Iterable[Path],
    batch_size: int = 64,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Predictions (file, p_<finding>, pred_<finding>) and failures (file, reason)."""
    files = list(files)
    rows, fails, batch, names = [], [], [], []

    def flush():
        if batch:
            probs = pred.probabilities(np.stack(batch))
            for name, p in zip(names, probs):
                row = {"file": str(name)}
                for f, v in zip(pred.findings, p):
                    t = pred.thresholds[f]
                    row[f"p_{f}"] = float(v)
                    row[f"pred_{f}"] = None if t is None else int(v >= t)
                rows.append(row)
            batch.clear()
            names.clear()

    for i, f in enumerate(files, 1):
        check(f"predict ({i - 1} of {len(files)} images done; nothing was written)")
        try:
            batch.append(pred.load_image(f))
            names.append(f)
        except (DicomError, FileNotFoundError, ValueError) as e:
            fails.append({"file": str(f), "reason": str(e)})
        if len(batch) >= batch_size:
            flush()
        if progress:
            progress(i, len(files))
    flush()
    cols = ["file"] + [c for f in pred.findings for c in (f"p_{f}", f"pred_{f}")]
    return pd.DataFrame(rows, columns=cols), pd.DataFrame(fails, columns=["file", "reason"])


# -- Grad-CAM -------------------------------------------------------------------------------
def grad_cam(
    pm: ProbabilityModel, image: np.ndarray, index: int, device=None, min_side: int = 7
) -> np.ndarray:
    """Grad-CAM (Selvaraju et al. 2017) of output `index` (a finding's probability; for the
    powerset, its marginal); (H, W) in 0..1.

    The map comes from the backbone's last stage (1/32 of the image: 16x16 at 512 px), or
    from the stage before it when the last one is smaller than `min_side` (small images); a
    vision transformer's from the patch tokens entering its last block (`cam_layers`).
    """
    device = device or next(pm.parameters()).device
    layers = _cam_layers(pm.net[0])
    feats: dict[int, torch.Tensor] = {}

    def keep(i):
        return lambda m, *io: feats.__setitem__(i, io[0][0] if layers[i].pre else io[-1])

    hooks = [
        c.module.register_forward_pre_hook(keep(i))
        if c.pre
        else c.module.register_forward_hook(keep(i))
        for i, c in enumerate(layers)
    ]
    try:
        x = torch.from_numpy(np.array(image, np.float32))[None, None].to(device)  # a copy:
        # the image may be a read-only view of a decoded file, which torch would warn about
        with torch.enable_grad():
            prob = pm(x)[0, index]
            hw = tuple(image.shape)
            if not feats:
                raise UsageError("Grad-CAM: the forward pass never reached the backbone's "
                                 "last stage, so it has no map to show")  # fmt: skip
            maps = [(i, layers[i].to_map(feats[i], hw)) for i in sorted(feats)]
            # the last level whose map is big enough; else the biggest map, the last on a tie
            # (VOLO's last two levels are both 1/16: the earlier one is no better)
            big = max(maps, key=lambda im: (min(im[1].shape[-2:]), -im[0]))
            i, a = next(((i, m) for i, m in maps if min(m.shape[-2:]) >= min_side), big)
            (grad,) = torch.autograd.grad(prob, feats[i])
            grad = layers[i].to_map(grad, hw)
    finally:
        for h in hooks:
            h.remove()
    w = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((w * a).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=image.shape, mode="bilinear", align_corners=False)
    cam = cam[0, 0].detach().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


def _cam_layers(body: nn.Module) -> list[CamLayer]:
    """Grad-CAM's layers, the last first: a timm backbone's (`cam_layers`); a ResNet's layer4
    then layer3; a DenseNet's features."""
    if hasattr(body, "model") and hasattr(body.model, "feature_info"):  # a timm backbone
        return cam_layers(body.model)
    mods = [body[-1], body[-2]] if len(body) == 8 else [body[-1]]
    return [CamLayer(m, False, nchw()) for m in mods]


def save_overlay(image: np.ndarray, cam: np.ndarray, path: Path, title: str) -> None:
    """The radiograph in gray with the heatmap over it (jet, 40%), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4, 4.3))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    ax.imshow(cam, cmap="jet", alpha=0.4, vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")
    fig.tight_layout()
    try:  # atomically: a full or read-only --cam folder is one line, with no partial PNG
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        plt.close(fig)


def write_cams(pred: Predictor, files: Iterable[Path], out: Path) -> list[Path]:
    """One overlay PNG per readable image and finding: OUT/<stem>__<finding>.png (inputs that
    share a stem are told apart by their folders: `cam_names`)."""
    written = []
    files = [Path(f) for f in files]
    names = cam_names(files)
    for f in files:
        try:
            img = pred.load_image(Path(f))
        except (DicomError, FileNotFoundError, ValueError):
            continue
        probs = pred.probabilities(img[None])[0]
        for n in pred.networks:
            for j, finding in enumerate(n.findings):
                cam = grad_cam(n.model, img, j)
                p = out / f"{names[f]}__{finding.lower().replace(' ', '_')}.png"
                k = pred.findings.index(finding)
                save_overlay(img, cam, p, f"{Path(f).name}\n{finding}: p = {probs[k]:.3f}")
                written.append(p)
    return written


# -- outputs ---------------------------------------------------------------------------------
RUN_MARKERS = ("record.json", "checkpoints/run.json")  # a complete run; an interrupted one


def _run_folder(folder: Path) -> Path | None:
    """The run folder `folder` is, or lies in up to two levels down (a compare's formulation,
    its checkpoints/ or evaluations/NAME)."""
    for d in (folder, *list(folder.parents)[:2]):
        if any((d / m).exists() for m in RUN_MARKERS):
            return d
    return None


def check_outputs(out_csv: Path, inputs: Sequence[Path], export_dir: Path | None = None,
                  overwrite: bool = False) -> None:  # fmt: skip
    """Refuse, before any prediction, outputs that would destroy something: a CSV (or its
    `_failures.csv`) onto an input image or an existing file of a run folder (its
    predictions.csv, weights, records), or an existing file that is not a CSV; an export into
    a non-empty folder (with `overwrite`, a previous export — a folder with export.json — is
    replaced; any other content is refused)."""
    ins = {Path(p).resolve() for p in inputs}
    for target in (out_csv, out_csv.with_name(out_csv.stem + "_failures.csv")):
        t = target.resolve()
        if t in ins:
            raise UsageError(f"--out {target} is one of the input images; choose another file")
        run = _run_folder(t.parent)
        if run is not None and (t.exists() or t.is_symlink()):
            raise UsageError(
                f"--out {target} would replace a file of the run in {run}; choose another file"
            )
        if t.exists() and t.suffix.lower() != ".csv":
            raise UsageError(f"--out {target} exists and is not a CSV; choose another file")
        if t.is_dir():
            raise UsageError(f"--out {target} is a folder; give a file name")
        if t.is_file() and not _ours(t):
            raise UsageError(
                f"--out {target} exists and is not a CSV written by predict (a manifest, a "
                "label file?); choose another file"
            )
    if export_dir is None or not export_dir.exists():
        return
    if not export_dir.is_dir():
        raise UsageError(f"--export {export_dir} is a file; give a folder")
    run = _run_folder(export_dir.resolve())
    if run is not None:
        raise UsageError(f"--export {export_dir} is inside the run in {run}; choose another folder")
    if any(export_dir.iterdir()):
        if not overwrite:
            raise UsageError(
                f"--export {export_dir} is not empty; choose an empty folder, or add "
                "--overwrite to replace a previous export"
            )
        if not (export_dir / "export.json").exists():
            raise UsageError(
                f"--export {export_dir} holds files that are not an export (no export.json); "
                "--overwrite replaces only a previous export: choose another folder"
            )


def _ours(csv: Path) -> bool:
    """Whether `csv` is a file predict writes (predictions, or their failures): its header
    is `file` then p_/pred_ columns, or `file,reason`; an empty file counts as replaceable."""
    try:
        with open(csv, newline="") as fh:
            header = next(iter(fh), "").strip().split(",")
    except (OSError, UnicodeDecodeError):
        return False
    if header == [""]:
        return True
    rest = header[1:]
    return header[0] == "file" and (rest == ["reason"] or bool(rest) and all(
        c.startswith(("p_", "pred_")) for c in rest))  # fmt: skip


__all__ = [
    "Predictor",
    "check_outputs",
    "collect_inputs",
    "grad_cam",
    "predict",
    "write_cams",
]
