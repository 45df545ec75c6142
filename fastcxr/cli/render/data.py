"""Renderers of the data commands: labels, prepare (with the demographics it found)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from rich.markup import escape

from fastcxr.cli.render.page import (
    Page,
    Table,
)


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
