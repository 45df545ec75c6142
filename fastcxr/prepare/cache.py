"""Convert source images into the 8-bit image cache: parallel, resumable, atomic, stoppable.

Each source image becomes `images/<key>.png` (8-bit grayscale, `size` x `size`). A file that
already exists is verified before it is skipped: its PNG structure is walked and every
chunk's CRC-32 (recorded by the PNG writer when the file was written) is checked, so a
truncated, zero-filled or overwritten file is converted again instead of being trusted. A
source that cannot be read is recorded in `failures.csv` (file, reason) and the batch goes
on; a cache that cannot be written (full disk, read-only folder) stops the whole batch with
`CacheWriteError`, leaving no partial file behind.

Work is handed to the worker processes a few small chunks at a time, so a stop request
(`fastcxr.runtime.stopping.STOP`, set by the CLI on SIGTERM/SIGINT) ends the batch within about a
second: pending chunks are cancelled, those in flight finish, and `Interrupted` is raised.
Workers ignore SIGINT (the parent decides when to stop), end on SIGTERM only once their
current image is whole, and die with their parent, even when it is killed with SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fastcxr.dicom import (
    DicomError,
)
from fastcxr.errors import FastcxrError, UsageError
from fastcxr.images.readers import ImageError, read_image
from fastcxr.runtime.stopping import STOP, Interrupted

MIN_SIZE, MAX_SIZE = 8, 4096  # cache image sizes accepted (the study's is 512)
CHUNK_SECONDS = 0.5  # target time of one task handed to a worker: bounds the stop latency
MAX_CHUNK = 64
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class CacheResult:
    converted: int
    skipped: int
    failures: pd.DataFrame  # columns: file, reason


class CacheWriteError(FastcxrError, ValueError):
    """The cache cannot be written (no space left, read-only or forbidden folder): not a
    problem of one image, so the whole batch stops."""


def check_size(size: int) -> int:
    """The cache image size, refused unless it is a whole number in [MIN_SIZE, MAX_SIZE]."""
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)):
        raise UsageError(f"--size must be a whole number of pixels, not {size!r}")
    if not MIN_SIZE <= size <= MAX_SIZE:
        raise UsageError(
            f"--size {size}: the cache image size must be between {MIN_SIZE} and {MAX_SIZE} "
            "pixels (the study uses 512)"
        )
    return int(size)


def load_source(path: Path, size: int, mode: str) -> np.ndarray:
    """A source image (DICOM, PNG, JPG) as the cache's uint8 `size` x `size` array
    (`fastcxr.images.readers.read_image`)."""
    return read_image(path, size, mode)


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _cached_ok(dst: Path, size: int) -> bool:
    """Whether `dst` is a whole, uncorrupted `size` x `size` 8-bit grayscale PNG.

    Walks the chunks and checks each one's CRC-32 (written with the file, so no index is kept
    beside the cache and shards writing the same folder need no coordination), that the
    header says `size` x `size`, 8-bit gray, and that the file ends exactly with IEND. About a
    twentieth of the cost of decoding (0.1 vs 2.8 ms for a 512x512 image).
    """
    try:
        data = memoryview(dst.read_bytes())
    except OSError:
        return False
    n, pos, seen_idat = len(data), len(_PNG_SIGNATURE), False
    if data[:pos] != _PNG_SIGNATURE:
        return False
    first = True
    while pos + 12 <= n:
        (length,) = struct.unpack_from(">I", data, pos)
        end = pos + 12 + length
        if end > n:
            return False
        ctype = bytes(data[pos + 4 : pos + 8])
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(data[pos + 4 : end - 4]) != crc:
            return False
        if first:
            if ctype != b"IHDR" or length != 13:
                return False
            w, h, depth, color = struct.unpack_from(">IIBB", data, pos + 8)
            if (w, h, depth, color) != (size, size, 8, 0):
                return False
            first = False
        elif ctype == b"IDAT":
            seen_idat = True
        elif ctype == b"IEND":
            return seen_idat and end == n
        pos = end
    return False


def _write_png(arr: np.ndarray, path: Path) -> None:
    """The one place a cache image's bytes are written."""
    Image.fromarray(arr).save(path, format="PNG", compress_level=1)


def describe_write_error(e: OSError, folder: Path) -> str:
    again = "; run the same prepare again to continue (finished images are kept)"
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        quota = " (disk quota exceeded)" if e.errno == errno.EDQUOT else ""
        return f"no space left on {folder}{quota}: free some space{again}"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {folder} ({e.strerror or e}): choose a writable --out{again}"
    return f"cannot write {folder} ({e.strerror or _one_line(e)}){again}"


def convert_one(args: tuple[str, str, int, str]) -> tuple[str, str | None, bool]:
    """(src, dst, size, mode) → (src, reason it could not be read or None, converted?)."""
    src, dst, size, mode = args
    dst_p = Path(dst)
    if _cached_ok(dst_p, size):
        return src, None, False
    try:
        arr = load_source(Path(src), size, mode)
    except (DicomError, OSError, ValueError) as e:
        return src, _one_line(e), False
    tmp = dst_p.with_name(f".{dst_p.name}.{os.getpid()}.part")
    try:
        dst_p.parent.mkdir(parents=True, exist_ok=True)
        _write_png(arr, tmp)
        os.replace(tmp, dst_p)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise CacheWriteError(describe_write_error(e, dst_p.parent)) from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return src, None, True


def _convert_job(args: tuple[str, str, int, str]) -> tuple[str | None, bool]:
    """`convert_one` without the source path: results sent back from workers stay small."""
    return convert_one(args)[1:]


# -- worker processes -----------------------------------------------------------------------
_busy = False  # in a worker: whether an item is being worked on
_exit_after_item = False


class WorkerDied(FastcxrError, ValueError):
    """A worker process ended abruptly (killed, or out of memory) while not asked to stop."""


def _die_with(parent: int) -> None:
    """Pool initializer. SIGINT is ignored (Ctrl-C reaches the whole process group; the
    parent stops the batch cleanly); SIGTERM ends the worker once its current item is whole
    (never with a partial file); and the worker dies when the parent does, even by SIGKILL
    (Linux: PR_SET_PDEATHSIG; elsewhere a watchdog thread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _on_sigterm)
    armed = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            armed = libc.prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            armed = False
    if not _alive(parent):  # the parent died before the death signal was armed
        os._exit(1)
    if not armed:
        ppid = os.getppid()

        def watch() -> None:
            while os.getppid() == ppid and _alive(parent):
                time.sleep(0.5)
            os._exit(1)

        threading.Thread(target=watch, name="fastcxr-parent-watch", daemon=True).start()


def _on_sigterm(signum, frame) -> None:
    global _exit_after_item
    if not _busy:
        os._exit(128 + signum)
    _exit_after_item = True


def _alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, dead but not yet reaped, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat.rpartition(")")[2].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False
    except (OSError, IndexError):
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _run_chunk(
    fn: Callable[[Any], Any], chunk: list[tuple[int, Any]]
) -> tuple[list[tuple[int, Any]], float, BaseException | None]:
    """In a worker: `fn` over the chunk → (index, result) pairs, seconds, and the exception
    that stopped the chunk early (its finished results are still returned)."""
    global _busy
    t0, done = time.perf_counter(), []
    try:
        for i, item in chunk:
            _busy = True
            try:
                done.append((i, fn(item)))
            finally:
                _busy = False
            if _exit_after_item:
                os._exit(128 + signal.SIGTERM)
    except Exception as e:  # handed to the parent, which stops the batch
        return done, time.perf_counter() - t0, e
    return done, time.perf_counter() - t0, None


def map_stoppable(
    fn: Callable[[Any], Any],
    items: Sequence[Any],
    workers: int,
    consume: Callable[[int, Any], None],
    stopped: Callable[[], Interrupted],
) -> None:
    """`consume(i, fn(items[i]))` for every item, in this process as results arrive, with `fn`
    run by `workers` processes (or here, when 1). Tasks are small chunks sized to take about
    `CHUNK_SECONDS` and only a few are queued at once, so when `STOP` is set the pending ones
    are cancelled, those in flight finish (about a second) and `stopped()` is raised. An
    exception raised by `fn` stops the batch the same way and is re-raised."""
    n = len(items)
    if workers <= 1 or n < 8:
        for i, item in enumerate(items):
            if STOP.is_set():
                raise stopped()
            consume(i, fn(item))
        return
    ex = ProcessPoolExecutor(workers, initializer=_die_with, initargs=(os.getpid(),))
    pending: set[Future] = set()
    nxt, chunk, per_item = 0, 1, None

    def take(fut: Future) -> None:
        results, seconds, error = fut.result()
        for i, r in results:
            consume(i, r)
        if error is not None:
            raise error
        nonlocal chunk, per_item
        if results:
            t = seconds / len(results)
            per_item = t if per_item is None else 0.7 * per_item + 0.3 * t
            chunk = int(min(MAX_CHUNK, max(1, CHUNK_SECONDS / max(per_item, 1e-6))))

    try:
        while nxt < n or pending:
            if STOP.is_set():
                ex.shutdown(wait=True, cancel_futures=True)  # the chunks in flight finish
                for fut in pending:
                    if fut.done() and not fut.cancelled() and fut.exception() is None:
                        take(fut)
                raise stopped()
            while nxt < n and len(pending) < workers + 1:
                part = [(i, items[i]) for i in range(nxt, min(n, nxt + chunk))]
                pending.add(ex.submit(_run_chunk, fn, part))
                nxt += len(part)
            done, pending = wait(pending, timeout=0.2, return_when=FIRST_COMPLETED)
            for fut in done:
                take(fut)
    except BrokenProcessPool as e:
        if STOP.is_set():  # the workers were sent SIGTERM with us; each finished its image
            raise stopped() from None
        raise WorkerDied(
            "a worker process ended abruptly (killed, or out of memory?): run the same "
            "command again to continue, with fewer --workers if memory is short"
        ) from e
    finally:
        ex.shutdown(wait=True, cancel_futures=True)


def build_cache(
    sources: Sequence[Path],
    targets: Sequence[Path],
    size: int,
    mode: str = "voi",
    workers: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> CacheResult:
    """Convert `sources[i]` → `targets[i]` in parallel; returns counts and failures.

    Raises `Interrupted` when `fastcxr.runtime.stopping.STOP` is set (what is converted is kept: the
    same call again continues) and `CacheWriteError` when the cache cannot be written.
    """
    size = check_size(size)
    jobs = [(str(s), str(t), size, mode) for s, t in zip(sources, targets)]
    workers = workers or os.cpu_count() or 1
    counts = {"converted": 0, "skipped": 0, "done": 0}
    failures: list[tuple[int, str, str]] = []

    def consume(i: int, result: tuple[str | None, bool]) -> None:
        err, did = result
        if err is not None:
            failures.append((i, jobs[i][0], err))
        else:
            counts["converted" if did else "skipped"] += 1
        counts["done"] += 1
        if progress:
            progress(counts["done"], len(jobs))

    def stopped() -> Interrupted:
        cached = counts["converted"] + counts["skipped"]
        return Interrupted(
            f"stopped by request: {cached} of {len(jobs)} images converted; "
            "run the same prepare again to continue"
        )

    map_stoppable(_convert_job, jobs, workers, consume, stopped)
    failures.sort()
    return CacheResult(
        counts["converted"],
        counts["skipped"],
        pd.DataFrame([f[1:] for f in failures], columns=["file", "reason"]),
    )


__all__ = [
    "CacheResult",
    "CacheWriteError",
    "ImageError",
    "WorkerDied",
    "build_cache",
    "check_size",
    "convert_one",
    "load_source",
    "map_stoppable",
]
