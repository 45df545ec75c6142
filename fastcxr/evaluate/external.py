"""External validation: a finished run applied to another prepared dataset (`evaluate_run`).

The run is applied exactly as it was recorded: its networks (`Predictor.load`), its
preprocessing (intensity mode, the same squash `predict` uses), its evaluation precision and
the decision thresholds it chose on its own validation split. The other dataset's labels are
handled as the run record's test set: a finding is scored on the images whose raw label for
it is 0 or 1 (uncertain -1 and blank are not scored), whatever the run's training policy.

Per finding: n, positives, patients, ROC AUC with the patient-bootstrap CI (the function and
settings `fastcxr report` uses), accuracy / sensitivity / specificity at the run's threshold,
accuracy at 0.5, ECE (10 equal-width bins) and the Brier score. Written into the run:

    RUN/evaluations/NAME/predictions.csv   split, image, patient_id, y_<finding>, p_<finding>
    RUN/evaluations/NAME/metrics.json      findings → metrics, and what was evaluated how
    RUN/evaluations/NAME/failures.csv      unreadable images (only when there are some)

A compare folder is evaluated formulation by formulation (RUN/<formulation>/evaluations/NAME)
with a summary in RUN/evaluations/NAME/summary.json. Evaluating a run on its own manifest and
test split reproduces its recorded test metrics.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fastcxr.errors import UsageError
from fastcxr.evaluate import stats
from fastcxr.evaluate.evaluation import CLUSTERED, EvalConfig, bootstrap_method
from fastcxr.evaluate.metrics import finding_metrics, scored_rows
from fastcxr.leakage import patient_keys
from fastcxr.results import Evaluation
from fastcxr.runtime.runs import (
    RunError,
    RunLock,
    is_complete,
    load_run,
    read_record_json,
    write_csv,
    write_error,
    write_json,
)

SPLITS = ("test", "valid", "all")
FORMAT = "fastcxr-evaluation-1"
ECE_BINS = 10
CALIBRATION = (
    f"ECE: {ECE_BINS} equal-width bins of predicted probability, |observed rate − mean "
    "prediction| weighted by the images in each bin; Brier: mean squared difference between "
    "probability and label"
)
LABEL_RULE = (
    "each finding is scored on the images of the split whose raw label for it is 0 or 1 "
    "(uncertain -1 and blank are not scored), as the run record's test set, whatever the "
    "run's training label policy; images scored for none of the run's findings are not read"
)
HEADLINE = ("n", "positives", "patients", "threshold", "accuracy", "sensitivity", "specificity",
            "accuracy_at_0.5", "auc", "auc_ci", "auc_ci_method", "auc_ci_reason", "ece",
            "brier", "reason")  # fmt: skip
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

Progress = Callable[[int, int], None]


# -- metrics from predictions --------------------------------------------------------------------
def auc_ci(y: np.ndarray, s: np.ndarray, groups: np.ndarray, cfg: EvalConfig) -> dict:
    """The AUC CI `fastcxr report` gives (`evaluation.finding_report`): the patient bootstrap
    (or DeLong clustered by patient) with `cfg`'s settings; None with the reason when
    undefined."""
    if cfg.ci == "delong":
        d = stats.auc_ci_delong(y, s, cfg.level, groups=groups)
        return {"auc_ci": d["ci"], "auc_ci_method": CLUSTERED, "auc_ci_reason": d["reason"]}
    b = stats.patient_bootstrap_ci(y, s, groups, "auc", cfg.n_boot, cfg.seed, cfg.level)
    return {
        "auc_ci": None if b["ci"] is None else list(b["ci"]),
        "auc_ci_method": bootstrap_method(cfg.n_boot),
        "auc_ci_reason": b["reason"],
    }


def score(
    pred: pd.DataFrame,
    findings: Sequence[str],
    thresholds: Mapping[str, float | None],
    cfg: EvalConfig = EvalConfig(),
) -> dict[str, dict]:
    """Per finding, on every row of `pred` (columns `patient_id`, `y_<f>` with NaN where not
    scored, `p_<f>`): `metrics.finding_metrics` at the run's `thresholds`, the AUC CI of
    `fastcxr report` (`cfg`), patients, ECE over 10 equal-width bins and the Brier score."""
    out = {}
    for f in findings:
        y_all = pd.to_numeric(pred[f"y_{f}"], errors="coerce").to_numpy(float)
        p_all = pred[f"p_{f}"].to_numpy(float)
        m = finding_metrics(y_all, p_all, thresholds.get(f))
        keep = scored_rows(y_all)
        y, s = y_all[keep].astype(int), p_all[keep]
        groups = patient_keys(pred["patient_id"].astype(str))[keep]
        if m["n"] == 0:
            m["reason"] = "no image of the split is labelled 0 or 1 for this finding"
        ci = auc_ci(y, s, groups, cfg)
        if m["n"] == 0:
            ci["auc_ci_reason"] = m["reason"]
        out[f] = {
            **m,
            "patients": int(len(set(groups))),
            **ci,
            "ece": stats.ece(y, s, ECE_BINS) if len(y) else None,
            "brier": stats.brier(y, s) if len(y) else None,
            "calibration": stats.calibration_bins(y, s, ECE_BINS),
        }
    return out


def internal(run: Mapping, findings: Sequence[str], cfg: EvalConfig = EvalConfig()) -> dict:
    """The run's own test-split AUC and CI per finding (its predictions.csv), as `report`."""
    pred = run["predictions"]
    test = pred[pred["split"] == "test"] if "split" in pred.columns else pred
    values = (run["config"].get("thresholds") or {}).get("values", {})
    keys = ("n", "positives", "patients", "auc", "auc_ci", "auc_ci_reason")
    return {f: {k: m[k] for k in keys} for f, m in score(test, findings, values, cfg).items()}


# -- the dataset -----------------------------------------------------------------------------------
MAX_EVAL_NAME = 120  # characters (ASCII): room for `.NAME.old-PID` and the like under 255


def default_name(manifest: Path, split: str, folders: Sequence[Path] = ()) -> str:
    """`<manifest folder>-<split>` as a slug, e.g. `prepared-32-test`. When an evaluation of
    that name in one of `folders` (the `evaluations/` folders it would be written to) was made
    on another manifest, the folders above it are added (`nih-prepared-32-test`), then a
    number: two datasets prepared into folders of the same name do not collide. The same
    manifest keeps its name (evaluating it again needs --overwrite)."""
    manifest = Path(manifest).resolve()
    above = [p.name for p in manifest.parents if p.name]  # its folder, then the ones above

    def slug(words: Sequence[str]) -> str:
        s = re.sub(r"[^a-z0-9]+", "-", "-".join([*words, split]).lower()).strip("-")
        if len(s) > MAX_EVAL_NAME:  # deep folders: keep the words nearest the manifest
            s = s[-MAX_EVAL_NAME:].split("-", 1)[-1]
        return s if s and s != split.lower() else f"dataset-{split}"

    def free(name: str) -> bool:
        return all(_made_from(f / name) in (None, manifest) for f in folders)

    names = [slug(above[k::-1]) for k in range(len(above))] or [slug([])]
    names += [slug([*above[:1], str(i)]) for i in range(2, 1000)]
    for name in names:
        if free(name):
            return name
    raise UsageError(f"no free evaluation name for {manifest}; choose one with --name")


def _made_from(folder: Path) -> Path | None:
    """The manifest an existing evaluation folder was made on (None: no evaluation there)."""
    if not folder.exists():
        return None
    try:
        return Path(json.loads((folder / "metrics.json").read_text())["manifest"]).resolve()
    except (OSError, ValueError, KeyError, TypeError):
        return folder  # unreadable: taken by something else


def _check_name(name: str) -> str:
    if not _NAME.match(name) or name.endswith(".part"):
        raise UsageError(
            f"--name {name!r}: use letters, digits, '.', '_' and '-' (not starting with '.' "
            "or '-'), no '/'"
        )
    if len(name) > MAX_EVAL_NAME:
        raise UsageError(f"--name is {len(name)} characters long; at most {MAX_EVAL_NAME}")
    return name


def finding_columns(df: pd.DataFrame, findings: Sequence[str], manifest: Path) -> dict[str, str]:
    """Run finding → the manifest column holding its labels, matched through fastcxr's
    vocabulary (`findings.canonical_finding`: aliases such as NIH's 'Effusion'). A finding
    the dataset lacks is a `UsageError` naming the findings it has."""
    from fastcxr.findings import canonical_finding

    has: dict[str, str] = {}
    for c in df.columns:
        try:
            has.setdefault(canonical_finding(str(c)), str(c))
        except UsageError:
            continue  # image, patient_id, split, … : not a finding
    missing = [f for f in findings if f not in has]
    if missing:
        raise UsageError(
            f"{manifest} has no labels for {', '.join(missing)} (the run's findings: "
            f"{', '.join(findings)}); it has: {', '.join(sorted(has)) or 'no finding columns'}"
        )
    return {f: has[f] for f in findings}


def preprocessing_check(run_prep, manifest: Path) -> dict:
    """The run's preprocessing against the dataset's `prepare.json`: what is applied, and
    the mismatches (a different intensity mode, images smaller than the run's input)."""
    from fastcxr.preprocessing import Preprocessing

    ds = Preprocessing.of_dataset(manifest, run_prep.size)
    first = run_prep.cache_size or run_prep.size
    mismatch, notes = [], []
    if ds.cache_size is None:
        notes.append(
            "no prepare.json beside the manifest: its images are read as they are (DICOMs "
            f"with the run's intensity mode {run_prep.intensity!r}); the intensity of PNG/JPG "
            "images cannot be checked"
        )
    else:
        if ds.intensity != run_prep.intensity:
            mismatch.append(
                f"intensity: the run was trained on {run_prep.intensity!r} images, this "
                f"dataset was prepared with {ds.intensity!r}: its pixels are not what the "
                f"network saw (prepare it again with --intensity {run_prep.intensity})"
            )
        if ds.cache_size < run_prep.size:
            mismatch.append(
                f"size: the dataset's images are {ds.cache_size}x{ds.cache_size}, smaller "
                f"than the run's {run_prep.size}x{run_prep.size} input: they are upsampled"
            )
        if ds.cache_size != first:
            notes.append(
                f"the dataset's {ds.cache_size} px images are squashed to {first} px (the "
                f"run's cache size) then to {run_prep.size} px, as `predict` does"
            )
    return {
        "run": run_prep.to_dict(),
        "dataset": {"size": ds.cache_size, "intensity": ds.intensity if ds.cache_size else None,
                    "source": ds.source},
        "applied": f"{run_prep.intensity}, squashed to "
                   + (f"{first} then " if first != run_prep.size else "")
                   + f"{run_prep.size} px: {run_prep.resize}; mean {run_prep.mean}, "
                   f"std {run_prep.std}",
        "mismatch": mismatch,
        "notes": notes,
    }  # fmt: skip


def _rows(df: pd.DataFrame, split: str, columns: Mapping[str, str], manifest: Path):
    """The split's rows with each finding's certain label (float 0/1, NaN), and how many
    rows of the split are scored for none of the findings."""
    from fastcxr.data import certain_labels
    from fastcxr.findings import NO_FINDING, LabelPolicy, derive_no_finding

    if NO_FINDING in columns and columns[NO_FINDING] == NO_FINDING:
        df = derive_no_finding(df)  # as the run's own test set reads it
    rows = df if split == "all" else df[df["split"].astype(str) == split]
    raw = rows[list(columns.values())].set_axis(list(columns), axis=1)
    LabelPolicy("zeros", "zeros").apply(raw, list(columns))  # raw labels are 1, 0, -1 or blank
    out = rows[["split", "image", "patient_id"]].copy()
    for f, c in columns.items():
        out[f"y_{f}"] = certain_labels(rows[c])
    ys = out[[f"y_{f}" for f in columns]]
    keep = ys.notna().any(axis=1).to_numpy()
    if not keep.any():
        sizes = df["split"].astype(str).value_counts().to_dict()
        raise UsageError(
            f"{manifest}: no {'' if split == 'all' else split + ' '}image is labelled 0 or 1 "
            f"for {', '.join(columns)}: nothing to evaluate (images per split: {sizes})"
        )
    return out[keep].reset_index(drop=True), int((~keep).sum()), int(len(rows))


# -- one run ---------------------------------------------------------------------------------------
def _sub_runs(run_dir: Path) -> tuple[dict[str, Path], bool]:
    """Formulation runs of a compare folder (True), or the run itself (False)."""
    if (run_dir / "compare.json").exists():
        try:
            names = json.loads((run_dir / "compare.json").read_text())["formulations"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise RunError(f"{run_dir / 'compare.json'}: unreadable ({e})") from None
        subs = {n: run_dir / n for n in names}
        unfinished = [n for n, p in subs.items() if not is_complete(p)]
        if unfinished:
            raise RunError(
                f"{run_dir}: formulation run(s) {', '.join(unfinished)} are not complete; "
                "resume the comparison first, or evaluate a finished RUN/FORMULATION"
            )
        return subs, True
    if is_complete(run_dir):
        return {run_dir.name: run_dir}, False
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if any(run_dir.glob("seed-*")):
        raise RunError(f"{run_dir}: a series of seeds; evaluate one seed's folder (RUN/seed-K)")
    raise RunError(f"{run_dir}: not a complete run or compare folder")


def run_overlap(run_dir: Path, dataset, split: str) -> dict:
    """What the evaluated rows share with the run's own training and validation data: images
    (the same file under any name, or a byte-identical copy: `leakage.same_files`) and
    patients (ids as `leakage.patient_key` reads them). `checked` is False when the run's
    manifest is gone (nothing can be compared)."""
    from fastcxr.leakage import patient_key, same_files
    from fastcxr.manifest import ManifestError, file_sha256, read_manifest

    config = read_record_json(run_dir / "config.json")
    data = config.get("data") or {}
    manifest = Path(data.get("manifest") or "")
    unchecked = {"checked": False, "images": 0, "patients": 0, "examples": []}
    try:
        own = read_manifest(manifest)
        sha = file_sha256(manifest)
    except (ManifestError, OSError):
        return {**unchecked, "reason": f"the run's manifest {manifest} cannot be read"}
    if data.get("sha256") and sha != data["sha256"]:  # re-split or re-prepared since training
        return {**unchecked, "reason": f"the run's manifest {manifest} changed since training "
                f"(sha256 {sha[:12]}… ≠ recorded {data['sha256'][:12]}…)"}  # fmt: skip
    if sha == file_sha256(dataset.manifest) or manifest.resolve() == dataset.manifest.resolve():
        return {**unchecked, "checked": True, "own_dataset": True, "against": str(manifest),
                "reason": f"{dataset.manifest} is the run's own dataset (its test split is "
                "scored in the run record already)"}  # fmt: skip
    own = own[own["split"].astype(str).isin(["train", "valid"])]
    rows = dataset.df if split == "all" else dataset.df[dataset.df["split"].astype(str) == split]
    pairs = same_files([str(manifest.parent / p) for p in own["image"].astype(str)],
                       [str(dataset.root / p) for p in rows["image"].astype(str)])  # fmt: skip
    theirs = set(own["patient_id"].astype(str).map(patient_key))
    shared = sorted({p for p in rows["patient_id"].astype(str) if patient_key(p) in theirs})
    return {
        "checked": True, "against": str(manifest), "images": len({q for _, q, _ in pairs}),
        "patients": len(shared),
        "examples": [f"{os.path.relpath(q, dataset.root)} = {p} ({how})"
                     for p, q, how in pairs[:3]] + [f"patient {x}" for x in shared[:3]],
    }  # fmt: skip


def _evaluate_one(
    run_dir: Path, dataset, split: str, name: str, cfg: EvalConfig, device, batch_size: int,
    progress: Progress | None,
) -> tuple[dict, pd.DataFrame, pd.DataFrame]:  # fmt: skip
    """Metrics dict, predictions and failures of one finished run on `dataset`."""
    from fastcxr.manifest import file_sha256
    from fastcxr.predict import Predictor, predict
    from fastcxr.version import __version__

    run = load_run(run_dir)
    pred = Predictor.load(run_dir, device=device)
    findings = list(pred.findings)
    recorded = run["config"].get("thresholds") or {}
    thresholds = {f: recorded.get("values", pred.thresholds).get(f) for f in findings}
    columns = finding_columns(dataset.df, findings, dataset.manifest)
    prep = preprocessing_check(pred.preprocessing, dataset.manifest)
    rows, unscored, in_split = _rows(dataset.df, split, columns, dataset.manifest)
    files = [dataset.root / i for i in rows["image"]]
    probs, fails = predict(pred, files, batch_size, progress)
    ok = {str(f) for f in probs["file"]}
    read = np.array([str(f) in ok for f in files], bool)
    rows = rows[read].reset_index(drop=True)
    probs = probs.set_index("file").loc[[str(f) for f in np.array(files, object)[read]]]
    for f in findings:
        rows[f"p_{f}"] = probs[f"p_{f}"].to_numpy(float)
    rows = rows[["split", "image", "patient_id",
                 *[c for f in findings for c in (f"y_{f}", f"p_{f}")]]]  # fmt: skip
    fails = fails.assign(image=[os.path.relpath(f, dataset.root) for f in fails["file"]])
    metrics = {
        "format": FORMAT,
        "name": name,
        "run": str(run_dir),
        "formulation": run["config"].get("formulation"),
        "manifest": str(dataset.manifest),
        "manifest_sha256": file_sha256(dataset.manifest),
        "split": split,
        "findings": score(rows, findings, thresholds, cfg),
        "internal": internal(run, findings, cfg),
        "columns": columns,
        "thresholds": {**recorded, "values": thresholds},
        "preprocessing": prep,
        "preprocessing_mismatch": prep["mismatch"],
        "precision": pred.precision,
        "device": str(pred.device),
        "label_rule": LABEL_RULE,
        "calibration_method": CALIBRATION,
        "images": {"in_split": in_split, "unscored": unscored, "read": int(read.sum()),
                   "unreadable": int(len(fails))},
        "failures": fails[["image", "reason"]].head(100).to_dict("records"),  # all: failures.csv
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "fastcxr_version": __version__,
    }  # fmt: skip
    return metrics, rows, fails


def _labels_csv(rows: pd.DataFrame) -> pd.DataFrame:
    """Labels as integers (blank where not scored), as the run record's predictions.csv."""
    out = rows.copy()
    for c in out.columns:
        if c.startswith("y_"):
            out[c] = pd.array(out[c].to_numpy(float), dtype="Int64")
    return out


def _publish(folder: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a fresh folder beside `folder`, then swap it in: readers see the
    old evaluation or the new one, whole, never a mix."""
    tmp = folder.with_name(f".{folder.name}.part-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        write(tmp)
        if folder.exists():
            aside = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, aside)
            os.replace(tmp, folder)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, folder)
    except OSError as e:
        raise write_error(folder.parent, e) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def evaluate_run(
    run_dir: str | Path,
    manifest: str | Path,
    split: str = "test",
    name: str | None = None,
    overwrite: bool = False,
    batch_size: int = 64,
    device=None,
    eval_cfg: EvalConfig = EvalConfig(),
    progress: Progress | None = None,
    allow_overlap: bool = False,
) -> Evaluation:
    """Apply the finished run `run_dir` (or every formulation of a compare folder) to the
    manifest's `split` (test, valid or all) and write `evaluations/NAME/` into it.

    Refused when the rows share images or patients with the run's training or validation
    data (`run_overlap`), unless `allow_overlap`: then recorded with `"external": false`.

    Returns the evaluation's metrics.json (with `dir`); for a compare folder, the summary
    (`runs`: formulation → its headline metrics). An existing evaluation NAME is replaced
    only with `overwrite`."""
    from fastcxr.data.dataset import Dataset

    if split not in SPLITS:
        raise UsageError(f"--split must be one of {', '.join(SPLITS)}, not {split!r}")
    run_dir = Path(run_dir).resolve()
    subs, is_compare = _sub_runs(run_dir)
    dataset = Dataset.load(manifest)
    folders = [p / "evaluations" for p in subs.values()]
    if is_compare:
        folders.append(run_dir / "evaluations")
    if name is None:
        name = default_name(dataset.manifest, split, folders)
    targets = [f / _check_name(name) for f in folders]
    with ExitStack() as locks:  # one evaluation of a name at a time (as training locks)
        for t in targets:
            locks.enter_context(RunLock(t))
        existing = [str(t) for t in targets if t.exists()]
        if existing and not overwrite:
            raise UsageError(
                f"evaluation {name!r} exists ({', '.join(existing)}); add --overwrite to replace "
                "it, or choose another --name"
            )
        overlap = _refuse_overlap(next(iter(subs.values())), dataset, split, allow_overlap)
        done = {}
        for form, sub in subs.items():
            done[form] = _evaluate_one(
                sub, dataset, split, name, eval_cfg, device, batch_size, progress
            )
        for (metrics, rows, fails), sub in zip(done.values(), subs.values()):
            metrics["overlap"] = overlap
            metrics["external"] = is_external(overlap)
            _write_evaluation(sub / "evaluations" / name, metrics, rows, fails)
        if not is_compare:
            return Evaluation.from_json(next(iter(done.values()))[0])
        summary = _compare_summary(run_dir, name, split, overlap, done)
        folder = run_dir / "evaluations" / name
        folder.parent.mkdir(parents=True, exist_ok=True)
        _publish(folder, lambda tmp: write_json(tmp / "summary.json", summary))
        return Evaluation.from_json({**summary, "dir": str(folder)})


def is_external(overlap: dict) -> bool:
    """External: checked against the run's own (unchanged) manifest, another dataset, and no
    image or patient shared with the run's training and validation data."""
    return bool(overlap["checked"] and not overlap.get("own_dataset")
                and not (overlap["images"] or overlap["patients"]))  # fmt: skip


def _refuse_overlap(run: Path, dataset, split: str, allow: bool) -> dict:
    """`run_overlap`, refused unless `allow` when the rows share images or patients with the
    run's training or validation data."""
    overlap = run_overlap(run, dataset, split)
    if allow:
        return overlap
    if not overlap["checked"]:
        raise UsageError(
            f"cannot check that {dataset.manifest} shares no image or patient with the run's "
            f"training and validation data: {overlap['reason']}; restore it, or add "
            "--allow-overlap to record the evaluation as not external"
        )
    if overlap.get("own_dataset"):
        raise UsageError(
            f"not an external validation: {overlap['reason']}; evaluate another dataset, or "
            "add --allow-overlap to record it as not external"
        )
    if overlap["images"] or overlap["patients"]:
        raise UsageError(
            f"not an external validation: {overlap['images']} image(s) and "
            f"{overlap['patients']} patient(s) of {dataset.manifest} (split {split}) are "
            f"in the run's training or validation data ({'; '.join(overlap['examples'][:3])}); "
            "evaluate another dataset, or add --allow-overlap to record it as not external"
        )
    return overlap


def _write_evaluation(folder: Path, metrics: dict, rows, fails) -> None:
    """One run's evaluation folder, published whole (metrics.json last); `metrics` gets its
    `dir`."""

    def write(tmp: Path) -> None:
        write_csv(tmp / "predictions.csv", _labels_csv(rows))
        if len(fails):
            write_csv(tmp / "failures.csv", fails[["image", "file", "reason"]])
        write_json(tmp / "metrics.json", metrics)  # last: a folder with it is whole

    folder.parent.mkdir(parents=True, exist_ok=True)
    _publish(folder, write)
    metrics["dir"] = str(folder)


def _compare_summary(run_dir: Path, name: str, split: str, overlap: dict, done: dict) -> dict:
    """A compare folder's evaluation: each formulation's headline metrics."""
    first = next(iter(done.values()))[0]
    return {
        "format": FORMAT, "name": name, "compare": str(run_dir),
        "manifest": first["manifest"], "manifest_sha256": first["manifest_sha256"],
        "split": split, "calibration_method": CALIBRATION,
        "overlap": overlap, "external": first["external"],
        "runs": {form: {"dir": m["dir"], "formulation": m["formulation"],
                        "findings": {f: {k: v[k] for k in HEADLINE}
                                     for f, v in m["findings"].items()},
                        "internal": m["internal"], "images": m["images"],
                        "preprocessing_mismatch": m["preprocessing_mismatch"]}
                 for form, (m, _, _) in done.items()},
        "created": first["created"], "fastcxr_version": first["fastcxr_version"],
    }  # fmt: skip


# -- what the report reads ---------------------------------------------------------------------
def evaluations_of(run_dir: Path) -> list[Path]:
    """The whole evaluations of a run (folders holding metrics.json), by name."""
    root = Path(run_dir) / "evaluations"
    if not root.is_dir():
        return []
    found = (p.parent for p in root.glob("*/metrics.json"))
    return sorted(p for p in found if not p.name.startswith("."))


def read_evaluation(folder: Path, cfg: EvalConfig = EvalConfig()) -> dict:
    """An evaluation's metrics.json, its findings rescored from its predictions.csv with
    `cfg` (so a report's CIs use one method throughout)."""
    m = json.loads((folder / "metrics.json").read_text())
    pred_csv = folder / "predictions.csv"
    if pred_csv.exists():
        pred = pd.read_csv(pred_csv, dtype={"image": str, "patient_id": str})
        values = m.get("thresholds", {}).get("values", {})
        m["findings"] = score(pred, list(m["findings"]), values, cfg)
    return m


__all__ = ["SPLITS", "default_name", "evaluate_run", "evaluations_of", "read_evaluation", "score"]
