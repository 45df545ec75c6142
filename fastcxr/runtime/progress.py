"""Progress events: how the library tells whoever runs it how far long work has got.

A progress event is `{"event": "progress", "id", "label", "done", "total", "unit"}` (a new
`label` on the same `id` starts that bar over), or `{"event": "progress", "id", "end": True}`
when it is done; it has no `epoch` key, so a log that prints epoch rows skips it. The command
line shows them as bars on a terminal (`fastcxr.cli.console.report`); they change no result.
"""

from __future__ import annotations


def progress_event(key: str, label: str, done: int, total: int | None, unit: str) -> dict:
    """A progress event (see the module's docstring)."""
    return {"event": "progress", "id": key, "label": label, "done": done, "total": total,
            "unit": unit}  # fmt: skip


def progress_end(key: str) -> dict:
    """The end of bar `key`."""
    return {"event": "progress", "id": key, "end": True}


__all__ = ["progress_end", "progress_event"]
