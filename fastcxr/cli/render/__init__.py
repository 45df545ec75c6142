"""Result dicts → what a command shows: rich `Table`s and lines, nothing run, nothing written.

Each renderer takes a command's result (the dict `--json` prints) and the settings the table
names (a `TrainConfig.to_dict()` or a few values) and returns a `Page`: the renderables for
stdout, in order with the notes for stderr (rich markup, every user-supplied value escaped).
Pure: no I/O and no imports beyond rich, so each is unit-tested on a hand-made dict.
"""

from fastcxr.cli.render.data import labels, prepare, render_demographics
from fastcxr.cli.render.evaluation import auc_ci, audit, evaluation
from fastcxr.cli.render.page import (
    SELECT_TEXT,
    Footnotes,
    Page,
    Table,
    fair_share,
    fmt,
    ratio,
    spread,
    stages,
    threshold_label,
    threshold_rule,
)
from fastcxr.cli.render.tools import bench, bench_prepare, predict, report
from fastcxr.cli.render.training import ablation, ablation_plan, compare, lr_find, train

__all__ = [
    "SELECT_TEXT", "Footnotes", "Page", "Table", "ablation", "ablation_plan", "audit",
    "auc_ci", "bench", "bench_prepare", "compare", "evaluation", "fair_share", "fmt", "labels",
    "lr_find", "predict", "prepare", "ratio", "render_demographics", "report", "spread",
    "stages", "threshold_label", "threshold_rule", "train",
]  # fmt: skip
