"""Seed variance: the same experiment repeated per seed, and how much its numbers move.

Each seed changes the initialisation, the shuffling and the augmentation; the data, the split
and the test images stay the same. Every seed keeps its own run record under
`RUN/seed-<k>/`; `RUN/seeds.json` holds the seeds, each seed's result and the aggregate:
per formulation and finding the mean, standard deviation (n − 1) and range of AUC and
accuracy across seeds. A seed whose record is complete is read back, not retrained.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from fastcxr.config import SEED_RANGE, TrainConfig, seed_in_range
from fastcxr.errors import UsageError
from fastcxr.runtime.runs import write_json

SEEDS_FILE = "seeds.json"
AGGREGATED = ("auc", "accuracy")


def parse_seeds(text: str) -> tuple[int, ...]:
    """`0,1,2` → (0, 1, 2); repeated or non-integer seeds are refused."""
    try:
        seeds = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise UsageError(f"--seeds must be comma-separated integers, not {text!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds repeats a seed: {text!r}")
    bad = [s for s in seeds if not seed_in_range(s)]
    if bad:  # refused now, not when its turn comes after hours of the other seeds
        raise UsageError(f"--seeds: each seed must be {SEED_RANGE}, not {bad[0]}")
    return seeds


def spread(values: Sequence[float | None]) -> dict:
    """Mean, sample standard deviation, min and max of the defined values (`None` left out)."""
    v = np.array([x for x in values if x is not None and not math.isnan(x)], float)
    out: dict = {"mean": None, "sd": None, "min": None, "max": None, "n": int(len(v))}
    if len(v) == 0:
        return {**out, "reason": "undefined in every seed"}
    out.update(mean=float(v.mean()), min=float(v.min()), max=float(v.max()))
    if len(v) > 1:
        out["sd"] = float(v.std(ddof=1))
    else:
        out["reason"] = "one seed: no standard deviation"
    if len(v) < len(values):
        out["reason"] = f"undefined in {len(values) - len(v)} of {len(values)} seeds"
    return out


def aggregate(per_seed: Sequence[dict[str, dict[str, dict]]]) -> dict:
    """[{FORM: {FINDING: {"auc", "accuracy", …}}} per seed] → {FORM: {FINDING: {"auc":
    spread, "accuracy": spread}}}."""
    first = per_seed[0]
    return {
        form: {
            f: {k: spread([s[form][f].get(k) for s in per_seed]) for k in AGGREGATED} for f in by_f
        }
        for form, by_f in first.items()
    }


def run_seeds(
    seeds: Sequence[int],
    cfg: TrainConfig,
    run_dir: str | Path,
    one: Callable[[TrainConfig, Path], dict],
    done: Callable[[Path], dict | None],
    findings_of: Callable[[dict], dict[str, dict[str, dict]]],
    log: Callable[[dict], None] | None = None,
) -> dict:
    """Run `one(cfg with seed k, RUN/seed-k)` for each seed (or read back `done(folder)`), then
    aggregate `findings_of(result)` across seeds; writes and returns RUN/seeds.json's content."""
    run_dir = Path(run_dir)
    results = {}
    for seed in seeds:
        sub = run_dir / f"seed-{seed}"
        prior = done(sub)
        if prior is not None:
            results[seed] = prior
            if log:
                log({"event": "skip", "formulation": f"seed {seed}", "reason": "finished"})
            continue
        if log:
            log({"event": "data", "message": f"seed {seed} → {sub}"})
        results[seed] = one(cfg.replace(seed=seed), sub)
    out = {
        "seeds": list(seeds),
        "runs": {str(k): v for k, v in results.items()},
        "aggregate": aggregate([findings_of(r) for r in results.values()]),
        "train_seconds": sum(_train_seconds(r) for r in results.values()),
        "run_dir": str(run_dir),
    }
    write_json(run_dir / SEEDS_FILE, out)
    return out


def _train_seconds(result: dict) -> float:
    if "formulations" in result:
        return sum(r["train_seconds"] for r in result["formulations"].values())
    if "stages" in result and "train_seconds" not in result:
        return sum(s["train_seconds"] for s in result["stages"])
    return float(result.get("train_seconds", 0.0))


def read_json(path: Path) -> dict | None:
    """A finished seed's result file, or None."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
