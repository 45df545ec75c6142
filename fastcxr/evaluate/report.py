"""`fastcxr report`: results.md and the figures of a set of runs, read from their records
only (a compare folder, a run, an ablation, a `--seeds` series), with the evaluations
(`fastcxr evaluate`) and subgroup audits (`fastcxr audit`) saved under them. The figures
themselves are drawn by `fastcxr.evaluate.figures`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from sklearn.metrics import auc, roc_curve

from fastcxr.errors import MissingFile, UsageError
from fastcxr.evaluate.evaluation import EvalConfig, evaluate, pairwise, table, with_holm
from fastcxr.evaluate.figures import (
    ablation_figure,
    accuracy_figure,
    calibration_figure,
    confusion_figure,
    curves_figure,
    epochs_time_figure,
    roc_figure,
    roc_seeds_figure,
    save_figure,
    tpr_gap_figure,
)
from fastcxr.evaluate.intervals import ci_text, shown_digits
from fastcxr.runtime.runs import (
    RunError,
    check_predictions,
    is_complete,
    load_run,
    read_record_json,
    writable_folder,
)
from fastcxr.runtime.seeds import SEEDS_FILE


def _test(pred: pd.DataFrame) -> pd.DataFrame:
    return pred[pred["split"] == "test"] if "split" in pred.columns else pred


# -- a --seeds series -------------------------------------------------------------------------
def seed_runs(seed_dir: Path) -> dict[str, Path]:
    """The runs of one seed of a series (RUN/seed-K): its formulations for a compare, else
    the seed's run itself (train, or an ablation: its selected model), by formulation."""
    if (seed_dir / "compare.json").exists():
        names = json.loads((seed_dir / "compare.json").read_text())["formulations"]
        return {n: seed_dir / n for n in names}
    if not is_complete(seed_dir):
        raise RunError(f"{seed_dir}: not a complete run (an unfinished seed?)")
    return {json.loads((seed_dir / "config.json").read_text())["formulation"]: seed_dir}


def series_config(path: Path, series: dict) -> dict:
    """The configuration (config.json) of the series' first run: every seed shares it but
    the seed (`compare --seeds` checks that)."""
    run = next(iter(seed_runs(path / f"seed-{series['seeds'][0]}").values()))
    return read_record_json(run / "config.json")


def seed_curves(path: Path, series: dict, finding: str) -> dict[str, list[tuple]]:
    """Each seed's test ROC curve for `finding`, by formulation (see `roc_seeds_figure`)."""
    out: dict[str, list[tuple]] = {}
    for seed in series["seeds"]:
        for name, run in seed_runs(path / f"seed-{seed}").items():
            check_predictions(run)  # the curve is the recorded run's, not an edited file's
            t = _test(pd.read_csv(run / "predictions.csv"))
            t = t[t[f"y_{finding}"].notna()]  # scored images only
            y = t[f"y_{finding}"].astype(int)
            if y.nunique() < 2:
                continue  # no curve without both classes
            fpr, tpr, _ = roc_curve(y, t[f"p_{finding}"])
            out.setdefault(name, []).append((seed, fpr, tpr, float(auc(fpr, tpr))))
    return out


def _spread(a: Mapping) -> tuple[str, str]:
    """(mean ± sd, min–max) of a `seeds.spread`, or why it is undefined."""
    if a.get("mean") is None:
        return _f(None, 3, a.get("reason")), ""
    d = shown_digits(a["mean"], a["min"], a["max"])
    sd = f" ± {a['sd']:.{d}f}" if a.get("sd") is not None else " (one seed: no sd)"
    return f"{a['mean']:.{d}f}{sd}", f"{a['min']:.{d}f}–{a['max']:.{d}f}"


def _is_ablation(path: Path, series: dict) -> bool:
    return (path / f"seed-{series['seeds'][0]}" / "ablation.json").exists()


def seeds_markdown(series: list[tuple[Path, dict]]) -> list[str]:
    """results.md's sections for `--seeds` series: mean ± sd and range per row and finding."""
    lines: list[str] = []
    for d, s in series:
        kind = "stage" if _is_ablation(d, s) else "formulation"
        cfg = series_config(d, s)
        tc = cfg["train"]
        lines += [
            "",
            f"## Across seeds — {d.name} (seeds {', '.join(map(str, s['seeds']))}; "
            f"{tc['arch']}, {tc['size']}px, preset {tc['preset']})"
            + (" — **synthetic data**" if cfg["data"].get("synthetic") else ""),
            "",
            "Test AUC and accuracy (at each seed's threshold chosen on its validation split), "
            "as each seed's run recorded them: mean ± sd (n − 1) and range over the seeds. "
            f"One seed's figures and tables: `fastcxr report {d}/seed-K`.",
            "",
            f"| {kind} | finding | seeds | AUC mean ± sd | AUC range | acc @ t mean ± sd | "
            "acc @ t range |",
            "|---|---|---|---|---|---|---|",
        ]
        for row, by_f in s["aggregate"].items():
            for f, m in by_f.items():
                a, c = _spread(m["auc"]), _spread(m["accuracy"])
                lines.append(f"| {row} | {f} | {m['auc']['n']} | {a[0]} | {a[1]} | {c[0]} | "
                             f"{c[1]} |")  # fmt: skip
    return lines


# -- the report -----------------------------------------------------------------------------
def _runs_of(path: Path) -> tuple[dict[str, Path], dict | None]:
    """Formulation runs under `path` (a compare folder, or one run) and an ablation, if any."""
    if (path / "compare.json").exists():
        names = json.loads((path / "compare.json").read_text())["formulations"]
        return {n: path / n for n in names}, None
    if (path / "ablation.json").exists():
        return {}, json.loads((path / "ablation.json").read_text())
    if is_complete(path):
        return {path.name: path}, None
    seeds = sorted(p.name for p in path.glob("seed-*") if p.is_dir())
    if seeds:
        raise RunError(
            f"{path}: a --seeds series without {SEEDS_FILE} (unfinished: run its command again "
            f"with --resume to finish it); one seed can be reported alone: fastcxr report "
            f"{path / seeds[0]}"
        )
    raise RunError(f"{path}: not a complete run, compare, ablation or --seeds folder")


def build_report(
    run_dirs,
    out: str | Path,
    eval_cfg: EvalConfig = EvalConfig(),
    template: str | Path | None = None,
) -> list[Path]:
    """Save every figure the runs support into `out`, plus results.md; returns the files.

    `template` is a Markdown write-up whose text opens results.md (e.g. reports/template.md).
    """
    intro = _template_text(template)  # before any figure is drawn
    out = writable_folder(out)  # a file, a read-only place: one line, before anything
    runs, ablations, series = _sources(run_dirs)
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        save_figure(fig, out / name)
        written.append(out / name)

    recs = {n: load_run(p) for n, p in runs.items()}
    findings = same_findings(recs)
    evals = {
        n: evaluate(r["predictions"], findings, eval_cfg, r["config"].get("thresholds"))
        for n, r in recs.items()
    }
    if recs:
        _run_figures(save, recs, evals, findings)
    for d, abl in ablations:
        save(ablation_figure(abl), f"ablation_{d.name}.png")
        save(curves_figure(load_run(d)["history"], "Experiment I"), f"curves_ablation_{d.name}.png")
    for d, s in series:
        _seed_figures(save, d, s)
    audits = subgroup_audits(runs)
    for key, a in audits.items():
        if not a["stale"]:
            save(tpr_gap_figure(a, key), f"tpr_gaps_{key.replace('/', '_')}.png")
    preds = {n: r["predictions"] for n, r in recs.items()}
    pairs = with_holm(pairwise(preds, findings)) if len(recs) > 1 else []
    md = results_markdown(intro, recs, evals, findings, ablations, pairs,
                          [p.name for p in written], external=external_validations(runs, eval_cfg),
                          audits=audits, seeds=series)  # fmt: skip
    (out / "results.md").write_text(md)
    written.append(out / "results.md")
    return written


def _sources(run_dirs) -> tuple[dict[str, Path], list, list]:
    """(formulation runs by name, [(folder, ablation.json)], [(folder, seeds.json)]) of the
    folders given: compare folders, runs, ablations and `--seeds` series."""
    runs, ablations, series = {}, [], []
    for d in map(Path, run_dirs):
        if (d / SEEDS_FILE).exists():  # a --seeds series: across seeds (RUN/seed-K: one seed)
            series.append((d, json.loads((d / SEEDS_FILE).read_text())))
            continue
        found, abl = _runs_of(d)
        runs.update(found)
        if abl:
            ablations.append((d, abl))
    return runs, ablations, series


def _slug(finding: str) -> str:
    return finding.lower().replace(" ", "_")


def _run_figures(save, recs: Mapping[str, dict], evals, findings) -> None:
    """The runs' figures: confusion, accuracy, ROC and calibration per finding, cost, curves."""
    preds = {n: r["predictions"] for n, r in recs.items()}
    save(confusion_figure(evals, findings), "confusion.png")
    save(accuracy_figure(evals, findings), "accuracy.png")
    for f in findings:
        save(roc_figure(preds, evals, f), f"roc_{_slug(f)}.png")
        save(calibration_figure(evals, f), f"calibration_{_slug(f)}.png")
    save(epochs_time_figure({n: r["record"] for n, r in recs.items()}), "epochs_vs_seconds.png")
    for n, r in recs.items():
        save(curves_figure(r["history"], n), f"curves_{n}.png")


def _seed_figures(save, d: Path, s: dict) -> None:
    """A `--seeds` series: each finding's ROC curves, one per seed."""
    what = "each seed's selected stage" if _is_ablation(d, s) else "seeds"
    title = f"{d.name}: {what} {', '.join(map(str, s['seeds']))}"
    for f in series_config(d, s)["train"]["findings"]:
        curves = seed_curves(d, s, f)
        if curves:
            save(roc_seeds_figure(curves, f, title), f"roc_seeds_{d.name}_{_slug(f)}.png")


def same_findings(recs: Mapping[str, dict]) -> list[str]:
    """The findings every run predicts; runs of different findings share no table (their
    rows, paired tests and figures are per finding), so they are refused together."""
    sets = {n: list(r["config"]["train"]["findings"]) for n, r in recs.items()}
    if len({tuple(v) for v in sets.values()}) > 1:
        raise RunError(
            "runs of different findings cannot be reported together ("
            + "; ".join(f"{n}: {', '.join(v)}" for n, v in sets.items())
            + "): report them apart (--out to separate folders)"
        )
    return next(iter(sets.values()), [])


def external_validations(runs: Mapping[str, Path], eval_cfg: EvalConfig) -> dict[str, dict]:
    """Every evaluation (`fastcxr evaluate`) under the runs: name → {run → its metrics},
    rescored from its predictions with the report's CI settings."""
    from fastcxr.evaluate.external import evaluations_of, read_evaluation

    out: dict[str, dict] = {}
    for n, p in runs.items():
        for folder in evaluations_of(p):
            out.setdefault(folder.name, {})[n] = read_evaluation(folder, eval_cfg)
    return out


def subgroup_audits(runs: Mapping[str, Path]) -> dict[str, dict]:
    """Every saved audit (`fastcxr audit`) under the runs: `run` or `run/evaluation` → it."""
    from fastcxr.evaluate.audit import audits_of, read_audit

    out = {}
    for n, p in runs.items():
        for folder in audits_of(p):
            key = n if folder.parent == Path(p) else f"{n}/{folder.parent.name}"
            out[key] = read_audit(folder)
    return out


def audit_markdown(audits: Mapping[str, dict]) -> list[str]:
    """results.md's section: per audit, finding × attribute × subgroup."""
    if not audits:
        return []
    first = next(iter(audits.values()))
    lines = ["", "## Subgroup audit", "",
             f"`fastcxr audit`: each finding within each subgroup of the test images, at the "
             f"run's validation-chosen threshold. {first['gap_rule']}. AUC CI: "
             f"{first['ci']['method']}. ⚠: fewer images than the minimum size."]  # fmt: skip
    for key, a in audits.items():
        lines += ["", f"### {key}", "", f"- data: `{a['manifest']}`, split {a['split']}; "
                  f"by {', '.join(a['by'])}; age bins {a['age_bins']}; minimum size "
                  f"{a['min_size']}"]  # fmt: skip
        if a["stale"]:
            lines.append(
                "- **stale**: the predictions changed since this audit; run "
                "`fastcxr audit` again (left out)"
            )
            continue
        lines += [f"- warning: {w}" for w in a.get("warnings") or []]
        lines += ["", "| finding | attribute | subgroup | n | patients | prevalence | "
                  "AUC [95% CI] | TPR | FPR | TPR gap [95% CI] |",
                  "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for f, m in a["findings"].items():
            for attr, groups in {"all": [m["all"]], **m["by"]}.items():
                lines += [_audit_row(f, attr, s) for s in groups]
        if a.get("underdiagnosis"):
            lines += _underdiagnosis_markdown(a)
    return lines


def _audit_row(f: str, attr: str, s: Mapping) -> str:
    """One subgroup of one finding: its counts, AUC, TPR, FPR and TPR gap."""
    why = s.get("reasons") or {}
    ci = s.get("tpr_gap_ci")
    if attr == "all":
        gap = "—"
    elif ci:
        shown, lohi = ci_text(s["tpr_gap"], ci, signed=True, sep=" to ")
        gap = f"{shown} [{lohi}]"
    elif s["tpr_gap"] is not None:
        gap = _f(s["tpr_gap"], 3, why.get("tpr")) + f" [CI {_f(None, 3, why.get('tpr_gap_ci'))}]"
    else:
        gap = _f(s["tpr_gap"], 3, why.get("tpr"))
    return (
        f"| {f} | {attr} | {s['subgroup']}{' ⚠' if s['small'] else ''} | "
        f"{s['n']} | {s['patients']} | {_f(s['prevalence'])} | "
        f"{_auc_ci({**s, 'reason': why.get('auc')})} | "
        f"{_f(s['tpr'], 3, why.get('tpr'))} | {_f(s['fpr'], 3, why.get('fpr'))}"
        f" | {gap} |"
    )


def _underdiagnosis_markdown(a: Mapping) -> list[str]:
    """Underdiagnosis (the FPR of No Finding) per subgroup, with its gap."""
    lines = ["", a["underdiagnosis_rule"] + ":", "",
             "| attribute | subgroup | images with a finding | underdiagnosis | "
             "gap [95% CI] |", "|---|---|---|---|---|"]  # fmt: skip
    for attr, groups in a["underdiagnosis"].items():
        for s in groups:
            ci = s.get("gap_ci")
            gap = _f(s["gap"], 3, s.get("reason"))
            if ci and s["gap"] is not None:
                shown, lohi = ci_text(s["gap"], ci, signed=True, sep=" to ")
                gap = f"{shown} [{lohi}]"
            elif s["gap"] is not None:
                gap += f" [CI {_f(None, 3, s.get('gap_ci_reason'))}]"
            lines.append(
                f"| {attr} | {s['subgroup']}{' ⚠' if s['small'] else ''} | "
                f"{s['n_with_finding']} | {_f(s['rate'], 3, s.get('reason'))} | {gap} |"
            )
    return lines


def _auc_ci(e: Mapping | None) -> str:
    """`AUC [lo–hi]`, or why it is undefined."""
    if not e or e.get("auc") is None:
        return _f(None, 3, (e or {}).get("undefined") or (e or {}).get("reason") or "not scored")
    ci = e.get("auc_ci")
    if not ci:
        return f"{e['auc']:.3f} [CI {_f(None, 3, e.get('auc_ci_reason'))}]"
    auc, lohi = ci_text(e["auc"], ci)
    return f"{auc} [{lohi}]"


def external_markdown(external: Mapping[str, Mapping[str, dict]], evals) -> list[str]:
    """results.md's section: per evaluation, finding × (internal AUC [CI], external AUC [CI],
    n, positives, decisions at the run's threshold, calibration)."""
    if not external:
        return []
    lines = [
        "",
        "## External validation",
        "",
        "Each run applied (`fastcxr evaluate`) to another dataset with its own preprocessing, "
        "precision and validation-chosen thresholds t. Internal: the run's test split; "
        "external: the evaluated split's images labelled 0 or 1 for the finding (n, "
        "positives). AUC CI: the report's method (above), over the patients of each set.",
    ]
    for name, by_run in external.items():
        first = next(iter(by_run.values()))
        lines += ["", f"### {name}", "",
                  f"- data: `{first['manifest']}` (sha256 `{first['manifest_sha256'][:12]}…`), "
                  f"split {first['split']}",
                  "- preprocessing applied: " + first["preprocessing"]["applied"],
                  f"- {first.get('calibration_method', '')}"]  # fmt: skip
        for run, m in by_run.items():
            for w in m.get("preprocessing_mismatch") or []:
                lines.append(f"- **preprocessing mismatch** ({run}): {w}")
            bad = m.get("images", {}).get("unreadable")
            if bad:
                lines.append(f"- {run}: {bad} unreadable image(s) left out (failures.csv)")
        lines += ["",
                  "| run | finding | internal AUC [95% CI] | external AUC [95% CI] | n | "
                  "positives | t | acc @ t | sens @ t | spec @ t | ECE | Brier |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for run, m in by_run.items():
            for f, e in m["findings"].items():
                why = e.get("reason")
                lines.append(
                    f"| {run} | {f} | {_auc_ci(evals.get(run, {}).get(f))} | {_auc_ci(e)} | "
                    f"{e['n']} | {e['positives']} | {_f(e['threshold'], 3, why)} | "
                    f"{_f(e['accuracy'], 3, why)} | {_f(e['sensitivity'], 3, why)} | "
                    f"{_f(e['specificity'], 3, why)} | {_f(e['ece'])} | {_f(e['brier'])} |"
                )
    return lines


def _template_text(template: str | Path | None) -> str:
    """The write-up that opens results.md ("" without one)."""
    if not template:
        return ""
    try:
        return Path(template).read_text().strip()
    except FileNotFoundError:
        raise MissingFile(f"--template {template}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or f"{type(e).__name__}: {e}"
        raise UsageError(f"--template {template}: cannot read it as text ({why})") from None


def _f(v, d=3, why: str | None = None) -> str:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return f"undefined ({why})" if why else "undefined"
    return f"{v:.{d}f}"


def _rule(by_f: Mapping[str, dict]) -> str:
    ch = next(iter(by_f.values()))["chosen_threshold"]
    return ch["method"] + (f" {ch['target']:g}" if ch.get("target") is not None else "")


def _selected(record: dict) -> str:
    sel = record.get("selected_stage")
    if isinstance(sel, dict):
        return ", ".join(f"{k}: {v}" for k, v in sel.items())
    return str(sel) if sel else "last (record predates stage selection)"


def results_markdown(intro, recs, evals, findings, ablations, pairs, figures, external=None,
                     audits=None, seeds=None) -> str:  # fmt: skip
    """results.md: the tables behind the figures, the policy, split sizes and the config,
    every external validation (`external_validations`) and `--seeds` series (`seeds`:
    [(folder, its seeds.json)])."""
    lines = ["# Results", ""]
    if recs:
        lines += [intro, ""] + config_markdown(recs, evals) + metrics_markdown(evals)
        lines += cost_markdown(recs)
    lines += pairs_markdown(pairs)
    for d, abl in ablations:
        lines += ablation_markdown(d, abl)
    lines += seeds_markdown(seeds or [])
    lines += external_markdown(external or {}, evals)
    lines += audit_markdown(audits or {})
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def config_markdown(recs, evals) -> list[str]:
    """The data and configuration of the runs, and each run's selected stage and thresholds."""
    first = next(iter(recs.values()))
    cfg = first["config"]
    tc = cfg["train"]
    data = cfg["data"]
    return ["## Data and configuration", "",
            f"- manifest: `{data['manifest']}` (sha256 `{data['sha256'][:12]}…`)"
            + (" — **synthetic data**" if data.get("synthetic") else ""),
            f"- label policy: uncertain={tc['uncertain']}, blank={tc['blank']}",
            "- split sizes (train and valid after the label policy; test: images scored for "
            f"at least one finding): {first['record'].get('split_sizes')}",
            f"- arch {tc['arch']}, {tc['size']}x{tc['size']}, batch {tc['batch_size']}, "
            f"pretrained={tc['pretrained']}, freeze style {tc['freeze_style']}, "
            f"seed {tc['seed']}",
            "- stages: " + ", ".join(f"{s['name']} ({s['unfreeze']})" for s in cfg["stages"]),
            "- software: " + ", ".join(f"{k} {v}" for k, v in cfg["environment"].items()
                                       if v),
            "", "## Per finding (test set)", "",
            "AUC CI: " + next(iter(next(iter(evals.values())).values()))["auc_ci_method"]
            + f"; threshold t per finding chosen on the validation split "
            f"({_rule(next(iter(evals.values())))}) and applied to test. "
            "Each finding is scored on the test images labelled 0 or 1 for it, the same "
            "images for every label policy and formulation.",
            "",
            "| run | selected stage (`--select best`: lowest validation loss) | thresholds |",
            "|---|---|---|",
            *[f"| {n} | {_selected(r['record'])} | "
              + ", ".join(f"{f} {_f(e['chosen_threshold'].get('threshold'))}"
                          for f, e in evals[n].items()) + " |"
              for n, r in recs.items()],
            ""]  # fmt: skip


METRIC_COLUMNS = ("run", "finding", "n", "auc", "auc_lo", "auc_hi", "pr_auc", "acc@0.5",
                  "threshold", "acc@t", "sens@t", "spec@t", "ppv@t", "npv@t", "f1@t", "brier",
                  "ece", "note")  # fmt: skip


def metrics_markdown(evals) -> list[str]:
    """Every run's metrics per finding on the test set, one row each."""
    cols = METRIC_COLUMNS
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, r in table(evals).iterrows():
        cells = (str(r[c]) if c in ("run", "finding", "n", "note") else _f(r[c]) for c in cols)
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def cost_markdown(recs) -> list[str]:
    lines = ["", "## Training cost", "", "| run | epochs | s/epoch | train time (s) |",
             "|---|---|---|---|"]  # fmt: skip
    for n, r in recs.items():
        s = r["record"]
        lines.append(
            f"| {n} | {s['epochs']} | {s['seconds_per_epoch']:.1f} | {s['train_seconds']:.0f} |"
        )
    return lines


def pairs_markdown(pairs) -> list[str]:
    """The paired comparisons of the runs' AUCs, Holm-adjusted."""
    if not pairs:
        return []
    lines = [
        "",
        "## Paired comparisons (DeLong's test clustered by patient, Obuchowski 1997; "
        "same test images)",
        "",
        "p (Holm): Holm-adjusted over every defined p-value of the table; an undefined p "
        "is left out of the family.",
        "",
        "| a | b | finding | patients | AUC a | AUC b | diff | 95% CI | p | p (Holm) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in pairs:
        ci, why = p["diff_ci"], p.get("reason")
        lines.append(
            f"| {p['a']} | {p['b']} | {p['finding']} | {p.get('patients', '')} | "
            f"{_f(p['auc_a'])} | {_f(p['auc_b'])} | {_f(p['auc_diff'], 3, why)} | "
            + (ci_text(p["auc_diff"], ci, sep=" to ")[1] if ci else _f(None, 3, why))
            + f" | {_f(p['p_value'], 4, why)} | "
            + f"{_f(p.get('p_holm'), 4, p.get('p_holm_reason'))} |"
        )
    return lines


def ablation_markdown(d: Path, abl: dict) -> list[str]:
    """Experiment I: one row per stage, ★ on the lowest validation loss."""
    found = abl["stages"][0]["findings"]
    lines = [
        "",
        f"## Experiment I — progressive unfreezing ({d.name})",
        "",
        f"★ lowest validation loss; the run's model: {_selected(abl)}. Accuracy at each "
        "stage's own validation-chosen threshold.",
        "",
        "| stage | unfrozen groups | trainable params | epochs | valid loss | "
        + " | ".join(f"{f} acc @ t | {f} AUC" for f in found)
        + " |",
        "|---|---|---|---|---|" + "---|---|" * len(found),
    ]
    for s in abl["stages"]:
        star = " ★" if s["name"] == abl["best_stage"] else ""
        cells = (f"{_f(m.get('accuracy'))} | {_f(m['auc'])}" for m in s["findings"].values())
        lines.append(
            f"| {s['name']}{star} | {len(s['unfrozen'])} | {s['trainable_params']:,} "
            f"| {s['epochs']} | {s['valid_loss']:.4f} | " + " | ".join(cells) + " |"
        )
    return lines
