"""The one size guard of every image reader: a declared size is bounded before anything is
decoded (a decompression bomb is an unreadable file, not a crash), and a shape that cannot be
a radiograph (a 1x1, a 1x5000 strip) is refused with the reason."""

from __future__ import annotations

MAX_SIDE = 16384  # largest accepted Rows/Columns; radiographs are ~3000, this bounds memory
MAX_PIXELS = 8192 * 8192
MIN_SIDE = 16  # smallest accepted side: a 1x1 or 4x4 "radiograph" carries no image to read
MAX_ASPECT = 4.0  # longest side / shortest: chest radiographs are about 0.8-1.25


def implausible_shape(rows: int, cols: int) -> str | None:
    """Why a rows x cols image cannot be a radiograph to read (None: it can)."""
    if min(rows, cols) < MIN_SIDE:
        return f"{rows}x{cols} is too small to be a radiograph (at least {MIN_SIDE} a side)"
    if max(rows, cols) / min(rows, cols) > MAX_ASPECT:
        return (f"{rows}x{cols} is too elongated to be a radiograph (sides at most "
                f"{MAX_ASPECT:g}:1)")  # fmt: skip
    return None


def too_large(rows: int, cols: int) -> str | None:
    """Why a declared rows x cols size is refused before decoding (None: within the limits)."""
    if not (0 < rows <= MAX_SIDE and 0 < cols <= MAX_SIDE) or rows * cols > MAX_PIXELS:
        return (f"implausible image size {rows}x{cols} declared (limit {MAX_SIDE} a side, "
                f"{MAX_PIXELS:,} pixels)")  # fmt: skip
    return None


__all__ = ["MAX_ASPECT", "MAX_PIXELS", "MAX_SIDE", "MIN_SIDE", "implausible_shape", "too_large"]
