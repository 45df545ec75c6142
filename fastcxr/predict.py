"""Apply a trained run to new radiographs, explain with Grad-CAM, export without fastai.

Preprocessing is exactly what the run recorded (its weights' sidecar): DICOM display pipeline
and intensity mode, squash to size x size (the cache's resize), 1 channel, normalisation.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fastcxr.dicom import DicomError
from fastcxr.errors import UsageError
from fastcxr.formulations import powerset_bits
from fastcxr.models import build_model, load_state_dict
from fastcxr.preprocessing import Preprocessing
from fastcxr.runs import RunError, is_complete
from fastcxr.stopping import check

IMAGE_SUFFIXES = (".dcm", ".dicom", ".png", ".jpg", ".jpeg")


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
            raise RunError(f"{run_dir}: not a complete run (no complete record.json)")
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        cfg = json.loads((run_dir / "config.json").read_text())
        findings = tuple(cfg["train"]["findings"])
        nets = []
        for p in _weights_of(run_dir, cfg):
            side = json.loads(p.with_suffix(".json").read_text())
            try:
                net = build_model(side["arch"], side["n_out"])
            except (KeyError, ValueError) as e:
                raise RunError(f"{p.with_suffix('.json')}: unusable sidecar ({e})") from None
            try:
                net.load_state_dict(load_state_dict(p))
            except RuntimeError:
                raise RunError(
                    f"{p}: the weights do not fit the sidecar's arch {side['arch']!r} with "
                    f"{side['n_out']} outputs: the sidecar was edited or belongs to other weights"
                ) from None
            pre = side["preprocessing"]
            pm = ProbabilityModel(
                net, side["formulation"], len(side["findings"]), pre["mean"], pre["std"]
            )
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
        from fastcxr.prepare.cache import ImageError

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


def _weights_of(run_dir: Path, cfg: dict) -> list[Path]:
    """Exactly the weight files of the networks the run record lists; never a leftover."""
    if "networks" not in cfg:  # a record written before networks were listed
        return sorted(run_dir.glob("model-*.pth"))
    paths = [run_dir / f"model-{n}.pth" for n in cfg["networks"]]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise RunError(f"{run_dir}: the record lists networks whose weights are missing: {missing}")
    return paths


def collect_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files, folders (recursive) and manifests → image paths, in a stable order."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
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
    from the stage before it when the last one is smaller than `min_side` (small images).
    """
    device = device or next(pm.parameters()).device
    body = pm.net[0]
    stages = [body[-1], body[-2]] if len(body) == 8 else [body[-1]]  # ResNet: layer4, layer3
    feats: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o)) for m in stages]
    try:
        x = torch.from_numpy(np.ascontiguousarray(image)).float()[None, None].to(device)
        with torch.enable_grad():
            prob = pm(x)[0, index]
            # hooks fire in forward order: feats = [layer3, layer4] for a ResNet
            acts = feats[::-1]
            a = next((t for t in acts if min(t.shape[-2:]) >= min_side), acts[-1])
            (grad,) = torch.autograd.grad(prob, a)
    finally:
        for h in hooks:
            h.remove()
    w = grad.mean(dim=(2, 3), keepdim=True)
    cam = torch.relu((w * a).sum(1, keepdim=True))
    cam = nn.functional.interpolate(cam, size=image.shape, mode="bilinear", align_corners=False)
    cam = cam[0, 0].detach().cpu().numpy()
    return cam / cam.max() if cam.max() > 0 else cam


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_cams(pred: Predictor, files: Iterable[Path], out: Path) -> list[Path]:
    """One overlay PNG per readable image and finding: OUT/<stem>__<finding>.png."""
    written = []
    for f in files:
        try:
            img = pred.load_image(Path(f))
        except (DicomError, FileNotFoundError, ValueError):
            continue
        probs = pred.probabilities(img[None])[0]
        for n in pred.networks:
            for j, finding in enumerate(n.findings):
                cam = grad_cam(n.model, img, j)
                p = out / f"{Path(f).stem}__{finding.lower().replace(' ', '_')}.png"
                k = pred.findings.index(finding)
                save_overlay(img, cam, p, f"{Path(f).name}\n{finding}: p = {probs[k]:.3f}")
                written.append(p)
    return written


# -- export ---------------------------------------------------------------------------------
def export(pred: Predictor, out: Path) -> list[Path]:
    """Each network as a `torch.export` program (.pt2: uint8-range input → probabilities)
    plus `export.json` with the findings, preprocessing and thresholds; no fastai needed."""
    out.mkdir(parents=True, exist_ok=True)
    written, nets = [], []
    example = torch.zeros(2, 1, pred.size, pred.size, device=pred.device)
    batch = torch.export.Dim("batch", min=1, max=4096)
    for n in pred.networks:
        name = "+".join(f.lower().replace(" ", "_") for f in n.findings)
        ep = torch.export.export(n.model, (example,), dynamic_shapes=({0: batch},))
        p = out / f"{name}.pt2"
        torch.export.save(ep, p)
        written.append(p)
        nets.append(
            {"file": p.name, "findings": list(n.findings), "formulation": n.sidecar["formulation"]}
        )
    meta = {"format": "fastcxr-export-1", "findings": list(pred.findings), "networks": nets,
            "input": "float tensor (B, 1, size, size) of 8-bit display values 0..255",
            "preprocessing": {**pred.preprocessing.to_dict(),
                              "dicom": "fastcxr.dicom.read_dicom"},
            "thresholds": pred.thresholds}  # fmt: skip
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    return [*written, out / "export.json"]


def load_exported(folder: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """A function (B, 1, H, W) 0..255 → (B, k) probabilities from an `export` folder."""
    meta = json.loads((folder / "export.json").read_text())
    progs = [
        (torch.export.load(folder / n["file"]).module(), n["findings"]) for n in meta["networks"]
    ]

    def run(x: torch.Tensor) -> np.ndarray:
        out = np.zeros((len(x), len(meta["findings"])))
        for prog, fs in progs:
            cols = [meta["findings"].index(f) for f in fs]
            out[:, cols] = prog(x).detach().cpu().numpy()
        return out

    return run


__all__ = [
    "Predictor",
    "collect_inputs",
    "export",
    "grad_cam",
    "load_exported",
    "predict",
    "write_cams",
]
