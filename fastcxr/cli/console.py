"""Where the command line writes: results on stdout, everything else (progress, training log,
notes, errors) on stderr."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from fastcxr.cli.render import Page


def width(stream) -> int | None:
    """The console width: a terminal's own, or COLUMNS when it is set (rich reads both);
    otherwise 120, so that tables stay readable when piped or logged (rich would fall back
    to 80 columns)."""
    if stream.isatty() or os.environ.get("COLUMNS", "").strip().isdigit():
        return None
    return 120


# Results on stdout are never read as markup (they hold user text: paths, stage names);
# stderr's colours are written with `esc` around every user-supplied value.
out = Console(width=width(sys.stdout), markup=False)
err = Console(stderr=True, width=width(sys.stderr))


def esc(value) -> str:
    """A value shown inside stderr's markup, escaped so that `[red]` or `[/]` stay text."""
    return escape(str(value))


def show(page: Page) -> None:
    """Print what a renderer made, in its order: results to stdout, notes to stderr."""
    for stream, item in page.items:
        (out if stream == "out" else err).print(item)


def fail(msg: str) -> NoReturn:
    """One line on stderr (user text is never read as markup), exit status 2."""
    if "Original Traceback" in msg:  # raised in a DataLoader worker: torch adds its traceback
        msg = msg.strip().splitlines()[-1].partition(": ")[2] or msg
    # raised in a fastai callback: fastai puts where in front of the message
    msg = re.sub(r"^Exception occured in `\w+` when calling event `\w+`:\s*", "", msg.strip())
    msg = " ".join(msg.split())
    err.print(f"[bold red]error:[/] {esc(msg)}", soft_wrap=True)
    raise typer.Exit(2)


def progress(enabled: bool = True, console: Console | None = None):
    """Progress bars on stderr: done/total, the rate (a task's `unit` field, img by default)
    and the time left. Shown only on a terminal and when `enabled` (not with --json); they
    vanish when done, leaving the lines printed meanwhile."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        ProgressColumn,
        TextColumn,
        TimeRemainingColumn,
    )
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            unit = task.fields.get("unit", "img")
            if not task.speed:
                return Text(f"– {unit}/s")
            if task.speed < 1:
                return Text(f"{1 / task.speed:.1f} s/{unit}")
            return Text(f"{task.speed:.1f} {unit}/s")

    console = console or err
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not (enabled and console.is_terminal),
    )


class Bars:
    """The library's progress events as bars (`progress`): `{"event": "progress", "id",
    "label", "done", "total", "unit"}` moves bar `id`, a new label restarts it (its rate and
    time left count from then), and `{"event": "progress", "id", "end": True}` removes it."""

    def __init__(self, enabled: bool = True, console: Console | None = None):
        self.bar = progress(enabled, console)
        self.tasks: dict[str, tuple] = {}  # id → (rich task id, label)

    def __call__(self, ev: Mapping) -> None:
        key = ev["id"]
        if ev.get("end"):
            task, _ = self.tasks.pop(key, (None, None))
            if task is not None:
                self.bar.remove_task(task)
            return
        label, done, total = ev["label"], ev["done"], ev.get("total")
        task, shown = self.tasks.get(key, (None, None))
        if task is None:
            task = self.bar.add_task(label, total=total, completed=done, unit=ev.get("unit"))
        elif shown != label:
            self.bar.reset(task, total=total, completed=done, description=label)
        else:
            self.bar.update(task, total=total, completed=done)
        self.tasks[key] = (task, label)
        if shown != label:  # drawn now, not at the next tick: a short phase is seen too
            self.bar.refresh()


_bars: list[Bars] = []  # the bars `report` moves: those of the innermost `reporting` block


@contextmanager
def reporting(enabled: bool = True, console: Console | None = None) -> Iterator[Bars]:
    """While the block runs, `report` shows the library's progress events as bars on stderr
    (a terminal only, and not when `enabled` is False: --json)."""
    bars = Bars(enabled, console)
    _bars.append(bars)
    try:
        with bars.bar:
            yield bars
    finally:
        _bars.remove(bars)


def report(ev: Mapping) -> bool:
    """Show `ev` if it is a progress event (True), inside `reporting`; other events: False."""
    if ev.get("event") != "progress":
        return False
    if _bars:
        _bars[-1](ev)
    return True
