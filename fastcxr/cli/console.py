"""Where the command line writes: results on stdout, everything else (progress, training log,
notes, errors) on stderr."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.markup import escape

if TYPE_CHECKING:
    from fastcxr.cli.render import Page

# Tables stay readable when piped or logged (rich would otherwise fall back to 80 columns).
# Results on stdout are never read as markup (they hold user text: paths, stage names);
# stderr's colours are written with `esc` around every user-supplied value.
out = Console(width=None if sys.stdout.isatty() else 120, markup=False)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 120)


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
    msg = " ".join(msg.split())
    err.print(f"[bold red]error:[/] {esc(msg)}", soft_wrap=True)
    raise typer.Exit(2)


def progress():
    """A progress bar on stderr: count, images per second and time left."""
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
            return Text(f"{task.speed:.1f} img/s" if task.speed else "– img/s")

    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=err,
        transient=True,
    )
