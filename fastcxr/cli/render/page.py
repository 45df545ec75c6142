"""The pieces every renderer uses: `Page` (what a command shows), `Table` (a rich table that
fits the terminal), cells, footnotes and notes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from copy import copy

from rich.console import Console, ConsoleOptions, RenderableType
from rich.table import Table as RichTable

from fastcxr.evaluate.intervals import shown_digits
from fastcxr.results import Result, SeedsResult, Spread

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


def spread(a: Spread | Mapping, digits: int = 3) -> str:
    """mean ± sd across seeds, with the range."""
    a = Spread.from_json(a)
    if a.mean is None:
        return fmt(None, why=a.reason)
    digits = shown_digits(a.mean, a.min, a.max, digits=digits)
    sd = f" ± {a.sd:.{digits}f}" if a.sd is not None else " ± undefined (one seed)"
    return f"{a.mean:.{digits}f}{sd}\n[{a.min:.{digits}f}–{a.max:.{digits}f}]"


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
def synthetic_note(result: Result) -> list[str]:
    if not getattr(result, "synthetic", None):
        return []
    return [
        "[yellow]Data: the built-in SYNTHETIC dataset (not patient data); "
        "numbers show the pipeline works, not clinical performance.[/]"
    ]


def aggregate_table(
    result: SeedsResult, findings: Sequence[str], title: str, row_label: str
) -> Table:
    t = Table(title=f"{title} — mean ± sd [range] over seeds {result.seeds}")
    t.add_column(row_label)
    for f in findings:
        t.add_column(f"{f}\nacc @ t", justify="right")
        t.add_column(f"{f}\nAUC", justify="right")
    for row, by_f in result.aggregate.items():
        cells = [row]
        for f in findings:
            cells += [spread(by_f[f].accuracy), spread(by_f[f].auc)]
        t.add_row(*cells)
    return t
