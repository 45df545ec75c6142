import os

import pytest
import torch

os.environ.setdefault("FASTCXR_HOME", "/nonexistent-fastcxr-home")  # tests never use ~/.cache
# Test modules import mlflow at collection, before fastcxr's tracker could turn its telemetry
# off: its config thread would reach out and draw from Python's `random` mid-test.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def synthetic_tree(tmp_path_factory):
    """A small synthetic MIMIC-CXR download (DICOMs + the three label files)."""
    from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

    root = tmp_path_factory.mktemp("mimic")
    write_synthetic_mimic(root, SyntheticSpec(patients=60, seed=3, rows=96, cols=80), workers=1)
    return root


@pytest.fixture(scope="session")
def prepared(synthetic_tree, tmp_path_factory):
    """The small tree prepared at 32x32."""
    from fastcxr.prepare.mimic import prepare_mimic

    out = tmp_path_factory.mktemp("prepared")
    prepare_mimic(synthetic_tree, out, size=32, workers=2)
    return out
