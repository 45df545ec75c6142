"""Experiment tracking (`--track`): the run record mirrored in TensorBoard, MLflow or W&B.

The run record (history.csv, metrics.json, …) stays the source of truth; a tracker is a mirror
of it and changes no number. It is not part of `TrainConfig` (a run started without it resumes
with it, and the other way round), the training reads nothing from it, and it draws no batch.

`--track` takes one tracker or several (`tensorboard,mlflow`). One tracked run per run record
(a `compare` tracks one per formulation). What it holds:

* the resolved configuration, when it starts (MLflow params, W&B config, TensorBoard text);
* every epoch, right after its checkpoint: the history row's numbers as `<network>/<column>`
  (`train_loss`, `valid_loss`, `epoch`, `seconds`, …) and `<network>/stage_index`, at step =
  the row's number in history.csv (1-based: one epoch count over the networks and stages, in
  the order they trained), so the binary formulation's networks never share a step or a name;
* at the end: the selected model's test metrics, `test/<finding>/<metric>`, the per-stage ones,
  `stage/<stage>/<finding>/<metric>` (undefined metrics are left out, never logged as 0), and
  the run record's files as artifacts (MLflow, W&B; TensorBoard has none: they lie beside it).

Resume. Logging after the checkpoint means every value a tracker holds comes from a
checkpointed row, which a resume never rewrites; a kill between a checkpoint and its log can
leave that one row unlogged. When a network starts or resumes, its checkpointed rows are
brought in again: TensorBoard opens its writer with `purge_step` at the network's first step
(readers discard what was logged before) and writes them again; MLflow continues the same run
and logs the steps its metric history lacks; W&B, which cannot be read back offline, continues
the same run id and logs the last checkpointed row again (the same values). So the logged
per-epoch losses equal history.csv.

Where (offline by default; RUN is the command's run folder, LABEL the formulation's folder in
it, e.g. `multilabel` or `seed-1/single`, empty for `train`):

* tensorboard: RUN/tracking/tensorboard/LABEL (config, test metrics) and …/LABEL/<network>;
* mlflow: the user's `MLFLOW_TRACKING_URI`, else a file store `file:RUN/tracking/mlruns`
  (with `MLFLOW_ALLOW_FILE_STORE=true`, which MLflow 3 wants for it, and
  `MLFLOW_DISABLE_TELEMETRY=true`, unless set); experiment `MLFLOW_EXPERIMENT_NAME`, else
  "fastcxr"; run name `RUN-NAME/LABEL`. Reading that store back needs
  `MLFLOW_ALLOW_FILE_STORE=true` too (MlflowClient, or mlflow-skinny's `mlflow experiments
  search` / `mlflow runs list` / `mlflow runs describe`); `mlflow ui` needs the full `mlflow`
  package (mlflow-skinny has no UI server);
* wandb: `WANDB_MODE` if set, else offline (with `WANDB_ERROR_REPORTING=false` unless set;
  `wandb sync` uploads it later), in `WANDB_DIR`, else RUN/tracking; project `WANDB_PROJECT`,
  else "fastcxr"; group RUN-NAME.

fastai's `TensorBoardCallback` and `WandbCallback` are not used: they log per batch, at a
counter that starts again with every fit (each stage, each resume), so steps collide across
stages and resumes, and their defaults draw batches (`trace_model`, `log_preds`; W&B's config
dump reads a validation batch and its prediction samples build a DataLoader from the global
RNG), which would change the results. fastcxr writes through the same libraries' own APIs:
`torch.utils.tensorboard.SummaryWriter` (the writer `TensorBoardCallback` uses),
`mlflow.MlflowClient`, and `wandb.init` / `Run.log` / `Artifact`.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import re
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from fastcxr.errors import FastcxrError, UsageError

EXTRA = "pip install 'fastcxr[tracking]'"
# tracker → (package to install, modules it needs)
TRACKERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "tensorboard": ("tensorboard", ("tensorboard", "torch.utils.tensorboard")),
    "mlflow": ("mlflow-skinny (or mlflow)", ("mlflow",)),
    "wandb": ("wandb", ("wandb",)),
}
RECORD_FILES = ("config.json", "history.csv", "metrics.json", "predictions.csv", "record.json")
FOLDER = "tracking"
Step = tuple[int, dict]  # (step, history row)


def require(track: str | Sequence[str]) -> tuple[str, ...]:
    """The trackers `track` names ("mlflow" or "tensorboard,mlflow"), after checking each is
    one and its package imports: called before any data is read or any folder written."""
    parts = track.split(",") if isinstance(track, str) else list(track)
    kinds = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
    if not kinds:
        raise UsageError(f"--track needs one of {', '.join(TRACKERS)}")
    for kind in kinds:
        if kind not in TRACKERS:
            raise UsageError(f"--track must be one of {', '.join(TRACKERS)}, not {kind!r}")
        package, modules = TRACKERS[kind]
        offline_defaults(kind)  # before the import: MLflow reads its telemetry switch then
        for name in modules:
            try:
                importlib.import_module(name)
            except ImportError as e:
                why = str(e).splitlines()[0] if str(e) else type(e).__name__
                raise UsageError(
                    f"--track {kind} needs the {package} package ({why}): {EXTRA}"
                ) from None
        if kind == "mlflow":
            check_mlflow_server()
    return kinds


REACH_TIMEOUT = 5.0  # seconds to reach a tracking server before anything is trained


def check_mlflow_server(timeout: float = REACH_TIMEOUT) -> None:
    """An http(s) MLFLOW_TRACKING_URI must accept a connection within `timeout`: MLflow's
    client retried an unreachable server for minutes, in silence, after training began."""
    import socket
    from urllib.parse import urlsplit

    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return  # a file store, databricks, a database URI: nothing to dial
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            pass
    except OSError as e:
        why = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise UsageError(
            f"--track mlflow: the tracking server MLFLOW_TRACKING_URI={uri} cannot be reached "
            f"({why}, {timeout:g} s); start it, fix the URI, or unset it to write a local file "
            "store in the run folder"
        ) from None


def offline_defaults(kind: str) -> None:
    """Where the user configured nothing, keep the library on this machine: MLflow's file store
    allowed and its usage telemetry off; W&B offline (see `_Wandb`) and its error reports off.
    A variable the user set is left as it is.

    MLflow's telemetry is off with a tracking server too: besides sending usage records, its
    background thread draws from Python's global `random` (its rollout check) at a moment no
    one controls, and fastai's augmentations draw from that generator."""
    if kind == "mlflow":
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    if kind == "mlflow" and not os.environ.get("MLFLOW_TRACKING_URI"):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3: file store opt-in
    if kind == "wandb" and "WANDB_MODE" not in os.environ:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")


def metric_name(*parts: str) -> str:
    """`a/b/c`, each part kept to what every tracker accepts (MLflow: letters, digits, `_-. /`)."""
    return "/".join(re.sub(r"[^\w.\- ]", "-", str(p)) for p in parts)


@dataclass(frozen=True)
class Tracking:
    """The trackers a command asked for (`kinds`: a name, a comma-separated list or a
    sequence) and its run folder (`root`), which holds the local stores and names the runs."""

    kinds: tuple[str, ...]
    root: Path

    def __post_init__(self):
        object.__setattr__(self, "kinds", require(self.kinds))
        object.__setattr__(self, "root", Path(self.root))

    def label(self, run_dir: Path) -> str:
        """The run's folder relative to the command's ('' when it is the command's folder)."""
        try:
            rel = Path(run_dir).resolve().relative_to(self.root.resolve()).as_posix()
        except ValueError:
            rel = Path(run_dir).name
        return "" if rel == "." else rel

    @property
    def folder(self) -> Path:
        return self.root / FOLDER


@contextlib.contextmanager
def kept_rng() -> Iterator[None]:
    """Python's, numpy's and torch's global generators as they were before the block. A
    tracker's client draws from them now and then — MLflow's file store when an experiment id
    it makes from a uuid starts with 0 (`random.randint`), its telemetry, retry jitter — and
    fastai's random transforms use them: tracking must never change a number."""
    import random

    import numpy as np
    import torch

    state, np_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(state)
        np.random.set_state(np_state)
        torch.set_rng_state(torch_state)


@contextlib.contextmanager
def tracked(
    tracking: Tracking | None,
    run_dir: Path,
    about: dict,
    resume: bool,
    log: Callable[[dict], None] | None = None,
) -> Iterator[Tracker]:
    """The run's tracker (a no-op one without `tracking`), ended when the block exits: as
    finished after `Tracker.finish`, else as failed, or killed when training was stopped."""
    if tracking is None:
        yield Tracker()
        return
    backends: list[_Mirror] = []
    try:
        for kind in tracking.kinds:
            with kept_rng():  # a client's start-up (MLflow: its experiment, its run) draws too
                backends.append(BACKENDS[kind](tracking, Path(run_dir), about, resume))
            if log:
                log({"event": "data", "message": f"tracking: {backends[-1].where()}"})
        yield _Fanout(backends) if len(backends) > 1 else backends[0]
    except BaseException as e:
        from fastcxr.runtime.stopping import Interrupted

        stopped = isinstance(e, (Interrupted, KeyboardInterrupt))
        for b in backends:
            with contextlib.suppress(Exception), kept_rng():  # the error that ended the run
                b.close("KILLED" if stopped else "FAILED")  # is the news
        raise
    for b in backends:
        with kept_rng():
            b.close("FINISHED")


class Tracker:
    """What training calls; this one (no `--track`) does nothing."""

    def network(self, name: str, rows: list[dict]) -> None:
        """Network `name` starts, or resumes with its checkpointed `rows`."""

    def epoch(self, name: str, rows: list[dict]) -> None:
        """Network `name` checkpointed its epoch `rows[-1]`."""

    def finish(self, run_dir: Path) -> None:
        """The run record is complete: its test metrics and files."""

    def close(self, status: str) -> None:
        """End the tracked run (FINISHED, FAILED or KILLED)."""


class _Fanout(Tracker):
    """Several trackers at once (`--track tensorboard,mlflow`)."""

    def __init__(self, trackers: list[Tracker]):
        self.trackers = trackers

    def network(self, name, rows):
        for t in self.trackers:
            t.network(name, rows)

    def epoch(self, name, rows):
        for t in self.trackers:
            t.epoch(name, rows)

    def finish(self, run_dir):
        for t in self.trackers:
            t.finish(run_dir)


class _Mirror(Tracker, ABC):
    """Steps and names shared by the three backends; they write `_rows`, `_resync`, `_final`."""

    kind = ""
    errors: tuple[type[Exception], ...] = ()  # the library's own failures (a server down, …)

    def __init__(self, tracking: Tracking, run_dir: Path, about: dict, resume: bool):
        self.tracking, self.run_dir, self.about, self.resume = tracking, run_dir, about, resume
        self.label = tracking.label(run_dir)
        self.run_name = "/".join(p for p in (tracking.root.name, self.label) if p)
        self.stage_index = {s["name"]: i for i, s in enumerate(about.get("stages", []))}
        self._offset = self._n = 0  # steps of the networks before the current one; its rows

    @abstractmethod
    def where(self) -> str:
        """Where the tracked run lives (one line for the log)."""

    def network(self, name: str, rows: list[dict]) -> None:
        self._offset, self._n = self._offset + self._n, len(rows)
        with self._failures():
            self._resync(name, [(self._offset + i + 1, r) for i, r in enumerate(rows)])

    def epoch(self, name: str, rows: list[dict]) -> None:
        self._n = len(rows)
        with self._failures():
            self._rows(name, [(self._offset + len(rows), rows[-1])])

    def finish(self, run_dir: Path) -> None:
        metrics = json.loads((run_dir / "metrics.json").read_text())
        files = [run_dir / f for f in RECORD_FILES] + sorted(run_dir.glob("model-*.json"))
        files = [f for f in files if f.is_file()]
        with self._failures("the run record is complete; the tracker lacks its test metrics"):
            self._final(final_metrics(metrics), self._offset + self._n, files)

    @contextlib.contextmanager
    def _failures(self, then: str = "") -> Iterator[None]:
        """The tracker's own failure is one line (every epoch is checkpointed before its log)."""
        then = then or (
            "the run is checkpointed: add --resume once the tracker works (or resume without "
            "--track)"
        )
        with kept_rng():
            try:
                yield
            except self.errors as e:
                raise FastcxrError(f"--track {self.kind}: {_first_line(e)}; {then}") from None

    def values(self, name: str, row: dict) -> dict[str, float]:
        """A history row's numbers, named `<network>/<column>`, and its stage's index."""
        out = {metric_name(name, k): float(v) for k, v in row.items() if _number(v)}
        if row.get("stage") in self.stage_index:
            out[metric_name(name, "stage_index")] = float(self.stage_index[row["stage"]])
        return out

    @abstractmethod
    def _rows(self, name: str, steps: list[Step]) -> None:
        """Log these (step, row) of network `name`."""

    @abstractmethod
    def _resync(self, name: str, steps: list[Step]) -> None:
        """Make the store hold the network's checkpointed (step, row), each once."""

    @abstractmethod
    def _final(self, metrics: dict[str, float], step: int, files: list[Path]) -> None:
        """Log the test metrics (at the last step) and the record's files."""

    # the run ids a resume continues: RUN/tracking/runs.json, {kind: {label: {...}}}
    def _every_id(self) -> dict:
        """runs.json whole ({} while there is none, or it is unreadable)."""
        try:
            every = json.loads((self.tracking.folder / "runs.json").read_text())
        except (OSError, ValueError):
            return {}
        return every if isinstance(every, dict) else {}

    def _ids(self) -> dict:
        ids = self._every_id().get(self.kind, {})
        return ids if isinstance(ids, dict) else {}

    def _prior(self) -> dict | None:
        return self._ids().get(self.label or ".") if self.resume else None

    def _save_id(self, entry: dict) -> None:
        from fastcxr.runtime.runs import write_json

        path = self.tracking.folder / "runs.json"
        every = self._every_id()
        every.setdefault(self.kind, {})[self.label or "."] = entry
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json(path, every)


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def final_metrics(metrics: dict) -> dict[str, float]:
    """metrics.json's defined numbers: `test/<finding>/<metric>` (the selected model) and
    `stage/<stage>/<finding>/<metric>` (each stage's model)."""
    out = {}
    for f, m in metrics.get("findings", {}).items():
        out.update({metric_name("test", f, k): float(v) for k, v in m.items() if _number(v)})
    for stage, by_f in metrics.get("per_stage", {}).items():
        for f, m in by_f.items():
            out.update(
                {metric_name("stage", stage, f, k): float(v) for k, v in m.items() if _number(v)}
            )
    return out


def flat_params(about: dict, prefix: str = "") -> dict[str, str]:
    """The configuration as flat `a.b.c` keys; lists of dicts by index, other values as JSON."""
    out = {}
    for k, v in about.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, f"{key}."))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            out.update(flat_params({str(i): x for i, x in enumerate(v)}, f"{key}."))
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


class _TensorBoard(_Mirror):
    kind = "tensorboard"

    def __init__(self, tracking, run_dir, about, resume):
        super().__init__(tracking, run_dir, about, resume)
        from torch.utils.tensorboard import SummaryWriter

        self.SummaryWriter = SummaryWriter
        self.base = tracking.folder / "tensorboard" / self.label
        self.net_writer = None
        # purge_step=0: a resumed run's earlier record events are discarded, then rewritten
        self.writer = SummaryWriter(str(self.base), purge_step=0)
        text = json.dumps(about, indent=2, default=str)
        self.writer.add_text("config", "\n".join("    " + ln for ln in text.splitlines()), 0)
        self.writer.flush()

    def where(self) -> str:
        return f"TensorBoard event files in {self.base} (tensorboard --logdir {self.base})"

    def _resync(self, name, steps):
        if self.net_writer is not None:
            self.net_writer.close()
        folder = self.base / metric_name(name)
        self.net_writer = self.SummaryWriter(str(folder), purge_step=self._offset + 1)
        self._rows(name, steps)

    def _rows(self, name, steps):
        for step, row in steps:
            for k, v in self.values(name, row).items():
                self.net_writer.add_scalar(k, v, step)
        self.net_writer.flush()

    def _final(self, metrics, step, files):
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self, status):
        for w in (self.net_writer, self.writer):
            if w is not None:
                w.close()


class _MLflow(_Mirror):
    kind = "mlflow"

    def __init__(self, tracking, run_dir, about, resume):
        super().__init__(tracking, run_dir, about, resume)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        self.errors = (MlflowException,)
        self.local = not os.environ.get("MLFLOW_TRACKING_URI")
        offline_defaults(self.kind)
        if self.local:
            self.uri = (tracking.folder / "mlruns").resolve().as_uri()
        else:
            self.uri = os.environ["MLFLOW_TRACKING_URI"]
        prior = self._prior()
        if prior and prior.get("tracking_uri") != ("local" if self.local else self.uri):
            prior = None  # another store now: a new run there, given every checkpointed row
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            if prior:
                self.run_id = prior["run_id"]
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                self._create()
        except MlflowException as e:
            raise FastcxrError(f"--track mlflow: {self.uri}: {_first_line(e)}") from None

    def _create(self) -> None:
        from mlflow.entities import Param

        exp_id = os.environ.get("MLFLOW_EXPERIMENT_ID")
        if not exp_id:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "fastcxr"
            exp = self.client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(name)
        tags = {"fastcxr.run_dir": str(self.run_dir.resolve()),
                "fastcxr.formulation": str(self.about.get("formulation")),
                "fastcxr.group": self.tracking.root.name}  # fmt: skip
        run = self.client.create_run(exp_id, run_name=self.run_name, tags=tags)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in flat_params(self.about).items()]
        for i in range(0, len(params), 100):  # MLflow takes 100 params per batch
            self.client.log_batch(self.run_id, params=params[i : i + 100])
        self._save_id({"run_id": self.run_id, "tracking_uri": "local" if self.local else self.uri,
                       "experiment_id": exp_id})  # fmt: skip

    def where(self) -> str:
        # MLflow 3 reads a file store only when allowed, and mlflow-skinny serves no UI
        read = " (read it with MLFLOW_ALLOW_FILE_STORE=true)" if self.local else ""
        return f"MLflow run {self.run_id} in {self.uri}{read}"

    def _metrics(self, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ms, now = int(time.time() * 1000), list(values.items())
        for i in range(0, len(now), 1000):
            batch = [Metric(k, v, ms, step) for k, v in now[i : i + 1000]]
            self.client.log_batch(self.run_id, metrics=batch)

    def _rows(self, name, steps):
        for step, row in steps:
            self._metrics(self.values(name, row), step)

    def _resync(self, name, steps):
        if not steps:
            return
        logged = self.client.get_metric_history(self.run_id, metric_name(name, "train_loss"))
        have = {m.step for m in logged}
        self._rows(name, [(s, r) for s, r in steps if s not in have])

    def _final(self, metrics, step, files):
        self._metrics(metrics, step)
        for f in files:
            self.client.log_artifact(self.run_id, str(f), artifact_path="run_record")

    def close(self, status):
        self.client.set_terminated(self.run_id, status)


class _Wandb(_Mirror):
    kind = "wandb"

    def __init__(self, tracking, run_dir, about, resume):
        super().__init__(tracking, run_dir, about, resume)
        import wandb

        self.errors = (wandb.Error,)
        offline_defaults(self.kind)
        prior = self._prior()
        self.continued = prior is not None
        run_id = prior["id"] if prior else uuid.uuid4().hex[:12]  # os.urandom: no RNG drawn
        self.dir = Path(os.environ.get("WANDB_DIR") or tracking.folder)
        self.dir.mkdir(parents=True, exist_ok=True)
        kwargs = dict(
            project=os.environ.get("WANDB_PROJECT") or "fastcxr", group=tracking.root.name,
            name=self.run_name, id=run_id, config=about, dir=str(self.dir),
            job_type=str(about.get("formulation")),
            settings=wandb.Settings(console="off", silent=True),
        )  # fmt: skip
        if "WANDB_MODE" not in os.environ:
            kwargs["mode"] = "offline"
        if self.continued:
            kwargs["resume"] = "allow"
        try:
            self.run = wandb.init(**kwargs)
        except wandb.Error as e:
            raise FastcxrError(f"--track wandb: {_first_line(e)}") from None
        self._save_id({"id": run_id, "project": kwargs["project"]})

    def where(self) -> str:
        mode = "offline" if self.run.offline else "online"
        how = f" (wandb sync {Path(self.run.dir).parent})" if self.run.offline else ""
        return f"W&B run {self.run.id}, {mode}, in {self.dir}{how}"

    def _rows(self, name, steps):
        for step, row in steps:
            self.run.log(self.values(name, row), step=step)

    def _resync(self, name, steps):
        # a continued run holds every checkpointed row but perhaps the last; a new one none
        self._rows(name, steps[-1:] if self.continued else steps)

    def _final(self, metrics, step, files):
        import wandb

        self.run.summary.update(metrics)
        name = re.sub(r"[^\w.\-]", "-", f"run-record-{self.run_name}")
        art = wandb.Artifact(name, type="run-record")
        for f in files:
            art.add_file(str(f))
        self.run.log_artifact(art)

    def close(self, status):
        self.run.finish(exit_code=0 if status == "FINISHED" else 1)


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


BACKENDS: dict[str, type[_Mirror]] = {
    "tensorboard": _TensorBoard,
    "mlflow": _MLflow,
    "wandb": _Wandb,
}
