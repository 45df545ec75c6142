"""What surrounds a command's work, one small piece each: stopping on signals, stdout kept for
the result, fastai's FutureWarnings hidden, and the one place expected errors become a clean
exit. `guarded()` puts them together; the commands use that.

Expected errors are `FastcxrError` (every error fastcxr raises on purpose: a file the user
named that is missing or unreadable is one, raised where it is opened, naming the path) and the
GPU running out of memory: one line on stderr, exit status 2. Anything else — a stray
FileNotFoundError or PermissionError included — is a bug: its traceback is shown. A job
stopped by SIGTERM/SIGINT exits 143.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

import typer

from fastcxr.cli.console import err, esc, fail
from fastcxr.errors import FastcxrError

OUT_OF_MEMORY = (
    "the GPU ran out of memory: lower --batch-size (evaluation batches are twice its size); "
    "finished epochs are checkpointed, so add --resume with the same --name"
)
INTERRUPTED = 143  # 128 + SIGTERM, what a job stopped by its scheduler reports


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM or SIGINT sets `fastcxr.runtime.stopping.STOP` (long jobs stop at their next safe
    point and raise `Interrupted`); a second Ctrl-C raises KeyboardInterrupt at once. The
    previous handlers are restored and STOP cleared on the way out."""
    import signal

    from fastcxr.runtime.stopping import STOP

    if threading.current_thread() is not threading.main_thread():  # handlers: main thread only
        yield
        return

    def on_signal(signum, frame):  # clusters send SIGTERM before they kill a job
        if STOP.is_set() and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        err.print(f"[yellow]{signal.Signals(signum).name}: stopping cleanly…[/]")
        STOP.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        STOP.clear()
        for s, handler in previous.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Whatever the libraries print goes to stderr: stdout holds the result alone."""
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _is_out_of_memory(e: BaseException) -> bool:
    torch = sys.modules.get("torch")  # not imported: the error cannot be torch's
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


def expected_message(e: BaseException) -> str | None:
    """The one line an expected error is shown as; None for anything else (a bug)."""
    if isinstance(e, FastcxrError):
        return str(e)
    if _is_out_of_memory(e):
        return OUT_OF_MEMORY
    return None


@contextlib.contextmanager
def expected_errors() -> Iterator[None]:
    """An expected error → one line on stderr, exit 2; a stopped job → its message in
    yellow, exit 143; everything else propagates with its traceback."""
    from fastcxr.runtime.stopping import Interrupted

    try:
        yield
    except Interrupted as e:
        err.print(f"[yellow]{esc(e)}[/]", soft_wrap=True)
        raise typer.Exit(INTERRUPTED) from None
    except Exception as e:
        msg = expected_message(e)
        if msg is None:
            raise
        fail(msg)


@contextlib.contextmanager
def guarded() -> Iterator[None]:
    """A command's work: expected errors mapped, signals stop it cleanly, stdout kept for
    the result (print it after this block), FutureWarnings hidden."""
    with expected_errors(), stop_on_signals(), stdout_to_stderr():
        yield
