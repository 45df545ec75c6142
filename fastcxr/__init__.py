"""fastcxr: train chest-radiograph classifiers fast and honestly, on fastai.

The public names below are loaded when first used (PEP 562): `import fastcxr` alone imports
neither torch nor fastai, pandas or matplotlib, so the command line starts at once.
"""

from __future__ import annotations

import importlib
import warnings
from typing import TYPE_CHECKING

from fastcxr.errors import FastcxrError, UsageError
from fastcxr.version import __version__ as __version__

if TYPE_CHECKING:  # what the lazy names below resolve to, for editors and type checkers
    from fastcxr.config import DEMO, PAPER, Stage, TrainConfig
    from fastcxr.data.dataset import Dataset
    from fastcxr.dicom import DicomError, read_dicom
    from fastcxr.findings import LabelPolicy
    from fastcxr.formulations import FORMULATIONS, get_formulation
    from fastcxr.manifest import read_manifest
    from fastcxr.models import block_splitter, build_model
    from fastcxr.preprocessing import Preprocessing
    from fastcxr.runtime.runs import load_run
    from fastcxr.study import (
        ablation_plan,
        compare,
        compare_seeds,
        train_formulation,
        train_seeds,
        unfreeze_ablation,
    )

# fastai's import decorates four of its activation functions with `torch.jit.script`, which
# torch 2.14 deprecates (fastai/layers.py): that notice, from that module of torch alone, is not
# the user's concern. fastcxr itself never calls it, and every other warning is shown.
warnings.filterwarnings(
    "ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning,
    module=r"torch\.jit\._script",
)  # fmt: skip

# public name → the module that defines it
_LAZY = {
    "DEMO": "fastcxr.config",
    "PAPER": "fastcxr.config",
    "Stage": "fastcxr.config",
    "TrainConfig": "fastcxr.config",
    "DicomError": "fastcxr.dicom",
    "read_dicom": "fastcxr.dicom",
    "LabelPolicy": "fastcxr.findings",
    "FORMULATIONS": "fastcxr.formulations",
    "get_formulation": "fastcxr.formulations",
    "read_manifest": "fastcxr.manifest",
    "block_splitter": "fastcxr.models",
    "build_model": "fastcxr.models",
    "Preprocessing": "fastcxr.preprocessing",
    "load_run": "fastcxr.runtime.runs",
    "Dataset": "fastcxr.data.dataset",
    "ablation_plan": "fastcxr.study",
    "compare": "fastcxr.study",
    "compare_seeds": "fastcxr.study",
    "train_formulation": "fastcxr.study",
    "train_seeds": "fastcxr.study",
    "unfreeze_ablation": "fastcxr.study",
}

__all__ = [
    "FastcxrError",
    "UsageError",
    "__version__",
    "DEMO",
    "PAPER",
    "Stage",
    "TrainConfig",
    "DicomError",
    "read_dicom",
    "LabelPolicy",
    "FORMULATIONS",
    "get_formulation",
    "read_manifest",
    "block_splitter",
    "build_model",
    "Preprocessing",
    "load_run",
    "Dataset",
    "ablation_plan",
    "compare",
    "compare_seeds",
    "train_formulation",
    "train_seeds",
    "unfreeze_ablation",
]
assert set(__all__) == {"FastcxrError", "UsageError", "__version__", *_LAZY}


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'fastcxr' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # loaded once; later lookups do not come here
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
