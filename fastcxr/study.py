"""The study's jobs as library functions: train one formulation, compare, unfreeze-ablation.

They return plain dicts (the same ones `--json` prints) and write run records; they never
print. `log` receives one dict per event (epoch finished, network started) for progress.
"""

from __future__ import annotations

import os
import random
import shutil
import threading
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
from fastcxr.data import NetworkData, apply_policy, network_data
from fastcxr.distributed import barrier, init, is_main, local_view, unwrap, world_size
from fastcxr.evaluation import EvalConfig, evaluate, holm, pairwise
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
from fastcxr.models import TorchvisionArch, block_splitter, build_model
from fastcxr.runs import (
    RunError,
    environment,
    is_complete,
    load_run,
    mark_complete,
    save_torch,
    save_weights,
    write_csv,
    write_json,
)
from fastcxr.schedule import Interrupted, StageResult, plan, run_stage

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


def _sidecar(cfg: TrainConfig, form: Formulation, net: Network, nd: NetworkData) -> dict:
    return {
        "format": "fastcxr-weights-1",
        "arch": cfg.arch,
        "formulation": form.name,
        "findings": list(net.findings),
        "n_out": form.n_out(net),
        "n_in": 1,
        "head": "fastai vision_learner head (concat pool, BN, dropout, 2 linear)",
        "preprocessing": {
            "size": cfg.size,
            "resize": "squish",
            "mean": 0.449,
            "std": 0.226,
            "intensity": "voi",
        },
        "thresholds": dict.fromkeys(net.findings, 0.5),
        "train_images": len(nd.train),
        "inference_precision": nd.speed.precision,  # what the run record's predictions used
    }


def _columns(findings: tuple[str, ...], net: Network) -> list[int]:
    return [findings.index(f) for f in net.findings]


def train_formulation(
    data: Dataset,
    formulation: str,
    cfg: TrainConfig,
    run_dir: str | Path,
    log: Log | None = None,
    stages: tuple[Stage, ...] | None = None,
    resume: bool = False,
) -> dict:
    """Train `formulation` through the schedule; write its run record; return its summary.

    A checkpoint is written after every epoch and stage; with `resume` an interrupted run
    continues from its last one (finished networks, stages and epochs are not repeated).
    Setting `STOP` (the CLI does on SIGTERM) ends training with `Interrupted` right after the
    next checkpoint.

    With several networks (the `single` formulation), each is trained in turn and epochs and
    time are added up, as the study counts two binary networks together.
    """
    run_dir = Path(run_dir)
    init()
    form = get_formulation(formulation)
    findings = cfg.findings
    stages = stages or cfg.stages
    df = apply_policy(data.df, cfg, findings)
    speed = resolve_speed(cfg, default_device())
    test = df[df["split"] == "test"].reset_index(drop=True)
    valid = df[df["split"] == "valid"].reset_index(drop=True)
    y_test = test[list(findings)].to_numpy(int)
    valid_probs = np.full((len(valid), len(findings)), np.nan)
    stage_probs: dict[str, np.ndarray] = {s.name: np.full(y_test.shape, np.nan) for s in stages}
    history, networks = [], []
    t_start = time.perf_counter()
    for net in form.networks(findings):
        cols = _columns(findings, net)
        ckpt = run_dir / "checkpoints" / f"{net.name}.pt"
        state = _load_checkpoint(ckpt) if resume else None
        if state and state["complete"]:
            _restore_network(state, stage_probs, valid_probs, cols)
            history += state["history"]
            networks.append(state["summary"])
            if log:
                log(
                    {
                        "event": "skip",
                        "formulation": form.name,
                        "reason": f"network {net.name} finished before the interruption",
                    }
                )
            continue
        if log:
            log({"event": "network", "formulation": form.name, "network": net.name})
        seed_everything(cfg.seed, speed)
        nd = network_data(df, data.root, form, net, cfg, speed=speed)
        learn = make_learner(nd, form, net, cfg)
        results, net_hist = [], []
        first = 0
        if state:
            first = state["stage_index"]
            learn.model.load_state_dict(state["model"])
            _restore_network(state, stage_probs, valid_probs, cols)
            results = [
                StageResult(**{**r, "stage": stages[i]}) for i, r in enumerate(state["results"])
            ]
            net_hist = list(state["history"])
            _set_rng(state["rng"])
            if log:
                log(
                    {
                        "event": "resume",
                        "formulation": form.name,
                        "network": net.name,
                        "stage": stages[min(first, len(stages) - 1)].name,
                        "epochs_done": len(net_hist),
                    }
                )
        checkpoint = NetworkCheckpoint(
            ckpt, learn, results, net_hist, stage_probs, valid_probs, cols
        )
        for si in range(first, len(stages)):
            st = stages[si]

            def on_epoch(stage_state: dict, si: int = si, checkpoint=checkpoint) -> None:
                checkpoint.save(si, stage_state)
                if STOP.is_set():
                    raise Interrupted(
                        f"stopped by request after epoch "
                        f"{stage_state['epochs_done']} of stage {stages[si].name}"
                    )

            resume_stage = None
            if state and si == first and state.get("stage"):
                resume_stage = {**state["stage"], "opt": state["opt"]}
            results.append(run_stage(learn, st, cfg, net_hist, log, resume_stage, on_epoch))
            with local_view():
                preds, _ = learn.get_preds(dl=nd.test_dl)
            stage_probs[st.name][:, cols] = form.probabilities(net, preds)
            checkpoint.save(si + 1)
        with local_view():
            preds, _ = learn.get_preds(dl=nd.dls.valid)  # for thresholds chosen on validation
        valid_probs[:, cols] = form.probabilities(net, preds)
        if is_main():
            save_weights(
                run_dir / f"model-{net.name}.pth", learn.model, _sidecar(cfg, form, net, nd)
            )
        summary_net = {
            "network": net.name,
            "findings": list(net.findings),
            "stages": [_stage_dict(r) for r in results],
            "epochs": sum(r.epochs for r in results),
            "train_seconds": sum(r.seconds for r in results),
            "compile_seconds": sum(r.compile_seconds for r in results),
        }
        net_rows = [{"network": net.name, **row} for row in net_hist]
        networks.append(summary_net)
        history += net_rows
        checkpoint.save(len(stages), complete=True, summary=summary_net, hist=net_rows)
    probs = stage_probs[stages[-1].name]
    epochs = sum(n["epochs"] for n in networks)
    train_seconds = sum(n["train_seconds"] for n in networks)
    metrics = all_metrics(y_test, probs, findings)
    summary = {
        "formulation": form.name, "description": form.description,
        "findings": {f: {"accuracy": m["accuracy"], "auc": m["auc"]} for f, m in metrics.items()},
        "epochs": epochs, "seconds_per_epoch": train_seconds / max(epochs, 1),
        "train_seconds": train_seconds, "networks": networks,
        "compile_seconds": sum(n.get("compile_seconds", 0.0) for n in networks),
        "split_sizes": df["split"].value_counts().to_dict(),
        "wall_seconds": time.perf_counter() - t_start,
    }  # fmt: skip
    per_stage = {s.name: all_metrics(y_test, stage_probs[s.name], findings) for s in stages}
    pred_df = pd.concat(
        [
            _predictions(test, probs, findings, "test"),
            _predictions(valid, valid_probs, findings, "valid"),
        ],
        ignore_index=True,
    )
    if is_main():  # one writer; the other processes wait for the record
        write_json(
            run_dir / "config.json",
            {
                "train": cfg.to_dict(),
                "formulation": form.name,
                "stages": [s.__dict__ for s in stages],
                "data": data.describe(),
                "environment": {**environment(), "processes": world_size()},
                "speed": speed.to_dict(),
            },
        )
        write_csv(run_dir / "history.csv", pd.DataFrame(history))
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


# -- checkpoints ----------------------------------------------------------------------------
STOP = threading.Event()  # set to stop training cleanly after the next checkpoint


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


def _get_rng() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
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


def _set_rng(rng: dict) -> None:
    torch.set_rng_state(rng["torch"])
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
    stage_probs: dict
    valid_probs: np.ndarray
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
            "rng": _get_rng(),
            "valid_probs": torch.from_numpy(self.valid_probs[:, self.cols].copy()),
            "stage_probs": {k: torch.from_numpy(v[:, self.cols].copy())
                            for k, v in self.stage_probs.items()},
        }  # fmt: skip
        save_torch(self.path, payload)


def _restore_network(state: dict, stage_probs: dict, valid_probs: np.ndarray, cols) -> None:
    for k, t in state["stage_probs"].items():
        if k in stage_probs:
            stage_probs[k][:, cols] = t.numpy()
    valid_probs[:, cols] = state["valid_probs"].numpy()


def _predictions(rows: pd.DataFrame, probs: np.ndarray, findings, split: str) -> pd.DataFrame:
    out = rows[["image", "patient_id"]].copy()
    out.insert(0, "split", split)
    for i, f in enumerate(findings):
        out[f"y_{f}"] = rows[f].to_numpy(int)
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
) -> dict:
    """Experiment II: every formulation with the same data, split, seed and schedule.

    Formulations whose run record is already complete are read back, not retrained. The
    result carries AUC CIs per finding and DeLong's test for every pair of formulations
    (p-values also Holm-adjusted over all pairs and findings).
    """
    run_dir = Path(run_dir)
    out = {}
    for name in formulations:
        sub = run_dir / name
        if is_complete(sub):
            out[name] = load_run(sub)["record"]
            out[name].pop("complete", None)
            if log:
                log({"event": "skip", "formulation": name, "reason": "complete run found"})
            continue
        out[name] = train_formulation(data, name, cfg, sub, log, resume=resume)
    preds = {name: load_run(run_dir / name)["predictions"] for name in formulations}
    evals = {name: evaluate(p, cfg.findings, eval_cfg) for name, p in preds.items()}
    for name, by_f in evals.items():
        for f, e in by_f.items():
            out[name]["findings"][f].update(auc_ci=e["auc_ci"], pr_auc=e["pr_auc"])
    pairs = pairwise(preds, cfg.findings)
    for pr, adj in zip(pairs, holm([p["p_value"] for p in pairs])):
        pr["p_holm"] = adj
    result = {
        "formulations": out,
        "pairs": pairs,
        "findings": list(cfg.findings),
        "auc_ci_method": next(iter(next(iter(evals.values())).values()))["auc_ci_method"],
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
) -> dict:
    """Experiment I: the ablation stages in sequence, test metrics after each stage.

    The best stage is the one with the lowest validation loss (chosen without the test set).
    """
    summary = train_formulation(
        data, formulation, cfg, run_dir, log, stages=cfg.ablation_stages, resume=resume
    )
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
            "findings": {f: {"accuracy": m["accuracy"], "auc": m["auc"]}
                         for f, m in metrics[st.name].items()},
        })  # fmt: skip
    best = min(stages, key=lambda s: s["valid_loss"])["name"]
    result = {
        "stages": stages,
        "best_stage": best,
        "formulation": formulation,
        "run_dir": str(run_dir),
        "synthetic": data.synthetic,
        "preset": cfg.preset,
        "arch": cfg.arch,
        "freeze_style": cfg.freeze_style,
    }
    if is_main():
        write_json(Path(run_dir) / "ablation.json", result)
    return result


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
