"""The study's figures. Each function takes what a run record holds and returns a matplotlib
Figure; `fastcxr.evaluate.report` reads the runs, saves the figures and writes results.md.
Nothing here calls plt.show().
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from fastcxr.evaluate.intervals import ci_text  # noqa: E402

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
        if ci:
            auc, lohi = ci_text(e["auc"], ci)
            label = f"{name}: AUC {auc} ({lohi})"
        else:
            label = f"{name}: AUC {e['auc']:.3f}"
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
