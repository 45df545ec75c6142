"""`scripts/gpu_check.py`'s target table: a bench row whose rounds disagree (`wide`) is not a
measurement, so the target it would judge reads "n/a" with the reason, never met or missed."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _row(stage, unfreeze, vs_limit, img_s, wide=False):
    return {"stage": stage, "unfreeze": unfreeze, "freeze_style": "keras",
            "fastcxr_vs_limit_median": vs_limit, "fastcxr_vs_defaults_median": None,
            "fastcxr_img_s": img_s, "wide": wide,
            "wide_reason": "fastcxr/limit ranges 0.40-1.20" if wide else None}  # fmt: skip


def test_a_wide_bench_row_neither_meets_nor_misses_its_target():
    gc = _gpu_check()
    rows = [_row("head", "0", 0.99, 900.0), _row("conv5", "conv5", 0.50, 100.0, wide=True)]
    summary = {
        "bench": {"rows": rows},
        "bench_compile": {"rows": [_row("all", "all", 1.0, 10.0, wide=True)]},
    }
    me = SimpleNamespace(args=SimpleNamespace(smoke=False), summary=summary)
    got = {t["name"]: t for t in gc.Checker.targets(me)}
    # a clean row is judged against the design's figure, both ways
    assert got["fastcxr/limit head"]["met"] is (0.99 >= gc.TARGETS["fastcxr_vs_limit"])
    assert "wide" not in got["fastcxr/limit head"]
    # rows flagged wide (0.50 and 100 img/s would be "missed") are not judged at all
    for name in ("fastcxr/limit conv5", "conv5 + head img/s", "compiled all img/s"):
        assert got[name]["met"] is None, name
        assert got[name]["wide"] == "fastcxr/limit ranges 0.40-1.20"
    me.summary["bench"]["rows"][1]["wide"] = False
    got = {t["name"]: t for t in gc.Checker.targets(me)}
    assert got["fastcxr/limit conv5"]["met"] is False
    assert got["conv5 + head img/s"]["met"] is False
