"""Run records: everything a table or figure needs, so nothing is retrained to report.

runs/NAME/                 one trained formulation (or one ablation)
  config.json              resolved TrainConfig + data, seed, versions, git rev, manifest hash
  history.csv              per epoch: network, stage, epoch, losses, seconds
  predictions.csv          per test image: image, patient_id, y_<finding>, p_<finding>
  metrics.json             per-finding metrics and timing
  model-<network>.pth      state dict (torch.load(weights_only=True)) …
  model-<network>.json     … and its sidecar: arch, formulation, findings, preprocessing
  record.json              written last: {"complete": true, …}
"""

from __future__ import annotations

import json
import os
import pickle
import platform
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from fastcxr.errors import FastcxrError

RECORD = "record.json"


class RunError(FastcxrError, ValueError):
    """A run directory that is missing, incomplete or malformed."""


def write_atomic(path: Path, write: Callable[[Path], Any]) -> None:
    """`write(tmp)` beside `path`, then rename: readers see the old file or the new, whole.

    A write that fails (full disk, read-only folder) leaves no partial file and raises a
    `RunError` that names the folder."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path.parent, e) from None
    tmp = path.with_name(f".{path.name}.part")
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a read-only folder: there is nothing to remove either
            pass
        if isinstance(e, RuntimeError) and not _write_failure(e, path.parent):
            raise
        raise write_error(path.parent, e) from None


# What torch's zip writer says when the file system refuses a write (a full disk shows as
# "unexpected pos" when the writer finds its position short of what it wrote).
_TORCH_WRITE_ERRORS = ("write", "unexpected pos", "pytorchstreamwriter")


def _write_failure(e: RuntimeError, folder: Path) -> bool:
    """Whether a RuntimeError raised while writing is the file system refusing the write."""
    import shutil

    text = str(e).lower()
    if any(k in text for k in _TORCH_WRITE_ERRORS):
        return True
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def write_error(folder: Path, e: Exception) -> RunError:
    """The one-line error for a failed write: full disk, or a folder that cannot be written."""
    import errno
    import shutil

    code = getattr(e, "errno", None)
    try:
        full = shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        full = False
    if code in (errno.ENOSPC, errno.EDQUOT) or (code is None and full):
        return RunError(
            f"no space left on {folder}: free some space, then run the command again (a "
            "training run continues with --resume)"
        )
    return RunError(f"cannot write {folder} ({getattr(e, 'strerror', None) or e})")


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=2, default=_jsonable)))


def write_csv(path: Path, df: pd.DataFrame, compression: str | None = None) -> None:
    write_atomic(path, lambda t: df.to_csv(t, index=False, compression=compression))


# What torch.load raises for a file that is not a weights_only checkpoint: a refused pickle, a
# cut or foreign zip, an empty file, a folder, a forbidden file, and — for corrupted bytes, as
# fuzzing showed — IndexError, KeyError, AssertionError or UnicodeDecodeError from its parsers.
TORCH_LOAD_ERRORS = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError,
                     IndexError, KeyError, AssertionError, TypeError, struct.error)  # fmt: skip


def save_torch(path: Path, obj: Any) -> None:
    write_atomic(path, lambda t: torch.save(obj, t))


def save_weights(path: Path, model: torch.nn.Module, sidecar: dict) -> None:
    """State dict (plain tensors) + JSON sidecar, both written atomically."""
    save_torch(path, {k: v.detach().cpu() for k, v in model.state_dict().items()})
    write_json(path.with_suffix(".json"), sidecar)


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (np.ndarray,)):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def environment() -> dict:
    """Package versions and git revision, recorded with every run."""
    import fastai
    import pydicom
    import sklearn
    import torchvision

    try:
        rev = (
            subprocess.run(
                ["git", "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                cwd=Path(__file__).parent,
                timeout=5,
            ).stdout.strip()
            or None
        )
    except (OSError, subprocess.SubprocessError):
        rev = None
    return {
        "python": platform.python_version(), "torch": torch.__version__,
        "torchvision": torchvision.__version__, "fastai": fastai.__version__,
        "pydicom": pydicom.__version__, "pandas": pd.__version__,
        "scikit-learn": sklearn.__version__, "numpy": np.__version__, "git_revision": rev,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }  # fmt: skip


def is_complete(run_dir: str | Path) -> bool:
    p = Path(run_dir) / RECORD
    try:
        return bool(json.loads(p.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def mark_complete(run_dir: Path, summary: dict) -> None:
    """The record that says the run is complete, with the sha256 of its predictions.csv (what
    the audit and the report read; `check_predictions`)."""
    from fastcxr.manifest import file_sha256

    pred = run_dir / "predictions.csv"
    digest = {"predictions_sha256": file_sha256(pred)} if pred.exists() else {}
    write_json(run_dir / RECORD, {"complete": True, **summary, **digest})


def check_predictions(run_dir: str | Path) -> None:
    """A run's predictions.csv must be the file the run wrote (its sha256 in the record): an
    edited one would be audited and reported under metrics it no longer matches. Runs recorded
    before the digest was kept are not checked."""
    from fastcxr.manifest import file_sha256

    run_dir = Path(run_dir)
    try:
        record = json.loads((run_dir / RECORD).read_text())
    except (OSError, ValueError):
        return  # is_complete and load_run say so
    want = record.get("predictions_sha256") if isinstance(record, dict) else None
    pred = run_dir / "predictions.csv"
    if not want or not pred.exists():
        return
    try:
        now = file_sha256(pred)
    except OSError as e:
        raise RunError(f"{pred}: unreadable ({e.strerror or e})") from None
    if now != want:
        raise RunError(
            f"{pred} changed since the run wrote it (sha256 {now[:12]}… ≠ {str(want)[:12]}… in "
            f"{RECORD}): its metrics no longer describe it; restore the file or retrain"
        )


def load_run(run_dir: str | Path) -> dict:
    """A complete run's record, config, metrics, history and predictions."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"{run_dir}: no such run directory")
    if not is_complete(run_dir):
        raise RunError(f"{run_dir}: incomplete run (no complete {RECORD}); resume or rerun it")
    check_predictions(run_dir)
    files = {"record": RECORD, "config": "config.json", "metrics": "metrics.json",
             "history": "history.csv", "predictions": "predictions.csv"}  # fmt: skip
    out: dict = {"dir": run_dir}
    for key, name in files.items():
        path = run_dir / name
        try:
            out[key] = pd.read_csv(path) if name.endswith(".csv") else json.loads(path.read_text())
        except (OSError, ValueError, pd.errors.ParserError) as e:  # JSON/CSV decode errors
            raise RunError(
                f"{path}: unreadable run record file ({type(e).__name__}: {e})"
            ) from None
    return out


# -- one run, one folder ------------------------------------------------------------------------
class RunLock:
    """Exclusive lock on a run folder while a process writes into it.

    The lock is `flock` on `.NAME.lock` beside the folder (so replacing the folder keeps it):
    the kernel releases it when its process ends, even by SIGKILL, so a stale lock never
    blocks a resume. A second process fails at once, naming the holder's pid. The holder
    removes the file when it is done (still holding the lock); a process that locked a file
    just removed that way sees that the path no longer names it, and locks anew.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir.parent / f".{self.run_dir.name}.lock"
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        writable_folder(self.run_dir.parent)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                raise RunError(
                    f"{self.run_dir} is being written by another fastcxr process (pid "
                    f"{holder}); wait for it to finish, or choose another --name"
                ) from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it between our open and our lock: again
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        _HELD.add(fd)
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            if _same_file(self.fd, self.path):
                self.path.unlink()  # under the lock: nothing is left beside the run
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            _HELD.discard(self.fd)
            os.close(self.fd)
            self.fd = None


# The descriptors of the locks this process holds. A forked child (a DataLoader worker) gets
# copies that share the lock; closing them in the child (never unlocking: that would free the
# parent's lock) means the lock dies with its holder even when orphaned workers outlive it
# for a few seconds after a SIGKILL, so an immediate --resume is not refused.
_HELD: set[int] = set()


def _close_held_locks() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_locks)


def _same_file(fd: int, path: Path) -> bool:
    """Whether `path` still names the file open as `fd`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)


def writable_folder(folder: str | Path) -> Path:
    """`folder`, created if needed, after checking a file can be written there."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".fastcxr-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except FileExistsError:
        raise RunError(f"cannot write {folder}: it is a file, not a folder") from None
    except OSError as e:
        raise RunError(f"cannot write {folder} ({e.strerror or e})") from None
    return folder


def claim(run_dir: str | Path, resume: bool = False, overwrite: bool = False) -> dict | None:
    """Make `run_dir` ready for a run (call it holding its `RunLock`).

    A complete run is never replaced unless `overwrite` (then the old folder is moved aside
    and deleted before anything is written); with `resume` it is returned (nothing to do).
    An interrupted run is continued only with `resume`. Returns the complete record or None.
    """
    run_dir = Path(run_dir)
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return None
    if overwrite:
        aside = run_dir.with_name(f".{run_dir.name}.removing-{os.getpid()}")
        os.replace(run_dir, aside)  # readers see the old run or none, never half of one
        import shutil

        shutil.rmtree(aside, ignore_errors=True)
        return None
    if is_complete(run_dir):
        if resume:
            return json.loads((run_dir / RECORD).read_text())
        raise RunError(
            f"{run_dir} holds a complete run; add --overwrite to replace it, or choose "
            "another --name"
        )
    if not resume:
        raise RunError(
            f"{run_dir} holds an interrupted run; add --resume to continue it, or "
            "--overwrite to start it again"
        )
    return None


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, current: dict) -> list[str]:
    """`key: old → new` for every (nested) setting that differs; a training setting is named
    by its option (`train.seed` → `seed`)."""
    a, b = _flat(saved), _flat(current)
    return [
        f"{k.removeprefix('train.')}: {a.get(k)!r} → {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def read_record_json(path: Path) -> dict:
    """A JSON object fastcxr wrote into a run folder; a missing, damaged or foreign one is a
    `RunError` naming it."""
    try:
        obj = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise RunError(
            f"{path}: unreadable run file ({getattr(e, 'strerror', None) or e})"
        ) from None
    if not isinstance(obj, dict):
        raise RunError(f"{path}: not a fastcxr run file (a JSON {type(obj).__name__})")
    return obj


def same_config(path: Path, current: dict, what: str) -> None:
    """Record `current` at `path`, or refuse when the one recorded there differs."""
    current = json.loads(json.dumps(current, default=_jsonable))
    if not path.exists():
        write_json(path, current)
        return
    saved = read_record_json(path)
    diffs = config_differences(saved, current)
    if diffs:
        raise RunError(
            f"{what} was started with another configuration; refusing to mix them ("
            + "; ".join(diffs)
            + "). Run it as it was started, or add --overwrite to start it again"
        )
