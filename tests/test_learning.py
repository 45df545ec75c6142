"""The built-in data carry learnable signs: a small net from scratch separates them."""

import pytest

from fastcxr.config import DEMO, Stage
from fastcxr.data.dataset import Dataset
from fastcxr.prepare.mimic import prepare_mimic
from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic
from fastcxr.study import train_formulation


@pytest.mark.slow
def test_small_net_learns_both_findings(tmp_path):
    raw = write_synthetic_mimic(
        tmp_path / "raw", SyntheticSpec(patients=220, seed=11, rows=80, cols=64)
    )
    prepare_mimic(raw, tmp_path / "prep", size=32, workers=2)
    cfg = DEMO.replace(
        size=32, batch_size=32, workers=0, stages=(Stage("all", "all", max_epochs=6, lr=2e-3),)
    )
    res = train_formulation(Dataset.load(tmp_path / "prep"), "multilabel", cfg, tmp_path / "run")
    for f, m in res["findings"].items():
        assert m["auc"] > 0.85, (f, m)
