"""Subgroup audit of a finished run (`audit_run`): does the model fail some patients more?

The run's saved test predictions (or an evaluation's, from `fastcxr evaluate`) are joined by
image to the manifest they were made on, and every finding is scored within each subgroup of
each attribute (`sex`, `age` in bins, `race`, `view`, or any other manifest column): n,
patients, positives, prevalence, ROC AUC with the patient-bootstrap CI, TPR and FPR at the
run's own validation-chosen threshold, and the TPR gap to the whole test set with its CI
(Seyyed-Kalantari et al. 2021, "CheXclusion: fairness gaps in deep chest X-ray classifiers",
PSB; gap = TPR of the subgroup − TPR of every scored image). When the run predicts No Finding,
"underdiagnosis" is the FPR of No Finding: the share of images with a finding that the model
calls normal (Seyyed-Kalantari et al. 2021, Nature Medicine 27:2176).

Gap CIs resample patients of the whole scored set (all of a patient's images together, so a
subgroup and the whole set are resampled jointly) and take percentiles of the gap. A subgroup
with fewer than `min_size` images is shown but flagged `small`; an undefined number is `None`
with its reason. Nothing is retrained or re-run: the audit reads the record.

Written (atomically, a folder swap) beside the predictions it audits:

    SOURCE/audit/audit.json     everything below, with the options and sources
    SOURCE/audit/subgroups.csv  one row per finding, attribute and subgroup
    SOURCE/audit/tpr_gaps.png   the TPR gaps with their CIs, one panel per finding
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

from fastcxr.errors import UsageError
from fastcxr.evaluate import stats
from fastcxr.evaluate.evaluation import EvalConfig
from fastcxr.findings import ALL_FINDINGS
from fastcxr.leakage import patient_keys
from fastcxr.manifest import file_sha256
from fastcxr.results import Audit
from fastcxr.runtime.progress import progress_end, progress_event
from fastcxr.runtime.runs import RunError, check_predictions, write_csv, write_json

FORMAT = "fastcxr-audit-1"
ATTRIBUTES = ("sex", "age", "race", "view")
AGE_BINS = (0, 20, 40, 60, 80)
MIN_SIZE = 50
UNKNOWN = "unknown"
NO_FINDING = "No Finding"
GAP_RULE = (
    "TPR gap = TPR of the subgroup − TPR of every scored image, at the run's threshold; 95% "
    "CI: percentile bootstrap over the patients of the scored set (subgroup and whole set "
    "resampled together)"
)
UNDERDIAGNOSIS_RULE = (
    "underdiagnosis = FPR of No Finding: the share of images with a finding (No Finding = 0) "
    "that the model calls No Finding at the run's threshold"
)


# -- subgroups ---------------------------------------------------------------------------------
def parse_age_bins(text: str | Sequence[float] | None) -> tuple[float, ...]:
    """`0,20,40,60,80` → (0, 20, 40, 60, 80): the lower edges of the age groups, increasing."""
    if text is None:
        return AGE_BINS
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        edges = tuple(float(p) for p in parts if str(p).strip() != "")
    except ValueError:
        raise UsageError(f"--age-bins {text!r}: give increasing ages, e.g. 0,20,40,60,80") from None
    if not edges or any(not math.isfinite(e) for e in edges):
        raise UsageError(f"--age-bins {text!r}: give increasing ages, e.g. 0,20,40,60,80")
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise UsageError(f"--age-bins {text!r}: the edges must increase strictly")
    return tuple(int(e) if e.is_integer() else e for e in edges)


def _edge(e: float) -> str:
    return f"{e:g}"


def age_groups(age: pd.Series, edges: Sequence[float]) -> pd.Series:
    """Each age's group: `[a, b)` is labelled `a-b` as `a–(b−1)` for whole-year edges
    (`20-39`), `<a` below the first edge, `a+` from the last; blank → unknown."""
    a = pd.to_numeric(age, errors="coerce").to_numpy(float)
    whole = all(float(e).is_integer() for e in edges)
    labels = []
    for lo, hi in zip(edges, edges[1:]):
        labels.append(f"{_edge(lo)}-{_edge(hi - 1)}" if whole else f"{_edge(lo)}-<{_edge(hi)}")
    labels.append(f"{_edge(edges[-1])}+")
    idx = np.searchsorted(np.asarray(edges, float), a, side="right") - 1
    out = np.where(idx >= 0, np.array(labels, object)[np.clip(idx, 0, None)], f"<{_edge(edges[0])}")
    out = np.where(np.isnan(a), UNKNOWN, out)
    return pd.Series(out, index=age.index, dtype=object)


def group_order(attribute: str, values: Sequence[str], edges: Sequence[float]) -> list[str]:
    """Subgroups in reading order: age groups by age, others alphabetically; unknown last."""
    present = [v for v in dict.fromkeys(values) if v != UNKNOWN]
    if attribute == "age":
        first = [f"<{_edge(edges[0])}"] if f"<{_edge(edges[0])}" in present else []
        ages = sorted(
            (v for v in present if not v.startswith("<")),
            key=lambda v: float(v.split("-")[0].rstrip("+")),
        )
        present = first + ages
    else:
        present = sorted(present)
    return present + ([UNKNOWN] if UNKNOWN in values else [])


def subgroups(rows: pd.DataFrame, attribute: str, edges: Sequence[float]) -> pd.Series:
    """The subgroup of every row for `attribute` (a manifest column); blank → unknown."""
    if attribute == "age":
        return age_groups(rows["age"], edges)
    v = rows[attribute].astype("string").str.strip()
    return v.where(v.notna() & (v != ""), UNKNOWN).astype(object)


def choose_attributes(manifest: pd.DataFrame, by: Sequence[str] | None, source: Path) -> list[str]:
    """The attributes to audit: `by` (each must be a manifest column with a value), or every
    one of sex, age, race and view the manifest has values for."""

    def has_values(c: str) -> bool:
        return (
            c in manifest.columns
            and manifest[c].astype("string").str.strip().replace("", pd.NA).notna().any()
        )

    if by is None:
        found = [a for a in ATTRIBUTES if has_values(a)]
        if not found:
            raise UsageError(
                f"{source} has no values for {', '.join(ATTRIBUTES)}: prepare it with "
                "demographics (`fastcxr prepare mimic --demographics DIR`), or name a column "
                "with --by"
            )
        return found
    if not by:
        raise UsageError("--by names no attribute; e.g. --by sex,age,race,view")
    skip = {"image", "patient_id", "split"}
    for a in by:
        if a in skip:
            raise UsageError(
                f"--by {a!r}: {a} is not a subgroup attribute (every image or patient would be "
                "its own subgroup, or the split is fixed to the one audited)"
            )
        if a in ALL_FINDINGS:
            raise UsageError(
                f"--by {a!r}: {a} is a finding label, not a patient attribute; subgroups by a "
                "label would mix the outcome into the groups (audit by sex, age, race, view, "
                "or another demographic column)"
            )
        if a not in manifest.columns:
            cols = [c for c in manifest.columns if c not in skip]
            raise UsageError(
                f"--by {a!r}: {source} has no column {a!r}; it has: {', '.join(cols)}"
                + (" (demographics: prepare with --demographics DIR)" if a in ATTRIBUTES else "")
            )
        if not has_values(a):
            raise UsageError(
                f"--by {a!r}: every value of {a!r} in {source} is blank"
                + (" (prepare with --demographics DIR for MIMIC-CXR)" if a in ATTRIBUTES else "")
            )
    return list(dict.fromkeys(by))


# -- numbers ---------------------------------------------------------------------------------
def _rate(hit: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted share of `hit` among the images of weight `w` (B, n); NaN where none."""
    den = w.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (w * hit).sum(-1) / np.where(den > 0, den, 1), np.nan)


def _ratio(a: int, b: int) -> float | None:
    return a / b if b else None


def score_finding(
    y: np.ndarray, p: np.ndarray, patients: np.ndarray,
    groups: Mapping[str, Mapping[str, np.ndarray]], threshold: float | None, cfg: EvalConfig,
    min_size: int, progress: Callable[[int, int], None] | None = None,
) -> dict:  # fmt: skip
    """One finding on its scored images: the whole set (`all`) and each subgroup of each
    attribute (`groups`: attribute → subgroup name → mask). TPR/FPR at `threshold`; gap CIs
    from one patient bootstrap of the whole set, shared by every subgroup. `progress(done,
    total)` hears of each (sub)group scored (its AUC bootstrap is most of the time)."""
    scorer = _Scorer(y.astype(bool), p, patients, threshold, cfg, min_size)
    total = 1 + sum(len(m) for m in groups.values())
    done = 0

    def counted(mask: np.ndarray, name: str) -> dict:
        nonlocal done
        out = scorer.subgroup(mask, name)
        done += 1
        if progress:
            progress(done, total)
        return out

    whole_set = counted(np.ones(len(y), bool), "all")
    by = {a: [counted(m, g) for g, m in masks.items()] for a, masks in groups.items()}
    return {"threshold": threshold, "all": whole_set, "by": by}


class _Scorer:
    """A finding's scored images, the hits at its threshold, and the whole set's TPR/FPR with
    their patient bootstrap (resampled once, shared by every subgroup's gap)."""

    LABELS = {"tpr": "positive", "fpr": "negative"}

    def __init__(self, y, p, patients, threshold, cfg: EvalConfig, min_size: int):
        self.y, self.p, self.patients, self.threshold = y, p, patients, threshold
        self.cfg, self.min_size = cfg, min_size
        self.hit = p >= threshold if threshold is not None else None
        self.w = stats.bootstrap_weights(patients, cfg.n_boot, cfg.seed) if len(y) else None
        self.classes = {"tpr": y, "fpr": ~y}
        self.whole, self.boot_all = {}, None
        if self.hit is not None:
            self.whole = {k: _ratio(int((self.hit & c).sum()), int(c.sum()))
                          for k, c in self.classes.items()}  # fmt: skip
        if self.hit is not None and self.w is not None:
            self.boot_all = {k: _rate(self.hit[c], self.w[:, c]) for k, c in self.classes.items()}

    def subgroup(self, mask: np.ndarray, name: str) -> dict:
        from fastcxr.evaluate.external import auc_ci

        ys, ps, gs = self.y[mask], self.p[mask], self.patients[mask]
        n, pos = int(mask.sum()), int(ys.sum())
        reasons: dict[str, str] = {}
        out = {"subgroup": name, "n": n, "patients": int(len(set(gs))), "positives": pos,
               "prevalence": _ratio(pos, n),
               "auc": stats.auc_rank(ys, ps) if n else None}  # fmt: skip
        out.update(
            auc_ci(ys.astype(int), ps, gs, self.cfg)
            if n
            else {"auc_ci": None, "auc_ci_method": None, "auc_ci_reason": "no image"}
        )
        if out["auc"] is None:
            reasons["auc"] = "one class in the subgroup" if n else "no image"
        out["threshold"] = self.threshold
        for k in ("tpr", "fpr"):
            self._rate_and_gap(out, reasons, mask, k)
        if self.hit is None:
            reasons["tpr"] = reasons["fpr"] = "no threshold chosen on validation"
        out["small"] = n < self.min_size
        out["reasons"] = reasons  # metric → why it is undefined
        out["reason"] = "; ".join(f"{k.upper()}: {v}" for k, v in reasons.items()) or None
        return out

    def _rate_and_gap(self, out: dict, reasons: dict, mask: np.ndarray, k: str) -> None:
        """The subgroup's TPR or FPR (`k`), its gap to the whole set's and the gap's CI."""
        hit, label = self.hit, self.LABELS[k]
        cls = self.classes[k][mask]
        out[k] = None if hit is None else _ratio(int((hit[mask] & cls).sum()), int(cls.sum()))
        if hit is not None and out[k] is None:
            reasons[k] = f"no {label} image"
        gap, gap_ci = None, None
        if out[k] is not None and self.boot_all is not None:
            gap = out[k] - self.whole[k]
            sel = mask & self.classes[k]
            sub_boot = _rate(hit[sel], self.w[:, sel])
            if len(set(self.patients[sel])) < 2:  # one patient's images say nothing of spread
                reasons[f"{k}_gap_ci"] = f"only one patient with a {label} image"
            elif np.nanmax(sub_boot) == np.nanmin(sub_boot):
                reasons[f"{k}_gap_ci"] = (
                    f"the subgroup's {k.upper()} is {np.nanmax(sub_boot):g} in every "
                    "resample: a percentile CI would show the whole set's spread only"
                )
            else:
                diff = sub_boot - self.boot_all[k]
                gap_ci = stats.percentile_ci(diff, self.cfg.n_boot, self.cfg.level)
                if gap_ci is None:
                    reasons[f"{k}_gap_ci"] = _gap_ci_reason(diff, self.cfg.n_boot, k)
        out[f"{k}_gap"], out[f"{k}_gap_ci"] = gap, gap_ci


def _gap_ci_reason(diff: np.ndarray, n_boot: int, k: str) -> str:
    """Why `percentile_ci` gave no interval for a gap's resamples `diff`."""
    defined = int((~np.isnan(diff)).sum())
    if defined < n_boot / 2:
        return (
            f"the {k.upper()} gap is defined in {defined} of {n_boot} patient resamples (the "
            "others draw none of the subgroup's images of its class): fewer than half"
        )
    value = float(np.nanmax(diff))
    return f"the {k.upper()} gap is {value:+.6g} in every patient resample: zero width"


# -- sources -----------------------------------------------------------------------------------
def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{path}: unreadable ({e})") from None


def sources(path: Path, evaluation: str | None) -> dict[str, Path]:
    """What to audit under `path`: name → a folder holding predictions.csv (a run, an
    evaluation folder, or each formulation of a compare folder; `evaluation`: that
    evaluation of each)."""
    from fastcxr.evaluate.external import _sub_runs, evaluations_of

    path = Path(path).resolve()
    is_eval = (path / "metrics.json").exists() and _read_json(path / "metrics.json").get(
        "format", ""
    ).startswith("fastcxr-evaluation")
    if is_eval:
        if evaluation:
            raise UsageError(f"{path} is an evaluation already; drop --evaluation")
        return {path.name: path}
    runs, _ = _sub_runs(path)  # a run, or every formulation of a compare folder
    if evaluation is None:
        return runs
    out = {}
    for n, p in runs.items():
        e = p / "evaluations" / evaluation
        if not (e / "metrics.json").exists():
            have = [q.name for q in evaluations_of(p)]
            raise UsageError(
                f"{p}: no evaluation {evaluation!r} (fastcxr evaluate); it has: "
                + (", ".join(have) or "none")
            )
        out[n] = e
    return out


def _source_info(folder: Path) -> dict:
    """Predictions, thresholds, findings and manifest of a run or evaluation folder."""
    metrics = _read_json(folder / "metrics.json")
    evaluated = str(metrics.get("format", "")).startswith("fastcxr-evaluation")
    if evaluated:
        thresholds = (metrics.get("thresholds") or {}).get("values", {})
        manifest, sha = metrics["manifest"], metrics.get("manifest_sha256")
        split = metrics.get("split")
        kind = "evaluation"
    else:
        check_predictions(folder)
        config = _read_json(folder / "config.json")
        thresholds = (config.get("thresholds") or {}).get("values", {})
        manifest, sha = config["data"]["manifest"], config["data"].get("sha256")
        split = "test"
        kind = "run"
    try:
        pred = pd.read_csv(folder / "predictions.csv", dtype={"image": str, "patient_id": str})
    except (OSError, ValueError, pd.errors.ParserError) as e:
        raise RunError(f"{folder / 'predictions.csv'}: unreadable ({e})") from None
    if kind == "run" and "split" in pred.columns:
        pred = pred[pred["split"] == "test"]
    findings = [c[2:] for c in pred.columns if c.startswith("p_")]
    return {"kind": kind, "predictions": pred.reset_index(drop=True), "findings": findings,
            "thresholds": thresholds, "manifest": Path(manifest), "manifest_sha256": sha,
            "split": split,
            "predictions_sha256": file_sha256(folder / "predictions.csv")}  # fmt: skip


def joined(pred: pd.DataFrame, manifest: pd.DataFrame, source: Path) -> pd.DataFrame:
    """The predictions with the manifest's columns (by image); every image must be there with
    the same patient, or the subgroups would be someone else's."""
    cols = [c for c in manifest.columns if c not in ("split",) and not c.startswith(("y_", "p_"))]
    m = manifest[cols].drop_duplicates("image").set_index("image")
    missing = ~pred["image"].isin(m.index)
    if missing.any():
        ex = ", ".join(pred.loc[missing, "image"].head(3))
        raise UsageError(
            f"{int(missing.sum())} of {len(pred)} predicted images are not in the manifest "
            f"{source} (e.g. {ex}): it is not the data these predictions were made on; pass "
            "the right one with --data"
        )
    right = m.loc[pred["image"]].reset_index()
    other = patient_keys(right["patient_id"].astype(str)) != patient_keys(
        pred["patient_id"].astype(str)
    )
    if other.any():
        raise UsageError(
            f"{int(other.sum())} predicted image(s) belong to another patient in {source} "
            f"(e.g. {pred.loc[other, 'image'].iloc[0]}): not the data these predictions were "
            "made on"
        )
    extra = right.drop(columns=["image", "patient_id"])
    return pd.concat([pred.reset_index(drop=True), extra], axis=1)


def audit_one(
    folder: Path, by: Sequence[str] | None, edges: Sequence[float], min_size: int,
    cfg: EvalConfig, data: Path | None = None, log=None,
) -> dict:  # fmt: skip
    """The audit of one run or evaluation folder (not written)."""
    from fastcxr.manifest import read_manifest

    info = _source_info(folder)
    manifest = Path(data) if data is not None else info["manifest"]
    manifest = manifest / "manifest.csv" if manifest.is_dir() else manifest
    if not manifest.exists():
        raise UsageError(
            f"{folder}: its manifest {manifest} is gone; pass where it is now with --data"
        )
    mdf = read_manifest(manifest)
    rows = joined(info["predictions"], mdf, manifest)
    attributes = choose_attributes(mdf, by, manifest)
    sha = file_sha256(manifest)
    warnings = []
    if info["manifest_sha256"] and sha != info["manifest_sha256"]:
        warnings.append(
            f"{manifest} changed since the predictions were made (sha256 {sha[:12]}… ≠ "
            f"{info['manifest_sha256'][:12]}…); its images and patients match, its other "
            "columns are read as they are now"
        )
    findings = {
        f: _score(folder, rows, f, attributes, edges, info["thresholds"].get(f), cfg, min_size,
                  log)
        for f in info["findings"]
    }  # fmt: skip
    if log is not None:
        log(progress_end("audit"))
    under = None
    if NO_FINDING in findings:
        under = {a: [{"subgroup": s["subgroup"], "n_with_finding": s["n"] - s["positives"],
                      "rate": s["fpr"], "gap": s["fpr_gap"], "gap_ci": s["fpr_gap_ci"],
                      "gap_ci_reason": s["reasons"].get("fpr_gap_ci"),
                      "small": s["small"], "reason": s["reasons"].get("fpr")}
                     for s in groups]
                 for a, groups in findings[NO_FINDING]["by"].items()}  # fmt: skip
    return {
        "format": FORMAT, "source": str(folder), "kind": info["kind"], "split": info["split"],
        "manifest": str(manifest.resolve()), "manifest_sha256": sha,
        "predictions_sha256": info["predictions_sha256"], "warnings": warnings,
        "by": attributes, "age_bins": list(edges), "min_size": min_size,
        "ci": {"method": f"percentile bootstrap over patients ({cfg.n_boot} resamples)",
               "level": cfg.level, "seed": cfg.seed},
        "gap_rule": GAP_RULE, "findings": findings,
        "underdiagnosis": under,
        "underdiagnosis_rule": UNDERDIAGNOSIS_RULE if under is not None else (
            "the run does not predict No Finding: underdiagnosis (the FPR of No Finding) is "
            "not defined for it"),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }  # fmt: skip


def _score(folder: Path, rows: pd.DataFrame, f: str, attributes, edges, threshold, cfg,
           min_size: int, log) -> dict:  # fmt: skip
    """`score_finding` for `f` on the rows scored for it, by each attribute's subgroups."""
    y_all = pd.to_numeric(rows[f"y_{f}"], errors="coerce").to_numpy(float)
    keep = ~np.isnan(y_all)
    sub = rows[keep].reset_index(drop=True)
    y, p = y_all[keep].astype(int), sub[f"p_{f}"].to_numpy(float)
    pats = patient_keys(sub["patient_id"].astype(str))
    masks = {}
    for a in attributes:
        g = subgroups(sub, a, edges).to_numpy(object)
        masks[a] = {name: g == name for name in group_order(a, list(g), edges)}
    bar = None
    if log is not None:

        def bar(done, total, label=f"{folder.name}: {f}"):
            log(progress_event("audit", label, done, total, "subgroup"))

    return score_finding(y, p, pats, masks, threshold, cfg, min_size, bar)


def table(audit: Mapping) -> pd.DataFrame:
    """One row per finding, attribute and subgroup (the whole set first, as `all`)."""
    rows = []
    keys = ("n", "patients", "positives", "prevalence", "auc", "threshold", "tpr", "fpr",
            "tpr_gap", "fpr_gap", "small", "reason")  # fmt: skip
    for f, m in audit["findings"].items():
        for a, groups in {"all": [m["all"]], **m["by"]}.items():
            for s in groups:
                ci, gci = s.get("auc_ci") or (None, None), s.get("tpr_gap_ci") or (None, None)
                rows.append({"finding": f, "attribute": a, "subgroup": s["subgroup"],
                             **{k: s[k] for k in keys if k in ("n", "patients", "positives",
                                                               "prevalence", "auc")},
                             "auc_lo": ci[0], "auc_hi": ci[1],
                             **{k: s[k] for k in keys[5:]},
                             "tpr_gap_lo": gci[0], "tpr_gap_hi": gci[1]})  # fmt: skip
    return pd.DataFrame(rows)


def audit_run(
    path: str | Path,
    by: Sequence[str] | None = None,
    age_bins: str | Sequence[float] | None = None,
    min_size: int = MIN_SIZE,
    evaluation: str | None = None,
    data: str | Path | None = None,
    cfg: EvalConfig = EvalConfig(),
    write: bool = True,
    log=None,
) -> Audit:
    """Audit a finished run (every formulation of a compare folder), or an evaluation (an
    evaluation folder, or `evaluation`: RUN/evaluations/NAME), and write SOURCE/audit/.
    `log` hears of the subgroups scored as progress events (`fastcxr.runtime.progress`).

    Returns the audit (with `dir`), or for several sources one whose `runs` holds each
    source's (name → audit)."""
    from fastcxr.evaluate.external import _publish

    if isinstance(min_size, bool) or not isinstance(min_size, int) or min_size < 1:
        raise UsageError(f"--min-size must be a whole number of images ≥ 1, not {min_size!r}")
    edges = parse_age_bins(age_bins)
    by = None if by is None else [b.strip() for b in by if b.strip()]
    found = sources(Path(path), evaluation)
    done = {n: audit_one(f, by, edges, min_size, cfg, Path(data) if data else None, log)
            for n, f in found.items()}  # fmt: skip
    if write:
        from fastcxr.evaluate.figures import save_figure, tpr_gap_figure

        for n, a in done.items():
            folder = Path(a["source"]) / "audit"
            if (folder / "audit.json").exists():  # said, not silent: the old one goes
                a["warnings"] = [*a.get("warnings", []), _replaced(folder)]

            def put(tmp: Path, a=a, n=n, folder=folder) -> None:
                tmp.mkdir(parents=True)
                write_csv(tmp / "subgroups.csv", table(a))
                save_figure(tpr_gap_figure(a, n), tmp / "tpr_gaps.png")
                write_json(tmp / "audit.json", {**a, "dir": str(folder)})  # last: whole

            _publish(folder, put)
            a["dir"] = str(folder)
    return Audit.from_json(next(iter(done.values())) if len(done) == 1 else {"runs": done})


def _replaced(folder: Path) -> str:
    """The warning that a new audit replaces the one in `folder` (when, and by what)."""
    try:
        old = json.loads((folder / "audit.json").read_text())
        when = f"written {old.get('created', 'at an unknown time')}"
        first = next(iter((old.get("findings") or {}).values()), {})
        by = ", ".join(first.get("by", {})) or "no attribute"
    except (OSError, ValueError, AttributeError):
        when, by = "unreadable", "unknown attributes"
    return f"replaced the previous audit in {folder} ({when}; by {by})"


def audits_of(run_dir: Path) -> list[Path]:
    """Saved audits under a run: its own (RUN/audit) and its evaluations'."""
    run_dir = Path(run_dir)
    found = [run_dir / "audit"] + sorted((run_dir / "evaluations").glob("*/audit"))
    return [p for p in found if (p / "audit.json").exists() and not p.parent.name.startswith(".")]


def read_audit(folder: Path) -> dict:
    """A saved audit, with `stale` set when the predictions it audited have changed."""
    a = _read_json(folder / "audit.json")
    pred = Path(folder).parent / "predictions.csv"  # beside it, wherever the run is now
    a["stale"] = not pred.exists() or file_sha256(pred) != a.get("predictions_sha256")
    return a


__all__ = ["ATTRIBUTES", "AGE_BINS", "audit_run", "audits_of", "parse_age_bins", "read_audit",
           "table"]  # fmt: skip
