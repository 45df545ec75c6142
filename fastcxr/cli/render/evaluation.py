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


# -- external validation ------------------------------------------------------------------------
def auc_ci(m: Mapping | None) -> str:
    """`AUC [lo–hi]`, or why the AUC or its CI is undefined."""
    if not m or m.get("auc") is None:
        return fmt(None, why=(m or {}).get("reason") or "not scored")
    ci = m.get("auc_ci")
    if ci:
        auc, lohi = ci_text(m["auc"], ci)
        return f"{auc}\n[{lohi}]"
    return f"{m['auc']:.3f}\nCI {fmt(None, why=m.get('auc_ci_reason'))}"


def evaluation(result: Mapping) -> Page:
    """`fastcxr evaluate`: per run (each formulation of a compare folder) and finding,
    internal against external AUC with CIs, the decisions at the run's threshold and
    calibration; mismatches and unreadable images on stderr."""
    runs = result["runs"] if "runs" in result else {result["run"]: result}
    ov = result.get("overlap") or {}
    if ov.get("images") or ov.get("patients"):
        page_note = (
            f"[bold red]not an external validation:[/] {ov['images']} image(s) and "
            f"{ov['patients']} patient(s) are in the run's training or validation data "
            f"({escape('; '.join(ov.get('examples', [])))})"
        )
    elif ov and (not ov.get("checked", True) or ov.get("own_dataset")):
        page_note = f"[bold red]not an external validation:[/] {escape(ov.get('reason') or '')}"
    else:
        page_note = None
    cols = ["finding", "internal AUC\n[95% CI]", "external AUC\n[95% CI]", "n", "pos.",
            "t", "acc\n@ t", "sens\n@ t", "spec\n@ t", "ECE\nBrier"]  # fmt: skip
    page = Page()
    if page_note:
        page.err(page_note)
    first = next(iter(next(iter(runs.values()))["findings"].values()), {})
    method = first.get("auc_ci_method") or "percentile bootstrap over patients"
    for run, r in runs.items():
        shown = str(run).rstrip("/").rsplit("/", 1)[-1]
        kind = "external validation" if result.get("external", True) else "NOT external"
        t = Table(title=f"{shown} — {kind} {result['name']} (split {result['split']})")
        for c in cols:
            t.add_column(c, justify="left" if c == "finding" else "right",
                         min_width=13 if "AUC" in c else None)  # fmt: skip
        for f, m in r["findings"].items():
            why = m.get("reason")
            t.add_row(
                f, auc_ci(r.get("internal", {}).get(f)), auc_ci(m), str(m["n"]),
                str(m["positives"]), fmt(m["threshold"], why=why), fmt(m["accuracy"], why=why),
                fmt(m["sensitivity"], why="no positive image" if not m["positives"] else why),
                fmt(m["specificity"], why="no negative image" if m["n"] == m["positives"] else why),
                f"{fmt(m['ece'])}\n{fmt(m['brier'])}",
            )  # fmt: skip
        page.out(t, f"data: {result['manifest']}")  # a path under the table: titles stay short
        for w in r.get("preprocessing_mismatch") or []:
            page.err(f"[yellow]{escape(shown)}: preprocessing mismatch — {escape(w)}[/]")
        bad = (r.get("images") or {}).get("unreadable")
        if bad:
            page.err(
                f"[yellow]{escape(shown)}: {bad} unreadable image(s) left out (listed in "
                f"{escape(str(r.get('dir', '')))}/failures.csv)[/]"
            )
    return page.out(
        "internal: the run's own test split; external: the images of this split labelled 0 "
        f"or 1 for the finding; pos.: those labelled 1. AUC 95% CI: {method}; t: the run's "
        "threshold, chosen on its validation split; ECE above Brier. "
        + result.get("calibration_method", "ECE over 10 equal-width bins"),
        f"written: {result['dir']}",
    )


def _gap(s: Mapping, notes: Footnotes, key: str = "tpr_gap", why: str | None = None) -> str:
    ci = s.get(f"{key}_ci")
    if s.get(key) is None:
        return notes.mark(why)
    if ci:
        gap, lohi = ci_text(s[key], ci, signed=True)
        return f"{gap}\n[{lohi}]"
    ci_why = s.get("reasons", {}).get(f"{key}_ci") or s.get(f"{key}_ci_reason")
    return f"{s[key]:+.3f}\n[CI {notes.mark(ci_why) if ci_why else 'undefined'}]"


def _auc_short(s: Mapping, notes: Footnotes) -> str:
    """AUC and its CI in a narrow cell (the reasons are in the JSON)."""
    if s.get("auc") is None:
        return notes.mark(s.get("reasons", {}).get("auc"))
    ci = s.get("auc_ci")
    if not ci:
        return f"{s['auc']:.3f}\n[CI undefined]"
    auc, lohi = ci_text(s["auc"], ci)
    return f"{auc}\n[{lohi}]"


def _subgroup(s: Mapping) -> str:
    return escape(str(s["subgroup"])) + (" ⚠" if s["small"] else "")


def audit_table(title: str, m: Mapping) -> Table:
    """One finding: the whole set, then each attribute's subgroups under its name; undefined
    values as marks with their reasons under the table."""
    t, notes = Table(title=title), Footnotes()
    for c in ("subgroup", "n", "patients", "prev.", "AUC\n[95% CI]", "TPR\n@ t", "FPR\n@ t",
              "TPR gap\n[95% CI]"):  # fmt: skip
        t.add_column(c, justify="left" if c == "subgroup" else "right")
    for attr, groups in {"all": [m["all"]], **m["by"]}.items():
        if attr != "all":
            t.add_section()
            t.add_row(Text(escape(str(attr)), style="bold"))
        for s in groups:
            why = s.get("reasons", {})
            t.add_row(
                _subgroup(s), str(s["n"]), str(s["patients"]), fmt(s["prevalence"], 2),
                _auc_short(s, notes), notes.fmt(s["tpr"], why=why.get("tpr")),
                notes.fmt(s["fpr"], why=why.get("fpr")),
                "ref." if attr == "all" else _gap(s, notes, why=why.get("tpr")),
            )  # fmt: skip
    return notes.under(t)


def underdiagnosis_table(title: str, under: Mapping) -> Table:
    t, notes = Table(title=title), Footnotes()
    for c in ("attribute", "subgroup", "images with\na finding", "underdiagnosis",
              "gap\n[95% CI]"):  # fmt: skip
        t.add_column(c, justify="left" if c in ("attribute", "subgroup") else "right")
    for attr, groups in under.items():
        for s in groups:
            t.add_row(escape(str(attr)), _subgroup(s), str(s["n_with_finding"]),
                      notes.fmt(s["rate"], why=s.get("reason")),
                      _gap(s, notes, "gap", s.get("reason")))  # fmt: skip
    return notes.under(t)


def audit(result: Mapping) -> Page:
    """`fastcxr audit`: per audited run (or evaluation) and finding, a table of its subgroups
    by attribute; small subgroups marked ⚠, warnings on stderr."""
    runs = result["runs"] if "runs" in result else {result["source"]: result}
    page = Page()
    first = next(iter(runs.values()))
    for name, a in runs.items():
        shown = str(name).rstrip("/").rsplit("/", 1)[-1]
        where = f"({a['kind']}, split {a['split']})"
        for f, m in a["findings"].items():
            page.out(audit_table(f"{shown} — {f} — subgroup audit {where}", m))
        page.out(f"data: {a['manifest']}")  # a path under the tables: titles stay short
        if a.get("underdiagnosis"):
            title = f"{shown} — underdiagnosis (FPR of No Finding)"
            page.out(underdiagnosis_table(title, a["underdiagnosis"]))
        for w in a.get("warnings") or []:
            page.err(f"[yellow]{escape(shown)}: {escape(w)}[/]")
    return page.out(
        f"t: the run's threshold, chosen on its validation split. {first['gap_rule']}; ref.: "
        f"the whole set, the reference. AUC CI: {first['ci']['method']}. ⚠: fewer than "
        f"{first['min_size']} scored images. "
        + ("" if first.get("underdiagnosis") else _sentence(first["underdiagnosis_rule"])),
        *[f"written: {a['dir']}" for a in runs.values() if a.get("dir")],
    )


def _sentence(text: str) -> str:
    """`text` as a sentence: its first letter capital, a full stop at the end."""
    text = text.strip()
    return text[:1].upper() + text[1:] + ("" if text.endswith(".") else ".")
