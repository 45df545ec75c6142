"""Result dicts → what a command shows: rich `Table`s and lines, nothing run, nothing written.

Each renderer takes a command's result (the dict `--json` prints) and the settings the table
names (a `TrainConfig.to_dict()` or a few values) and returns a `Page`: the renderables for
stdout, in order with the notes for stderr (rich markup, every user-supplied value escaped).
Pure: no I/O and no imports beyond rich, so each is unit-tested on a hand-made dict.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from copy import copy
from typing import Any

from rich.console import Console, ConsoleOptions, RenderableType
from rich.markup import escape
from rich.table import Table as RichTable
from rich.text import Text

SELECT_TEXT = {
    "best": "the stage with the lowest validation loss",
    "last": "the schedule's last stage (--select last)",
}


class Page:
    """What a command shows: renderables for stdout and markup lines for stderr, in order."""

    def __init__(self) -> None:
        self.items: list[tuple[str, RenderableType]] = []

    def out(self, *items: RenderableType) -> Page:
        self.items += [("out", x) for x in items]
        return self

    def err(self, *lines: str) -> Page:
        self.items += [("err", x) for x in lines]
        return self

    @property
    def stdout(self) -> list[RenderableType]:
        return [x for s, x in self.items if s == "out"]

    @property
    def stderr(self) -> list[RenderableType]:
        return [x for s, x in self.items if s == "err"]


class Table(RichTable):
    """A rich `Table` that fits its console without cutting a word.

    Rich alone narrows the widest columns first and cuts the words of a column with long
    ones. Here, when the table is wider than the console, every column first gets its longest
    word, then the rest is shared: each column gets what shows its cells on one line, or an
    equal share of what is left (max-min fair). When the longest words alone are too wide, the
    padding between columns goes first."""

    def __rich_console__(self, console: Console, options: ConsoleOptions):
        table = self
        if sum(r.minimum for r in self._ranges(console, options)) > self._room(options):
            table = copy(self)
            table.collapse_padding, table.pad_edge = True, False
        yield from RichTable.__rich_console__(table, console, options)

    def _room(self, options: ConsoleOptions) -> int:
        return (self.width or options.max_width) - self._extra_width

    def _ranges(self, console: Console, options: ConsoleOptions) -> list:
        options = options.update_width(self._room(options))
        return [self._measure_column(console, options, c) for c in self.columns]

    def _calculate_column_widths(self, console: Console, options: ConsoleOptions) -> list[int]:
        ranges = [self._measure_column(console, options, c) for c in self.columns]
        lo, hi = [r.minimum for r in ranges], [r.maximum for r in ranges]
        if sum(hi) <= options.max_width or sum(lo) > options.max_width:
            return super()._calculate_column_widths(console, options)
        extra = fair_share(options.max_width - sum(lo), [b - a for a, b in zip(lo, hi)])
        return [a + e for a, e in zip(lo, extra)]


def fair_share(spare: int, needs: Sequence[int]) -> list[int]:
    """`spare` split over `needs`: the smallest needs met first, the rest shared evenly."""
    got = [0] * len(needs)
    order = sorted(range(len(needs)), key=lambda i: needs[i])
    for k, i in enumerate(order):
        got[i] = min(needs[i], spare // (len(order) - k))
        spare -= got[i]
    for i in reversed(order):  # what integer division left, to the largest needs
        if spare and got[i] < needs[i]:
            got[i], spare = got[i] + 1, spare - 1
    return got


# -- cells --------------------------------------------------------------------------------------
def fmt(v, digits: int = 3, why: str | None = None) -> str:
    """A number, or `undefined (why)` for None/NaN."""
    if v is None or (isinstance(v, float) and v != v):
        return f"undefined ({why})" if why else "undefined"
    return f"{v:.{digits}f}"


def stages(selected) -> str:
    """A run's selected stage(s): one name, or network: name pairs."""
    if selected is None:
        return "last (a record from before stage selection)"
    if isinstance(selected, dict):
        vals = set(selected.values())
        return (
            next(iter(vals))
            if len(vals) == 1
            else ", ".join(f"{k} {v}" for k, v in selected.items())
        )
    return str(selected)


def spread(a: Mapping, digits: int = 3) -> str:
    """mean ± sd across seeds, with the range."""
    if a["mean"] is None:
        return fmt(None, why=a.get("reason"))
    sd = f" ± {a['sd']:.{digits}f}" if a["sd"] is not None else " ± undefined (one seed)"
    return f"{a['mean']:.{digits}f}{sd}\n[{a['min']:.{digits}f}–{a['max']:.{digits}f}]"


def threshold_rule(cfg: Mapping) -> str:
    """How each finding's threshold t was chosen on validation: `youden`, `sensitivity 0.9`."""
    t = cfg["threshold"]
    return t if t == "youden" else f"{t} {cfg['threshold_target']:g}"


def threshold_label(cfg: Mapping) -> str:
    return f"acc @ t\n({threshold_rule(cfg)})"


SUPERSCRIPT = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")


class Footnotes:
    """Undefined cells as a short mark, `–¹`, each reason numbered once and listed under the
    table (`caption`): a long reason would otherwise widen its column on every row."""

    def __init__(self) -> None:
        self.reasons: list[str] = []

    def fmt(self, v, digits: int = 3, why: str | None = None) -> str:
        """A number, or the mark of why it is undefined (None/NaN)."""
        if v is None or (isinstance(v, float) and v != v):
            return self.mark(why)
        return f"{v:.{digits}f}"

    def mark(self, why: str | None) -> str:
        why = why or "no reason recorded"
        if why not in self.reasons:
            self.reasons.append(why)
        return "–" + str(self.reasons.index(why) + 1).translate(SUPERSCRIPT)

    def caption(self) -> str | None:
        """`¹ undefined: why` per reason, or None when every cell is defined."""
        return (
            "\n".join(
                f"{str(i).translate(SUPERSCRIPT)} undefined: {why}"
                for i, why in enumerate(self.reasons, 1)
            )
            or None
        )

    def under(self, t: Table) -> Table:
        """`t` with the footnotes as its caption, left-aligned."""
        t.caption, t.caption_justify = self.caption(), "left"
        return t


def ratio(median, rng: Sequence | None, suffix: str = "") -> str:
    """A ratio over bench rounds: `median [min–max]` (the median alone without a range)."""
    cell = f"{median:.2f}{suffix}"
    if rng:
        cell += f" [{rng[0]:.2f}–{rng[1]:.2f}]"
    return cell


# -- notes --------------------------------------------------------------------------------------
def synthetic_note(result: Mapping) -> list[str]:
    if not result.get("synthetic"):
        return []
    return [
        "[yellow]Data: the built-in SYNTHETIC dataset (not patient data); "
        "numbers show the pipeline works, not clinical performance.[/]"
    ]


def aggregate_table(result: Mapping, findings: Sequence[str], title: str, row_label: str) -> Table:
    t = Table(title=f"{title} — mean ± sd [range] over seeds {result['seeds']}")
    t.add_column(row_label)
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for row, by_f in result["aggregate"].items():
        cells = [row]
        for f in findings:
            cells += [spread(by_f[f]["accuracy"]), spread(by_f[f]["auc"])]
        t.add_row(*cells)
    return t


# -- training -----------------------------------------------------------------------------------
def compare(result: Mapping, cfg: Mapping) -> Page:
    """`fastcxr compare`: one seed (table, AUC CIs, paired tests) or seeds (mean ± sd)."""
    page = Page().err(*synthetic_note(result))
    findings = cfg["findings"]
    title = f"Experiment II — formulations ({cfg['arch']}, {cfg['size']}px, {cfg['preset']})"
    if "aggregate" in result:
        return page.out(
            aggregate_table(result, findings, title, "formulation"),
            f"threshold per finding: {cfg['threshold']} on each seed's validation split; "
            f"training time over all seeds {result['train_seconds']:.0f} s — run records: "
            f"{result['run_dir']}/seed-K",
        )
    t = Table(title=title)
    t.add_column("formulation")
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for c in ("epochs", "s/epoch", "train time (s)"):
        t.add_column(c, justify="right")
    for fname, r in result["formulations"].items():
        cells = [fname + (f" ({len(r['networks'])} nets)" if len(r["networks"]) > 1 else "")]
        for f in findings:
            m = r["findings"][f]
            ci = m.get("auc_ci")
            auc = fmt(m["auc"], why=m.get("reason"))
            auc += (
                f"\n({ci[0]:.3f}–{ci[1]:.3f})"
                if ci
                else f"\nCI {fmt(None, why=m.get('auc_ci_reason'))}"
            )
            acc = fmt(m["accuracy"], why=m.get("reason"))
            if m.get("threshold") is not None:
                acc += f"\nt={m['threshold']:.3f}"
            cells += [acc, auc]
        cells += [str(r["epochs"]), f"{r['seconds_per_epoch']:.1f}", f"{r['train_seconds']:.0f}"]
        t.add_row(*cells)
    page.out(
        t,
        f"acc @ t: accuracy at each finding's threshold t, chosen ({threshold_rule(cfg)}) on "
        "the validation predictions; accuracy at 0.5 is in --json and `fastcxr report`.",
        f"AUC 95% CI: {result.get('auc_ci_method', '')}. Model reported and saved: "
        f"{SELECT_TEXT[cfg['select']]}: "
        + "; ".join(
            f"{k}: {stages(r.get('selected_stage'))}" for k, r in result["formulations"].items()
        ),
    )
    if result.get("pairs"):
        page.out(pairs_table(result["pairs"]))
    return page.out(f"run record: {result['run_dir']}")


def pairs_table(pairs: Iterable[Mapping]) -> Table:
    """DeLong's paired test per finding and pair of formulations, with Holm's adjustment."""
    pt = Table(
        title="Paired comparison of AUCs (DeLong's test clustered by patient, "
        "Obuchowski 1997, on the same test images)"
    )
    for c in ("finding", "a − b", "patients", "AUC diff", "95% CI", "p", "p (Holm)"):
        pt.add_column(c, justify="left" if c in ("finding", "a − b") else "right")
    for p in pairs:
        ci, why = p["diff_ci"], p.get("reason")
        pt.add_row(
            p["finding"],
            f"{p['a']} − {p['b']}",
            str(p.get("patients", "")),
            fmt(p["auc_diff"], 4, why),
            f"{ci[0]:+.4f} … {ci[1]:+.4f}" if ci else fmt(None, why=why),
            fmt(p["p_value"], 4, why),
            fmt(p.get("p_holm"), 4, p.get("p_holm_reason")),
        )
    return pt


def train(result: Mapping, cfg: Mapping, formulation: str, run_dir: Any) -> Page:
    """`fastcxr train`: per finding, accuracy at the chosen threshold and AUC (or seeds)."""
    page = Page().err(*synthetic_note(result))
    if "aggregate" in result:
        return page.out(
            aggregate_table(result, cfg["findings"], formulation, "formulation"),
            f"training time over all seeds {result['train_seconds']:.0f} s — {run_dir}",
        )
    t = Table(title=f"{formulation} ({cfg['arch']}, {cfg['size']}px)")
    for c in ("finding", threshold_label(cfg), "threshold", "acc @ 0.5", "ROC AUC"):
        t.add_column(c, justify="right" if c != "finding" else "left")
    for f, m in result["findings"].items():
        why = m.get("reason")
        t.add_row(
            f, fmt(m["accuracy"], why=why), fmt(m["threshold"], why=why),
            fmt(m["accuracy_at_0.5"]), fmt(m["auc"], why=why),
        )  # fmt: skip
    compiled = f" (+ {result['compile_seconds']:.0f} s compiling)" if cfg["compile"] else ""
    return page.out(
        t,
        f"selected stage ({cfg['select']}): {stages(result['selected_stage'])}",
        f"{result['epochs']} epochs, {result['seconds_per_epoch']:.1f} s/epoch, "
        f"{result['train_seconds']:.0f} s{compiled} — run record: {run_dir}",
    )


def ablation_plan(plan: Mapping, cfg: Mapping, formulation: str) -> Page:
    """`fastcxr unfreeze-ablation --dry-run`: what each stage adds, and its parameters."""
    t = Table(
        title=f"Experiment I plan — {cfg['arch']}, {formulation}, "
        f"{cfg['freeze_style']}-style freezing"
    )
    for c in ("stage", "adds", "trainable params", "Δ params", "epochs≤", "lr"):
        t.add_column(c, justify="left" if c in ("stage", "adds") else "right")
    prev, seen = 0, set()
    for s in plan["stages"]:
        new = [g for g in s["unfrozen"] if g not in seen]
        seen.update(new)
        shown = ", ".join(new[:3]) + (f" … ({len(new)} groups)" if len(new) > 3 else "")
        t.add_row(
            s["name"],
            shown,
            f"{s['trainable_params']:,}",
            f"{s['trainable_params'] - prev:+,}",
            str(s["max_epochs"]),
            s["lr"] if isinstance(s["lr"], str) else f"{s['lr']:g}",
        )
        prev = s["trainable_params"]
    return Page().out(t, f"total parameters: {plan['total_params']:,}")


def ablation(result: Mapping, cfg: Mapping, formulation: str, run_dir: Any) -> Page:
    """`fastcxr unfreeze-ablation`: test metrics after each stage, ★ the best by validation."""
    page = Page().err(*synthetic_note(result))
    findings = cfg["findings"]
    title = f"Experiment I — progressive unfreezing ({cfg['arch']}, {formulation})"
    if "aggregate" in result:
        return page.out(
            aggregate_table(result, findings, title, "stage"),
            f"training time over all seeds {result['train_seconds']:.0f} s — {run_dir}",
        )
    t, notes = Table(title=title), Footnotes()
    names = [
        s["name"] + (" ★" if s["name"] == result["best_stage"] else "") for s in result["stages"]
    ]
    t.add_column("stage", min_width=max(map(len, names)))  # the ★ stays beside its stage
    t.add_column("unfrozen")
    for c in ("trainable params", "epochs", "valid loss"):
        t.add_column(c, justify="right")
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for name, s in zip(names, result["stages"]):
        blocks = [g for g in s["unfrozen"] if g != "head"]
        cells = [
            name,
            "head"
            + (f" + 1 block ({blocks[0]})" if len(blocks) == 1 else "")
            + (f" + {len(blocks)} blocks ({blocks[0]}…)" if len(blocks) > 1 else ""),
            f"{s['trainable_params']:,}",
            str(s["epochs"]),
            f"{s['valid_loss']:.4f}",
        ]
        for f in findings:
            m, why = s["findings"][f], s["findings"][f].get("reason")
            cells += [notes.fmt(m["accuracy"], why=why), notes.fmt(m["auc"], why=why)]
        t.add_row(*cells, style="bold" if s["name"] == result["best_stage"] else None)
    return page.out(
        notes.under(t),
        f"acc @ t: accuracy at each finding's threshold t, chosen ({threshold_rule(cfg)}) on "
        "the validation predictions.",
        _best_line(result) + f"; the run's model ({cfg['select']}): "
        f"{stages(result['selected_stage'])} — run record: {result['run_dir']}",
    )


def _best_line(result: Mapping) -> str:
    """What ★ marks: the lowest validation loss, averaged over the networks when there are
    several (`single`), with each network's own best stage beside it."""
    by_net = result.get("best_stage_by_network") or {}
    line = f"★ best stage by {result.get('best_stage_rule', 'validation loss')}: "
    line += result["best_stage"]
    if len(by_net) > 1:
        line += " (each network's own: " + ", ".join(f"{n} {s}" for n, s in by_net.items()) + ")"
    return line


# -- data ---------------------------------------------------------------------------------------
def labels(result: Mapping, findings: Sequence[str], policy: str) -> Page:
    """`fastcxr labels`: label combinations per split, and each finding's raw counts."""
    t = Table(title=f"Label combinations ({', '.join(findings)}) under {policy}")
    t.add_column("split")
    combos = list(next(iter(result["splits"].values()))["combinations"])
    for c in combos:
        t.add_column(f"({c})", justify="right")
    t.add_column("kept / images", justify="right")
    for split, r in result["splits"].items():
        t.add_row(
            split, *[str(r["combinations"][c]) for c in combos], f"{r['kept']} / {r['images']}"
        )
    ft = Table(title="Raw labels per finding")
    for c in ("split", "finding", "1", "0", "-1", "blank"):
        ft.add_column(c, justify="left" if c in ("split", "finding") else "right")
    for split, r in result["splits"].items():
        for f, counts in r["findings"].items():
            ft.add_row(split, f, *[str(counts[k]) for k in ("1", "0", "-1", "blank")])
    return render_demographics(result, Page().out(t, ft))


def render_demographics(result: Mapping, page: Page | None = None) -> Page:
    """`fastcxr labels`: images per split by sex and by age group (a note instead when the
    manifest records neither)."""
    page = page or Page()
    splits = {s: r["demographics"] for s, r in result["splits"].items() if "demographics" in r}
    if not splits:
        return page
    known = any(
        n for d in splits.values() for part in ("sex", "age") for k, n in d[part].items()
        if k != "unknown"
    )  # fmt: skip
    if not known:
        return page.err("no sex or age recorded in this manifest (none in the dataset, or "
                        "prepared before fastcxr wrote the demographic columns)")  # fmt: skip
    first = next(iter(splits.values()))
    t = Table(title="Images by sex and age group")
    t.add_column("split")
    sex_label = {"F": "female", "M": "male", "unknown": "sex unknown"}
    for c in first["sex"]:
        t.add_column(sex_label.get(c, c), justify="right")
    for c in first["age"]:
        t.add_column(f"age {c}", justify="right")
    for split, d in splits.items():
        t.add_row(split, *[str(d["sex"][c]) for c in first["sex"]],
                  *[str(d["age"][c]) for c in first["age"]])  # fmt: skip
    return page.out(t)


def prepare(report: Mapping, root: Any, out_dir: Any) -> Page:
    """`fastcxr prepare …`: images, conversions, failures and split sizes."""
    t = Table()
    t.add_column("")
    t.add_column("", justify="right")
    for k in ("images", "converted", "skipped", "failures"):
        t.add_row(k, str(report[k]))
    for k, v in report["splits"].items():
        t.add_row(f"split {k}", str(v))
    page = Page().out(f"prepared {root} → {out_dir}", t)
    if report["failures"]:
        page.err(
            f"[yellow]{report['failures']} file(s) could not be read or were skipped (e.g. not "
            f"a radiograph modality): see {escape(str(out_dir))}/failures*.csv[/]"
        )
    if report["manifest"] is None:
        page.err("shard done; run again without --shard to write the manifest")
    return page


# -- tools --------------------------------------------------------------------------------------
def bench(result: Mapping, defaults: bool = True) -> Page:
    """`fastcxr bench`: img/s per stage and freezing style; the ratios as median [range]
    over rounds, and a note on the rows whose rounds disagree."""
    sp = result["speed"]
    t = Table(
        title=f"Training img/s — {result['arch']}, {result['size']}px, batch "
        f"{result['batch_size']}, {sp['precision']}, channels_last={sp['channels_last']}, "
        f"compile={sp['compile']} on {result['device']}"
    )
    cols = ["stage", "freezing", "limit", "fastcxr", "fastcxr / limit"]
    if defaults:
        cols += ["fastai defaults", "fastcxr / defaults"]
    if sp["compile"]:
        cols += ["compile s (fastcxr)"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "freezing") else "right")
    for row in result["rows"]:
        cells = [
            row["stage"],
            row["freeze_style"],
            f"{row['limit_img_s']:.1f}",
            f"{row['fastcxr_img_s']:.1f}",
            ratio(_median(row, "limit"), row.get("fastcxr_vs_limit_range")),
        ]
        if defaults:
            cells += [
                f"{row['defaults_img_s']:.1f}",
                ratio(_median(row, "defaults"), row.get("fastcxr_vs_defaults_range"), "x"),
            ]
        if sp["compile"]:
            cells += [f"{row['compile_s']['fastcxr']:.1f}"]
        t.add_row(*cells)
    page = Page().out(
        t,
        f"evaluation (no gradient, batch {2 * result['batch_size']}): "
        f"{result['eval_img_s']:.1f} img/s",
    )
    rounds = result.get("rounds")
    if rounds:
        page.out(f"ratios: median [min–max] over {rounds} interleaved round(s) per stage")
    pj = result["projection"]
    if pj["available"]:
        page.out(
            f"projected `compare --preset paper` on {pj['train_images']:,} training images "
            f"({pj['networks']} networks x 4 stages x {pj['epochs_per_stage']} epochs, "
            f"{pj['freeze_style']} freezing, no early stop): {pj['hours']:.2f} h"
        )
    wide = [r for r in result["rows"] if r.get("wide")]
    if wide:
        page.err(
            "[yellow]rounds disagree (read these ratios with care): "
            + "; ".join(
                escape(f"{r['stage']} {r['freeze_style']}: {r.get('wide_reason') or 'wide range'}")
                for r in wide
            )
            + "[/]"
        )
    return page


def bench_prepare(result: Mapping, size: int) -> Page:
    """`fastcxr bench-prepare`: conversion images/s per core, fastcxr against the baseline."""
    t = Table(
        title=f"Conversion of {result['rows']}x{result['cols']} {result['bits_stored']}-bit "
        f"DICOMs to {size}x{size} PNG (one process)"
    )
    t.add_column("")
    t.add_column("images/s per core", justify="right")
    t.add_row(
        "baseline: pydicom + LUTs + float rescale + PIL resize + PNG",
        f"{result['baseline_images_per_s_per_core']:.2f}",
    )
    t.add_row("fastcxr", f"{result['fastcxr_images_per_s_per_core']:.2f}")
    return Page().out(
        t,
        f"fastcxr / baseline = {result['ratio']:.2f}x; all of MIMIC-CXR (377,110 images) on 16 "
        f"cores ≈ {result['mimic_minutes_on_16_cores']:.0f} min at this rate",
    )


def predict(summary: Mapping, cam_dir: Any = None, export_dir: Any = None) -> Page:
    """`fastcxr predict`: how many images, where the CSV is; each unreadable file on stderr."""
    page = Page().out(
        f"predicted {summary['predicted']} image(s) on {summary['device']} → {summary['csv']}"
    )
    for r in summary["failures"]:
        page.err(f"[yellow]could not read[/] {escape(str(r['file']))}: {escape(str(r['reason']))}")
    if summary["cams"]:
        page.out(f"wrote {summary['cams']} Grad-CAM overlays to {cam_dir}")
    if summary["exported"]:
        page.out(f"exported to {export_dir}")
    return page


def report(files: Iterable) -> Page:
    """`fastcxr report`: the files it wrote."""
    return Page().out(*(f"wrote {f}" for f in files))


def _median(row: dict, other: str) -> float:
    """A bench row's fastcxr/OTHER ratio: the median over its rounds (older results: the
    quotient of its img/s)."""
    return row.get(f"fastcxr_vs_{other}_median", row[f"fastcxr_vs_{other}"])


# -- external validation ------------------------------------------------------------------------
def auc_ci(m: Mapping | None) -> str:
    """`AUC [lo–hi]`, or why the AUC or its CI is undefined."""
    if not m or m.get("auc") is None:
        return fmt(None, why=(m or {}).get("reason") or "not scored")
    ci = m.get("auc_ci")
    tail = f"[{ci[0]:.3f}–{ci[1]:.3f}]" if ci else f"CI {fmt(None, why=m.get('auc_ci_reason'))}"
    return f"{m['auc']:.3f}\n{tail}"


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
        return f"{s[key]:+.3f}\n[{ci[0]:+.3f}–{ci[1]:+.3f}]"
    ci_why = s.get("reasons", {}).get(f"{key}_ci")
    return f"{s[key]:+.3f}\n[CI {notes.mark(ci_why) if ci_why else 'undefined'}]"


def _auc_short(s: Mapping, notes: Footnotes) -> str:
    """AUC and its CI in a narrow cell (the reasons are in the JSON)."""
    if s.get("auc") is None:
        return notes.mark(s.get("reasons", {}).get("auc"))
    ci = s.get("auc_ci")
    return f"{s['auc']:.3f}\n" + (f"[{ci[0]:.3f}–{ci[1]:.3f}]" if ci else "[CI undefined]")


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


def lr_find(result: Mapping) -> Page:
    """`fastcxr lr-find`: per network and stage, the finder's suggestions."""
    page = Page()
    for net, stages in result["networks"].items():
        t = Table(
            title=f"{result['formulation']}: {net} — learning-rate finder "
            f"({result['arch']}, {result['size']}px, batch {result['batch_size']})"
        )
        for c in ("stage", "unfreezes", "groups", "configured lr", "valley", "minimum",
                  "iterations"):  # fmt: skip
            t.add_column(c, justify="left" if c in ("stage", "unfreezes") else "right")
        for s in stages:
            lr = s["configured_lr"]
            t.add_row(
                escape(s["stage"]), escape(s["unfreeze"]), str(len(s["unfrozen"])),
                lr if isinstance(lr, str) else f"{lr:.2e}",
                fmt(s["valley"], 2) if s["valley"] is None else f"{s['valley']:.2e}",
                fmt(s["minimum"], 2) if s["minimum"] is None else f"{s['minimum']:.2e}",
                str(s["iterations"]),
            )  # fmt: skip
        page.out(t)
    files = result.get("files", {})
    return page.out(
        "valley: fastai's default suggestion (what --lr find trains with); minimum: a tenth of "
        "the rate at the lowest loss. The rate is the head's; the other unfrozen groups follow "
        f"at lr / {result['lr_ratio']:g} and between. Every stage swept from the starting "
        "weights (nothing trained); `--lr find` on a training command sweeps at each stage's "
        "real start.",
        *[f"written: {files[k]}" for k in ("json", "plot") if k in files],
    )
