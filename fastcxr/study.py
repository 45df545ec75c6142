"""The study's jobs as library functions: train one formulation, compare, unfreeze-ablation.

They return plain dicts (the same ones `--json` prints) and write run records; they never
print. `log` receives one dict per event (epoch finished, network started) for progress.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.callback.progress import ProgressCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import Adam, OptimWrapper
from fastai.torch_basics import default_device, set_seed
from fastai.vision.learner import vision_learner

from fastcxr.config import Stage, TrainConfig
from fastcxr.data import (
    NetworkData,
    apply_policy,
    check_files,
    network_data,
    require_thresholds,
    scored,
)
from fastcxr.distributed import barrier, init, is_main, local_view, unwrap, world_size
from fastcxr.evaluation import CLUSTERED, EvalConfig, evaluate, pairwise, with_holm
from fastcxr.fastpath import Accelerated, Speed, fused_adamw, resolve_speed
from fastcxr.formulations import (
    FORMULATIONS,
    Formulation,
    Network,
    get_formulation,
    powerset_bits,
)
from fastcxr.manifest import file_sha256, read_manifest
from fastcxr.metrics import all_metrics
from fastcxr.metrics import thresholds as thresholds_for
from fastcxr.models import (
    TorchvisionArch,
    block_splitter,
    build_model,
    group_names,
    resolve_unfreeze,
)
from fastcxr.preprocessing import Preprocessing
from fastcxr.runs import (
    RunError,
    RunLock,
    claim,
    config_differences,
    environment,
    is_complete,
    load_run,
    mark_complete,
    same_config,
    save_torch,
    save_weights,
    write_csv,
    write_json,
)
from fastcxr.schedule import Interrupted, StageResult, plan, run_stage
from fastcxr.seeds import read_json, run_seeds
from fastcxr.stopping import STOP

Log = Callable[[dict], None]


@dataclass(frozen=True)
class Dataset:
    """A manifest on disk: its rows, the folder its image paths are relative to, and its hash."""

    manifest: Path
    df: pd.DataFrame
    synthetic: bool = False

    @property
    def root(self) -> Path:
        return self.manifest.parent

    @classmethod
    def load(cls, manifest: str | Path, synthetic: bool = False) -> Dataset:
        p = Path(manifest)
        p = p / "manifest.csv" if p.is_dir() else p
        return cls(p.resolve(), read_manifest(p), synthetic)

    def preprocessing(self, size: int) -> Preprocessing:
        """The preprocessing its images were made with (`prepare.json`), trained at `size`."""
        return Preprocessing.of_dataset(self.manifest, size)

    def describe(self) -> dict:
        return {
            "manifest": str(self.manifest),
            "sha256": file_sha256(self.manifest),
            "synthetic": self.synthetic,
            "images": len(self.df),
        }


def make_learner(nd: NetworkData, form: Formulation, net: Network, cfg: TrainConfig) -> Learner:
    """`vision_learner` with a 1-channel stem, the block splitter and the formulation's loss;
    on the fast path also bf16/channels_last/compile (`Accelerated`) and a fused AdamW."""
    arch = TorchvisionArch(cfg.arch, cfg.weights)
    fast = nd.speed.loader == "fast"
    learn = vision_learner(
        nd.dls, arch, n_out=form.n_out(net), pretrained=cfg.pretrained or bool(cfg.weights),
        loss_func=form.loss(net, nd.y_train, device=nd.dls.device), splitter=block_splitter,
        cut=arch.cut, n_in=1, normalize=False, metrics=[],
        opt_func=fused_adamw(nd.speed) if fast else Adam,
        train_bn=cfg.freeze_style == "fastai",
    )  # fmt: skip
    if fast:
        learn.add_cb(Accelerated(nd.speed))
    if world_size() > 1:
        from fastcxr.ddp import DataParallel

        learn.add_cb(DataParallel())
    return silence(learn)


def silence(learn: Learner) -> Learner:
    """No progress bars and no per-epoch printing (fastcxr reports through `log`)."""
    if ProgressCallback in [type(c) for c in learn.cbs]:
        learn.remove_cb(ProgressCallback)
    learn.logger = _quiet
    return learn


def seed_everything(seed: int, speed: Speed) -> None:
    """Seed every RNG. The plain path is also bit-reproducible (deterministic cuDNN); the fast
    path lets cuDNN pick its fastest (non-deterministic) kernels."""
    set_seed(seed, reproducible=not speed.cudnn_benchmark)
    if speed.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def _quiet(*args, **kwargs) -> None:
    """fastai's Recorder prints each epoch; fastcxr reports epochs through `log` instead."""


def _stage_dict(r: StageResult) -> dict:
    return {
        "name": r.stage.name,
        "unfreeze": r.stage.unfreeze,
        "unfrozen": r.unfrozen,
        "trainable_params": r.trainable_params,
        "epochs": r.epochs,
        "best_epoch": r.best_epoch,
        "valid_loss": r.valid_loss,
        "train_seconds": r.seconds,
        "compile_seconds": r.compile_seconds,
        "lr": r.stage.lr,
    }


def _sidecar(
    cfg: TrainConfig, form: Formulation, net: Network, nd: NetworkData, selected: str,
    thresholds: dict[str, float | None],
) -> dict:  # fmt: skip
    return {
        "format": "fastcxr-weights-1",
        "arch": cfg.arch,
        "formulation": form.name,
        "findings": list(net.findings),
        "n_out": form.n_out(net),
        "n_in": 1,
        "head": "fastai vision_learner head (concat pool, BN, dropout, 2 linear)",
        "preprocessing": nd.preprocessing.to_dict(),
        "selected_stage": selected,
        "thresholds": thresholds,  # chosen on the validation split
        "threshold_method": {"method": cfg.threshold, "target": cfg.threshold_target},
        "train_images": len(nd.train),
        "inference_precision": nd.speed.precision,  # what the run record's predictions used
    }


def _columns(findings: tuple[str, ...], net: Network) -> list[int]:
    return [findings.index(f) for f in net.findings]


TEST_SET_RULE = (
    "each finding is scored on the test images whose raw label for it is 0 or 1: the same "
    "images for every label policy, formulation and seed (the policy chooses the training "
    "and validation images and their targets; thresholds are chosen on the validation images "
    "labelled 0 or 1)"
)


@dataclass
class Outputs:
    """Per stage, the probabilities on the test and validation images, (n, k) each; a
    network fills its findings' columns."""

    test: dict[str, np.ndarray]
    valid: dict[str, np.ndarray]

    @classmethod
    def empty(cls, stages, n_test: int, n_valid: int, k: int) -> Outputs:
        return cls(
            {s.name: np.full((n_test, k), np.nan) for s in stages},
            {s.name: np.full((n_valid, k), np.nan) for s in stages},
        )

    def selected(self, chosen: dict[str, str], nets, findings) -> tuple[np.ndarray, np.ndarray]:
        """Test and validation probabilities, each network's columns from its chosen stage."""
        test = np.full_like(next(iter(self.test.values())), np.nan)
        valid = np.full_like(next(iter(self.valid.values())), np.nan)
        for net in nets:
            cols = _columns(findings, net)
            test[:, cols] = self.test[chosen[net.name]][:, cols]
            valid[:, cols] = self.valid[chosen[net.name]][:, cols]
        return test, valid


def select_stage(results: list[StageResult], how: str) -> int:
    """Index of the stage a run reports and saves: lowest validation loss (`best`, the
    earliest on a tie) or the last one (`last`). Chosen without the test set."""
    if how == "last":
        return len(results) - 1
    losses = np.array([r.valid_loss for r in results], float)
    if np.isnan(losses).all():
        return len(results) - 1
    return int(np.nanargmin(losses))


def train_formulation(
    data: Dataset,
    formulation: str,
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = None,
    stages: tuple[Stage, ...] | None = None,
    resume: bool = False,
    overwrite: bool = False,
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
        return _train(data, df, form, cfg, stages, run_dir, log, resume)


def check_schedule(cfg: TrainConfig, stages) -> None:
    """Architecture, loader, precision and every stage's unfreeze spec checked before any
    folder is written (the model is built on the meta device: no memory, no weights)."""
    resolve_speed(cfg, default_device())
    with torch.device("meta"):
        names = group_names(build_model(cfg.arch, 1))
    for st in stages:
        try:
            resolve_unfreeze(st.unfreeze, names)
        except ValueError as e:
            raise ValueError(f"--stages: stage {st.name}: {e}") from None


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
    rec = json.loads((run_dir / "config.json").read_text())
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


def _train(data, df, form, cfg, stages, run_dir, log, resume) -> dict:
    """`train_formulation` once its folder is claimed: every network, then the record."""
    findings = cfg.findings
    speed = resolve_speed(cfg, default_device())
    prep = data.preprocessing(cfg.size)
    test = df[df["split"] == "test"].reset_index(drop=True)
    valid = df[df["split"] == "valid"].reset_index(drop=True)
    y_test = test[[scored(f) for f in findings]].to_numpy(float)
    y_valid = valid[[scored(f) for f in findings]].to_numpy(float)
    outs = Outputs.empty(stages, len(test), len(valid), len(findings))
    job = Job(data, df, prep, form, cfg, stages, speed, outs, y_valid, run_dir, log, resume)
    history, networks = [], []
    t_start = time.perf_counter()
    nets = form.networks(findings)
    for net in nets:
        summary_net, rows = _train_network(job, net)
        networks.append(summary_net)
        history += rows
    chosen = {n["network"]: n["selected_stage"] for n in networks}
    probs, valid_probs = outs.selected(chosen, nets, findings)
    thresholds = all_thresholds(y_valid, valid_probs, findings, cfg)
    metrics = all_metrics(y_test, probs, findings, thresholds)
    per_stage = {}
    for s in stages:
        t_s = all_thresholds(y_valid, outs.valid[s.name], findings, cfg)
        per_stage[s.name] = all_metrics(y_test, outs.test[s.name], findings, t_s)
    epochs = sum(n["epochs"] for n in networks)
    train_seconds = sum(n["train_seconds"] for n in networks)
    summary = {
        "formulation": form.name, "description": form.description,
        "findings": {f: _headline(m) for f, m in metrics.items()},
        "thresholds": {"method": cfg.threshold, "target": cfg.threshold_target,
                       "chosen_on": "valid", "values": thresholds},
        "select": cfg.select, "selected_stage": chosen,
        "epochs": epochs, "seconds_per_epoch": train_seconds / max(epochs, 1),
        "train_seconds": train_seconds, "networks": networks,
        "compile_seconds": sum(n.get("compile_seconds", 0.0) for n in networks),
        "split_sizes": df["split"].value_counts().to_dict(),
        "test_images_scored": {f: int((~np.isnan(y_test[:, i])).sum())
                               for i, f in enumerate(findings)},
        "wall_seconds": time.perf_counter() - t_start,
    }  # fmt: skip
    if is_main():
        _write_record(run_dir, cfg, form, stages, data, prep, speed, thresholds, nets, history)
        pred_df = pd.concat(
            [
                _predictions(test, probs, findings, "test"),
                _predictions(valid, valid_probs, findings, "valid"),
            ],
            ignore_index=True,
        )
        write_csv(run_dir / "predictions.csv", pred_df)
        write_json(
            run_dir / "metrics.json",
            {
                "findings": metrics,
                "per_stage": per_stage,
                **{k: v for k, v in summary.items() if k != "findings"},
            },
        )
        mark_complete(run_dir, summary)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # the record is complete
    barrier()
    return summary


def all_thresholds(y_valid, p_valid, findings, cfg: TrainConfig) -> dict[str, float | None]:
    return thresholds_for(y_valid, p_valid, findings, cfg.threshold, cfg.threshold_target)


def _headline(m: dict) -> dict:
    keys = ("accuracy", "auc", "threshold", "accuracy_at_0.5", "sensitivity", "specificity",
            "n", "positives", "reason")  # fmt: skip
    return {k: m[k] for k in keys}


def _write_record(run_dir, cfg, form, stages, data, prep, speed, thresholds, nets, history):
    write_json(
        run_dir / "config.json",
        {
            "train": cfg.to_dict(),
            "formulation": form.name,
            "networks": [n.name for n in nets],
            "stages": [s.__dict__ for s in stages],
            "data": data.describe(),
            "preprocessing": prep.to_dict(),
            "test_set": TEST_SET_RULE,
            "label_policy": {"uncertain": cfg.uncertain, "blank": cfg.blank,
                             "applies_to": ["train", "valid"]},
            "thresholds": {"method": cfg.threshold, "target": cfg.threshold_target,
                           "chosen_on": "valid", "values": thresholds},
            "environment": {**environment(), "processes": world_size()},
            "speed": speed.to_dict(),
        },
    )  # fmt: skip
    write_csv(run_dir / "history.csv", pd.DataFrame(history))


@dataclass
class Job:
    """What every network of one formulation run shares."""

    data: Dataset
    df: pd.DataFrame  # `apply_policy`'s rows
    prep: Preprocessing
    form: Formulation
    cfg: TrainConfig
    stages: tuple[Stage, ...]
    speed: Speed
    outs: Outputs
    y_valid: np.ndarray  # (n_valid, k) certain labels, NaN where not scored
    run_dir: Path
    log: Log | None
    resume: bool


def _train_network(job: Job, net: Network) -> tuple[dict, list[dict]]:
    """Train one network through the stages (or restore it from its checkpoint); fill its
    columns of `job.outs`, save its selected stage's weights with the thresholds chosen on
    validation; returns (summary, history rows)."""
    data, df, prep, form, cfg, stages = job.data, job.df, job.prep, job.form, job.cfg, job.stages
    speed, outs, run_dir, log = job.speed, job.outs, job.run_dir, job.log
    cols = _columns(cfg.findings, net)
    ckpt = run_dir / "checkpoints" / f"{net.name}.pt"
    state = _load_checkpoint(ckpt) if job.resume else None
    if state and state["complete"]:
        _restore_network(state, outs, cols)
        if log:
            log({"event": "skip", "formulation": form.name,
                 "reason": f"network {net.name} finished before the interruption"})  # fmt: skip
        return state["summary"], state["history"]
    if log:
        log({"event": "network", "formulation": form.name, "network": net.name})
    seed_everything(cfg.seed, speed)
    nd = network_data(df, data.root, form, net, cfg, speed=speed, preprocessing=prep)
    learn = make_learner(nd, form, net, cfg)
    results, net_hist, first = [], [], 0
    if state:
        first = state["stage_index"]
        learn.model.load_state_dict(state["model"])
        _restore_network(state, outs, cols)
        results = [StageResult(**{**r, "stage": stages[i]}) for i, r in enumerate(state["results"])]
        net_hist = list(state["history"])
        _set_rng(state["rng"], learn)
        if log:
            log({"event": "resume", "formulation": form.name, "network": net.name,
                 "stage": stages[min(first, len(stages) - 1)].name,
                 "epochs_done": len(net_hist)})  # fmt: skip
    checkpoint = NetworkCheckpoint(ckpt, learn, results, net_hist, outs, cols)
    best_file = ckpt.with_name(f"{net.name}.selected.pt")  # survives an interruption
    best_state = None
    for si in range(first, len(stages)):

        def on_epoch(stage_state: dict, si: int = si) -> None:
            checkpoint.save(si, stage_state)
            if STOP.is_set():
                raise Interrupted(
                    f"stopped by request after epoch {stage_state['epochs_done']} of stage "
                    f"{stages[si].name}; continue with the same --name and --resume"
                )

        resume_stage = None
        if state and si == first and state.get("stage"):
            resume_stage = {**state["stage"], "opt": state["opt"]}
        results.append(run_stage(learn, stages[si], cfg, net_hist, log, resume_stage, on_epoch))
        with local_view():
            test_preds, _ = learn.get_preds(dl=nd.test_dl)
            valid_preds, _ = learn.get_preds(dl=nd.dls.valid)  # thresholds, chosen on valid
        outs.test[stages[si].name][:, cols] = form.probabilities(net, test_preds)
        outs.valid[stages[si].name][:, cols] = form.probabilities(net, valid_preds)
        if cfg.select == "best" and select_stage(results, "best") == si:
            best_state = _cpu_state(learn.model)
            if is_main():
                save_torch(best_file, {"stage_index": si, "model": best_state})
        checkpoint.save(si + 1)
    sel = select_stage(results, cfg.select)
    if sel != len(stages) - 1:  # an earlier stage was better: its weights are the model
        if best_state is None:  # selected before an interruption
            best_state = torch.load(best_file, weights_only=True)["model"]
        unwrap(learn.model).load_state_dict(best_state)
    t = all_thresholds(
        job.y_valid[:, cols], outs.valid[stages[sel].name][:, cols], net.findings, cfg
    )
    if is_main():
        side = _sidecar(cfg, form, net, nd, stages[sel].name, t)
        save_weights(run_dir / f"model-{net.name}.pth", unwrap(learn.model), side)
    summary_net = {
        "network": net.name,
        "findings": list(net.findings),
        "stages": [_stage_dict(r) for r in results],
        "selected_stage": stages[sel].name,
        "epochs": sum(r.epochs for r in results),
        "train_seconds": sum(r.seconds for r in results),
        "compile_seconds": sum(r.compile_seconds for r in results),
    }
    net_rows = [{"network": net.name, **row} for row in net_hist]
    checkpoint.save(len(stages), complete=True, summary=summary_net, hist=net_rows)
    return summary_net, net_rows


def _cpu_state(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in unwrap(model).state_dict().items()}


@contextlib.contextmanager
def main_lock(run_dir: Path):
    """`RunLock` on the main process; the other processes of a multi-GPU run follow it."""
    if not is_main():
        yield None
        return
    with RunLock(run_dir) as lock:
        yield lock


# -- checkpoints ----------------------------------------------------------------------------


def _load_checkpoint(path: Path) -> dict | None:
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunError(
            f"{path}: unreadable checkpoint ({type(e).__name__}: {e}); delete it to "
            "train this network afresh"
        ) from e


def _get_rng(learn: Learner | None = None) -> dict:
    """Every RNG training draws from: torch (CPU and CUDA), Python, NumPy, and the training
    loader's own `random.Random` (fastai's DataLoader shuffles with it, not the global one)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [
            name,
            torch.from_numpy(keys.astype(np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    rng = _loader_rng(learn)
    if rng is not None:
        out["train_loader"] = rng.getstate()
    return out


def _loader_rng(learn: Learner | None) -> random.Random | None:
    """The training loader's shuffling RNG (under DDP, the wrapped loader's)."""
    dl = learn.dls.train if learn is not None else None
    for _ in range(3):
        if dl is None:
            return None
        rng = dl.__dict__.get("rng")
        if isinstance(rng, random.Random):
            return rng
        dl = dl.__dict__.get("dl")
    return None


def _set_rng(rng: dict, learn: Learner | None = None) -> None:
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    loader_rng = _loader_rng(learn)
    if loader_rng is not None and "train_loader" in rng:
        v, state, gauss = rng["train_loader"]
        loader_rng.setstate((v, tuple(state), gauss))
    v, state, gauss = rng["python"]
    random.setstate((v, tuple(state), gauss))
    name, keys, pos, has_gauss, cached = rng["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))


@dataclass
class NetworkCheckpoint:
    """One network's checkpoint file and the training state it is written from (rank 0)."""

    path: Path
    learn: Learner
    results: list[StageResult]
    hist: list[dict]
    outs: Outputs
    cols: list[int]

    def save(
        self,
        stage_index: int,
        stage_state: dict | None = None,
        complete: bool = False,
        summary: dict | None = None,
        hist: list[dict] | None = None,
    ) -> None:
        """Everything needed to continue this network: weights, optimizer, schedule position,
        the stage's early-stopping state, history, predictions so far, RNG states."""
        if not is_main():
            return
        if stage_state is not None:
            best, best_epoch, best_state = stage_state["restore"]
            es_best, wait = stage_state["early_stop"]
            stage_state = {
                **stage_state,
                "restore": (float(best), best_epoch, best_state),
                "early_stop": (float(es_best), int(wait)),
                "smooth_loss": tuple(stage_state.get("smooth_loss", (0, 0.0))),
            }
        opt = None
        if isinstance(self.learn.opt, OptimWrapper):  # the fast path's torch AdamW
            opt = {"torch": self.learn.opt.opt.state_dict()}
        elif self.learn.opt is not None:
            sd = self.learn.opt.state_dict()
            opt = {"state": list(sd["state"]), "hypers": [dict(h) for h in sd["hypers"]]}
        model = unwrap(self.learn.model).state_dict()
        payload = {
            "complete": complete, "stage_index": stage_index, "stage": stage_state,
            "model": {k: v.detach().cpu() for k, v in model.items()},
            "opt": opt, "results": [{k: v for k, v in r.__dict__.items() if k != "stage"}
                                    for r in self.results],
            "history": self.hist if hist is None else hist, "summary": summary,
            "rng": _get_rng(self.learn),
            "valid_probs": {k: torch.from_numpy(v[:, self.cols].copy())
                            for k, v in self.outs.valid.items()},
            "stage_probs": {k: torch.from_numpy(v[:, self.cols].copy())
                            for k, v in self.outs.test.items()},
        }  # fmt: skip
        save_torch(self.path, payload)


def _restore_network(state: dict, outs: Outputs, cols) -> None:
    for saved, into in ((state["stage_probs"], outs.test), (state["valid_probs"], outs.valid)):
        for k, t in saved.items():
            if k in into:
                into[k][:, cols] = t.numpy()


def _predictions(rows: pd.DataFrame, probs: np.ndarray, findings, split: str) -> pd.DataFrame:
    """Per image: its certain label per finding (blank where it is not scored on it) and the
    selected model's probability."""
    out = rows[["image", "patient_id"]].copy()
    out.insert(0, "split", split)
    for i, f in enumerate(findings):
        out[f"y_{f}"] = pd.array(rows[scored(f)].to_numpy(float), dtype="Int64")
        out[f"p_{f}"] = probs[:, i]
    return out


def compare(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    formulations: tuple[str, ...] = tuple(FORMULATIONS),
    log: Log | None = None,
    eval_cfg: EvalConfig = EvalConfig(),
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """Experiment II: every formulation with the same data, split, seed and schedule.

    Formulations whose run record is already complete are read back, not retrained (an
    interrupted one continues with `resume`); the folder must hold a comparison with the
    same configuration and data, unless `overwrite` replaces it. The result carries AUC CIs
    per finding and DeLong's test for every pair of formulations (p-values also
    Holm-adjusted over all pairs and findings).
    """
    run_dir = Path(run_dir)
    with main_lock(run_dir):
        if is_main():
            _fresh_if(run_dir, overwrite)
            same_config(run_dir / "plan.json", _plan_key(data, cfg), str(run_dir))
        barrier()
        return _compare(data, cfg, run_dir, formulations, log, eval_cfg, resume)


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


def _compare(data, cfg, run_dir, formulations, log, eval_cfg, resume) -> dict:
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
        out[name] = train_formulation(data, name, cfg, sub, log, resume=resume)
    runs = {name: load_run(run_dir / name) for name in formulations}
    preds = {name: r["predictions"] for name, r in runs.items()}
    evals = {
        name: evaluate(r["predictions"], cfg.findings, eval_cfg, r["config"].get("thresholds"))
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
) -> dict:
    """Experiment I: the ablation stages in sequence, test metrics after each stage.

    The best stage is the one with the lowest validation loss (chosen without the test set).
    """
    summary = train_formulation(
        data, formulation, cfg, run_dir, log, stages=cfg.ablation_stages, resume=resume,
        overwrite=overwrite,
    )  # fmt: skip
    metrics = load_run(run_dir)["metrics"]["per_stage"]
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
            "findings": {f: _headline(m) for f, m in metrics[st.name].items()},
        })  # fmt: skip
    best = stages[int(np.nanargmin([s["valid_loss"] for s in stages]))]["name"]
    result = {
        "stages": stages,
        "best_stage": best,
        "selected_stage": summary["selected_stage"],
        "select": cfg.select,
        "thresholds": summary["thresholds"],
        "formulation": formulation,
        "run_dir": str(run_dir),
        "synthetic": data.synthetic,
        "preset": cfg.preset,
        "arch": cfg.arch,
        "freeze_style": cfg.freeze_style,
        "findings": summary["findings"],  # the selected model's
        "train_seconds": summary["train_seconds"],
    }
    if is_main():
        write_json(Path(run_dir) / "ablation.json", result)
    return result


def compare_seeds(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    seeds: tuple[int, ...],
    formulations: tuple[str, ...] = tuple(FORMULATIONS),
    log: Log | None = None,
    eval_cfg: EvalConfig = EvalConfig(),
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """`compare` once per seed (RUN/seed-K), with the spread of AUC and accuracy across seeds.
    A seed whose compare.json exists is read back (`compare` reads back finished runs too)."""

    def one(c: TrainConfig, sub: Path) -> dict:
        return compare(data, c, sub, formulations, log, eval_cfg, resume)

    r = _seeded(data, cfg, run_dir, overwrite)(
        seeds, cfg, run_dir, one, lambda sub: read_json(sub / "compare.json"),
        lambda res: {k: v["findings"] for k, v in res["formulations"].items()}, log,
    )  # fmt: skip
    return {**r, **_about(data, cfg), "formulations": list(formulations)}


def train_seeds(
    data: Dataset,
    formulation: str,
    cfg: TrainConfig,
    run_dir: str | Path,
    seeds: tuple[int, ...],
    log: Log | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """`train_formulation` once per seed (RUN/seed-K); with `resume`, finished seeds are read
    back."""

    def one(c: TrainConfig, sub: Path) -> dict:
        return train_formulation(data, formulation, c, sub, log, resume=resume)

    def done(sub: Path) -> dict | None:
        return load_run(sub)["record"] if resume and is_complete(sub) else None

    r = _seeded(data, cfg, run_dir, overwrite)(
        seeds, cfg, run_dir, one, done, lambda res: {formulation: res["findings"]}, log
    )
    return {**r, **_about(data, cfg), "formulation": formulation}


def ablation_seeds(
    data: Dataset,
    cfg: TrainConfig,
    run_dir: str | Path,
    seeds: tuple[int, ...],
    formulation: str = "multilabel",
    log: Log | None = None,
    resume: bool = False,
    overwrite: bool = False,
) -> dict:
    """`unfreeze_ablation` once per seed (RUN/seed-K); the aggregate is keyed by stage."""

    def one(c: TrainConfig, sub: Path) -> dict:
        return unfreeze_ablation(data, c, sub, formulation, log, resume)

    def done(sub: Path) -> dict | None:
        return read_json(sub / "ablation.json") if resume else None

    r = _seeded(data, cfg, run_dir, overwrite)(
        seeds, cfg, run_dir, one, done,
        lambda res: {s["name"]: s["findings"] for s in res["stages"]}, log,
    )  # fmt: skip
    return {**r, **_about(data, cfg), "formulation": formulation}


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


def ablation_plan(cfg: TrainConfig, formulation: str = "multilabel") -> dict:
    """The ablation's stages with trainable parameter counts, without data or training."""
    form = get_formulation(formulation)
    net = form.networks(cfg.findings)[0]
    model = build_model(cfg.arch, form.n_out(net), pretrained=False)
    learn = Learner(
        DataLoaders(),
        model,
        loss_func=form.loss(net, powerset_bits(len(net.findings))),  # one row per combination
        splitter=block_splitter,
        train_bn=cfg.freeze_style == "fastai",
    )
    stages = plan(learn, cfg.ablation_stages)
    return {
        "stages": stages,
        "arch": cfg.arch,
        "formulation": formulation,
        "freeze_style": cfg.freeze_style,
        "networks": len(form.networks(cfg.findings)),
        "total_params": sum(p.numel() for p in model.parameters()),
    }


def fastcxr_home() -> Path:
    """Where generated data live: $FASTCXR_HOME, default ~/.cache/fastcxr."""
    return Path(os.environ.get("FASTCXR_HOME") or Path.home() / ".cache" / "fastcxr")


def builtin_dataset(
    size: int, home: str | Path | None = None, log: Log | None = None, workers: int | None = None
) -> Dataset:
    """The built-in synthetic MIMIC-CXR, generated once and prepared once per image size."""
    from fastcxr.prepare.mimic import prepare_mimic
    from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

    home = Path(home or fastcxr_home())
    spec = SyntheticSpec()
    raw = home / f"synthetic-mimic-seed{spec.seed}"
    prepared = raw / f"prepared-{size}"
    init()  # with several processes, rank 0 builds the data while the others wait
    if is_main():
        if not (raw / ".complete").exists():
            if log:
                log(
                    {
                        "event": "data",
                        "message": f"generating the built-in synthetic dataset in {raw}",
                    }
                )
            write_synthetic_mimic(raw, spec)
            (raw / ".complete").write_text("ok\n")
        if not (prepared / "prepare.json").exists():
            if log:
                log({"event": "data", "message": f"preparing it at {size}x{size} in {prepared}"})
            prepare_mimic(raw, prepared, size=size, workers=workers)
    barrier()
    return Dataset.load(prepared / "manifest.csv", synthetic=True)
