"""The CLI's renderers on hand-made result dicts: nothing trained, nothing read or written."""

import re

from rich.console import Console

from fastcxr.cli import render

FINDINGS = ("Edema", "Pleural Effusion")
CFG = {
    "arch": "resnet10",
    "size": 32,
    "preset": "demo",
    "findings": FINDINGS,
    "threshold": "youden",
    "threshold_target": None,
    "select": "best",
    "compile": False,
    "freeze_style": "keras",
}


def text(items) -> str:
    """What `items` look like on a 200-column console that reads no markup (like stdout)."""
    c = Console(record=True, width=200, markup=False, color_system=None)
    for x in items:
        c.print(x)
    return c.export_text()


def markup(lines) -> str:
    """stderr lines (rich markup) as the user reads them."""
    c = Console(record=True, width=200, color_system=None)
    for x in lines:
        c.print(x)
    return c.export_text()


def row(out: str, first: str) -> str:
    """The table body line whose first cell starts with `first`."""
    return next(ln for ln in out.splitlines() if re.match(rf"│\s*{re.escape(first)}\b", ln))


def flat(out: str) -> str:
    """`out` with its line breaks and runs of spaces as single spaces (titles wrap)."""
    return " ".join(out.split())


def metric(acc, auc, thr=0.5, ci=(0.6, 0.9), reason=None, ci_reason=None):
    m = {"accuracy": acc, "auc": auc, "threshold": thr, "auc_ci": ci}
    if reason:
        m["reason"] = reason
    if ci_reason:
        m["auc_ci_reason"] = ci_reason
    return m


def agg(mean, sd, lo, hi, reason=None):
    return {"mean": mean, "sd": sd, "min": lo, "max": hi, "n": 3, "reason": reason}


def test_fmt_spread_and_stage_cells():
    assert render.fmt(0.12345) == "0.123"
    assert render.fmt(float("nan"), why="one class in test") == "undefined (one class in test)"
    assert render.fmt(None) == "undefined"
    assert render.spread(agg(0.8, 0.01, 0.79, 0.81)) == "0.800 ± 0.010\n[0.790–0.810]"
    assert render.spread(agg(0.8, None, 0.8, 0.8)) == "0.800 ± undefined (one seed)\n[0.800–0.800]"
    assert render.spread(agg(None, None, None, None, "no positives")) == "undefined (no positives)"
    assert render.stages({"edema": "conv5", "effusion": "conv5"}) == "conv5"
    assert render.stages({"edema": "head", "effusion": "all"}) == "edema head, effusion all"
    assert render.stages(None).startswith("last")
    assert render.threshold_label({"threshold": "sensitivity", "threshold_target": 0.9}) == (
        "acc @ t\n(sensitivity 0.9)"
    )
    assert render.ratio(0.51234, [0.4, 0.6]) == "0.51 [0.40–0.60]"
    assert render.ratio(1.5, None, "x") == "1.50x"


def test_compare_single_seed():
    result = {
        "synthetic": True,
        "run_dir": "runs/c",
        "auc_ci_method": "patient bootstrap",
        "formulations": {
            "single": {
                "networks": ["edema", "pleural_effusion"],
                "findings": {
                    "Edema": metric(0.75, 0.81234, thr=0.4321),
                    "Pleural Effusion": metric(
                        0.5,
                        None,
                        thr=None,
                        ci=None,
                        reason="one class in test",
                        ci_reason="no positive patient",
                    ),
                },
                "epochs": 4,
                "seconds_per_epoch": 2.25,
                "train_seconds": 9.0,
                "selected_stage": {"edema": "conv5", "pleural_effusion": "all"},
            },
            "multilabel": {
                "networks": ["edema+pleural_effusion"],
                "findings": {f: metric(0.7, 0.8) for f in FINDINGS},
                "epochs": 2,
                "seconds_per_epoch": 3.0,
                "train_seconds": 6.0,
                "selected_stage": "head",
            },
        },
        "pairs": [
            {
                "finding": "Edema",
                "a": "single",
                "b": "multilabel",
                "patients": 40,
                "auc_diff": 0.01234,
                "diff_ci": [-0.05, 0.07],
                "p_value": 0.5,
                "p_holm": 1.0,
            },
            {
                "finding": "Pleural Effusion",
                "a": "single",
                "b": "multilabel",
                "patients": 40,
                "auc_diff": None,
                "diff_ci": None,
                "p_value": None,
                "reason": "one class",
                "p_holm": None,
                "p_holm_reason": "not tested",
            },
        ],
    }
    page = render.compare(result, CFG)
    assert "SYNTHETIC" in markup(page.stderr) and "SYNTHETIC" not in text(page.stdout)
    out = text(page.stdout)
    assert "Experiment II — formulations (resnet10, 32px, demo)" in out
    assert "(youden)" in out  # the threshold rule heads the accuracy columns
    single = row(out, "single")
    assert "single (2 nets)" in single and "0.750" in single and "0.812" in single
    assert "undefined (one class in test)" in single
    assert "t=0.432" in out and "(0.600–0.900)" in out
    assert "CI undefined (no positive patient)" in out
    assert re.search(r"multilabel\s", row(out, "multilabel"))
    assert "2.2" in single or "2.3" in single  # s/epoch, one decimal
    assert "the stage with the lowest validation loss" in out
    assert "single: edema conv5, pleural_effusion all; multilabel: head" in out
    assert "p (Holm)" in out
    edema = row(out, "Edema")
    assert "+0.0123" not in edema and "0.0123" in edema  # the difference, 4 digits
    assert "-0.0500 … +0.0700" in edema and "1.0000" in edema
    effusion = row(out, "Pleural Effusion")
    assert "undefined (one class)" in effusion and "undefined (not tested)" in effusion
    assert out.rstrip().endswith("run record: runs/c")


def test_compare_over_seeds():
    result = {
        "seeds": [0, 1, 2],
        "run_dir": "runs/s",
        "train_seconds": 123.4,
        "aggregate": {
            "multilabel": {
                "Edema": {
                    "accuracy": agg(0.7, 0.02, 0.68, 0.72),
                    "auc": agg(0.8, 0.01, 0.79, 0.81),
                },
                "Pleural Effusion": {
                    "accuracy": agg(0.6, None, 0.6, 0.6),
                    "auc": agg(None, None, None, None, "no positives"),
                },
            }
        },
    }
    page = render.compare(result, CFG)
    assert page.stderr == []  # not synthetic
    out = text(page.stdout)
    assert "mean ± sd [range] over seeds [0, 1, 2]" in out
    assert "0.700 ± 0.020" in out and "[0.680–0.720]" in out
    assert "± undefined (one seed)" in out and "undefined (no positives)" in out
    assert "training time over all seeds 123 s — run records: runs/s/seed-K" in out


def test_train():
    result = {
        "findings": {
            "Edema": {"accuracy": 0.8, "threshold": 0.25, "accuracy_at_0.5": 0.7, "auc": 0.9},
            "Pleural Effusion": {
                "accuracy": None,
                "threshold": None,
                "accuracy_at_0.5": 0.5,
                "auc": None,
                "reason": "only class [0] in test",
            },
        },
        "selected_stage": "conv5",
        "epochs": 3,
        "seconds_per_epoch": 1.5,
        "train_seconds": 4.5,
        "compile_seconds": 12.0,
    }
    cfg = {**CFG, "threshold": "specificity", "threshold_target": 0.95, "compile": True}
    out = text(render.train(result, cfg, "multilabel", "runs/t").stdout)
    assert "multilabel (resnet10, 32px)" in out and "(specificity 0.95)" in out
    edema = row(out, "Edema")
    assert all(v in edema for v in ("0.800", "0.250", "0.700", "0.900"))
    assert row(out, "Pleural Effusion").count("undefined (only class [0] in test)") == 3
    assert "selected stage (specificity" not in out and "selected stage (best): conv5" in out
    assert "3 epochs, 1.5 s/epoch, 4 s (+ 12 s compiling) — run record: runs/t" in out
    plain = text(render.train(result, CFG, "multilabel", "runs/t").stdout)
    assert "compiling" not in plain


def test_ablation_marks_the_best_stage():
    def stage(name, unfrozen, params, loss):
        return {
            "name": name,
            "unfrozen": unfrozen,
            "trainable_params": params,
            "epochs": 2,
            "valid_loss": loss,
            "findings": {f: metric(0.7, 0.8) for f in FINDINGS},
        }

    result = {
        "run_dir": "runs/a",
        "best_stage": "conv5",
        "selected_stage": "conv5",
        "stages": [
            stage("head", ["head"], 1026, 0.7),
            stage("conv5", ["conv5_block1", "conv5_block2", "head"], 1234567, 0.5),
        ],
    }
    out = text(render.ablation(result, CFG, "multilabel", "runs/a").stdout)
    assert "Experiment I — progressive unfreezing (resnet10, multilabel)" in out
    assert "★" in row(out, "conv5") and "★" not in row(out, "head")
    assert "head + 2 blocks (conv5_block1…)" in out and "1,234,567" in out and "0.5000" in out
    assert "★ best stage by validation loss: conv5; the run's model (best): conv5" in out
    assert out.rstrip().endswith("run record: runs/a")


def test_ablation_over_seeds():
    result = {
        "seeds": [3, 4],
        "train_seconds": 10,
        "aggregate": {
            s: {
                f: {"accuracy": agg(0.7, 0.1, 0.6, 0.8), "auc": agg(0.8, 0.1, 0.7, 0.9)}
                for f in FINDINGS
            }
            for s in ("head", "all")
        },
    }
    out = text(render.ablation(result, CFG, "multilabel", "runs/a").stdout)
    assert "over seeds [3, 4]" in out and row(out, "head") and row(out, "all")
    assert "training time over all seeds 10 s — runs/a" in out


def test_ablation_plan_shows_what_each_stage_adds():
    groups = [f"conv4_block{i}" for i in range(1, 6)]
    plan = {
        "total_params": 60_000_000,
        "stages": [
            {
                "name": "head",
                "unfrozen": ["head"],
                "trainable_params": 4098,
                "max_epochs": 10,
                "lr": 0.001,
            },
            {
                "name": "conv4",
                "unfrozen": ["head", *groups],
                "trainable_params": 5_000_000,
                "max_epochs": 10,
                "lr": 1e-4,
            },
        ],
    }
    out = text(render.ablation_plan(plan, CFG, "multilabel").stdout)
    assert "Experiment I plan — resnet10, multilabel, keras-style freezing" in out
    conv4 = row(out, "conv4")
    assert "conv4_block1, conv4_block2, conv4_block3 … (5 groups)" in conv4
    assert "5,000,000" in conv4 and "+4,995,902" in conv4 and "0.0001" in conv4
    assert "total parameters: 60,000,000" in out


def test_labels():
    result = {
        "splits": {
            "train": {
                "images": 10,
                "kept": 8,
                "combinations": {"0,0": 3, "0,1": 2, "1,0": 2, "1,1": 1},
                "findings": {f: {"1": 3, "0": 5, "-1": 1, "blank": 1} for f in FINDINGS},
            },
            "test": {
                "images": 4,
                "kept": 4,
                "combinations": {"0,0": 1, "0,1": 1, "1,0": 1, "1,1": 1},
                "findings": {f: {"1": 2, "0": 2, "-1": 0, "blank": 0} for f in FINDINGS},
            },
        }
    }
    out = text(render.labels(result, FINDINGS, "uncertain=drop, blank=drop").stdout)
    title = "Label combinations (Edema, Pleural Effusion) under uncertain=drop, blank=drop"
    assert title in flat(out)
    assert "(0,1)" in out and "(1,1)" in out
    assert "8 / 10" in row(out, "train") and "4 / 4" in row(out, "test")
    raw = out.split("Raw labels per finding")[1]
    assert re.search(r"train\s+│?\s*Edema\s+│?\s*3\s+│?\s*5\s+│?\s*1\s+│?\s*1", raw)


def test_bench_ratios_are_median_and_range_and_wide_rows_are_flagged():
    def bench_row(stage, style, wide=False):
        return {
            "stage": stage,
            "freeze_style": style,
            "limit_img_s": 100.0,
            "fastcxr_img_s": 51.0,
            "fastcxr_vs_limit": 0.51,
            "fastcxr_vs_limit_range": [0.45, 0.62],
            "defaults_img_s": 20.0,
            "fastcxr_vs_defaults": 2.55,
            "fastcxr_vs_defaults_range": [2.1, 2.9],
            "rounds": 3,
            "wide": wide,
            "wide_reason": "fastcxr/limit spans 0.45–0.62 (>20%)" if wide else None,
            "compile_s": {"fastcxr": 7.5},
        }

    result = {
        "arch": "resnet152",
        "size": 512,
        "batch_size": 64,
        "device": "cuda:0",
        "rounds": 3,
        "speed": {"precision": "bf16", "channels_last": True, "compile": True},
        "rows": [bench_row("head", "keras"), bench_row("all", "[fastai]", wide=True)],
        "eval_img_s": 900.0,
        "projection": {
            "available": True,
            "train_images": 34000,
            "networks": 4,
            "epochs_per_stage": 10,
            "freeze_style": "keras",
            "hours": 12.345,
        },
    }
    page = render.bench(result)
    out = text(page.stdout)
    assert "resnet152, 512px, batch 64, bf16, channels_last=True, compile=True on cuda:0" in out
    head = row(out, "head")
    assert "0.51 [0.45–0.62]" in head and "2.55x [2.10–2.90]" in head and "7.5" in head
    assert "evaluation (no gradient, batch 128): 900.0 img/s" in out
    assert "over 3 interleaved round(s)" in out
    assert "34,000 training images" in out and "12.35 h" in out
    note = markup(page.stderr)
    assert "all [fastai]: fastcxr/limit spans 0.45–0.62 (>20%)" in note  # user text kept
    assert "head keras" not in note
    without = text(render.bench(result, defaults=False).stdout)
    assert "fastai defaults" not in without and "2.55x" not in without


def test_bench_before_rounds_existed():
    result = {
        "arch": "resnet10",
        "size": 32,
        "batch_size": 4,
        "device": "cpu",
        "speed": {"precision": "fp32", "channels_last": False, "compile": False},
        "rows": [
            {
                "stage": "head",
                "freeze_style": "keras",
                "limit_img_s": 10.0,
                "fastcxr_img_s": 5.0,
                "fastcxr_vs_limit": 0.5,
            }
        ],
        "eval_img_s": 20.0,
        "projection": {"available": False},
    }
    page = render.bench(result, defaults=False)
    out = text(page.stdout)
    assert "0.50" in row(out, "head") and "[" not in row(out, "head") and page.stderr == []
    assert "round" not in out and "projected" not in out


def test_bench_prepare():
    r = {
        "rows": 3056,
        "cols": 2544,
        "bits_stored": 12,
        "baseline_images_per_s_per_core": 1.234,
        "fastcxr_images_per_s_per_core": 4.567,
        "ratio": 3.7,
        "mimic_minutes_on_16_cores": 85.2,
    }
    out = text(render.bench_prepare(r, 512).stdout)
    assert "Conversion of 3056x2544 12-bit DICOMs to 512x512 PNG" in out
    assert "1.23" in out and "4.57" in out
    assert "fastcxr / baseline = 3.70x" in out and "≈ 85 min" in out


def test_prepare_report():
    report = {
        "images": 90,
        "converted": 80,
        "skipped": 5,
        "failures": 5,
        "manifest": None,
        "splits": {"train": 70, "valid": 10, "test": 10},
    }
    page = render.prepare(report, "data/[nih]", "out/[x]")
    out = text(page.stdout)
    assert "prepared data/[nih] → out/[x]" in flat(out)
    assert re.search(r"converted\s+│?\s*80", out) and re.search(r"split valid\s+│?\s*10", out)
    err = markup(page.stderr)
    assert "5 file(s) could not be read" in err and "out/[x]/failures*.csv" in err
    assert "run again without --shard" in err
    done = render.prepare({**report, "failures": 0, "manifest": "out/manifest.csv"}, "a", "b")
    assert done.stderr == []


def test_predict_summary_lists_each_failure_on_stderr():
    summary = {
        "predicted": 3,
        "failed": 1,
        "csv": "p.csv",
        "cams": 6,
        "exported": ["x/m.pt2"],
        "device": "cpu",
        "failures": [{"file": "bad[1].dcm", "reason": "truncated"}],
    }
    page = render.predict(summary, "cams", "x")
    out = text(page.stdout)
    assert "predicted 3 image(s) on cpu → p.csv" in out
    assert "wrote 6 Grad-CAM overlays to cams" in out and "exported to x" in out
    assert "could not read bad[1].dcm: truncated" in markup(page.stderr)
    # the order of the streams is kept: the summary, its failures, then what else was written
    assert [s for s, _ in page.items] == ["out", "err", "out", "out"]
    quiet = render.predict({**summary, "cams": 0, "exported": [], "failures": []})
    assert len(quiet.items) == 1


def test_report_lists_the_files():
    assert text(render.report(["a/b.png", "a/results.md"]).stdout).splitlines() == [
        "wrote a/b.png",
        "wrote a/results.md",
    ]


def test_ablation_of_two_networks_says_what_the_star_averages():
    result = {
        "run_dir": "runs/s", "best_stage": "all", "selected_stage": {"edema": "head",
                                                                      "pleural_effusion": "all"},
        "best_stage_rule": "validation loss (the mean over the 2 networks)",
        "best_stage_by_network": {"edema": "head", "pleural_effusion": "all"},
        "stages": [{"name": n, "unfrozen": u, "trainable_params": 10, "epochs": 2,
                    "valid_loss": v, "findings": {f: metric(0.7, 0.8) for f in FINDINGS}}
                   for n, u, v in (("head", ["head"], 0.6),
                                   ("all", ["conv5_block1", "head"], 0.5))],
    }  # fmt: skip
    out = " ".join(text(render.ablation(result, CFG, "single", "runs/s").stdout).split())
    assert ("★ best stage by validation loss (the mean over the 2 networks): all (each "
            "network's own: edema head, pleural_effusion all)") in out  # fmt: skip
