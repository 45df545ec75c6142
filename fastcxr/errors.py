"""The errors fastcxr expects: bad input, a refused run, an unreadable file.

Every one derives from `FastcxrError`; the command line catches that class alone and prints it
as one line (exit 2). Anything else is a bug and shows its traceback. `UsageError` is a bad
option or argument value; it is also a `ValueError`, so library callers may catch either.
"""

from __future__ import annotations


class FastcxrError(Exception):
    """An expected failure, explained in its message (one line, naming what to change)."""


class UsageError(FastcxrError, ValueError):
    """An option, argument or configuration value that cannot be used."""


class MissingFile(FastcxrError, FileNotFoundError):
    """A file or folder the command was given, or needs beside one it was given, is not there
    (the message names it). Also a `FileNotFoundError`, so library callers may catch either."""


class Diverged(FastcxrError):
    """Training produced a loss that is not a finite number (NaN or infinite)."""


class DamagedRecord(FastcxrError, TypeError):
    """A record's JSON whose value has the wrong type where a result reads it (the message
    names the place, e.g. `CompareResult.formulations.single.findings.Edema`). Also a
    `TypeError`, so library callers may catch either."""


__all__ = ["DamagedRecord", "Diverged", "FastcxrError", "MissingFile", "UsageError"]
