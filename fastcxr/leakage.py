"""Leakage that a plain comparison of manifest strings misses.

* Patient ids that are one number written differently (`10035354`, `10035354.0`,
  `010035354`) are one patient: `patient_key`.
* An image listed under two names — a symlink, or a byte-identical copy — is one image:
  `same_files` finds them by resolved path, then by content (files of equal size are hashed,
  a 64 KiB head first, the whole file only when heads agree), so the cost is a `stat` per
  file plus reads of the few that could be copies.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

_NUMBER = re.compile(r"^[+]?0*(\d+)(?:\.0*)?$")
_SCIENTIFIC = re.compile(r"^[+]?\d+(?:\.\d*)?[eE][+]?\d{1,3}$")  # "1.0035354E+07" (a spreadsheet)
_HEAD = 1 << 16


def patient_key(pid) -> str:
    """The id two spellings of one patient share: a whole number without leading zeros, a
    trailing `.0` or an exponent ("010035354", "10035354.0", "1.0035354E+07" → "10035354");
    other ids stripped of spaces."""
    text = str(pid).strip()
    m = _NUMBER.match(text)
    if m:
        return m.group(1).lstrip("0") or "0"
    if _SCIENTIFIC.match(text):
        from decimal import Decimal

        value = Decimal(text)
        if value == value.to_integral_value():
            return str(int(value))
    return text


def patient_keys(ids: Iterable) -> np.ndarray:
    """`patient_key` of each id: the clusters of the patient-level statistics (bootstrap,
    DeLong), so two spellings of one patient are one cluster there as in the leakage check."""
    return np.array([patient_key(p) for p in ids], dtype=object)


def _digest(path: str, head: bool) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if head:
            h.update(f.read(_HEAD))
        else:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def same_files(a: Sequence[str | Path], b: Sequence[str | Path]) -> list[tuple[str, str, str]]:
    """Pairs (file of `a`, file of `b`, how) naming one image: `how` is "same file" (one
    resolves to the other: a symlink, a hard link, another spelling of the path) or
    "identical content". Missing or unreadable files are skipped (they are reported
    elsewhere)."""

    def info(paths: Iterable[str | Path]) -> dict[str, tuple[str, tuple, int]]:
        out = {}
        for p in paths:
            try:
                st = os.stat(p)
            except OSError:
                continue
            out[str(p)] = (os.path.realpath(p), (st.st_dev, st.st_ino), st.st_size)
        return out

    ia, ib = info(a), info(b)
    found: dict[tuple[str, str], str] = {}
    by_real = defaultdict(list)
    for p, (real, ino, _) in ia.items():
        by_real[real].append(p)
        by_real[ino].append(p)
    for q, (real, ino, _) in ib.items():
        for p in {*by_real.get(real, ()), *by_real.get(ino, ())}:
            found[p, q] = "same file"
    sizes_a = defaultdict(list)
    for p, (_, _, size) in ia.items():
        sizes_a[size].append(p)
    digests: dict[tuple[str, bool], str | None] = {}

    def digest(p: str, head: bool) -> str | None:
        if (p, head) not in digests:
            try:
                digests[p, head] = _digest(p, head)
            except OSError:
                digests[p, head] = None
        return digests[p, head]

    for q, (_, _, size) in ib.items():
        for p in sizes_a.get(size, ()):
            if (p, q) in found:
                continue
            hq, hp = digest(q, True), digest(p, True)
            if hq is None or hq != hp:
                continue
            if size <= _HEAD or digest(q, False) == digest(p, False):
                found[p, q] = "identical content"
    return [(p, q, how) for (p, q), how in found.items()]


__all__ = ["patient_key", "same_files"]
