"""Renderers of the tools: bench, bench-prepare, predict, report."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from rich.markup import escape

from fastcxr.cli.render.page import (
    Page,
    Table,
    ratio,
)
from fastcxr.results import BenchResult, PrepareBench


# -- tools --------------------------------------------------------------------------------------
def bench(result: BenchResult | Mapping, defaults: bool = True) -> Page:
    """`fastcxr bench`: img/s per stage and freezing style; the ratios as median [range]
    over rounds, and a note on the rows whose rounds disagree."""
    result = BenchResult.from_json(result)
    sp = result.speed
    t = Table(
        title=f"Training img/s — {result.arch}, {result.size}px, batch "
        f"{result.batch_size}, {sp.precision}, channels_last={sp.channels_last}, "
        f"compile={sp.compile} on {result.device}"
    )
    cols = ["stage", "freezing", "limit", "fastcxr", "fastcxr / limit"]
    if defaults:
        cols += ["fastai defaults", "fastcxr / defaults"]
    if sp.compile:
        cols += ["compile s (fastcxr)"]
    for c in cols:
        t.add_column(c, justify="left" if c in ("stage", "freezing") else "right")
    for row in result.rows:
        cells = [
            row.stage,
            row.freeze_style,
            f"{row.limit_img_s:.1f}",
            f"{row.fastcxr_img_s:.1f}",
            ratio(*row.vs("limit")),
        ]
        if defaults:
            cells += [f"{row.defaults_img_s:.1f}", ratio(*row.vs("defaults"), "x")]
        if sp.compile:
            cells += [f"{row.compile_s['fastcxr']:.1f}"]
        t.add_row(*cells)
    page = Page().out(
        t,
        f"evaluation (no gradient, batch {2 * result.batch_size}): {result.eval_img_s:.1f} img/s",
    )
    if result.rounds:
        page.out(f"ratios: median [min–max] over {result.rounds} interleaved round(s) per stage")
    pj = result.projection
    if pj.available:
        page.out(
            f"projected `compare --preset paper` on {pj.train_images:,} training images "
            f"({pj.networks} networks x 4 stages x {pj.epochs_per_stage} epochs, "
            f"{pj.freeze_style} freezing, no early stop): {pj.hours:.2f} h"
        )
    wide = [r for r in result.rows if r.wide]
    if wide:
        page.err(
            "[yellow]rounds disagree (read these ratios with care): "
            + "; ".join(
                escape(f"{r.stage} {r.freeze_style}: {r.wide_reason or 'wide range'}") for r in wide
            )
            + "[/]"
        )
    return page


def bench_prepare(result: PrepareBench | Mapping, size: int) -> Page:
    """`fastcxr bench-prepare`: conversion images/s per core, fastcxr against the baseline."""
    r = PrepareBench.from_json(result)
    t = Table(
        title=f"Conversion of {r.rows}x{r.cols} {r.bits_stored}-bit "
        f"DICOMs to {size}x{size} PNG (one process)"
    )
    t.add_column("")
    t.add_column("images/s per core", justify="right")
    t.add_row(
        "baseline: pydicom + LUTs + float rescale + PIL resize + PNG",
        f"{r.baseline_images_per_s_per_core:.2f}",
    )
    t.add_row("fastcxr", f"{r.fastcxr_images_per_s_per_core:.2f}")
    return Page().out(
        t,
        f"fastcxr / baseline = {r.ratio:.2f}x; all of MIMIC-CXR (377,110 images) on 16 "
        f"cores ≈ {r.mimic_minutes_on_16_cores:.0f} min at this rate",
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
