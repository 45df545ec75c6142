"""`fastcxr bench` stops within seconds on SIGTERM/SIGINT, whatever it is measuring."""

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from tiny import fastcxr

from fastcxr import bench
from fastcxr.runtime.stopping import STOP, Interrupted

BENCH = ["bench", "--arch", "resnet10", "--size", "32", "--batch-size", "4", "--warmup", "1",
         "--steps", "200000", "--stages", "head", "--workers", "0", "--no-defaults"]  # fmt: skip


@pytest.fixture
def stop_requested():
    STOP.set()
    yield
    STOP.clear()


def _run_and_signal(cmd, ready, sig=signal.SIGTERM, timeout=15.0):
    """Start `cmd`, send `sig` once `ready(stderr_so_far)` holds; (status, stderr, seconds
    from the signal to the exit)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while not ready("".join(lines)) and proc.poll() is None:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        assert proc.poll() is None, "".join(lines)
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s after {sig.name}:\n{''.join(lines)}")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            kids = _children(proc.pid)
            proc.kill()
            proc.wait()
            for k in kids:  # a failed stop must not leave its workers behind
                try:
                    os.kill(k, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        reader.join(timeout=10)
    return proc.returncode, "".join(lines), took


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            if int(stat.read_text().rpartition(")")[2].split()[1]) == pid:
                kids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):
            continue
    return kids


@pytest.mark.slow
def test_sigterm_stops_bench_while_it_writes_its_image_cache(tmp_path):
    cache = tmp_path / "cache"
    # 200000 steps want a cache of a million images: the signal comes while it is written

    def ready(_):
        return cache.exists() and any((cache / "images").glob("*.png"))

    rc, err, took = _run_and_signal(fastcxr(*BENCH, "--cache", cache), ready)
    print(f"bench (writing its cache): stopped {took:.2f} s after SIGTERM")
    assert rc == 143, err
    assert "stopped by request while writing the bench cache" in " ".join(err.split())
    assert not (cache / ".complete").exists()
    assert not [p for p in cache.rglob("*") if p.name.endswith(".part")]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
@pytest.mark.slow
def test_signal_stops_bench_between_measurement_steps(tmp_path, sig):
    cache = tmp_path / "cache"
    cmd = fastcxr(*BENCH, "--images", "48", "--cache", cache)

    def ready(err):
        return "model-only limit" in err

    time_in_loop = []

    def ready_a_second_later(err):
        if ready(err) and not time_in_loop:
            time_in_loop.append(time.monotonic())
        return bool(time_in_loop) and time.monotonic() - time_in_loop[0] > 1.0

    rc, err, took = _run_and_signal(cmd, ready_a_second_later, sig)
    print(f"bench (model-only limit loop): stopped {took:.2f} s after {sig.name}")
    assert rc == 143, err
    assert "stopped by request during bench (model-only limit" in " ".join(err.split())


def test_throughput_callback_stops_on_request(stop_requested):
    tp = bench.Throughput(1, 10, lambda: None, "bench (fastcxr, stage head)")
    with pytest.raises(Interrupted, match=r"during bench \(fastcxr, stage head\)"):
        tp.before_batch()
    with pytest.raises(Interrupted):
        tp.after_batch()


def test_bench_cache_and_bench_prepare_stop_on_request(tmp_path, stop_requested):
    t0 = time.monotonic()
    with pytest.raises(Interrupted, match="writing the bench cache"):
        bench.write_bench_cache(tmp_path / "c", 64, 32, workers=2)
    with pytest.raises(Interrupted, match="bench-prepare"):
        bench.bench_prepare(n=2, size=32, repeats=1, rows=300, cols=254)
    assert time.monotonic() - t0 < 10
    assert not (tmp_path / "c" / ".complete").exists()
    assert not list((tmp_path / "c" / "images").glob("*.png"))
