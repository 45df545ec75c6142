"""The study's jobs as library functions: train one formulation, compare, unfreeze-ablation.

The building blocks (`train_formulation`, `compare`, `unfreeze_ablation`) return the dicts
their run records hold; the entry `run` (and `ablation_plan`, `write_lr_find`) return typed
results (`fastcxr.results`: what `--json` prints is their `to_json()`). They never print;
`log` receives one dict per event (epoch finished, network started) for progress.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.torch_basics import default_device

from fastcxr.config import Stage, TrainConfig
from fastcxr.data import apply_policy, check_files, require_thresholds
from fastcxr.data.dataset import Dataset
from fastcxr.errors import UsageError
from fastcxr.evaluate.evaluation import CLUSTERED, EvalConfig, evaluate, pairwise, with_holm
from fastcxr.formulations import FORMULATIONS, Formulation, get_formulation, powerset_bits
from fastcxr.manifest import file_sha256
from fastcxr.models import block_splitter, build_model, group_names, resolve_unfreeze
from fastcxr.results import (
    AblationPlan,
    AblationResult,
    CompareResult,
    LRFindResult,
    SeedsResult,
    TrainingResult,
    TrainResult,
)
from fastcxr.runtime.distributed import barrier, init, is_main
from fastcxr.runtime.fastpath import resolve_speed
from fastcxr.runtime.runs import (
    RunError,
    RunLock,
    claim,
    config_differences,
    is_complete,
    load_run,
    read_record_json,
    same_config,
    writable_folder,
    write_atomic,
    write_json,
)
from fastcxr.runtime.seeds import read_json, run_seeds
from fastcxr.runtime.tracking import Tracking, tracked
from fastcxr.train.freezing import Freezing
from fastcxr.train.lr_find import END_LR, NUM_IT, START_LR, lr_find
from fastcxr.train.network import Job, train_network
from fastcxr.train.record import TEST_SET_RULE, headline, write_record
from fastcxr.train.schedule import check_stages, plan

Log = Callable[[dict], None]


def train_formulation(
    data: Dataset,
    formulation: str,
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = None,
    stages: tuple[Stage, ...] | None = None,
    resume: bool = False,
    overwrite: bool = False,
    track: Tracking | None = None,
) -> dict:
    """Train `formulation` through the schedule; write its run record; return its summary.

    The run folder is locked while training; a complete run in it is never replaced unless
    `overwrite` (with `resume` its record is returned), an interrupted one is continued only
    with `resume`, and a resume with another configuration or data is refused.

    A checkpoint is written after every epoch and stage; with `resume` an interrupted run
    continues from its last one (finished networks, stages and epochs are not repeated).
    Setting `STOP` (the CLI does on SIGTERM) ends training with `Interrupted` right after the
    next checkpoint.

    Each network reports and saves the stage `cfg.select` picks (the lowest validation loss
    by default). Decisions use per-finding thresholds chosen on the validation predictions
    (`cfg.threshold`). With several networks (the `single` formulation), each is trained in
    turn and epochs and time are added up, as the study counts two binary networks together.

    With `track`, the run is mirrored in TensorBoard, MLflow or W&B (`fastcxr.runtime.tracking`): it
    is not part of the configuration and changes no number.
    """
    run_dir = Path(run_dir)
    init()
    form = get_formulation(formulation)
    stages = stages or cfg.stages
    df = apply_policy(data.df, cfg, cfg.findings)
    require_thresholds(df, cfg.findings)
    check_files(df, data.root)
    check_schedule(cfg, stages)
    with main_lock(run_dir):
        prior = claim(run_dir, resume, overwrite) if is_main() else None
        barrier()
        if prior is None and resume and not is_main() and is_complete(run_dir):
            prior = load_run(run_dir)["record"]
        if prior is not None:
            check_recorded(run_dir, data, form, cfg, stages)
            if log:
                log({"event": "skip", "formulation": form.name, "reason": "complete run found"})
            return {k: v for k, v in prior.items() if k != "complete"}
        if is_main():
            same_config(run_dir / "checkpoints" / "run.json",
                        _resume_key(data, form, cfg, stages), str(run_dir))  # fmt: skip
        about = _tracked_config(data, form, cfg, stages)
        with tracked(track if is_main() else None, run_dir, about, resume, log) as tracker:
            job = Job.create(data.root, df, data.preprocessing(cfg.size), form, cfg, stages,
                             run_dir, log, resume, tracker)  # fmt: skip
            t0 = time.perf_counter()
            results = [train_network(job, net) for net in form.networks(cfg.findings)]
            summary = write_record(job, data, results, wall_seconds=time.perf_counter() - t0)
            tracker.finish(run_dir)
            return summary


def _tracked_config(data: Dataset, form: Formulation, cfg: TrainConfig, stages) -> dict:
    """The resolved configuration a tracker records (config.json is logged whole at the end)."""
    train = {k: v for k, v in cfg.to_dict().items() if k not in ("stages", "ablation_stages")}
    nets = [n.name for n in form.networks(cfg.findings)]
    return {"formulation": form.name, "networks": nets, "stages": [s.__dict__ for s in stages],
            "train": train, "data": data.describe()}  # fmt: skip


def check_schedule(cfg: TrainConfig, stages) -> None:
    """Architecture, loader, precision, every stage's unfreeze spec, and that each stage
    unfreezes more or other groups than the one before (`check_stages`), checked before any
    folder is written (the model is built on the meta device: no memory, no weights)."""
    resolve_speed(cfg, default_device())
    with torch.device("meta"):
        model = build_model(cfg.arch, 1, size=cfg.size)
    names = group_names(model)
    for st in stages:
        try:
            resolve_unfreeze(st.unfreeze, names)
        except ValueError as e:
            raise UsageError(f"--stages: stage {st.name}: {e}") from None
    check_stages(model, tuple(stages), cfg.arch)


def _comparable(train: dict) -> dict:
    """The training settings two runs must share: all but the worker count (which changes no
    number) and the stage lists (compared as the schedule actually run)."""
    return {k: v for k, v in train.items() if k not in ("workers", "stages", "ablation_stages")}


def _resume_key(data: Dataset, form: Formulation, cfg: TrainConfig, stages) -> dict:
    """What a resumed run must share with the run it continues (the worker count is free)."""
    train = _comparable(cfg.to_dict())
    return {"formulation": form.name, "train": train, "stages": [s.__dict__ for s in stages],
            "data_sha256": file_sha256(data.manifest)}  # fmt: skip


def check_recorded(run_dir: Path, data: Dataset, form: Formulation, cfg: TrainConfig, stages):
    """A complete run read back instead of trained must be the run asked for: same
    formulation, configuration, schedule and data; else the differences are listed."""
    rec = read_record_json(run_dir / "config.json")
    train = _comparable(rec.get("train", {}))
    saved = {
        "formulation": rec.get("formulation"),
        "train": train,
        "stages": rec.get("stages"),
        "data_sha256": rec.get("data", {}).get("sha256"),
    }
    current = json.loads(json.dumps(_resume_key(data, form, cfg, stages)))
    diffs = config_differences(saved, current)
    if diffs:
        raise RunError(
            f"{run_dir} holds a complete run with another configuration ("
            + "; ".join(diffs)
            + "); choose another --name, or add --overwrite to replace it"
        )


@contextlib.contextmanager
def main_lock(run_dir: Path):
    """`RunLock` on the main process; the other processes of a multi-GPU run follow it."""
    if not is_main():
        yield None
        return
    with RunLock(run_dir) as lock:
        yield lock


def compare(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    formulations: tuple[str, ...] = tuple(FORMULATIONS),
    log: Log | None = None,
    eval_cfg: EvalConfig = EvalConfig(),
    resume: bool = False,
    overwrite: bool = False,
    track: Tracking | None = None,
) -> dict:
    """Experiment II: every formulation with the same data, split, seed and schedule.

    Formulations whose run record is already complete are read back, not retrained (an
    interrupted one continues with `resume`); the folder must hold a comparison with the
    same configuration and data, unless `overwrite` replaces it. The result carries AUC CIs
    per finding and DeLong's test for every pair of formulations (p-values also
    Holm-adjusted over all pairs and findings).
    """
    run_dir = Path(run_dir)
    check_schedule(cfg, cfg.stages)  # before plan.json: a refused schedule leaves no folder
    with main_lock(run_dir):
        if is_main():
            _fresh_if(run_dir, overwrite)
            same_config(run_dir / "plan.json", _plan_key(data, cfg), str(run_dir))
        barrier()
        return _compare(data, cfg, run_dir, formulations, log, eval_cfg, resume, track)


def _plan_key(data: Dataset, cfg: TrainConfig, without: tuple[str, ...] = ()) -> dict:
    """What every run of a comparison (or of a seed series, `without` the seed) shares."""
    key = _resume_key(data, get_formulation("multilabel"), cfg, cfg.stages)
    key.pop("formulation")
    for k in without:
        key["train"].pop(k, None)
    return key


def _fresh_if(run_dir: Path, overwrite: bool) -> None:
    """With `overwrite`, the old folder is moved aside and removed before anything is written."""
    if overwrite and run_dir.exists():
        claim(run_dir, overwrite=True)


def _compare(data, cfg, run_dir, formulations, log, eval_cfg, resume, track) -> dict:
    out = {}
    for name in formulations:
        sub = run_dir / name
        if is_complete(sub):
            check_recorded(sub, data, get_formulation(name), cfg, cfg.stages)
            out[name] = load_run(sub)["record"]
            out[name].pop("complete", None)
            if log:
                log({"event": "skip", "formulation": name, "reason": "complete run found"})
            continue
        out[name] = train_formulation(data, name, cfg, sub, log, resume=resume, track=track)
    runs = {name: load_run(run_dir / name) for name in formulations}
    preds = {name: r["predictions"] for name, r in runs.items()}
    evals = {
        name: evaluate(r["predictions"], cfg.findings, eval_cfg, r["config"].get("thresholds"), log)
        for name, r in runs.items()
    }
    for name, by_f in evals.items():
        for f, e in by_f.items():
            out[name]["findings"][f].update(
                auc_ci=e["auc_ci"], auc_ci_reason=e["auc_ci_reason"], pr_auc=e["pr_auc"]
            )
    pairs = with_holm(pairwise(preds, cfg.findings))
    result = {
        "formulations": out,
        "pairs": pairs,
        "findings": list(cfg.findings),
        "auc_ci_method": next(iter(next(iter(evals.values())).values()))["auc_ci_method"],
        "pairs_method": CLUSTERED,
        "thresholds": {
            "method": cfg.threshold,
            "target": cfg.threshold_target,
            "chosen_on": "valid",
        },
        "select": cfg.select,
        "test_set": TEST_SET_RULE,
        "run_dir": str(run_dir),
        "synthetic": data.synthetic,
        "preset": cfg.preset,
        "arch": cfg.arch,
        "size": cfg.size,
    }
    if is_main():
        write_json(run_dir / "evaluation.json", evals)
        write_json(run_dir / "compare.json", result)
    return result


def unfreeze_ablation(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    formulation: str = "multilabel",
    log: Log | None = None,
    resume: bool = False,
    overwrite: bool = False,
    track: Tracking | None = None,
) -> dict:
    """Experiment I: the ablation stages in sequence, test metrics after each stage.

    The best stage is the one with the lowest validation loss (chosen without the test set).
    A complete run in `run_dir` is read back and shown, not retrained, as `compare` reads
    back its finished formulations (`make ablation` twice shows the same result); it must
    hold the same configuration and data, else the differences are listed. `overwrite`
    trains it again; an interrupted run still needs `resume`.
    """
    finished = not overwrite and is_complete(run_dir)
    summary = train_formulation(
        data, formulation, cfg, run_dir, log, stages=cfg.ablation_stages,
        resume=resume or finished, overwrite=overwrite, track=track,
    )  # fmt: skip
    stages = _ablation_stages(cfg, summary, load_run(run_dir)["metrics"]["per_stage"])
    best = stages[int(np.nanargmin([s["valid_loss"] for s in stages]))]["name"]
    # each network's own best stage: ★ averages the networks' losses (`single` has several)
    by_net = {
        n["network"]: cfg.ablation_stages[
            int(np.nanargmin([s["valid_loss"] for s in n["stages"]]))
        ].name
        for n in summary["networks"]
    }
    rule = "validation loss" + (
        f" (the mean over the {len(by_net)} networks)" if len(by_net) > 1 else ""
    )
    result = {
        "stages": stages, "best_stage": best, "best_stage_by_network": by_net,
        "best_stage_rule": rule, "selected_stage": summary["selected_stage"],
        "select": cfg.select, "thresholds": summary["thresholds"], "formulation": formulation,
        "run_dir": str(run_dir), "synthetic": data.synthetic, "preset": cfg.preset,
        "arch": cfg.arch, "freeze_style": cfg.freeze_style,
        "findings": summary["findings"],  # the selected model's
        "train_seconds": summary["train_seconds"],
    }  # fmt: skip
    if is_main():
        write_json(Path(run_dir) / "ablation.json", result)
    return result


def _ablation_stages(cfg: TrainConfig, summary: dict, metrics: dict) -> list[dict]:
    """Each ablation stage summed over the networks (their mean validation loss), with the
    test metrics of the stage's model per finding."""
    stages = []
    for i, st in enumerate(cfg.ablation_stages):
        per_net = [n["stages"][i] for n in summary["networks"]]
        stages.append({
            "name": st.name, "unfreeze": st.unfreeze,
            "unfrozen": per_net[0]["unfrozen"],  # same architecture for every network
            "trainable_params": sum(s["trainable_params"] for s in per_net),
            "epochs": sum(s["epochs"] for s in per_net),
            "valid_loss": float(np.mean([s["valid_loss"] for s in per_net])),
            "train_seconds": sum(s["train_seconds"] for s in per_net),
            "findings": {f: headline(m) for f, m in metrics[st.name].items()},
        })  # fmt: skip
    return stages


# -- one entry: any experiment, on one seed or several --------------------------------------
KINDS = ("train", "compare", "ablation")
ONE_SEED = {"train": TrainResult, "compare": CompareResult, "ablation": AblationResult}


def run(
    kind: str,
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    *,
    seeds: tuple[int, ...] | None = None,
    formulation: str = "multilabel",
    formulations: tuple[str, ...] = tuple(FORMULATIONS),
    log: Log | None = None,
    eval_cfg: EvalConfig = EvalConfig(),
    resume: bool = False,
    overwrite: bool = False,
    track: Tracking | None = None,
) -> TrainingResult:
    """The experiment `kind` — `train` (one `formulation`), `compare` (`formulations`,
    Experiment II) or `ablation` (progressive unfreezing of one `formulation`, Experiment
    I) — into `run_dir`; with `seeds`, once per seed (RUN/seed-K; finished seeds are read back
    on `resume`) with the spread of AUC and accuracy across the seeds, by formulation (train,
    compare) or stage (ablation)."""
    if kind not in KINDS:
        raise UsageError(f"experiment {kind!r}: one of {', '.join(KINDS)}")
    go = {"resume": resume, "track": track}
    if kind == "train":

        def one(c, sub, over=overwrite):
            return train_formulation(data, formulation, c, sub, log, overwrite=over, **go)

        def done(sub):
            return load_run(sub)["record"] if resume and is_complete(sub) else None

        rows, about, stages = (lambda r: {formulation: r["findings"]},
                               {"formulation": formulation}, cfg.stages)  # fmt: skip
    elif kind == "compare":

        def one(c, sub, over=overwrite):
            return compare(data, c, sub, formulations, log, eval_cfg, overwrite=over, **go)

        def done(sub):
            return read_json(sub / "compare.json")

        rows = lambda r: {k: v["findings"] for k, v in r["formulations"].items()}  # noqa: E731
        about, stages = {"formulations": list(formulations)}, cfg.stages
    else:

        def one(c, sub, over=overwrite):
            return unfreeze_ablation(data, c, sub, formulation, log, overwrite=over, **go)

        def done(sub):
            return read_json(sub / "ablation.json") if resume else None

        rows = lambda r: {s["name"]: s["findings"] for s in r["stages"]}  # noqa: E731
        about, stages = {"formulation": formulation}, cfg.ablation_stages
    if not seeds:
        return ONE_SEED[kind].read(one(cfg, run_dir), run_dir)
    check_schedule(cfg, stages)  # before the series' plan.json
    r = _seeded(data, cfg, run_dir, overwrite)(
        seeds, cfg, run_dir, lambda c, sub: one(c, sub, False), done, rows, log
    )
    return SeedsResult.read({**r, **_about(data, cfg), **about}, run_dir)


def compare_seeds(data, cfg, run_dir, seeds, formulations=tuple(FORMULATIONS), log=None,
                  eval_cfg=EvalConfig(), resume=False, overwrite=False,
                  track=None) -> TrainingResult:  # fmt: skip
    """`compare` once per seed (RUN/seed-K): `run("compare", ..., seeds=seeds)`."""
    return run("compare", data, cfg, run_dir, seeds=seeds, formulations=formulations, log=log,
               eval_cfg=eval_cfg, resume=resume, overwrite=overwrite, track=track)  # fmt: skip


def train_seeds(data, formulation, cfg, run_dir, seeds, log=None, resume=False,
                overwrite=False, track=None) -> TrainingResult:  # fmt: skip
    """`train_formulation` once per seed (RUN/seed-K): `run("train", ..., seeds=seeds)`."""
    return run("train", data, cfg, run_dir, seeds=seeds, formulation=formulation, log=log,
               resume=resume, overwrite=overwrite, track=track)  # fmt: skip


def ablation_seeds(data, cfg, run_dir, seeds, formulation="multilabel", log=None,
                   resume=False, overwrite=False, track=None) -> TrainingResult:  # fmt: skip
    """`unfreeze_ablation` once per seed (RUN/seed-K): `run("ablation", ..., seeds=seeds)`."""
    return run("ablation", data, cfg, run_dir, seeds=seeds, formulation=formulation, log=log,
               resume=resume, overwrite=overwrite, track=track)  # fmt: skip


def _seeded(data: Dataset, cfg: TrainConfig, run_dir: str | Path, overwrite: bool):
    """`run_seeds`, holding the series' lock, after checking it is the same series (the seed
    aside) as the one already in `run_dir`."""
    run_dir = Path(run_dir)

    def run(*args, **kwargs) -> dict:
        with main_lock(run_dir):
            if is_main():
                _fresh_if(run_dir, overwrite)
                key = _plan_key(data, cfg, without=("seed",))
                same_config(run_dir / "plan.json", key, str(run_dir))
            barrier()
            return run_seeds(*args, **kwargs)

    return run


def _about(data: Dataset, cfg: TrainConfig) -> dict:
    return {"synthetic": data.synthetic, "preset": cfg.preset, "arch": cfg.arch,
            "size": cfg.size, "findings": list(cfg.findings)}  # fmt: skip


def ablation_plan(cfg: TrainConfig, formulation: str = "multilabel") -> AblationPlan:
    """The ablation's stages with trainable parameter counts, without data or training."""
    form = get_formulation(formulation)
    net = form.networks(cfg.findings)[0]
    model = build_model(cfg.arch, form.n_out(net), size=cfg.size)
    learn = Learner(
        DataLoaders(),
        model,
        loss_func=form.loss(net, powerset_bits(len(net.findings))),  # one row per combination
        splitter=block_splitter,
        train_bn=Freezing.of(cfg).train_bn,
    )
    stages = plan(learn, cfg.ablation_stages, cfg.arch)
    return AblationPlan.from_json(
        {
            "stages": stages,
            "arch": cfg.arch,
            "formulation": formulation,
            "freeze_style": cfg.freeze_style,
            "networks": len(form.networks(cfg.findings)),
            "total_params": sum(p.numel() for p in model.parameters()),
        }
    )


# -- the `fastcxr lr-find` command's files ------------------------------------------------
def write_lr_find(data, form, cfg, stages, out_dir, start_lr=START_LR, end_lr=END_LR,
                  num_it=NUM_IT, log=None) -> LRFindResult:  # fmt: skip
    """`lr_find`, then OUT/lr_find.json (the suggestions and curves) and OUT/lr_find.png
    (loss against rate per stage, the suggestions marked), each written atomically."""
    from fastcxr.evaluate.figures import lr_find_figure, save_figure

    out_dir = writable_folder(out_dir)  # before the sweep, not after it (#22 item 18)
    result = lr_find(data, form, cfg, stages, start_lr, end_lr, num_it, log)
    result["files"] = {"json": str(out_dir / "lr_find.json"), "plot": str(out_dir / "lr_find.png")}
    write_atomic(out_dir / "lr_find.png",
                 lambda t: save_figure(lr_find_figure(result), t, format="png"))  # fmt: skip
    write_json(out_dir / "lr_find.json", result)
    return LRFindResult.from_json(result)
