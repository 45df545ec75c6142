"""The study's figures, from run records only. Each function returns a matplotlib Figure;
`build_report` saves them and writes results.md. Nothing here calls plt.show().
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import auc, roc_curve  # noqa: E402

from fastcxr.evaluation import EvalConfig, evaluate, pairwise, table, with_holm  # noqa: E402
from fastcxr.runs import RunError, is_complete, load_run  # noqa: E402
from fastcxr.seeds import SEEDS_FILE  # noqa: E402

COLORS = ["#1b6ca8", "#d1495b", "#2e933c", "#edae49", "#6a4c93", "#00798c"]


def _test(pred: pd.DataFrame) -> pd.DataFrame:
    return pred[pred["split"] == "test"] if "split" in pred.columns else pred


def confusion_figure(evals: Mapping[str, Mapping[str, dict]], findings) -> Figure:
    """Confusion matrices at each finding's threshold chosen on validation, one per
    formulation (rows) and finding (columns)."""
    fig, axes = plt.subplots(
        len(evals), len(findings), squeeze=False, figsize=(3.3 * len(findings), 3.0 * len(evals))
    )
    for r, (name, by_f) in enumerate(evals.items()):
        for c, f in enumerate(findings):
            ax = axes[r, c]
            ch = by_f[f]["chosen_threshold"]
            if "confusion" not in ch:
                ax.text(0.5, 0.5, f"undefined\n({ch.get('reason')})", ha="center", fontsize=8)
                ax.axis("off")
                continue
            k = ch["confusion"]
            cm = np.array([[k["tn"], k["fp"]], [k["fn"], k["tp"]]])
            ax.imshow(cm, cmap="Blues", vmin=0)
            for (i, j), v in np.ndenumerate(cm):
                ax.text(
                    j,
                    i,
                    str(v),
                    ha="center",
                    va="center",
                    fontsize=11,
                    color="white" if v > cm.max() / 2 else "black",
                )
            ax.set_xticks([0, 1], ["pred 0", "pred 1"])
            ax.set_yticks([0, 1], ["true 0", "true 1"])
            ax.set_title(f"{name} — {f}\nt = {ch['threshold']:.3f} ({ch['method']})", fontsize=9)
    fig.tight_layout()
    return fig


def accuracy_figure(evals: Mapping[str, Mapping[str, dict]], findings) -> Figure:
    """Accuracy at each finding's validation-chosen threshold, one bar per formulation."""
    fig, ax = plt.subplots(figsize=(1.6 + 1.8 * len(findings), 3.6))
    width = 0.8 / len(evals)
    for i, (name, by_f) in enumerate(evals.items()):
        vals = [by_f[f]["chosen_threshold"].get("accuracy") or np.nan for f in findings]
        xs = np.arange(len(findings)) + (i - (len(evals) - 1) / 2) * width
        bars = ax.bar(xs, vals, width, label=name, color=COLORS[i % len(COLORS)])
        ax.bar_label(bars, fmt="%.3f", fontsize=8, padding=2)
    ax.set_xticks(np.arange(len(findings)), findings)
    method = next(iter(next(iter(evals.values())).values()))["chosen_threshold"]["method"]
    ax.set_ylabel(f"accuracy (threshold: {method} on valid)")
    ax.set_ylim(0, 1.22)
    ax.legend(loc="upper center", ncol=len(evals), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


def roc_figure(preds: Mapping[str, pd.DataFrame], evals, finding: str) -> Figure:
    """ROC curves for one finding, one per formulation; AUC and its CI in the legend."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for i, (name, pred) in enumerate(preds.items()):
        t = _test(pred)
        e = evals[name][finding]
        if e["auc"] is None:
            continue
        t = t[t[f"y_{finding}"].notna()]  # scored images only
        fpr, tpr, _ = roc_curve(t[f"y_{finding}"].astype(int), t[f"p_{finding}"])
        ci = e["auc_ci"]
        label = f"{name}: AUC {e['auc']:.3f}" + (f" ({ci[0]:.3f}–{ci[1]:.3f})" if ci else "")
        ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], lw=1.8, label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC — {finding}")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def epochs_time_figure(summaries: Mapping[str, dict]) -> Figure:
    """Epochs trained against seconds per epoch, one point per formulation."""
    fig, ax = plt.subplots(figsize=(4.8, 3.6))
    for i, (name, s) in enumerate(summaries.items()):
        ax.scatter(
            s["epochs"],
            s["seconds_per_epoch"],
            s=60,
            color=COLORS[i % len(COLORS)],
            label=f"{name}: {s['train_seconds']:.0f} s total",
        )
    ax.set_xlabel("epochs trained (networks added up)")
    ax.set_ylabel("seconds per epoch")
    ax.margins(0.25)
    ax.set_ylim(bottom=0)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


MAX_MARKER_AREA = 200.0  # points², the bin with the most images


def marker_areas(counts, most: int) -> np.ndarray:
    """Marker areas (points²) proportional to `counts`, `most` images drawn at the largest."""
    return MAX_MARKER_AREA * np.asarray(counts, float) / max(most, 1)


def calibration_figure(evals, finding: str) -> Figure:
    """Reliability diagram for one finding: observed rate against mean prediction per bin, each
    marker's area proportional to its bin's images (`marker_areas`, shared by every run)."""
    fig, ax = plt.subplots(figsize=(4.6, 5.4))
    most = max((b["n"] for by_f in evals.values() for b in by_f[finding]["calibration"]),
               default=0)  # fmt: skip
    for i, (name, by_f) in enumerate(evals.items()):
        e = by_f[finding]
        bins = [b for b in e["calibration"] if b["n"]]
        x, y = [b["mean_pred"] for b in bins], [b["observed"] for b in bins]
        color = COLORS[i % len(COLORS)]
        ax.plot(x, y, "-", color=color, lw=1,
                label=f"{name}: ECE {e['ece']:.3f}, Brier {e['brier']:.3f}")  # fmt: skip
        ax.scatter(x, y, s=marker_areas([b["n"] for b in bins], most), color=color,
                   alpha=0.7, zorder=3)  # fmt: skip
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("mean predicted probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"Calibration — {finding} (marker area ∝ images; largest: {most})", fontsize=10)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), fontsize=8, frameon=False)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def ablation_figure(ablation: dict) -> Figure:
    """Experiment I: validation loss and per-finding test AUC per unfreezing stage; the best
    stage (lowest validation loss, ★) and the run's selected stage (`--select`, ringed) are
    marked on both panels."""
    st = ablation["stages"]
    names = [s["name"] for s in st]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6))
    a1.plot(names, [s["valid_loss"] for s in st], "o-", color=COLORS[0])
    best, selected = ablation.get("best_stage"), ablation.get("selected_stage")
    for ax in (a1, a2):
        if best in names:
            ax.axvline(names.index(best), color="grey", ls=":", lw=1)
            ax.text(names.index(best), 1.0, "★ best", transform=ax.get_xaxis_transform(),
                    ha="center", va="bottom", fontsize=7)  # fmt: skip
    by_net = selected if isinstance(selected, Mapping) else {"": selected}  # {network: stage}
    chosen = [n for n in names if n in by_net.values()]
    if chosen:
        ks = [names.index(n) for n in chosen]
        label = "selected: the run's model"
        if len(chosen) > 1:  # the networks of `single` chose different stages
            label += " (" + "; ".join(f"{n}: {s}" for n, s in by_net.items()) + ")"
        a1.plot(ks, [st[k]["valid_loss"] for k in ks], "o", ms=12, mfc="none", color="black",
                label=label)  # fmt: skip
        a1.legend(fontsize=8)
    a1.set_ylabel("best validation loss")
    a1.set_title("validation loss per stage")
    for i, f in enumerate(st[0]["findings"]):
        a2.plot(
            names,
            [s["findings"][f]["auc"] or np.nan for s in st],
            "o-",
            color=COLORS[(i + 1) % len(COLORS)],
            label=f,
        )
    a2.set_ylabel("test ROC AUC")
    a2.set_title("test AUC per stage")
    a2.legend(fontsize=8)
    for ax in (a1, a2):
        ax.tick_params(axis="x", rotation=20)
    fig.tight_layout()
    return fig


def restored_epochs(h: pd.DataFrame) -> np.ndarray:
    """Row positions of the epoch each stage restored: its lowest validation loss, the
    earliest on a tie (as `RestoreBest`, which keeps an epoch only when strictly better)."""
    loss, stage = h["valid_loss"].to_numpy(float), h["stage"].to_numpy()
    out = []
    for name in dict.fromkeys(stage):
        rows = np.flatnonzero(stage == name)
        finite = rows[np.isfinite(loss[rows])]
        if len(finite):
            out.append(finite[np.argmin(loss[finite])])
    return np.array(out, int)


def curves_figure(history: pd.DataFrame, title: str) -> Figure:
    """Training curves: train and validation loss per epoch, stages shaded, per network."""
    nets = list(history["network"].unique()) if "network" in history else [None]
    fig, axes = plt.subplots(1, len(nets), squeeze=False, figsize=(4.8 * len(nets), 3.6))
    for ax, net in zip(axes[0], nets):
        h = history[history["network"] == net] if net is not None else history
        x = np.arange(1, len(h) + 1)
        ax.plot(x, h["train_loss"], "o-", ms=3, color=COLORS[0], label="train loss")
        ax.plot(x, h["valid_loss"], "o-", ms=3, color=COLORS[1], label="valid loss")
        kept = restored_epochs(h)
        ax.plot(x[kept], h["valid_loss"].to_numpy()[kept], "o", ms=9, mfc="none",
                color="black", label="restored (best of its stage)")  # fmt: skip
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        for k, stage in enumerate(h["stage"].unique()):
            lo = x[h["stage"].to_numpy() == stage].min() - 0.5
            hi = x[h["stage"].to_numpy() == stage].max() + 0.5
            ax.axvspan(lo, hi, color="grey", alpha=0.08 if k % 2 else 0.0)
            ax.text(
                (lo + hi) / 2,
                1.0,
                stage,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="bottom",
                fontsize=7,
            )
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss")
        ax.set_title(f"{title} {net or ''}".strip(), fontsize=10, pad=14)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def tpr_gap_figure(audit: Mapping, title: str = "") -> Figure:
    """The subgroup audit's TPR gaps (subgroup − whole test set) with their 95% CIs: one
    panel per finding, subgroups grouped by attribute; hollow markers: fewer images than
    the audit's minimum size; a cross at 0: TPR undefined (no positive image)."""
    findings = list(audit["findings"])
    labels = [
        (a, s["subgroup"])
        for a, groups in next(iter(audit["findings"].values()))["by"].items()
        for s in groups
    ]
    fig, axes = plt.subplots(
        1,
        len(findings),
        figsize=(3.6 * len(findings) + 1.6, 0.32 * len(labels) + 1.6),
        sharey=True,
        squeeze=False,
    )
    attrs = list(dict.fromkeys(a for a, _ in labels))
    for ax, f in zip(axes[0], findings):
        pos = {
            (a, s["subgroup"]): s
            for a, groups in audit["findings"][f]["by"].items()
            for s in groups
        }
        for i, key in enumerate(labels):
            s = pos.get(key)
            color = COLORS[attrs.index(key[0]) % len(COLORS)]
            if s is None or s["tpr_gap"] is None:
                ax.plot([0], [i], "x", color="grey", ms=5)
                continue
            ci = s.get("tpr_gap_ci")
            if ci:
                ax.plot(ci, [i, i], "-", color=color, lw=1.6)
            ax.plot(
                [s["tpr_gap"]], [i], "o", ms=5, color=color, mfc="white" if s["small"] else color
            )
        ax.axvline(0, color="grey", lw=1, ls=":")
        whole = audit["findings"][f]["all"]
        tpr = "undefined" if whole["tpr"] is None else f"{whole['tpr']:.2f}"
        ax.set_title(f"{f} (TPR all {tpr})", fontsize=9)
        ax.set_xlabel("TPR gap to all")
    axes[0][0].set_yticks(range(len(labels)), [f"{a}: {s}" for a, s in labels], fontsize=8)
    axes[0][0].invert_yaxis()
    fig.suptitle(
        f"Subgroup TPR gaps{' — ' + title if title else ''} (hollow: n < {audit['min_size']})",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


def save_figure(fig: Figure, path: Path, **kwargs) -> None:
    fig.savefig(path, dpi=130, **kwargs)
    plt.close(fig)


def lr_find_figure(result: Mapping) -> Figure:
    """`fastcxr lr-find`: smoothed training loss against the head's learning rate, one line
    per stage and one panel per network; ● valley (fastai's default suggestion), ▲ minimum."""
    nets = result["networks"]
    fig, axes = plt.subplots(1, len(nets), figsize=(5.2 * len(nets), 4.2), squeeze=False)
    for ax, (net, stages) in zip(axes[0], nets.items()):
        for i, st in enumerate(stages):
            color = COLORS[i % len(COLORS)]
            lrs, losses = np.asarray(st["lrs"]), np.asarray(st["losses"])
            ax.plot(lrs, losses, color=color, lw=1.4, label=f"{st['stage']} ({st['unfreeze']})")
            for key, marker in (("valley", "o"), ("minimum", "^")):
                v = st.get(key)
                if v is not None and len(lrs):
                    ax.plot(
                        [v],
                        [np.interp(np.log(v), np.log(lrs), losses)],
                        marker,
                        color=color,
                        ms=7,
                        mfc="white" if key == "minimum" else color,
                    )
        ax.set_xscale("log")
        ax.set_xlabel("learning rate (head)")
        ax.set_ylabel("smoothed training loss")
        ax.set_title(f"{result['formulation']}: {net}", fontsize=9)
        ax.legend(fontsize=7, title="● valley  △ minimum", title_fontsize=7)
    fig.suptitle(
        f"Learning-rate finder — {result['arch']} {result['size']}px, batch "
        f"{result['batch_size']}, lr ratio {result['lr_ratio']:g}",
        fontsize=10,
    )
    fig.tight_layout()
    return fig


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
    return json.loads((run / "config.json").read_text())


def roc_seeds_figure(curves: Mapping[str, list[tuple]], finding: str, title: str) -> Figure:
    """ROC curves for one finding, one line per seed, one colour per formulation; the legend
    gives each formulation's AUC mean ± sd over its seeds. `curves`: name → [(seed, fpr,
    tpr, auc)]."""
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for i, (name, per_seed) in enumerate(curves.items()):
        aucs = np.array([a for *_, a in per_seed])
        sd = f" ± {aucs.std(ddof=1):.3f}" if len(aucs) > 1 else ""
        for j, (_, fpr, tpr, _) in enumerate(per_seed):
            label = f"{name}: AUC {aucs.mean():.3f}{sd} ({len(aucs)} seeds)" if j == 0 else None
            ax.plot(fpr, tpr, color=COLORS[i % len(COLORS)], lw=1.2, alpha=0.75, label=label)
    ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
    ax.set_xlabel("1 − specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(f"ROC per seed — {finding}\n{title}", fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_aspect("equal")
    fig.tight_layout()
    return fig


def seed_curves(path: Path, series: dict, finding: str) -> dict[str, list[tuple]]:
    """Each seed's test ROC curve for `finding`, by formulation (see `roc_seeds_figure`)."""
    out: dict[str, list[tuple]] = {}
    for seed in series["seeds"]:
        for name, run in seed_runs(path / f"seed-{seed}").items():
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
    sd = f" ± {a['sd']:.3f}" if a.get("sd") is not None else " (one seed: no sd)"
    return f"{a['mean']:.3f}{sd}", f"{a['min']:.3f}–{a['max']:.3f}"


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
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs, ablations, series = {}, [], []
    for d in map(Path, run_dirs):
        if (d / SEEDS_FILE).exists():  # a --seeds series: across seeds (RUN/seed-K: one seed)
            series.append((d, json.loads((d / SEEDS_FILE).read_text())))
            continue
        found, abl = _runs_of(d)
        runs.update(found)
        if abl:
            ablations.append((d, abl))
    written: list[Path] = []

    def save(fig: Figure, name: str) -> None:
        save_figure(fig, out / name)
        written.append(out / name)

    recs = {n: load_run(p) for n, p in runs.items()}
    findings = next(iter(recs.values()))["config"]["train"]["findings"] if recs else []
    evals = {
        n: evaluate(r["predictions"], findings, eval_cfg, r["config"].get("thresholds"))
        for n, r in recs.items()
    }
    if recs:
        preds = {n: r["predictions"] for n, r in recs.items()}
        summaries = {n: r["record"] for n, r in recs.items()}
        save(confusion_figure(evals, findings), "confusion.png")
        save(accuracy_figure(evals, findings), "accuracy.png")
        for f in findings:
            slug = f.lower().replace(" ", "_")
            save(roc_figure(preds, evals, f), f"roc_{slug}.png")
            save(calibration_figure(evals, f), f"calibration_{slug}.png")
        save(epochs_time_figure(summaries), "epochs_vs_seconds.png")
        for n, r in recs.items():
            save(curves_figure(r["history"], n), f"curves_{n}.png")
    for d, abl in ablations:
        save(ablation_figure(abl), f"ablation_{d.name}.png")
        save(curves_figure(load_run(d)["history"], "Experiment I"), f"curves_ablation_{d.name}.png")
    for d, s in series:
        what = "each seed's selected stage" if _is_ablation(d, s) else "seeds"
        title = f"{d.name}: {what} {', '.join(map(str, s['seeds']))}"
        for f in series_config(d, s)["train"]["findings"]:
            curves = seed_curves(d, s, f)
            if curves:
                slug = f.lower().replace(" ", "_")
                save(roc_seeds_figure(curves, f, title), f"roc_seeds_{d.name}_{slug}.png")
    audits = subgroup_audits(runs)
    for key, a in audits.items():
        if not a["stale"]:
            save(tpr_gap_figure(a, key), f"tpr_gaps_{key.replace('/', '_')}.png")
    intro = Path(template).read_text().strip() if template else ""
    md = results_markdown(
        intro,
        recs,
        evals,
        findings,
        ablations,
        with_holm(pairwise({n: r["predictions"] for n, r in recs.items()}, findings))
        if len(recs) > 1
        else [],
        [p.name for p in written],
        external=external_validations(runs, eval_cfg),
        audits=audits,
        seeds=series,
    )
    (out / "results.md").write_text(md)
    written.append(out / "results.md")
    return written


def external_validations(runs: Mapping[str, Path], eval_cfg: EvalConfig) -> dict[str, dict]:
    """Every evaluation (`fastcxr evaluate`) under the runs: name → {run → its metrics},
    rescored from its predictions with the report's CI settings."""
    from fastcxr.external import evaluations_of, read_evaluation

    out: dict[str, dict] = {}
    for n, p in runs.items():
        for folder in evaluations_of(p):
            out.setdefault(folder.name, {})[n] = read_evaluation(folder, eval_cfg)
    return out


def subgroup_audits(runs: Mapping[str, Path]) -> dict[str, dict]:
    """Every saved audit (`fastcxr audit`) under the runs: `run` or `run/evaluation` → it."""
    from fastcxr.audit import audits_of, read_audit

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
                for s in groups:
                    why = s.get("reasons") or {}
                    ci = s.get("tpr_gap_ci")
                    gap = (
                        "—"
                        if attr == "all"
                        else _f(s["tpr_gap"], 3, why.get("tpr"))
                        + (
                            f" [{ci[0]:+.3f} to {ci[1]:+.3f}]"
                            if ci
                            else f" [CI {_f(None, 3, why.get('tpr_gap_ci'))}]"
                            if s["tpr_gap"] is not None
                            else ""
                        )
                    )
                    lines.append(
                        f"| {f} | {attr} | {s['subgroup']}{' ⚠' if s['small'] else ''} | "
                        f"{s['n']} | {s['patients']} | {_f(s['prevalence'])} | "
                        f"{_auc_ci({**s, 'reason': why.get('auc')})} | "
                        f"{_f(s['tpr'], 3, why.get('tpr'))} | {_f(s['fpr'], 3, why.get('fpr'))}"
                        f" | {gap} |"
                    )
        if a.get("underdiagnosis"):
            lines += ["", a["underdiagnosis_rule"] + ":", "",
                      "| attribute | subgroup | images with a finding | underdiagnosis | "
                      "gap [95% CI] |", "|---|---|---|---|---|"]  # fmt: skip
            for attr, groups in a["underdiagnosis"].items():
                for s in groups:
                    ci = s.get("gap_ci")
                    lines.append(
                        f"| {attr} | {s['subgroup']}{' ⚠' if s['small'] else ''} | "
                        f"{s['n_with_finding']} | {_f(s['rate'], 3, s.get('reason'))} | "
                        f"{_f(s['gap'], 3, s.get('reason'))}"
                        + (f" [{ci[0]:+.3f} to {ci[1]:+.3f}]" if ci else "")
                        + " |"
                    )
    return lines


def _auc_ci(e: Mapping | None) -> str:
    """`AUC [lo–hi]`, or why it is undefined."""
    if not e or e.get("auc") is None:
        return _f(None, 3, (e or {}).get("undefined") or (e or {}).get("reason") or "not scored")
    ci = e.get("auc_ci")
    return f"{e['auc']:.3f} " + (
        f"[{ci[0]:.3f}–{ci[1]:.3f}]" if ci else f"[CI {_f(None, 3, e.get('auc_ci_reason'))}]"
    )


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
        first = next(iter(recs.values()))
        cfg = first["config"]
        tc = cfg["train"]
        data = cfg["data"]
        lines += [intro, "",
                  "## Data and configuration", "",
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
        t = table(evals)
        cols = [
            "run",
            "finding",
            "n",
            "auc",
            "auc_lo",
            "auc_hi",
            "pr_auc",
            "acc@0.5",
            "threshold",
            "acc@t",
            "sens@t",
            "spec@t",
            "ppv@t",
            "npv@t",
            "f1@t",
            "brier",
            "ece",
            "note",
        ]
        lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for _, r in t.iterrows():
            lines.append(
                "| "
                + " | ".join(
                    str(r[c]) if c in ("run", "finding", "n", "note") else _f(r[c]) for c in cols
                )
                + " |"
            )
        lines += [
            "",
            "## Training cost",
            "",
            "| run | epochs | s/epoch | train time (s) |",
            "|---|---|---|---|",
        ]
        for n, r in recs.items():
            s = r["record"]
            lines.append(
                f"| {n} | {s['epochs']} | {s['seconds_per_epoch']:.1f} | {s['train_seconds']:.0f} |"
            )
    if pairs:
        lines += [
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
                + (f"{_f(ci[0])} to {_f(ci[1])}" if ci else _f(None, 3, why))
                + f" | {_f(p['p_value'], 4, why)} | "
                + f"{_f(p.get('p_holm'), 4, p.get('p_holm_reason'))} |"
            )
    for d, abl in ablations:
        lines += [
            "",
            f"## Experiment I — progressive unfreezing ({d.name})",
            "",
            f"★ lowest validation loss; the run's model: {_selected(abl)}. Accuracy at each "
            "stage's own validation-chosen threshold.",
            "",
            "| stage | unfrozen groups | trainable params | epochs | valid loss | "
            + " | ".join(f"{f} acc @ t | {f} AUC" for f in abl["stages"][0]["findings"])
            + " |",
            "|---|---|---|---|---|" + "---|---|" * len(abl["stages"][0]["findings"]),
        ]
        for s in abl["stages"]:
            star = " ★" if s["name"] == abl["best_stage"] else ""
            lines.append(
                f"| {s['name']}{star} | {len(s['unfrozen'])} | {s['trainable_params']:,} "
                f"| {s['epochs']} | {s['valid_loss']:.4f} | "
                + " | ".join(
                    f"{_f(m.get('accuracy'))} | {_f(m['auc'])}" for m in s["findings"].values()
                )
                + " |"
            )
    lines += seeds_markdown(seeds or [])
    lines += external_markdown(external or {}, evals)
    lines += audit_markdown(audits or {})
    lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    return "\n".join(lines) + "\n"
