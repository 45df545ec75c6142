"""A run without fastai: `torch.export` programs or one ONNX model, with `export.json`
(findings, preprocessing, thresholds) and the standalone `preprocess.py`; `load_exported`
runs either back."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fastcxr.errors import FastcxrError, UsageError
from fastcxr.predict import Predictor
from fastcxr.runtime.runs import writable_folder

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


EXPORT_NAMES = ("export.json", "preprocess.py", "model.onnx")  # and one .pt2 per network


def clear_export(export_dir: Path) -> None:
    """Remove a previous export (checked by `check_outputs`) before writing the new one: the
    files it wrote (export.json, preprocess.py, model.onnx, the .pt2 networks) and nothing
    else — other files in the folder are kept."""
    if not (export_dir.exists() and (export_dir / "export.json").exists()):
        return
    for p in export_dir.iterdir():
        if p.is_file() and (p.name in EXPORT_NAMES or p.suffix == ".pt2"):
            p.unlink()


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
    out = writable_folder(out)
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
        x = torch.as_tensor(x, dtype=torch.float32)  # a NumPy array too, as ONNX takes
        out = np.zeros((len(x), len(meta["findings"])))
        for prog, fs in progs:
            cols = [meta["findings"].index(f) for f in fs]
            out[:, cols] = prog(x).detach().cpu().numpy()
        return out

    return run


__all__ = ["EXPORT_FORMATS", "RunModel", "clear_export", "export", "load_exported", "onnx_modules"]
