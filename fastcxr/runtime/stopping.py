"""Stopping on request: one event every long job checks, and the exception it ends with.

The CLI sets `STOP` on SIGTERM or SIGINT; training stops right after its next checkpoint,
`prepare` after the images in flight, `bench` after the current measurement step. Each then
raises `Interrupted`, and the CLI exits with status 143 saying how to continue.
"""

from __future__ import annotations

import threading

STOP = threading.Event()


class Interrupted(Exception):
    """A job stopped on request (SIGTERM/SIGINT) in a clean, resumable state."""


def check(what: str) -> None:
    """Raise `Interrupted` (naming `what` was stopped) when a stop was requested."""
    if STOP.is_set():
        raise Interrupted(f"stopped by request during {what}")
