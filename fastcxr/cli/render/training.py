"""Renderers of the training commands: compare, train, unfreeze-ablation (and its plan),
lr-find."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, TypeVar

from rich.markup import escape

from fastcxr.cli.render.page import (
    SELECT_TEXT,
    Footnotes,
    Page,
    Table,
    aggregate_table,
    fmt,
    stages,
    synthetic_note,
    threshold_label,
    threshold_rule,
)
from fastcxr.evaluate.intervals import ci_text
from fastcxr.results import (
    AblationPlan,
    AblationResult,
    CompareResult,
    LRFindResult,
    Pair,
    Result,
    SeedsResult,
    TrainResult,
)

R = TypeVar("R", bound=Result)


# -- training -----------------------------------------------------------------------------------
def compare(result: CompareResult | SeedsResult | Mapping, cfg: Mapping) -> Page:
    """`fastcxr compare`: one seed (table, AUC CIs, paired tests) or seeds (mean ± sd)."""
    result = read(result, CompareResult)
    page = Page().err(*synthetic_note(result))
    findings = cfg["findings"]
    title = f"Experiment II — formulations ({cfg['arch']}, {cfg['size']}px, {cfg['preset']})"
    if isinstance(result, SeedsResult):
        return page.out(
            aggregate_table(result, findings, title, "formulation"),
            f"threshold per finding: {cfg['threshold']} on each seed's validation split; "
            f"training time over all seeds {result.train_seconds:.0f} s — run records: "
            f"{result.run_dir}/seed-K",
        )
    t = Table(title=title)
    t.add_column("formulation")
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for c in ("epochs", "s/epoch", "train time (s)"):
        t.add_column(c, justify="right")
    for fname, r in result.formulations.items():
        nets = r.networks or []
        cells = [fname + (f" ({len(nets)} nets)" if len(nets) > 1 else "")]
        for f in findings:
            m = r.findings[f]
            auc = fmt(m.auc, why=m.reason)
            if m.auc_ci and m.auc is not None:
                shown, lohi = ci_text(m.auc, m.auc_ci)
                auc = f"{shown}\n({lohi})"
            else:
                auc += f"\nCI {fmt(None, why=m.auc_ci_reason)}"
            acc = fmt(m.accuracy, why=m.reason)
            if m.threshold is not None:
                acc += f"\nt={m.threshold:.3f}"
            cells += [acc, auc]
        cells += [str(r.epochs), f"{r.seconds_per_epoch:.1f}", f"{r.train_seconds:.0f}"]
        t.add_row(*cells)
    page.out(
        t,
        f"acc @ t: accuracy at each finding's threshold t, chosen ({threshold_rule(cfg)}) on "
        "the validation predictions; accuracy at 0.5 is in --json and `fastcxr report`.",
        f"AUC 95% CI: {result.auc_ci_method or ''}. Model reported and saved: "
        f"{SELECT_TEXT[cfg['select']]}: "
        + "; ".join(f"{k}: {stages(r.selected_stage)}" for k, r in result.formulations.items()),
    )
    if result.pairs:
        page.out(pairs_table(result.pairs))
    return page.out(f"run record: {result.run_dir}")


def read(result: Result | Mapping, one_seed: type[R]) -> R | SeedsResult:
    """A training command's result: a seed series (with `aggregate`) or one seed's."""
    if isinstance(result, Result):
        return result
    return (SeedsResult if "aggregate" in result else one_seed).from_json(result)


def pairs_table(pairs: Iterable[Pair | Mapping]) -> Table:
    """DeLong's paired test per finding and pair of formulations, with Holm's adjustment."""
    pt = Table(
        title="Paired comparison of AUCs (DeLong's test clustered by patient, "
        "Obuchowski 1997, on the same test images)"
    )
    for c in ("finding", "a − b", "patients", "AUC diff", "95% CI", "p", "p (Holm)"):
        pt.add_column(c, justify="left" if c in ("finding", "a − b") else "right")
    for p in map(Pair.from_json, pairs):
        ci, why = p.diff_ci, p.reason
        pt.add_row(
            p.finding,
            f"{p.a} − {p.b}",
            "" if p.patients is None else str(p.patients),
            fmt(p.auc_diff, 4, why),
            ci_text(p.auc_diff, ci, digits=4, signed=True, sep=" … ")[1]
            if ci
            else fmt(None, why=why),
            fmt(p.p_value, 4, why),
            fmt(p.p_holm, 4, p.p_holm_reason),
        )
    return pt


def train(result: TrainResult | SeedsResult | Mapping, cfg: Mapping, formulation: str,
          run_dir: Any) -> Page:  # fmt: skip
    """`fastcxr train`: per finding, accuracy at the chosen threshold and AUC (or seeds)."""
    result = read(result, TrainResult)
    page = Page().err(*synthetic_note(result))
    if isinstance(result, SeedsResult):
        return page.out(
            aggregate_table(result, cfg["findings"], formulation, "formulation"),
            f"training time over all seeds {result.train_seconds:.0f} s — {run_dir}",
        )
    t = Table(title=f"{formulation} ({cfg['arch']}, {cfg['size']}px)")
    for c in ("finding", threshold_label(cfg), "threshold", "acc @ 0.5", "ROC AUC"):
        t.add_column(c, justify="right" if c != "finding" else "left")
    for f, m in result.findings.items():
        why = m.reason
        t.add_row(
            f, fmt(m.accuracy, why=why), fmt(m.threshold, why=why),
            fmt(m.accuracy_at_05), fmt(m.auc, why=why),
        )  # fmt: skip
    compiled = f" (+ {result.compile_seconds:.0f} s compiling)" if cfg["compile"] else ""
    return page.out(
        t,
        f"selected stage ({cfg['select']}): {stages(result.selected_stage)}",
        f"{result.epochs} epochs, {result.seconds_per_epoch:.1f} s/epoch, "
        f"{result.train_seconds:.0f} s{compiled} — run record: {run_dir}",
    )


def ablation_plan(plan: AblationPlan | Mapping, cfg: Mapping, formulation: str) -> Page:
    """`fastcxr unfreeze-ablation --dry-run`: what each stage adds, and its parameters."""
    plan = AblationPlan.from_json(plan)
    t = Table(
        title=f"Experiment I plan — {cfg['arch']}, {formulation}, "
        f"{cfg['freeze_style']}-style freezing"
    )
    for c in ("stage", "adds", "trainable params", "Δ params", "epochs≤", "lr"):
        t.add_column(c, justify="left" if c in ("stage", "adds") else "right")
    prev, seen = 0, set()
    for s in plan.stages:
        new = [g for g in s.unfrozen if g not in seen]
        seen.update(new)
        shown = ", ".join(new[:3]) + (f" … ({len(new)} groups)" if len(new) > 3 else "")
        t.add_row(
            s.name,
            shown,
            f"{s.trainable_params:,}",
            f"{s.trainable_params - prev:+,}",
            str(s.max_epochs),
            s.lr if isinstance(s.lr, str) else f"{s.lr:g}",
        )
        prev = s.trainable_params
    return Page().out(t, f"total parameters: {plan.total_params:,}")


def ablation(result: AblationResult | SeedsResult | Mapping, cfg: Mapping, formulation: str,
             run_dir: Any) -> Page:  # fmt: skip
    """`fastcxr unfreeze-ablation`: test metrics after each stage, ★ the best by validation."""
    result = read(result, AblationResult)
    page = Page().err(*synthetic_note(result))
    findings = cfg["findings"]
    title = f"Experiment I — progressive unfreezing ({cfg['arch']}, {formulation})"
    if isinstance(result, SeedsResult):
        return page.out(
            aggregate_table(result, findings, title, "stage"),
            f"training time over all seeds {result.train_seconds:.0f} s — {run_dir}",
        )
    t, notes = Table(title=title), Footnotes()
    best = result.best_stage
    names = [s.name + (" ★" if s.name == best else "") for s in result.stages]
    t.add_column("stage", min_width=max(map(len, names)))  # the ★ stays beside its stage
    t.add_column("unfrozen")
    for c in ("trainable params", "epochs", "valid loss"):
        t.add_column(c, justify="right")
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for name, s in zip(names, result.stages):
        blocks = [g for g in s.unfrozen if g != "head"]
        cells = [
            name,
            "head"
            + (f" + 1 block ({blocks[0]})" if len(blocks) == 1 else "")
            + (f" + {len(blocks)} blocks ({blocks[0]}…)" if len(blocks) > 1 else ""),
            f"{s.trainable_params:,}",
            str(s.epochs),
            f"{s.valid_loss:.4f}",
        ]
        for f in findings:
            m = s.findings[f]
            cells += [notes.fmt(m.accuracy, why=m.reason), notes.fmt(m.auc, why=m.reason)]
        t.add_row(*cells, style="bold" if s.name == best else None)
    return page.out(
        notes.under(t),
        f"acc @ t: accuracy at each finding's threshold t, chosen ({threshold_rule(cfg)}) on "
        "the validation predictions.",
        _best_line(result) + f"; the run's model ({cfg['select']}): "
        f"{stages(result.selected_stage)} — run record: {result.run_dir}",
    )


def _best_line(result: AblationResult) -> str:
    """What ★ marks: the lowest validation loss, averaged over the networks when there are
    several (`single`), with each network's own best stage beside it."""
    by_net = result.best_stage_by_network or {}
    line = f"★ best stage by {result.best_stage_rule or 'validation loss'}: "
    line += result.best_stage
    if len(by_net) > 1:
        line += " (each network's own: " + ", ".join(f"{n} {s}" for n, s in by_net.items()) + ")"
    return line


def lr_find(result: LRFindResult | Mapping) -> Page:
    """`fastcxr lr-find`: per network and stage, the finder's suggestions."""
    result = LRFindResult.from_json(result)
    page = Page()
    for net, swept in result.networks.items():
        t = Table(
            title=f"{result.formulation}: {net} — learning-rate finder "
            f"({result.arch}, {result.size}px, batch {result.batch_size})"
        )
        for c in ("stage", "unfreezes", "groups", "configured lr", "valley", "minimum",
                  "iterations"):  # fmt: skip
            t.add_column(c, justify="left" if c in ("stage", "unfreezes") else "right")
        for s in swept:
            lr = s.configured_lr
            t.add_row(
                escape(s.stage), escape(s.unfreeze), str(len(s.unfrozen)),
                lr if isinstance(lr, str) else f"{lr:.2e}",
                fmt(s.valley, 2) if s.valley is None else f"{s.valley:.2e}",
                fmt(s.minimum, 2) if s.minimum is None else f"{s.minimum:.2e}",
                str(s.iterations),
            )  # fmt: skip
        page.out(t)
    files = result.files or {}
    return page.out(
        "valley: fastai's default suggestion (what --lr find trains with); minimum: a tenth of "
        "the rate at the lowest loss. The rate is the head's; the other unfrozen groups follow "
        f"at lr / {result.lr_ratio:g} and between. Every stage swept from the starting "
        "weights (nothing trained); `--lr find` on a training command sweeps at each stage's "
        "real start.",
        *[f"written: {files[k]}" for k in ("json", "plot") if k in files],
    )
