"""Run records: everything a table or figure needs, so nothing is retrained to report.

runs/NAME/                 one trained formulation (or one ablation)
  config.json              resolved TrainConfig + data, seed, versions, git rev, manifest hash
  history.csv              per epoch: network, stage, epoch, losses, seconds
  predictions.csv          per test image: image, patient_id, y_<finding>, p_<finding>
  metrics.json             per-finding metrics and timing
  model-<network>.pth      state dict (torch.load(weights_only=True)) …
  model-<network>.json     … and its sidecar: arch, formulation, findings, preprocessing
  record.json              written last: {"complete": true, …}
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

RECORD = "record.json"


class RunError(ValueError):
    """A run directory that is missing, incomplete or malformed."""


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` beside `path`, then rename: readers see the old file or the new, whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.part")
    write(tmp)
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=2, default=_jsonable)))


def write_csv(path: Path, df: pd.DataFrame, compression: str | None = None) -> None:
    write_atomic(path, lambda t: df.to_csv(t, index=False, compression=compression))


def save_torch(path: Path, obj: Any) -> None:
    write_atomic(path, lambda t: torch.save(obj, t))


def save_weights(path: Path, model: torch.nn.Module, sidecar: dict) -> None:
    """State dict (plain tensors) + JSON sidecar, both written atomically."""
    save_torch(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    write_json(path.with_suffix(".json"), sidecar)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment() -> dict:
    """Package versions and git revision, recorded with every run."""
    import fastai
    import pydicom
    import sklearn
    import torchvision

    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "fastai": fastai.__version__,
        "pydicom": pydicom.__version__, "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__, "numpy": np.__version__, "git_revision": rev,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip


def is_complete(run_dir: str | Path) -> bool:
    p = Path(run_dir) / RECORD
    try:
        return bool(json.loads(p.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def mark_complete(run_dir: Path, summary: dict) -> None:
    write_json(run_dir / RECORD, {"complete": True, **summary})


def load_run(run_dir: str | Path) -> dict:
    """A complete run's record, config, metrics, history and predictions."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: incomplete run (no complete {RECORD}); resume or rerun it")
    return {
        "dir": run_dir,
        "record": json.loads((run_dir / RECORD).read_text()),
        "config": json.loads((run_dir / "config.json").read_text()),
        "metrics": json.loads((run_dir / "metrics.json").read_text()),
        "history": pd.read_csv(run_dir / "history.csv"),
        "predictions": pd.read_csv(run_dir / "predictions.csv"),
    }
