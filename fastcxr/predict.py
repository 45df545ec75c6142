"""Apply a trained run to new radiographs, explain with Grad-CAM, export without fastai.

Preprocessing is exactly what the run recorded (its weights' sidecar): DICOM display pipeline
and intensity mode, squash to size x size (the cache's resize), 1 channel, normalisation.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

from fastcxr.dicom import DicomError
from fastcxr.errors import FastcxrError, UsageError
from fastcxr.formulations import powerset_bits
from fastcxr.images.readers import SUFFIXES, ImageError
from fastcxr.models import build_model, load_state_dict
from fastcxr.preprocessing import Preprocessing
from fastcxr.runtime.runs import RunError, is_complete, write_atomic
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
        cfg = json.loads((run_dir / "config.json").read_text())
        findings = tuple(cfg["train"]["findings"])
        nets = []
        for p in _weights_of(run_dir, cfg):
            try:
                side = json.loads(p.with_suffix(".json").read_text())
            except (OSError, ValueError) as e:
                raise RunError(f"{p.with_suffix('.json')}: unreadable sidecar ({e})") from None
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
    from the stage before it when the last one is smaller than `min_side` (small images).
    """
    device = device or next(pm.parameters()).device
    body = pm.net[0]
    stages = [body[-1], body[-2]] if len(body) == 8 else [body[-1]]  # ResNet: layer4, layer3
    feats: list[torch.Tensor] = []
    hooks = [m.register_forward_hook(lambda m, i, o: feats.append(o)) for m in stages]
    try:
        x = torch.from_numpy(np.array(image, np.float32))[None, None].to(device)  # a copy:
        # the image may be a read-only view of a decoded file, which torch would warn about
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


# -- export ---------------------------------------------------------------------------------
EXPORT_FORMATS = ("torch", "onnx")
ONNX_OPSET = 20  # what the `onnx` extra's floor (onnx 1.15, onnxruntime 1.17) runs
ONNX_INPUT, ONNX_OUTPUT, ONNX_FILE = "image", "probabilities", "model.onnx"
ONNX_EXTRA = "pip install 'fastcxr[onnx]'"


class RunModel(nn.Module):
    """Every network of a run in one module: uint8 (B, 1, size, size) → (B, k) float32
    probabilities in the order of the run's findings (for `single` runs, each network's
    output in its finding's column). The networks are the Predictor's own `ProbabilityModel`s,
    so the numbers are the ones `Predictor.probabilities` gives in fp32."""

    def __init__(self, models: Sequence[nn.Module], nets_findings, findings: Sequence[str]):
        super().__init__()
        self.models = nn.ModuleList(models)
        where = {f: (i, j) for i, fs in enumerate(nets_findings) for j, f in enumerate(fs)}
        self.columns = [where[f] for f in findings]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        outs = [m(x) for m in self.models]
        return torch.stack([outs[i][:, j] for i, j in self.columns], dim=1)


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


def clear_export(export_dir: Path) -> None:
    """Remove a previous export (checked by `check_outputs`) before writing the new one."""
    if export_dir.exists() and (export_dir / "export.json").exists():
        shutil.rmtree(export_dir)


def export(pred: Predictor, out: Path, format: str = "torch") -> list[Path]:
    """The run without fastai, plus `export.json` (findings, preprocessing, thresholds).

    `torch`: each network as a `torch.export` program (.pt2: float 0..255 input →
    probabilities). `onnx`: one `model.onnx` for the whole run (uint8 input; the cast,
    normalisation, networks and activation inside; per-finding probabilities out), checked in
    onnxruntime against the Predictor before it is kept; needs the `onnx` extra."""
    if format not in EXPORT_FORMATS:
        raise UsageError(f"export format must be one of {'/'.join(EXPORT_FORMATS)}, not {format!r}")
    if format == "onnx":
        onnx_modules()  # missing packages are refused before anything is written
    out.mkdir(parents=True, exist_ok=True)
    written, info = (_export_onnx if format == "onnx" else _export_torch)(pred, out)
    # the preprocessing, without fastcxr (pydicom, numpy, Pillow), pixel for pixel as ours
    prep_py = out / "preprocess.py"
    shutil.copyfile(Path(__file__).parent / "standalone" / "preprocess.py", prep_py)
    written.append(prep_py)
    meta = {"format": "fastcxr-export-1", "model_format": format,
            "findings": list(pred.findings), "networks": info.pop("networks"),
            "input": info.pop("input"),
            "preprocessing": {**pred.preprocessing.to_dict(),
                              "dicom": "fastcxr.dicom.read_dicom",
                              "standalone": "preprocess.py (pydicom, numpy, Pillow)"},
            "thresholds": pred.thresholds, **info}  # fmt: skip
    (out / "export.json").write_text(json.dumps(meta, indent=2))
    return [*written, out / "export.json"]


def _export_torch(pred: Predictor, out: Path) -> tuple[list[Path], dict]:
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
    return written, {
        "networks": nets,
        "input": "float tensor (B, 1, size, size) of 8-bit display values 0..255",
    }


def onnx_modules(exporting: bool = True):
    """(onnx, onnxruntime), or a UsageError naming the extra that provides them (and, to
    export, onnxscript, which torch's ONNX exporter needs)."""
    import importlib
    import inspect

    mods, missing = [], []
    for name in ("onnx", "onnxruntime", "onnxscript")[: 3 if exporting else 2]:
        try:
            mods.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        what = "--format onnx" if exporting else "an ONNX export"
        raise UsageError(f"{what} needs {', '.join(missing)}: {ONNX_EXTRA}")
    if exporting and "dynamo" not in inspect.signature(torch.onnx.export).parameters:
        raise UsageError(f"--format onnx needs torch>=2.5 (this is {torch.__version__})")
    return mods[0], mods[1]


def _export_onnx(pred: Predictor, out: Path) -> tuple[list[Path], dict]:
    import copy
    import warnings

    onnx, ort = onnx_modules()
    models = [copy.deepcopy(n.model).float().cpu().eval() for n in pred.networks]
    model = RunModel(models, [n.findings for n in pred.networks], pred.findings).eval()
    size, k = pred.size, len(pred.findings)
    example = torch.zeros(2, 1, size, size, dtype=torch.uint8)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model, (example,), dynamo=True, opset_version=ONNX_OPSET, verbose=False,
            input_names=[ONNX_INPUT], output_names=[ONNX_OUTPUT],
            dynamic_shapes=({0: batch},),
        )  # fmt: skip
    path = out / ONNX_FILE
    prog.save(path)  # weights inline up to protobuf's 2 GB, in model.onnx.data beyond it
    onnx.checker.check_model(str(path))
    # the file must give the Predictor's numbers before it is kept
    x = np.random.default_rng(0).integers(0, 256, (2, 1, size, size), dtype=np.uint8)
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        [ONNX_OUTPUT], {ONNX_INPUT: x}
    )[0]
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    diff = float(np.abs(got - want).max())
    if not diff <= 1e-4:
        path.unlink()
        raise FastcxrError(
            f"{path}: onnxruntime's probabilities differ from fastcxr's by {diff:.2g}: "
            "not written (a bug; please report it with the run's arch)"
        )
    nets = [
        {"file": ONNX_FILE, "findings": list(n.findings), "formulation": n.sidecar["formulation"]}
        for n in pred.networks
    ]
    onnx_info = {
        "file": ONNX_FILE,
        "opset": ONNX_OPSET,
        "input": {"name": ONNX_INPUT, "dtype": "uint8", "shape": ["batch", 1, size, size]},
        "output": {"name": ONNX_OUTPUT, "dtype": "float32", "shape": ["batch", k],
                   "columns": list(pred.findings)},
        "precision": "fp32",  # a bf16 run's Predictor differs from it by about 1e-2
        "run_precision": pred.precision,
        "inside": "float cast, (x - 255 mean) / (255 std), the networks, sigmoid "
                  "(per-finding marginals of the softmax for multiclass)",
    }  # fmt: skip
    files = [path, *([data] if (data := path.with_name(path.name + ".data")).exists() else [])]
    return files, {
        "networks": nets,
        "input": f"uint8 tensor (B, 1, {size}, {size}) of 8-bit display values 0..255",
        "onnx": onnx_info,
    }


def load_exported(folder: Path) -> Callable[[torch.Tensor], np.ndarray]:
    """A function (B, 1, H, W) 0..255 → (B, k) probabilities from an `export` folder (either
    format; for ONNX the values are rounded to uint8, the model's input type)."""
    meta = json.loads((folder / "export.json").read_text())
    if meta.get("model_format") == "onnx":
        _, ort = onnx_modules(exporting=False)
        spec = meta["onnx"]
        sess = ort.InferenceSession(str(folder / spec["file"]), providers=["CPUExecutionProvider"])

        def run_onnx(x: torch.Tensor) -> np.ndarray:
            a = np.asarray(torch.as_tensor(x).detach().cpu().numpy(), np.float64)
            u8 = np.clip(np.rint(a), 0, 255).astype(np.uint8)
            name = spec["input"]["name"]
            return sess.run([spec["output"]["name"]], {name: u8})[0].astype(np.float64)

        return run_onnx
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
    "EXPORT_FORMATS",
    "Predictor",
    "collect_inputs",
    "export",
    "grad_cam",
    "load_exported",
    "predict",
    "write_cams",
]
