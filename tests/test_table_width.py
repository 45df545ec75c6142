"""Every command's table at 100 and 120 columns: nothing cut (no word folded or ended with
"…", every row closed by its right border), and the console width follows `COLUMNS`."""

import io
import re

import numpy as np
import pytest
from rich.console import Console
from rich.table import Table

from fastcxr.cli import render

WIDTHS = (100, 120)
FINDINGS = ("Edema", "Pleural Effusion")  # the study's (the default --findings)
CFG = {
    "arch": "resnet152", "size": 512, "preset": "paper", "findings": FINDINGS,
    "threshold": "sensitivity", "threshold_target": 0.9, "select": "best", "compile": True,
    "freeze_style": "keras",
}  # fmt: skip
RACES = ("WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN",
         "ASIAN - SOUTH EAST ASIAN", "AMERICAN INDIAN/ALASKA NATIVE",
         "UNABLE TO OBTAIN")  # fmt: skip
BORDER_START, BORDER_END = "┏┃┡│├└", "┓┃┩│┤┘"


# -- the check ----------------------------------------------------------------------------------
def _plain(x) -> str:
    return "" if x is None else str(x.plain if hasattr(x, "plain") else x)


def _texts(t: Table) -> list[str]:
    """Every text the table shows: title, caption, headers and cells."""
    out = [_plain(t.title), _plain(t.caption)]
    for c in t.columns:
        out += [_plain(c.header), *map(_plain, c.cells)]
    return out


def rendered(item, width: int) -> str:
    c = Console(width=width, record=True, markup=False, color_system=None, file=io.StringIO())
    c.print(item)
    return c.export_text()


def assert_fits(t: Table, width: int) -> str:
    """`t` at `width` columns shows every word of every text whole, ends no word with an
    ellipsis it did not have, and closes every row with its right border."""
    out = rendered(t, width)
    lines = out.splitlines()
    assert max(map(len, lines)) <= width
    title = 0
    while title < len(lines) and lines[title][:1] not in BORDER_START:
        title += 1
    assert title <= 2, f"the title takes {title} lines at {width}:\n{out}"
    for ln in lines:
        if ln[:1] and ln[0] in BORDER_START:
            assert ln.rstrip()[-1] in BORDER_END, f"no right border at {width}:\n{out}"
    texts = _texts(t)
    assert out.count("…") <= sum(s.count("…") for s in texts), f"cut at {width}:\n{out}"
    shown = " ".join(re.sub(r"[│┃]", " ", out).split())
    for word in {w for s in texts for w in s.split()}:
        assert word in shown, f"{word!r} cut at {width}:\n{out}"
    return out


def tables(page: render.Page) -> list[Table]:
    got = [x for x in page.stdout if isinstance(x, Table)]
    assert got
    return got


# -- realistic results: long finding and subgroup names, undefined values with reasons -----------
def metric(acc, auc, reason=None):
    m = {"accuracy": acc, "auc": auc, "threshold": 0.4321, "auc_ci": [0.61, 0.93],
         "accuracy_at_0.5": acc}  # fmt: skip
    if reason:
        m.update(reason=reason, auc_ci=None, auc_ci_reason="one class in the test set")
    return m


UNDEFINED = "one class in the test set: AUC undefined"
# where users keep their data: long paths
MIMIC_MANIFEST = (
    "/scratch/users/jdoe/datasets/physionet.org/files/mimic-cxr/2.1.0/prepared-512/manifest.csv"
)
CHEXPERT_MANIFEST = (
    "/scratch/users/jdoe/datasets/stanford/CheXpert-v1.0-small/prepared-512/manifest.csv"
)


def compare_result() -> dict:
    def form(nets, undefined=False):
        fs = {f: metric(0.8123, 0.9012) for f in FINDINGS}
        if undefined:
            fs["Pleural Effusion"] = metric(None, None, UNDEFINED)
        return {"networks": nets, "findings": fs, "epochs": 38, "seconds_per_epoch": 1234.5,
                "train_seconds": 46911.0,
                "selected_stage": {n: "conv4_last3" for n in nets}}  # fmt: skip

    pair = {"finding": FINDINGS[0], "a": "multilabel", "b": "multiclass",
            "patients": 12345, "auc_diff": 0.0123, "diff_ci": [-0.0456, 0.0789],
            "p_value": 0.1234, "p_holm": 0.3702}  # fmt: skip
    undefined_pair = {**pair, "finding": "Pleural Effusion", "auc_diff": None, "diff_ci": None,
                      "p_value": None, "reason": UNDEFINED, "p_holm": None,
                      "p_holm_reason": "p-value undefined"}  # fmt: skip
    return {
        "run_dir": "runs/compare-paper-20250101-120000", "auc_ci_method": "percentile "
        "bootstrap over patients (2000 resamples)",
        "formulations": {"single": form(["enlarged_cardiomediastinum", "pleural_effusion"]),
                         "multilabel": form(["multilabel"], undefined=True),
                         "multiclass": form(["multiclass"])},
        "pairs": [pair, undefined_pair],
    }  # fmt: skip


def aggregate_result(rows) -> dict:
    def agg(mean):
        return {"mean": mean, "sd": 0.0123, "min": mean - 0.02, "max": mean + 0.02, "n": 5}

    one = {"mean": None, "sd": None, "min": None, "max": None, "reason": "undefined in every seed"}
    return {
        "seeds": [0, 1, 2, 3, 4], "train_seconds": 123456, "run_dir": "runs/x",
        "aggregate": {r: {f: {"accuracy": agg(0.81), "auc": agg(0.9) if i else one}
                          for f in FINDINGS} for i, r in enumerate(rows)},
    }  # fmt: skip


RESNET152 = ([f"conv4_block{i}" for i in range(34, 37)] + [f"conv5_block{i}" for i in (1, 2, 3)]
             + ["head"])  # fmt: skip
STAGES = {"head": ["head"], "conv5_block3": RESNET152[-2:], "conv5": RESNET152[-4:],
          "conv4_last3": RESNET152, "all": ["stem", *RESNET152]}  # fmt: skip


def ablation_result() -> dict:
    def stage(name, i):
        fs = {f: metric(0.8123, 0.9012) for f in FINDINGS}
        if name == "head":
            fs["Pleural Effusion"] = metric(None, None, UNDEFINED)
        return {"name": name, "unfrozen": STAGES[name], "trainable_params": 58_000_000 + i,
                "epochs": 10, "valid_loss": 0.3456 - i / 100, "findings": fs}  # fmt: skip

    return {"run_dir": "runs/ablation-paper", "best_stage": "conv4_last3",
            "selected_stage": "conv4_last3",
            "stages": [stage(n, i) for i, n in enumerate(STAGES)]}  # fmt: skip


def audit_result() -> dict:
    """A real audit (the library's own scoring) of 600 images, race and sex subgroups, one
    subgroup with no positive image."""
    from fastcxr.evaluate.audit import GAP_RULE, UNDERDIAGNOSIS_RULE, score_finding
    from fastcxr.evaluate.evaluation import EvalConfig

    rng = np.random.default_rng(0)
    n = 600
    pats = np.array([f"p{i // 3}" for i in range(n)])
    race = np.array([RACES[(i // 3) % len(RACES)] for i in range(n)], object)
    sex = np.array(["F" if (i // 3) % 2 else "M" for i in range(n)], object)
    findings = {}
    for f in ("Enlarged Cardiomediastinum", "No Finding"):
        y = (rng.random(n) < 0.3).astype(int)
        y[race == "UNABLE TO OBTAIN"] = 0
        p = np.clip(0.3 * y + rng.random(n) * 0.7, 0, 1)
        masks = {"sex": {s: sex == s for s in "FM"}, "race": {r: race == r for r in RACES}}
        findings[f] = score_finding(y, p, pats, masks, 0.5, EvalConfig(n_boot=200), 50)
    under = {a: [{"subgroup": s["subgroup"], "n_with_finding": s["n"] - s["positives"],
                  "rate": s["fpr"], "gap": s["fpr_gap"], "gap_ci": s["fpr_gap_ci"],
                  "small": s["small"], "reason": s["reasons"].get("fpr")} for s in groups]
             for a, groups in findings["No Finding"]["by"].items()}  # fmt: skip
    return {"source": "runs/compare-paper/multilabel", "kind": "run", "split": "test",
            "manifest": MIMIC_MANIFEST, "warnings": [],
            "min_size": 50, "ci": {"method": "percentile bootstrap over patients (200 resamples)"},
            "gap_rule": GAP_RULE, "findings": findings, "underdiagnosis": under,
            "underdiagnosis_rule": UNDERDIAGNOSIS_RULE, "dir": "runs/x/audit"}  # fmt: skip


def evaluation_result() -> dict:
    fine = {"n": 12345, "positives": 2345, "threshold": 0.4321, "accuracy": 0.8123,
            "sensitivity": 0.9012, "specificity": 0.7012, "auc": 0.9012, "auc_ci": [0.89, 0.91],
            "ece": 0.0312, "brier": 0.1234}  # fmt: skip
    one = {**fine, "positives": 0, "sensitivity": None, "auc": None, "auc_ci": None,
           "auc_ci_reason": "one class in the test set", "reason": UNDEFINED}  # fmt: skip
    return {"run": "runs/compare-paper/multilabel", "name": "chexpert-valid",
            "manifest": CHEXPERT_MANIFEST, "split": "valid",
            "dir": "runs/x/evaluations/chexpert-valid",
            "findings": {FINDINGS[0]: fine, FINDINGS[1]: one},
            "internal": {f: {"auc": 0.9, "auc_ci": [0.88, 0.92]} for f in FINDINGS}}  # fmt: skip


def lr_find_result() -> dict:
    def stage(name, valley):
        return {"stage": name, "unfreeze": "conv4_block-3", "unfrozen": STAGES[name],
                "configured_lr": 1e-4, "valley": valley, "minimum": 3.1e-3,
                "iterations": 100}  # fmt: skip

    return {"formulation": "multilabel", "arch": "resnet152", "size": 512, "batch_size": 64,
            "lr_ratio": 10.0, "files": {"json": "reports/build/lr-find/lr_find.json"},
            "networks": {"enlarged_cardiomediastinum+pleural_effusion": [
                stage("head", 1.2e-3), stage("conv4_last3", None)]}}  # fmt: skip


def bench_result() -> dict:
    def row(stage, style):
        return {"stage": stage, "freeze_style": style, "limit_img_s": 1234.5,
                "fastcxr_img_s": 1100.2, "fastcxr_vs_limit_median": 0.89,
                "fastcxr_vs_limit": 0.89, "fastcxr_vs_limit_range": [0.85, 0.93],
                "defaults_img_s": 312.4, "fastcxr_vs_defaults": 3.52,
                "fastcxr_vs_defaults_range": [3.41, 3.62],
                "compile_s": {"fastcxr": 45.3}}  # fmt: skip

    return {"arch": "resnet152", "size": 512, "batch_size": 64, "device": "NVIDIA H200",
            "rounds": 3, "speed": {"precision": "bf16", "channels_last": True, "compile": True},
            "rows": [row(s, st) for s in STAGES for st in ("keras", "fastai")],
            "eval_img_s": 4321.0, "projection": {"available": False}}  # fmt: skip


def labels_result() -> dict:
    split = {"images": 123456, "kept": 101234,
             "combinations": {"0,0": 50123, "0,1": 20123, "1,0": 20123, "1,1": 10865},
             "findings": {f: {"1": 30123, "0": 60123, "-1": 5123, "blank": 28087}
                          for f in FINDINGS},
             "demographics": {"sex": {"F": 60000, "M": 63000, "unknown": 456},
                              "age": {g: 20000 for g in ("0-20", "20-40", "40-60", "60-80",
                                                         "80+", "unknown")}}}  # fmt: skip
    return {"splits": {s: split for s in ("train", "valid", "test")}}


PAGES = {
    "compare": lambda: render.compare(compare_result(), CFG),
    "compare --seeds": lambda: render.compare(
        aggregate_result(["single", "multilabel", "multiclass"]), CFG
    ),
    "train": lambda: render.train(
        {
            "findings": compare_result()["formulations"]["multilabel"]["findings"],
            "selected_stage": "conv4_last3",
            "epochs": 38,
            "seconds_per_epoch": 1234.5,
            "train_seconds": 46911.0,
            "compile_seconds": 45.0,
        },
        CFG,
        "multilabel",
        "runs/t",
    ),  # fmt: skip
    "unfreeze-ablation": lambda: render.ablation(ablation_result(), CFG, "multilabel", "runs/a"),
    "unfreeze-ablation --seeds": lambda: render.ablation(
        aggregate_result(list(STAGES)), CFG, "multilabel", "runs/a"
    ),
    "unfreeze-ablation --dry-run": lambda: render.ablation_plan(
        {
            "total_params": 58_143_810,
            "stages": [
                {
                    "name": s,
                    "unfrozen": g,
                    "trainable_params": 4_098 + i,
                    "max_epochs": 10,
                    "lr": "find" if i else 1e-3,
                }
                for i, (s, g) in enumerate(STAGES.items())
            ],
        },
        CFG,
        "multilabel",
    ),  # fmt: skip
    "labels": lambda: render.labels(labels_result(), FINDINGS, "uncertain=drop, blank=drop"),
    "prepare": lambda: render.prepare(
        {
            "images": 377110,
            "converted": 377000,
            "skipped": 100,
            "failures": 10,
            "manifest": "out/manifest.csv",
            "splits": {"train": 368960, "valid": 2991, "test": 5159},
        },
        "/data/physionet.org/files/mimic-cxr/2.0.0",
        "/data/mimic-cxr/prepared-512",
    ),  # fmt: skip
    "bench": lambda: render.bench(bench_result()),
    "bench-prepare": lambda: render.bench_prepare(
        {
            "rows": 3056,
            "cols": 2544,
            "bits_stored": 12,
            "baseline_images_per_s_per_core": 1.234,
            "fastcxr_images_per_s_per_core": 4.567,
            "ratio": 3.7,
            "mimic_minutes_on_16_cores": 85.2,
        },
        512,
    ),  # fmt: skip
    "evaluate": lambda: render.evaluation(evaluation_result()),
    "audit": lambda: render.audit(audit_result()),
    "lr-find": lambda: render.lr_find(lr_find_result()),
}


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("command", PAGES)
def test_every_table_fits(command, width):
    for t in tables(PAGES[command]()):
        assert_fits(t, width)


def test_the_check_catches_a_cut_table():
    t = Table(title="wide")
    for i in range(8):
        t.add_column(f"column{i}")
    t.add_row(*["a-very-long-unbreakable-cell-text"] * 8)
    with pytest.raises(AssertionError):
        assert_fits(t, 100)
    narrow = Table()
    narrow.add_column("x", no_wrap=True)
    narrow.add_row("word " * 30)
    with pytest.raises(AssertionError):
        assert_fits(narrow, 100)


@pytest.mark.parametrize("width", WIDTHS)
def test_the_star_stays_beside_its_stage_and_undefined_cells_are_footnoted(width):
    (t,) = tables(PAGES["unfreeze-ablation"]())
    out = assert_fits(t, width)
    assert re.search(r"│\s*conv4_last3 ★\s*│", out)
    assert "–¹" in out and "¹ undefined: one class in the test set: AUC undefined" in out
    assert "undefined (" not in out.split("¹ undefined")[0]  # no reason inside the table
    audit = tables(PAGES["audit"]())
    out = assert_fits(audit[0], width)
    assert re.search(r"│ UNABLE TO OBTAIN\s*│.*–¹ │\s*–² │.*–² │", out)
    assert "¹ undefined: one class in the subgroup" in out
    assert "² undefined: no positive image" in out
    assert re.search(r"│ BLACK/AFRICAN( AMERICAN)?\s*│", out)  # whole words, wrapped at most


def test_the_audits_footnote_reads_as_sentences():
    from fastcxr.cli import render

    a = audit_result()
    a["underdiagnosis"] = None
    a["underdiagnosis_rule"] = "the run does not predict No Finding: not defined for it"
    items = [str(x) for _, x in render.audit(a).items if isinstance(x, str)]
    note = next(x for x in items if x.startswith("t: the run's threshold"))
    assert "images. The run does not predict No Finding: not defined for it." in note
    sentences = [s for s in note.split(". ") if s]
    assert all(s[0].isupper() or not s[0].isalpha() or s.startswith("t:") for s in sentences)


@pytest.mark.parametrize(("command", "path"), [("evaluate", CHEXPERT_MANIFEST),
                                               ("audit", MIMIC_MANIFEST)])  # fmt: skip
def test_a_datasets_path_is_written_under_the_tables_not_in_their_titles(command, path):
    page = PAGES[command]()
    assert all(path not in _plain(t.title) for t in tables(page))
    assert f"data: {path}" in [x for _, x in page.items if isinstance(x, str)]
