"""A formulation's run record, written from its networks' results: `write_record`.

Files (see `fastcxr.runtime.runs`): config.json, history.csv, predictions.csv, metrics.json and
record.json (written last: the run is complete); the checkpoints are then removed.
"""

from __future__ import annotations

import shutil

import numpy as np
import pandas as pd

from fastcxr.data import scored
from fastcxr.evaluate.metrics import all_metrics
from fastcxr.evaluate.metrics import thresholds as thresholds_for
from fastcxr.findings import NO_FINDING, NO_FINDING_RULE
from fastcxr.runtime.distributed import barrier, is_main, world_size
from fastcxr.runtime.runs import environment, mark_complete, write_csv, write_json
from fastcxr.train.network import Job, NetworkResult

TEST_SET_RULE = (
    "each finding is scored on the test images whose raw label for it is 0 or 1: the same "
    "images for every label policy, formulation and seed (the policy chooses the training "
    "and validation images and their targets; thresholds are chosen on the validation images "
    "labelled 0 or 1)"
)
HEADLINE = ("accuracy", "auc", "threshold", "accuracy_at_0.5", "sensitivity", "specificity",
            "n", "positives", "reason")  # fmt: skip


def headline(m: dict) -> dict:
    """The metrics a summary shows per finding."""
    return {k: m[k] for k in HEADLINE}


def assemble(job: Job, results: list[NetworkResult], split: str, stage: str | None = None):
    """(n, k) probabilities of `split`: each network's columns from `stage`, or from its
    selected stage."""
    findings = job.cfg.findings
    out = np.full((len(job.test if split == "test" else job.valid), len(findings)), np.nan)
    for r in results:
        cols = [findings.index(f) for f in r.net.findings]
        by_stage = r.test if split == "test" else r.valid
        out[:, cols] = by_stage[stage or r.selected_stage]
    return out


def _thresholds(job: Job, valid_probs: np.ndarray) -> dict[str, float | None]:
    cfg = job.cfg
    return thresholds_for(job.labels("valid"), valid_probs, cfg.findings, cfg.threshold,
                          cfg.threshold_target)  # fmt: skip


def _threshold_record(job: Job, values: dict) -> dict:
    return {"method": job.cfg.threshold, "target": job.cfg.threshold_target,
            "chosen_on": "valid", "values": values}  # fmt: skip


def summarize(job: Job, results: list[NetworkResult], metrics: dict, thresholds: dict,
              wall_seconds: float) -> dict:  # fmt: skip
    """The formulation's summary (`record.json`; what `train --json` prints)."""
    networks = [r.summary for r in results]
    epochs = sum(n["epochs"] for n in networks)
    train_seconds = sum(n["train_seconds"] for n in networks)
    y_test = job.labels("test")
    return {
        "formulation": job.form.name, "description": job.form.description,
        "findings": {f: headline(m) for f, m in metrics.items()},
        "thresholds": _threshold_record(job, thresholds),
        "select": job.cfg.select,
        "selected_stage": {r.net.name: r.selected_stage for r in results},
        "epochs": epochs, "seconds_per_epoch": train_seconds / max(epochs, 1),
        "train_seconds": train_seconds, "networks": networks,
        "compile_seconds": sum(n.get("compile_seconds", 0.0) for n in networks),
        "split_sizes": job.df["split"].value_counts().to_dict(),
        "test_images_scored": {f: int((~np.isnan(y_test[:, i])).sum())
                               for i, f in enumerate(job.cfg.findings)},
        "wall_seconds": wall_seconds,
    }  # fmt: skip


def write_record(job: Job, data, results: list[NetworkResult], wall_seconds: float) -> dict:
    """Metrics of the selected model and of every stage, then the record files (rank 0);
    returns the summary."""
    findings, y_test = job.cfg.findings, job.labels("test")
    probs, valid_probs = assemble(job, results, "test"), assemble(job, results, "valid")
    thresholds = _thresholds(job, valid_probs)
    metrics = all_metrics(y_test, probs, findings, thresholds)
    per_stage = {}
    for s in job.stages:
        t_s = _thresholds(job, assemble(job, results, "valid", s.name))
        per_stage[s.name] = all_metrics(y_test, assemble(job, results, "test", s.name),
                                        findings, t_s)  # fmt: skip
    summary = summarize(job, results, metrics, thresholds, wall_seconds)
    if is_main():
        _write_config(job, data, results, thresholds)
        write_csv(
            job.run_dir / "history.csv", pd.DataFrame([r for x in results for r in x.history])
        )
        pred_df = pd.concat([predictions(job.test, probs, findings, "test"),
                             predictions(job.valid, valid_probs, findings, "valid")],
                            ignore_index=True)  # fmt: skip
        write_csv(job.run_dir / "predictions.csv", pred_df)
        rest = {k: v for k, v in summary.items() if k != "findings"}
        write_json(job.run_dir / "metrics.json",
                   {"findings": metrics, "per_stage": per_stage, **rest})  # fmt: skip
        mark_complete(job.run_dir, summary)
        shutil.rmtree(job.run_dir / "checkpoints", ignore_errors=True)  # the record is complete
    barrier()
    return summary


def _write_config(job: Job, data, results: list[NetworkResult], thresholds: dict) -> None:
    cfg = job.cfg
    write_json(
        job.run_dir / "config.json",
        {
            "train": cfg.to_dict(),
            "formulation": job.form.name,
            "networks": [r.net.name for r in results],
            "stages": [s.__dict__ for s in job.stages],
            "data": data.describe(),
            "preprocessing": job.prep.to_dict(),
            "test_set": TEST_SET_RULE,
            "label_policy": {"uncertain": cfg.uncertain, "blank": cfg.blank,
                             "applies_to": ["train", "valid"],
                             **({"no_finding": NO_FINDING_RULE} if NO_FINDING in cfg.findings
                                else {})},
            "thresholds": _threshold_record(job, thresholds),
            **_lr_found(results),
            "environment": {**environment(), "processes": world_size()},
            "speed": job.speed.to_dict(),
        },
    )  # fmt: skip


def _lr_found(results: list[NetworkResult]) -> dict:
    """`--lr find`: per network and stage, the finder's suggestions and the rate used."""
    found = {r.net.name: {s["name"]: s["lr_find"] for s in r.summary["stages"] if "lr_find" in s}
             for r in results}  # fmt: skip
    return {"lr_find": found} if any(found.values()) else {}


def predictions(rows: pd.DataFrame, probs: np.ndarray, findings, split: str) -> pd.DataFrame:
    """Per image: its certain label per finding (blank where it is not scored on it) and the
    selected model's probability."""
    out = rows[["image", "patient_id"]].copy()
    out.insert(0, "split", split)
    for i, f in enumerate(findings):
        out[f"y_{f}"] = pd.array(rows[scored(f)].to_numpy(float), dtype="Int64")
        out[f"p_{f}"] = probs[:, i]
    return out
