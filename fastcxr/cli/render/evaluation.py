"""Renderers of evaluate (a run on another dataset) and audit (subgroups)."""

from __future__ import annotations

from collections.abc import Mapping

from rich.markup import escape
from rich.text import Text

from fastcxr.cli.render.page import (
    Footnotes,
    Page,
    Table,
    fmt,
)
from fastcxr.evaluate.intervals import ci_text
from fastcxr.results import Audit, Evaluation, FindingAudit, Score, Subgroup


# -- external validation ------------------------------------------------------------------------
def auc_ci(m: Score | Mapping | None) -> str:
    """`AUC [lo–hi]`, or why the AUC or its CI is undefined."""
    m = None if m is None else Score.from_json(m)
    if m is None or m.auc is None:
        return fmt(None, why=(m and m.reason) or "not scored")
    if m.auc_ci:
        auc, lohi = ci_text(m.auc, m.auc_ci)
        return f"{auc}\n[{lohi}]"
    return f"{m.auc:.3f}\nCI {fmt(None, why=m.auc_ci_reason)}"


def _overlap_note(ov) -> str | None:
    """Why an evaluation is not external (shared images/patients, or the run's own data)."""
    if ov is None:
        return None
    if ov.images or ov.patients:
        return (
            f"[bold red]not an external validation:[/] {ov.images} image(s) and "
            f"{ov.patients} patient(s) are in the run's training or validation data "
            f"({escape('; '.join(ov.examples or []))})"
        )
    if ov.checked is False or ov.own_dataset:
        return f"[bold red]not an external validation:[/] {escape(ov.reason or '')}"
    return None


def evaluation(result: Evaluation | Mapping) -> Page:
    """`fastcxr evaluate`: per run (each formulation of a compare folder) and finding,
    internal against external AUC with CIs, the decisions at the run's threshold and
    calibration; mismatches and unreadable images on stderr."""
    result = Evaluation.from_json(result)
    runs = result.by_run()
    cols = ["finding", "internal AUC\n[95% CI]", "external AUC\n[95% CI]", "n", "pos.",
            "t", "acc\n@ t", "sens\n@ t", "spec\n@ t", "ECE\nBrier"]  # fmt: skip
    page = Page()
    note = _overlap_note(result.overlap)
    if note:
        page.err(note)
    first = next(iter(next(iter(runs.values())).findings.values()), Score())
    method = first.auc_ci_method or "percentile bootstrap over patients"
    for run, r in runs.items():
        shown = str(run).rstrip("/").rsplit("/", 1)[-1]
        kind = "external validation" if result.get("external", True) else "NOT external"
        t = Table(title=f"{shown} — {kind} {result.name} (split {result.split})")
        for c in cols:
            t.add_column(c, justify="left" if c == "finding" else "right",
                         min_width=13 if "AUC" in c else None)  # fmt: skip
        for f, m in r.findings.items():
            why = m.reason
            t.add_row(
                f, auc_ci((r.internal or {}).get(f)), auc_ci(m), str(m.n),
                str(m.positives), fmt(m.threshold, why=why), fmt(m.accuracy, why=why),
                fmt(m.sensitivity, why="no positive image" if not m.positives else why),
                fmt(m.specificity, why="no negative image" if m.n == m.positives else why),
                f"{fmt(m.ece)}\n{fmt(m.brier)}",
            )  # fmt: skip
        page.out(t, f"data: {result.manifest}")  # a path under the table: titles stay short
        for w in r.preprocessing_mismatch or []:
            page.err(f"[yellow]{escape(shown)}: preprocessing mismatch — {escape(w)}[/]")
        bad = r.images and r.images.unreadable
        if bad:
            page.err(
                f"[yellow]{escape(shown)}: {bad} unreadable image(s) left out (listed in "
                f"{escape(str(r.dir or ''))}/failures.csv)[/]"
            )
    return page.out(
        "internal: the run's own test split; external: the images of this split labelled 0 "
        f"or 1 for the finding; pos.: those labelled 1. AUC 95% CI: {method}; t: the run's "
        "threshold, chosen on its validation split; ECE above Brier. "
        + (result.calibration_method or "ECE over 10 equal-width bins"),
        f"written: {result.dir}",
    )


def _gap(gap: float | None, ci, ci_why: str | None, notes: Footnotes, why: str | None) -> str:
    """A gap to the whole set with its CI, or the marks of why either is undefined."""
    if gap is None:
        return notes.mark(why)
    if ci:
        shown, lohi = ci_text(gap, ci, signed=True)
        return f"{shown}\n[{lohi}]"
    return f"{gap:+.3f}\n[CI {notes.mark(ci_why) if ci_why else 'undefined'}]"


def _auc_short(s: Subgroup, notes: Footnotes) -> str:
    """AUC and its CI in a narrow cell (the reasons are in the JSON)."""
    if s.auc is None:
        return notes.mark(s.why("auc"))
    if not s.auc_ci:
        return f"{s.auc:.3f}\n[CI undefined]"
    auc, lohi = ci_text(s.auc, s.auc_ci)
    return f"{auc}\n[{lohi}]"


def _subgroup(s: Subgroup) -> str:
    return escape(str(s.subgroup)) + (" ⚠" if s.small else "")


def audit_table(title: str, m: FindingAudit | Mapping) -> Table:
    """One finding: the whole set, then each attribute's subgroups under its name; undefined
    values as marks with their reasons under the table."""
    m = FindingAudit.from_json(m)
    t, notes = Table(title=title), Footnotes()
    for c in ("subgroup", "n", "patients", "prev.", "AUC\n[95% CI]", "TPR\n@ t", "FPR\n@ t",
              "TPR gap\n[95% CI]"):  # fmt: skip
        t.add_column(c, justify="left" if c == "subgroup" else "right")
    for attr, groups in {"all": [m.all], **(m.by or {})}.items():
        if attr != "all":
            t.add_section()
            t.add_row(Text(escape(str(attr)), style="bold"))
        for s in groups:
            cells = [_subgroup(s), str(s.n), str(s.patients), fmt(s.prevalence, 2),
                     _auc_short(s, notes), notes.fmt(s.tpr, why=s.why("tpr")),
                     notes.fmt(s.fpr, why=s.why("fpr"))]  # fmt: skip
            # the gap's marks after the row's others: footnotes are numbered left to right
            cells.append("ref." if attr == "all" else _gap(
                s.tpr_gap, s.tpr_gap_ci, s.why("tpr_gap_ci"), notes, s.why("tpr")
            ))  # fmt: skip
            t.add_row(*cells)
    return notes.under(t)


def underdiagnosis_table(title: str, under: Mapping) -> Table:
    t, notes = Table(title=title), Footnotes()
    for c in ("attribute", "subgroup", "images with\na finding", "underdiagnosis",
              "gap\n[95% CI]"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("attribute", "subgroup") else "right")
    for attr, groups in under.items():
        for s in map(Subgroup.from_json, groups):
            t.add_row(escape(str(attr)), _subgroup(s), str(s.n_with_finding),
                      notes.fmt(s.rate, why=s.reason),
                      _gap(s.gap, s.gap_ci, s.gap_ci_reason, notes, s.reason))  # fmt: skip
    return notes.under(t)


def audit(result: Audit | Mapping) -> Page:
    """`fastcxr audit`: per audited run (or evaluation) and finding, a table of its subgroups
    by attribute; small subgroups marked ⚠, warnings on stderr."""
    runs = Audit.from_json(result).by_run()
    page = Page()
    first = next(iter(runs.values()))
    for name, a in runs.items():
        shown = str(name).rstrip("/").rsplit("/", 1)[-1]
        where = f"({a.kind}, split {a.split})"
        for f, m in a.findings.items():
            page.out(audit_table(f"{shown} — {f} — subgroup audit {where}", m))
        page.out(f"data: {a.manifest}")  # a path under the tables: titles stay short
        if a.underdiagnosis:
            title = f"{shown} — underdiagnosis (FPR of No Finding)"
            page.out(underdiagnosis_table(title, a.underdiagnosis))
        for w in a.warnings or []:
            page.err(f"[yellow]{escape(shown)}: {escape(w)}[/]")
    return page.out(
        f"t: the run's threshold, chosen on its validation split. {first.gap_rule}; ref.: "
        f"the whole set, the reference. AUC CI: {(first.ci or {}).get('method')}. ⚠: fewer "
        f"than {first.min_size} scored images. "
        + ("" if first.underdiagnosis else _sentence(first.underdiagnosis_rule)),
        *[f"written: {a.dir}" for a in runs.values() if a.dir],
    )


def _sentence(text: str) -> str:
    """`text` as a sentence: its first letter capital, a full stop at the end."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
