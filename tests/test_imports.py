"""The command line starts without the heavy libraries, and its one error guard: expected
errors are one line and exit 2, anything else (a bug) keeps its traceback."""

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import typer
from typer.testing import CliRunner

from fastcxr.cli import app
from fastcxr.cli.guard import guarded, stop_on_signals
from fastcxr.errors import FastcxrError, UsageError
from fastcxr.runtime.stopping import STOP, Interrupted

HEAVY = ("torch", "fastai", "pandas", "matplotlib", "pydicom", "PIL", "sklearn")
runner = CliRunner()


def _loaded_after(code: str) -> list[str]:
    """The HEAVY modules in sys.modules after running `code` in a fresh interpreter."""
    probe = (
        f"{code}\nimport json, sys\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    )
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("code", ["import fastcxr.cli", "import fastcxr", "import fastcxr.errors"])
def test_importing_loads_no_heavy_library(code):
    assert _loaded_after(code) == []


def test_public_names_resolve_lazily():
    code = "import fastcxr\nassert fastcxr.__version__\nassert 'TrainConfig' in dir(fastcxr)"
    assert _loaded_after(code) == []
    import fastcxr.config
    import fastcxr.study

    assert fastcxr.TrainConfig is fastcxr.config.TrainConfig
    assert fastcxr.DEMO is fastcxr.config.DEMO
    assert fastcxr.compare is fastcxr.study.compare
    for name in fastcxr.__all__:
        assert getattr(fastcxr, name) is not None, name
    assert {"FastcxrError", "UsageError", "Dataset", "read_dicom"} <= set(dir(fastcxr))
    assert fastcxr.UsageError is UsageError and issubclass(UsageError, ValueError)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        fastcxr.nope  # noqa: B018


def test_help_starts_without_torch():
    res = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "fastcxr", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and "compare" in res.stdout, res.stderr
    imported = {ln.rpartition("|")[2].strip() for ln in res.stderr.splitlines() if "|" in ln}
    assert not imported & set(HEAVY)
    assert "version" in res.stdout and "prepare" in res.stdout


# -- the error guard ----------------------------------------------------------------------------
def _guarded_app(exc: BaseException) -> typer.Typer:
    tiny = typer.Typer()

    @tiny.command()
    def boom() -> None:
        with guarded():
            raise exc

    return tiny


def test_an_expected_error_is_one_line_and_exit_2():
    res = runner.invoke(_guarded_app(FastcxrError("the manifest [x] has\n  no rows")), [])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: the manifest [x] has no rows"  # user text, no markup
    res = runner.invoke(_guarded_app(UsageError("--epochs must be >= 1")), [])
    assert res.exit_code == 2 and "--epochs must be >= 1" in res.stderr


def test_a_missing_file_is_one_line_and_a_stray_file_error_is_a_bug():
    """#23 item 7: fastcxr raises `MissingFile` (a FastcxrError) where it opens what the user
    named; a FileNotFoundError or PermissionError that reaches the command line is a bug."""
    from fastcxr.errors import MissingFile

    res = runner.invoke(_guarded_app(MissingFile("/no/such/manifest.csv: no such file")), [])
    assert res.exit_code == 2
    assert res.stderr.strip() == "error: /no/such/manifest.csv: no such file"
    for e in (FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), "/x"),
              PermissionError(errno.EACCES, "Permission denied", "/r")):  # fmt: skip
        res = runner.invoke(_guarded_app(e), [])
        assert res.exit_code != 2 and res.exception is e and "error:" not in res.stderr


@pytest.mark.parametrize("bug", [ValueError("a bug"), KeyError("column"), TypeError("x")])
def test_a_bug_is_not_dressed_as_a_clean_exit(bug):
    res = runner.invoke(_guarded_app(bug), [])
    assert res.exit_code != 2 and res.exception is bug  # propagates: Python shows its traceback
    assert "error:" not in res.stderr


def test_a_bug_in_the_library_shows_its_traceback(monkeypatch, tmp_path):
    import fastcxr.manifest

    def broken(path):
        raise ValueError("a bug, not the user's input")

    monkeypatch.setattr(fastcxr.manifest, "read_manifest", broken)
    res = runner.invoke(app, ["labels", str(tmp_path)])
    assert isinstance(res.exception, ValueError) and res.exit_code != 2

    def refused(path):
        raise fastcxr.manifest.ManifestError(f"{path}: no manifest.csv")

    monkeypatch.setattr(fastcxr.manifest, "read_manifest", refused)
    res = runner.invoke(app, ["labels", str(tmp_path)])
    assert res.exit_code == 2 and res.stderr.strip() == f"error: {tmp_path}: no manifest.csv"


def test_the_traceback_reaches_the_terminal():
    code = (
        "import typer\nfrom fastcxr.cli.guard import guarded\napp = typer.Typer()\n"
        "@app.command()\ndef boom():\n    with guarded():\n        raise ValueError('a bug')\n"
        "app()"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "ValueError: a bug" in res.stderr


def test_a_stopped_job_exits_143_with_its_message():
    res = runner.invoke(_guarded_app(Interrupted("stopped by request during bench")), [])
    assert res.exit_code == 143 and "stopped by request during bench" in res.stderr


def test_stop_on_signals_sets_stop_and_restores_the_handlers():
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    with stop_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        deadline = time.monotonic() + 5
        while not STOP.is_set() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert STOP.is_set()
        with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C stops at once
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)
    assert not STOP.is_set()
    assert {s: signal.getsignal(s) for s in before} == before
