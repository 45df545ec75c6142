"""`bench_train`'s interleaved rounds: medians, ranges and the wide flag; global state left
as it was found."""

import math
import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastcxr import bench
from fastcxr.bench import MIN_ROUNDS, WIDE, bench_train, summarise
from fastcxr.config import TrainConfig, parse_stages
from fastcxr.errors import UsageError

CFG = TrainConfig(
    arch="resnet10", size=32, batch_size=4, pretrained=False, freeze_style="keras", workers=0
)
NEW_KEYS = ("rounds", "fastcxr_vs_limit_median", "fastcxr_vs_limit_range",
            "fastcxr_vs_defaults_median", "fastcxr_vs_defaults_range", "per_round", "wide",
            "wide_reason")  # fmt: skip


def _rounds(limit, fast, defaults=None):
    out = [{"limit_img_s": a, "fastcxr_img_s": b} for a, b in zip(limit, fast)]
    for r, d in zip(out, defaults or []):
        r["defaults_img_s"] = d
    return out


def test_summary_of_hand_made_rounds():
    s = summarise(_rounds([100, 110, 90], [50, 55, 60], [20, 25, 30]))
    # medians per arm; `_median` is the median of the per-round ratios, not of the medians;
    # the plain key stays the quotient of the row's own columns
    assert (s["limit_img_s"], s["fastcxr_img_s"], s["defaults_img_s"]) == (100, 55, 25)
    assert s["fastcxr_vs_limit"] == 55 / 100 and s["fastcxr_vs_defaults"] == 55 / 25
    assert s["fastcxr_vs_limit_median"] == 0.5 and s["fastcxr_vs_limit_range"] == [0.5, 60 / 90]
    assert s["fastcxr_vs_defaults_median"] == 2.2
    assert s["fastcxr_vs_defaults_range"] == [2.0, 2.5]
    assert s["rounds"] == 3
    # fastcxr/limit: (0.667 - 0.5) / 0.5 = 33% > 25%; fastcxr/defaults: 0.5 / 2.2 = 23%
    assert s["wide"] and "fastcxr/limit ranges 0.50 to 0.67" in s["wide_reason"]
    assert "fastcxr/defaults" not in s["wide_reason"]


def test_a_tight_row_is_not_wide_and_few_rounds_always_are():
    tight = summarise(_rounds([100, 101, 99], [80, 81, 79]))
    assert not tight["wide"] and tight["wide_reason"] is None
    assert tight["fastcxr_vs_defaults_range"] is None and "defaults_img_s" not in tight
    # just inside and just outside WIDE: range / median = WIDE ± 0.01
    for width, wide in ((WIDE - 0.01, False), (WIDE + 0.01, True)):
        s = summarise(_rounds([100] * 3, [100 - 50 * width, 100, 100 + 50 * width]))
        assert math.isclose(s["fastcxr_vs_limit_median"], 1.0) and s["wide"] is wide
    two = summarise(_rounds([100, 100], [80, 80]))
    assert two["wide"] and f"2 rounds: at least {MIN_ROUNDS}" in two["wide_reason"]
    one = summarise(_rounds([100], [80], [40]))
    assert one["fastcxr_vs_limit_range"] == [0.8, 0.8] and one["fastcxr_vs_defaults"] == 2.0
    assert one["wide"] and one["wide_reason"].startswith("1 round:")


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True, "3"])
def test_rounds_below_one_are_refused_before_anything_is_written(tmp_path, rounds):
    with pytest.raises(UsageError, match="--rounds"):
        bench_train(CFG, parse_stages("head"), cache=tmp_path / "c", rounds=rounds)
    assert not (tmp_path / "c").exists()


@pytest.mark.slow
def test_bench_train_rounds_and_restored_globals(tmp_path):
    cudnn = torch.backends.cudnn
    saved = (cudnn.benchmark, cudnn.deterministic)
    # sentinels: the opposite of what the arms set on a CPU (no benchmark; deterministic)
    cudnn.benchmark, cudnn.deterministic = True, False
    random.seed(11)
    np.random.seed(12)
    torch.manual_seed(13)
    rng = random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone()
    said = []
    try:
        r = bench_train(
            CFG, parse_stages("head"), ("keras",), warmup=1, steps=2,
            cache=tmp_path / "cache", log=said.append, rounds=3,
        ).to_json()  # fmt: skip
        after = (cudnn.benchmark, cudnn.deterministic)
    finally:
        cudnn.benchmark, cudnn.deterministic = saved
    assert after == (True, False)
    assert random.getstate() == rng[0] and (np.random.get_state()[1] == rng[1]).all()
    assert torch.equal(torch.get_rng_state(), rng[2])

    assert r["rounds"] == 3 and r["wide_threshold"] == WIDE
    (row,) = r["rows"]
    for k in ("limit_img_s", "fastcxr_img_s", "defaults_img_s", "fastcxr_vs_limit",
              "fastcxr_vs_defaults", "compile_s", *NEW_KEYS):  # fmt: skip
        assert k in row, k
    per = row["per_round"]
    assert row["rounds"] == len(per) == 3
    for arm in ("limit", "fastcxr", "defaults"):
        img_s = [p[f"{arm}_img_s"] for p in per]
        assert all(v > 0 for v in img_s) and row[f"{arm}_img_s"] == np.median(img_s)
    for other in ("limit", "defaults"):
        ratios = [p["fastcxr_img_s"] / p[f"{other}_img_s"] for p in per]
        assert math.isclose(row[f"fastcxr_vs_{other}_median"], float(np.median(ratios)))
        assert row[f"fastcxr_vs_{other}"] == row["fastcxr_img_s"] / row[f"{other}_img_s"]
        assert row[f"fastcxr_vs_{other}_range"] == pytest.approx([min(ratios), max(ratios)])
    widths = [(hi - lo) / med for med, (lo, hi) in (
        (row["fastcxr_vs_limit_median"], row["fastcxr_vs_limit_range"]),
        (row["fastcxr_vs_defaults_median"], row["fastcxr_vs_defaults_range"]),
    )]  # fmt: skip
    assert row["wide"] is any(w > WIDE for w in widths)
    assert (row["wide_reason"] is None) is not row["wide"]
    # interleaved: every round measures limit, fastcxr, defaults, in that order
    measured = [m for m in said if ", round " in m]
    assert [m.split(",")[0] for m in measured] == [
        "model-only limit", "fastcxr", "fastai defaults"
    ] * 3  # fmt: skip
    assert [m.rsplit("round ", 1)[1] for m in measured] == [
        f"{i} of 3" for i in (1, 2, 3) for _ in range(3)
    ]


def test_no_private_imports_from_other_modules():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(bench))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module.startswith("fastcxr"):
            assert not [a.name for a in node.names if a.name.startswith("_")], node.module


@pytest.mark.slow
def test_the_fastai_defaults_arm_can_cast_to_bf16(tmp_path):
    """On a GPU the defaults arm calls `learn.to_bf16()`, a method fastai adds to `Learner`
    only once `fastai.callback.fp16` is imported: the first GPU run of `fastcxr bench` stopped
    there ("'Sequential' object has no attribute 'to_bf16'"). Built in a fresh interpreter,
    as `fastcxr bench` builds it, the arm's learner can be cast."""
    code = """
import sys
from pathlib import Path
import torch
from fastcxr.bench import BenchJob, write_bench_cache
from fastcxr.bench.arms import _defaults_learner
from fastcxr.config import DEMO
from fastcxr.data.dataset import Dataset
from fastcxr.runtime.fastpath import resolve_speed
from fastcxr.formulations import get_formulation
cfg = DEMO.replace(size=32, batch_size=8, workers=0, loader="fast")
form = get_formulation("multilabel")
net = form.networks(cfg.findings)[0]
ds = Dataset.load(write_bench_cache(Path(sys.argv[1]), 40, 32, 1))
job = BenchJob(cfg, resolve_speed(cfg, "cpu"), form, net, ds, 1, 1, torch.device("cpu"))
learn = _defaults_learner(job).to_bf16()
print(type(learn).__name__, [type(c).__name__ for c in learn.cbs if "Precision" in str(c)])
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "c")], capture_output=True,
                       text=True, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["Learner", "['MixedPrecision']"]
