"""The `fastcxr` command line: thin commands that call the library and render with rich.

One module per family of commands (`training`, `datasets`, `tools`), the options they share
(`options`), pure renderers from result dicts to tables (`render`), and what surrounds every
command's work (`guard`: signals, stdout, warnings, the one mapping of expected errors).
Importing this package loads typer and rich, not torch: each command imports the library
it needs when it runs, so `fastcxr --help` and `fastcxr version` answer at once.
"""

from __future__ import annotations

import typer

from fastcxr.cli import audit, datasets, evaluate, lr_find, tools, training

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Train chest-radiograph classifiers fast and honestly, on fastai.",
)
prepare_app = typer.Typer(
    no_args_is_help=True, help="Build a manifest and an 8-bit image cache from a dataset."
)
app.add_typer(prepare_app, name="prepare")

# In the order `fastcxr --help` lists them.
app.command("version")(tools.version)
app.command("compare")(training.compare)
app.command("train")(training.train)
app.command("unfreeze-ablation")(training.unfreeze_ablation)
app.command("lr-find")(lr_find.lr_find)
app.command("labels")(datasets.labels)
app.command("bench-prepare")(tools.bench_prepare)
app.command("bench")(tools.bench)
app.command("report")(tools.report)
app.command("predict")(tools.predict)
app.command("evaluate")(evaluate.evaluate)
app.command("audit")(audit.audit)
prepare_app.command("synthetic")(datasets.synthetic)
prepare_app.command("mimic")(datasets.mimic)
prepare_app.command("chexpert")(datasets.chexpert)
prepare_app.command("nih")(datasets.nih)


def main() -> None:  # pragma: no cover
    """The `fastcxr` console script."""
    app()


__all__ = ["app", "main", "prepare_app"]
