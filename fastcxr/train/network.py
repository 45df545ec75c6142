"""Train one network of a formulation through the schedule: `train_network(job, net)`.

A network resumes from its `NetworkState` checkpoint (or is read back whole when it had
finished), runs the stages left, predicts the test and validation images after each stage,
keeps the selected stage's weights (`cfg.select`), chooses its thresholds on validation and
saves its weights with a sidecar. The run record is written from the results afterwards
(`fastcxr.train.record.write_record`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.torch_basics import default_device

from fastcxr.config import Stage, TrainConfig
from fastcxr.data import network_data, scored
from fastcxr.evaluate.metrics import thresholds as thresholds_for
from fastcxr.formulations import Formulation, Network
from fastcxr.preprocessing import Preprocessing
from fastcxr.runtime.distributed import is_main, local_view, unwrap
from fastcxr.runtime.fastpath import Speed, resolve_speed
from fastcxr.runtime.runs import save_torch, save_weights
from fastcxr.runtime.stopping import STOP, Interrupted
from fastcxr.runtime.tracking import Tracker
from fastcxr.train.callbacks import Log, cpu_state
from fastcxr.train.checkpoint import NetworkState, get_rng, model_state, optimizer_state, set_rng
from fastcxr.train.learner import make_learner, seed_everything
from fastcxr.train.lr_find import summary as lr_find_summary
from fastcxr.train.schedule import StageResult, StageResume, run_stage


@dataclass
class Job:
    """What every network of one formulation run shares."""

    root: Path  # the folder the manifest's image paths are relative to
    df: pd.DataFrame  # `apply_policy`'s rows
    prep: Preprocessing
    form: Formulation
    cfg: TrainConfig
    stages: tuple[Stage, ...]
    speed: Speed
    run_dir: Path
    log: Log | None = None
    resume: bool = False
    tracker: Tracker = field(default_factory=Tracker)  # `--track`: a mirror, changes no number
    test: pd.DataFrame = field(init=False)
    valid: pd.DataFrame = field(init=False)

    def __post_init__(self):
        self.test = self.df[self.df["split"] == "test"].reset_index(drop=True)
        self.valid = self.df[self.df["split"] == "valid"].reset_index(drop=True)

    @classmethod
    def create(cls, root, df, prep, form, cfg, stages, run_dir, log=None, resume=False,
               tracker: Tracker | None = None) -> Job:  # fmt: skip
        speed = resolve_speed(cfg, default_device())
        return cls(Path(root), df, prep, form, cfg, tuple(stages), speed, Path(run_dir), log,
                   resume, tracker or Tracker())  # fmt: skip

    def labels(self, split: str) -> np.ndarray:
        """(n, k) certain labels of the test or validation images, NaN where not scored."""
        rows = self.test if split == "test" else self.valid
        return rows[[scored(f) for f in self.cfg.findings]].to_numpy(float)

    def emit(self, **event) -> None:
        if self.log:
            self.log({"formulation": self.form.name, **event})

    def checkpoint_path(self, net: Network) -> Path:
        return self.run_dir / "checkpoints" / f"{net.name}.pt"


@dataclass
class NetworkResult:
    """One trained network: its summary, history and per-stage probabilities (its columns)."""

    net: Network
    summary: dict
    history: list[dict]  # rows with the network's name
    test: dict[str, np.ndarray]  # stage → (n_test, k_net)
    valid: dict[str, np.ndarray]

    @property
    def selected_stage(self) -> str:
        return self.summary["selected_stage"]

    @classmethod
    def of(cls, net: Network, summary: dict, rows: list[dict], test: dict, valid: dict):
        return cls(net, summary, [{"network": net.name, **r} for r in rows], test, valid)


def select_stage(results: list[StageResult], how: str) -> int:
    """Index of the stage a run reports and saves: lowest validation loss (`best`, the
    earliest on a tie) or the last one (`last`). Chosen without the test set."""
    if how == "last":
        return len(results) - 1
    losses = np.array([r.valid_loss for r in results], float)
    if np.isnan(losses).all():
        return len(results) - 1
    return int(np.nanargmin(losses))


def train_network(job: Job, net: Network) -> NetworkResult:
    """Train `net` through the stages left (all of them, or those after its checkpoint)."""
    state = NetworkState.load(job.checkpoint_path(net)) if job.resume else None
    if state is not None and state.complete:
        job.emit(event="skip", reason=f"network {net.name} finished before the interruption")
        job.tracker.network(net.name, state.history)
        return NetworkResult.of(net, state.summary, state.history, _numpy(state.test_probs),
                                _numpy(state.valid_probs))  # fmt: skip
    job.emit(event="network", network=net.name)
    seed_everything(job.cfg.seed, job.speed)
    run = _NetworkRun(job, net, state)
    try:
        job.tracker.network(net.name, run.rows)  # a resumed network's checkpointed epochs
        for si in range(run.first, len(job.stages)):
            run.stage(si)
        return run.finish()
    finally:  # its loader workers stop with it (15 per loader on a 16-core GPU node)
        run.nd.close()


def _numpy(probs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in probs.items()}


class _NetworkRun:
    """One network's learner and the state its checkpoints are written from."""

    def __init__(self, job: Job, net: Network, state: NetworkState | None):
        self.job, self.net, self.cfg = job, net, job.cfg
        self.path = job.checkpoint_path(net)
        self.best_file = self.path.with_name(f"{net.name}.selected.pt")  # survives a kill
        self.nd = network_data(job.df, job.root, job.form, net, job.cfg, speed=job.speed,
                               preprocessing=job.prep)  # fmt: skip
        self.learn = make_learner(self.nd, job.form, net, job.cfg)
        self.results: list[StageResult] = []
        self.rows: list[dict] = []
        self.test: dict[str, np.ndarray] = {}
        self.valid: dict[str, np.ndarray] = {}
        self.first, self.pending, self.best_state = 0, None, None
        if state is not None:
            self._restore(state)

    def _restore(self, state: NetworkState) -> None:
        stages = self.job.stages
        self.learn.model.load_state_dict(state.model)
        self.results = [StageResult(**r, stage=stages[i]) for i, r in enumerate(state.results)]
        self.rows = list(state.history)
        self.test, self.valid = _numpy(state.test_probs), _numpy(state.valid_probs)
        self.first = state.stage_index
        if state.stage_started:
            self.pending = StageResume(state.callbacks, state.opt)
        set_rng(state.rng, self.learn)
        self.job.emit(event="resume", network=self.net.name,
                      stage=stages[min(self.first, len(stages) - 1)].name,
                      epochs_done=len(self.rows))  # fmt: skip

    def stage(self, si: int) -> None:
        """Run stage `si` (or what is left of it), predict, keep the best weights."""
        st, job = self.job.stages[si], self.job
        resume, self.pending = self.pending, None

        def checkpoint(callbacks: dict[str, dict]) -> None:
            self.save(si, callbacks)
            job.tracker.epoch(self.net.name, self.rows)  # after the checkpoint: see tracking
            if STOP.is_set():
                raise Interrupted(
                    f"stopped by request after epoch {callbacks['history']['epochs_done']} of "
                    f"stage {st.name}; continue with the same --name and --resume"
                )

        self.results.append(
            run_stage(self.learn, st, self.cfg, self.rows, job.log, resume, checkpoint)
        )
        with local_view():
            test_preds, _ = self.learn.get_preds(dl=self.nd.test_dl)
            valid_preds, _ = self.learn.get_preds(dl=self.nd.dls.valid)  # for thresholds
        self.test[st.name] = job.form.probabilities(self.net, test_preds)
        self.valid[st.name] = job.form.probabilities(self.net, valid_preds)
        if self.cfg.select == "best" and select_stage(self.results, "best") == si:
            self.best_state = cpu_state(self.learn.model)
            if is_main():
                save_torch(self.best_file, {"stage_index": si, "model": self.best_state})
        self.save(si + 1)

    def save(self, stage_index: int, callbacks=None, summary: dict | None = None) -> None:
        """Write the checkpoint (rank 0); with `summary`, the network is complete."""
        if not is_main():
            return
        NetworkState(
            stage_index=stage_index, model=model_state(self.learn), rng=get_rng(self.learn),
            opt=optimizer_state(self.learn), callbacks=callbacks,
            results=[r.to_dict() for r in self.results], history=self.rows,
            test_probs={k: torch.from_numpy(v.copy()) for k, v in self.test.items()},
            valid_probs={k: torch.from_numpy(v.copy()) for k, v in self.valid.items()},
            complete=summary is not None, summary=summary,
        ).save(self.path)  # fmt: skip

    def finish(self) -> NetworkResult:
        """Load the selected stage's weights, choose thresholds, save the weights."""
        stages, cfg, job, net = self.job.stages, self.cfg, self.job, self.net
        sel = select_stage(self.results, cfg.select)
        if sel != len(stages) - 1:  # an earlier stage was better: its weights are the model
            best = self.best_state or torch.load(self.best_file, weights_only=True)["model"]
            unwrap(self.learn.model).load_state_dict(best)
        name = stages[sel].name
        cols = [cfg.findings.index(f) for f in net.findings]
        t = thresholds_for(job.labels("valid")[:, cols], self.valid[name], net.findings,
                           cfg.threshold, cfg.threshold_target)  # fmt: skip
        if is_main():
            save_weights(job.run_dir / f"model-{net.name}.pth", unwrap(self.learn.model),
                         sidecar(job, net, len(self.nd.train), name, t))  # fmt: skip
        summary = {
            "network": net.name, "findings": list(net.findings),
            "stages": [stage_dict(r) for r in self.results], "selected_stage": name,
            "epochs": sum(r.epochs for r in self.results),
            "train_seconds": sum(r.seconds for r in self.results),
            "compile_seconds": sum(r.compile_seconds for r in self.results),
        }  # fmt: skip
        self.save(len(stages), summary=summary)
        return NetworkResult.of(net, summary, self.rows, self.test, self.valid)


def stage_dict(r: StageResult) -> dict:
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
        "lr": r.lr,
        **({"lr_find": lr_find_summary(r.lr_find)} if r.lr_find else {}),
    }


def sidecar(job: Job, net: Network, train_images: int, selected: str, thresholds) -> dict:
    """What `predict` needs besides the weights (`fastcxr-weights-1`)."""
    cfg, form = job.cfg, job.form
    return {
        "format": "fastcxr-weights-1",
        "arch": cfg.arch,
        "formulation": form.name,
        "findings": list(net.findings),
        "n_out": form.n_out(net),
        "n_in": 1,
        "head": "fastai vision_learner head (concat pool, BN, dropout, 2 linear)",
        "preprocessing": job.prep.to_dict(),
        "selected_stage": selected,
        "thresholds": thresholds,  # chosen on the validation split
        "threshold_method": {"method": cfg.threshold, "target": cfg.threshold_target},
        "train_images": train_images,
        "inference_precision": job.speed.precision,  # what the run record's predictions used
    }
