#!/usr/bin/env python3
"""`make gpu-check`: the GPU path checked in one command, within a time budget.

Runs, in this order (`--only` chooses and orders), each as its own process (a crash or a hang
of one is recorded and the next goes on), and writes into `--out` (default
`reports/build/gpu/`):

1. `environment` — device, driver, torch/fastai/pydicom versions, cores;
2. `bench` — `fastcxr bench --json` (the study's stages and `all`, Keras freezing, interleaved
   rounds) → `bench.json`;
3. `end-to-end` — `fastcxr compare --preset paper` (from scratch, one epoch per stage) on a
   synthetic 512x512 cache, each epoch's img/s next to bench's figure for its stage, and the GPU
   utilisation NVML sampled during the training epochs;
4. `pytest-gpu` — `pytest -m gpu` (tests/test_gpu.py and the other `gpu`-marked tests), the
   numbers each test measured (`gpu-tests.json`) and its JUnit report (`pytest-gpu.xml`);
5. `bench-compile` — the same bench with `--compile` for `head` and `all` → `bench-compile.json`.

`gpu-check.json` holds `device`, `checks` ([{name, ok, seconds, ...}]; `ok` is null for a
check that was skipped — no GPU, or not enough of the time budget left), the bench and
end-to-end figures, and the design's targets with whether each was met; `gpu-check.log` the
whole output. Exit status 0 when every check ran and passed, 1 when one failed (or was
interrupted: 130), 3 when none failed but some were skipped (`ok` null: incomplete); a target
missed is reported, not failed: it is a measurement.

`--smoke` runs the same code path on a CPU with a tiny architecture and size (the GPU tests and
NVML are then reported as skipped), so that CI keeps the script working between GPU sessions.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The design's targets (../shared/DESIGN.md, issue #21), measured on an H100.
TARGETS = {
    "fastcxr_vs_limit": 0.95,  # every stage
    "compiled_all_img_s": 500.0,
    "conv5_img_s": 750.0,
    "vs_defaults_frozen": 2.5,
    "vs_defaults_unfrozen": 1.3,
    "e2e_vs_bench": 0.9,
    "paper_hours": 1.0,
}

FULL = {
    "arch": "resnet152", "size": 512, "batch_size": 64, "warmup": 3, "steps": 10,
    "rounds": 3, "e2e_images": 3000,
    # seconds each check is expected to take on one H200 (sized from DESIGN.md's H100
    # figures and the first device run); a check is skipped when less than this is left
    "estimates": {"bench": 150, "end-to-end": 150, "pytest-gpu": 200, "bench-compile": 180},
}  # fmt: skip
SMOKE = {
    "arch": "resnet22n", "size": 32, "batch_size": 8, "warmup": 1, "steps": 2, "rounds": 3,
    "bench_stages": "head,all",  # the same code as the study's five, in less CPU time
    "e2e_images": 160,
    # generous: a shared 2-core CI runner can be 5x slower than a quiet one
    "estimates": {"pytest-gpu": 120, "bench": 150, "end-to-end": 240, "bench-compile": 150},
    "formulations": "multilabel,multiclass",  # two networks, each through the paper's stages
}  # fmt: skip
STUDY_STAGES = "head,conv5_block3=conv5_block-1,conv5,conv4_last3=conv4_block-3,all"


class Log:
    """Lines to the console and to gpu-check.log, each with the seconds since the start."""

    def __init__(self, path: Path):
        self.t0 = time.monotonic()
        self.f = path.open("w", buffering=1)

    def __call__(self, msg: str) -> None:
        line = f"[{time.monotonic() - self.t0:7.1f}s] {msg}"
        print(line, flush=True)
        self.f.write(line + "\n")

    def raw(self, line: str) -> None:
        self.f.write(line if line.endswith("\n") else line + "\n")
        print(line.rstrip("\n"), flush=True)


def run_streamed(cmd, log: Log, timeout: float, stdout_path: Path | None = None, env=None,
                 on_line=None) -> tuple[int, str]:  # fmt: skip
    """Run `cmd` in its own process group; stderr (and stdout unless `stdout_path`) streamed
    to the log, each line passed to `on_line(t, line)`; killed after `timeout` seconds.
    Returns (exit status, a reason when it did not exit by itself)."""
    log(f"$ {' '.join(map(str, cmd))}")
    out = stdout_path.open("w") if stdout_path else None
    proc = subprocess.Popen(
        [str(c) for c in cmd], stdout=out or subprocess.PIPE,
        stderr=subprocess.STDOUT if out is None else subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1", **(env or {})}, cwd=ROOT,
        start_new_session=True,
    )  # fmt: skip
    killed, done = [], threading.Event()

    def watchdog():
        if done.wait(timeout):
            return
        killed.append(f"killed after {timeout:.0f} s (time budget)")
        try:  # SIGABRT first: with PYTHONFAULTHANDLER set, Python prints where it was
            os.kill(proc.pid, signal.SIGABRT)
            if done.wait(5):
                return
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    threading.Thread(target=watchdog, daemon=True).start()
    stream = proc.stdout if out is None else proc.stderr
    try:
        for line in stream:
            log.raw(line)
            if on_line:
                on_line(time.time(), line)
        rc = proc.wait()
    except BaseException:  # interrupted (SIGINT, SIGTERM): the check's processes go with it
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
        raise
    finally:
        done.set()
    if out:
        out.close()
    return rc, "; ".join(killed)


class Nvml:
    """GPU utilisation and memory sampled every `period` seconds in a thread (nvidia-ml-py)."""

    def __init__(self, period: float = 0.1):
        self.period, self.samples, self.reason = period, [], None
        self._stop = threading.Event()
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nv = pynvml
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception as e:  # no package, no driver, no device: reported, not fatal
            self.nv, self.reason = None, f"NVML unavailable: {type(e).__name__}: {e}"

    def device(self) -> dict | None:
        if self.nv is None:
            return None
        nv, h = self.nv, self.handle
        name = nv.nvmlDeviceGetName(h)
        return {
            "name": name.decode() if isinstance(name, bytes) else name,
            "driver": _str(nv.nvmlSystemGetDriverVersion()),
            "memory_gib": nv.nvmlDeviceGetMemoryInfo(h).total / 2**30,
        }

    def __enter__(self):
        if self.nv is not None:
            self.thread = threading.Thread(target=self._loop, daemon=True)
            self.thread.start()
        return self

    def _loop(self):
        nv, h = self.nv, self.handle
        while not self._stop.wait(self.period):
            try:
                u = nv.nvmlDeviceGetUtilizationRates(h)
                m = nv.nvmlDeviceGetMemoryInfo(h)
                self.samples.append((time.time(), u.gpu, u.memory, m.used / 2**30))
            except Exception as e:  # a sample that fails is reported once, sampling stops
                self.reason = f"NVML sampling stopped: {e}"
                return

    def __exit__(self, *exc):
        self._stop.set()
        if self.nv is not None:
            self.thread.join()

    def within(self, windows: list[tuple[float, float]]) -> dict:
        """Utilisation (%) of the samples inside `windows` ([start, end] wall times)."""
        import numpy as np

        if self.nv is None:
            return {"available": False, "reason": self.reason}
        got = [s for s in self.samples if any(a <= s[0] <= b for a, b in windows)]
        if not got:
            return {"available": False, "reason": "no sample inside the training epochs"}
        util = np.array([s[1] for s in got], float)
        return {
            "available": True, "samples": len(got), "period_s": self.period,
            "gpu_util_mean": float(util.mean()), "gpu_util_median": float(np.median(util)),
            "gpu_util_p10": float(np.percentile(util, 10)),
            "share_of_samples_below_80": float((util < 80).mean()),
            "memory_used_gib_max": float(max(s[3] for s in got)),
        }  # fmt: skip


def _str(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class Checker:
    def __init__(self, args):
        self.args = args
        self.p = SMOKE if args.smoke else FULL
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / "gpu-check.log")
        if args.work:  # the user's folder: a scratch folder is made inside it, and only
            Path(args.work).mkdir(parents=True, exist_ok=True)  # that one is removed
        self.work = Path(tempfile.mkdtemp(prefix="fastcxr-gpu-check-", dir=args.work))
        self.t0 = time.monotonic()
        self.checks: list[dict] = []
        self.current = "environment"
        self.summary: dict = {"smoke": args.smoke, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        self.py = sys.executable
        self.env = {"PYTHONUNBUFFERED": "1", "FASTCXR_HOME": str(self.work / "home")}
        if args.smoke:  # a small CPU shared with a loader worker: one OpenMP thread each, or
            self.env["OMP_NUM_THREADS"] = "1"  # their spinning threads slow each other 10x

    def left(self) -> float:
        return self.args.budget - (time.monotonic() - self.t0)

    def limit(self, name: str) -> float:
        """Seconds a check's command may run: what is left of the budget, and no more than
        1.3 times its estimate, so that one hung check leaves time to the next."""
        return max(min(self.left(), 1.3 * self.p["estimates"][name]), 1.0)

    def fastcxr(self, *args) -> list:
        return [self.py, "-m", "fastcxr", *args]

    def check(self, name: str, fn) -> None:
        est = self.p["estimates"].get(name, 0)
        if name != "environment" and self.left() < est:
            why = (f"skipped: {self.left():.0f} s of the {self.args.budget:.0f} s budget left, "
                   f"the check needs about {est} s")  # fmt: skip
            self._add(name, None, 0.0, reason=why)
            return
        self.log(f"== {name} ==")
        t0 = time.monotonic()
        try:
            ok, extra = fn()
        except Exception as e:  # the check's own failure is recorded; the next check goes on
            import traceback

            self.log.raw(traceback.format_exc())
            ok, extra = False, {"reason": f"{type(e).__name__}: {e}"}
        self._add(name, ok, time.monotonic() - t0, **extra)

    def _add(self, name, ok, seconds, **extra) -> None:
        self.checks.append({"name": name, "ok": ok, "seconds": round(seconds, 1), **extra})
        word = {True: "ok", False: "FAILED", None: "skipped"}[ok]
        why = f" {extra['reason']}" if "reason" in extra else ""
        self.log(f"-- {name}: {word} ({seconds:.0f} s){why}")

    # -- the checks -------------------------------------------------------------------------
    def environment(self):
        import torch

        cuda = torch.cuda.is_available()
        env = {
            "python": platform.python_version(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": cuda,
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
        }  # fmt: skip
        for pkg in ("fastai", "pydicom", "torchvision", "numpy", "onnxruntime"):
            try:
                env[pkg] = __import__(pkg).__version__
            except Exception:
                env[pkg] = None
        try:
            env["git"] = subprocess.run(
                ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                text=True, timeout=10,
            ).stdout.strip() or None  # fmt: skip
        except (OSError, subprocess.SubprocessError):
            env["git"] = None
        if cuda:
            p = torch.cuda.get_device_properties(0)
            env["device"] = torch.cuda.get_device_name(0)
            env["capability"] = f"{p.major}.{p.minor}"
            env["memory_gib"] = p.total_memory / 2**30
            nv = Nvml().device()
            if nv:
                env["driver"] = nv["driver"]
        else:
            env["device"] = "cpu"
        self.summary["device"] = env["device"]
        self.summary["environment"] = env
        self.log(json.dumps(env))
        if not cuda and not self.args.smoke:
            return False, {"reason": "no CUDA device: on a CPU run `make gpu-check SMOKE=1`"}
        return True, {"device": env["device"]}

    def pytest_gpu(self):
        xml = self.out / "pytest-gpu.xml"
        rec = self.out / "gpu-tests.json"
        rec.unlink(missing_ok=True)
        cmd = [self.py, "-m", "pytest", "-m", "gpu", "-v", "--tb=short", "-rA",
               "-p", "no:cacheprovider", f"--junitxml={xml}", "--durations=0",
               # a test that hangs shows its stack (and is stopped, with pytest-timeout)
               "-o", "faulthandler_timeout=90", *gpu_test_files()]  # fmt: skip
        if importlib.util.find_spec("pytest_timeout"):
            cmd.insert(cmd.index("-v"), "--timeout=150")
        rc, killed = run_streamed(cmd, self.log, self.limit("pytest-gpu"), env={
            **self.env, "GPU_CHECK_OUT": str(self.out)})  # fmt: skip
        tests = _junit(xml) if xml.exists() else []
        measured = json.loads(rec.read_text()) if rec.exists() else {}
        self.summary["gpu_tests"] = {"tests": tests, "measured": measured}
        n = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "skipped")}
        extra = {**n, "exit_status": rc}
        if killed:
            return False, {**extra, "reason": killed}
        if rc not in (0, 5) or n["failed"]:
            return False, {**extra, "reason": f"{n['failed']} gpu test(s) failed (exit {rc})"}
        if n["passed"] == 0:
            return None, {**extra, "reason": f"no CUDA device: {n['skipped']} gpu tests skipped"}
        return True, extra

    def _bench_cmd(self, *extra) -> list:
        p = self.p
        return self.fastcxr(
            "bench", "--json", "--arch", p["arch"], "--size", p["size"], "--batch-size",
            p["batch_size"], "--freeze-style", "keras", "--warmup", p["warmup"], "--steps",
            p["steps"], "--rounds", p["rounds"], "--cache", self.work / "bench-cache", *extra,
        )  # fmt: skip

    def _bench(self, key: str, path: Path, *extra):
        name = "bench" if key == "bench" else "bench-compile"
        rc, killed = run_streamed(self._bench_cmd(*extra), self.log, self.limit(name),
                                  stdout_path=path, env=self.env)  # fmt: skip
        if rc != 0 or killed:
            return False, {"reason": killed or f"fastcxr bench exited {rc}"}
        res = json.loads(path.read_text())
        self.summary[key] = {
            k: res[k] for k in ("device", "arch", "size", "batch_size", "speed", "warmup",
                                "steps", "rounds", "eval_img_s", "projection")
        }  # fmt: skip
        self.summary[key]["rows"] = [
            {k: r.get(k) for k in ("stage", "unfreeze", "freeze_style", "limit_img_s",
                                   "fastcxr_img_s", "defaults_img_s", "fastcxr_vs_limit_median",
                                   "fastcxr_vs_limit_range", "fastcxr_vs_defaults_median",
                                   "fastcxr_vs_defaults_range", "wide", "wide_reason",
                                   "compile_s")}
            for r in res["rows"]
        ]  # fmt: skip
        return True, {"rows": len(res["rows"])}

    def bench(self):
        stages = self.p.get("bench_stages", STUDY_STAGES)
        return self._bench("bench", self.out / "bench.json", "--stages", stages)

    def bench_compile(self):
        return self._bench("bench_compile", self.out / "bench-compile.json", "--compile",
                           "--stages", "head,all", "--no-defaults")  # fmt: skip

    def end_to_end(self):
        import pandas as pd

        from fastcxr.bench import write_bench_cache

        p = self.p
        cache = self.work / "e2e-cache"
        t0 = time.monotonic()
        self.log(f"writing {p['e2e_images']} synthetic radiographs at {p['size']}px")
        manifest = write_bench_cache(cache, p["e2e_images"], p["size"])
        cache_s = time.monotonic() - t0
        runs = self.work / "runs"
        shutil.rmtree(runs / "e2e", ignore_errors=True)
        cmd = self.fastcxr(
            "compare", "--data", manifest, "--preset", "paper", "--no-pretrained", "--epochs",
            "1", "--runs", runs, "--name", "e2e", "--json",
        )  # fmt: skip
        if self.args.smoke:
            cmd += [
                "--arch",
                p["arch"],
                "--size",
                p["size"],
                "--batch-size",
                p["batch_size"],
                "--loader",
                "fast",
                "--workers",
                "1",
                "--formulations",
                p["formulations"],
            ]
        ends: list[tuple[float, str]] = []
        epoch = re.compile(r"^\s*(\S+) epoch\s+(\d+)\s.*\s([\d.]+)s\s*$")

        def on_line(t, line):
            if epoch.match(line):
                ends.append((t, line))

        with Nvml() as nvml:
            limit = self.limit("end-to-end")
            rc, killed = run_streamed(cmd, self.log, limit, self.work / "e2e.json",
                                      env=self.env, on_line=on_line)  # fmt: skip
        if rc != 0 or killed:
            return False, {"reason": killed or f"fastcxr compare exited {rc}"}
        df = pd.read_csv(manifest)
        n_train = int((df["split"] == "train").sum())
        bs = p["batch_size"]
        trained = n_train // bs * bs  # the fast loader drops the last partial batch
        epochs, windows = [], []
        order = json.loads((runs / "e2e" / "compare.json").read_text())["formulations"]
        hist = [pd.read_csv(runs / "e2e" / f / "history.csv").assign(formulation=f)
                for f in order]  # in training order, as the epoch lines arrived  # fmt: skip
        hist = pd.concat(hist, ignore_index=True)
        if len(hist) != len(ends):
            self.log(f"note: {len(ends)} epoch lines for {len(hist)} history rows")
        for i, r in enumerate(hist.itertuples()):
            row = {
                "formulation": r.formulation,
                "network": r.network,
                "stage": r.stage,
                "train_seconds": r.train_seconds,
                "epoch_seconds": r.seconds,
                "compile_seconds": r.compile_seconds,
                "img_s": trained / r.train_seconds,
            }
            if i < len(ends):  # the epoch's training window, from its log line's arrival
                end = ends[i][0] - (r.seconds - r.train_seconds)
                windows.append((end - r.train_seconds, end))
                row["gpu_util"] = nvml.within([windows[-1]]).get("gpu_util_mean")
            epochs.append(row)
        scale = 34_000 / n_train  # the study's training set, 10 epochs per stage (worst case)
        proj_s = float(sum(e["epoch_seconds"] for e in epochs)) * scale * 10
        self.summary["end_to_end"] = {
            "images": p["e2e_images"], "train_images": n_train, "trained_per_epoch": trained,
            "cache_seconds": cache_s, "epochs": epochs, "nvml": nvml.within(windows),
            "projected_paper_hours": proj_s / 3600,
            "projection_note": "each epoch's measured seconds (training + validation) scaled "
            f"to 34,000 training images, x10 epochs per stage, summed over the {len(epochs)} "
            "network-stages",
        }  # fmt: skip
        return True, {"epochs": len(epochs)}

    # -- the summary ------------------------------------------------------------------------
    def e2e_vs_bench(self) -> None:
        """Each end-to-end epoch's img/s over bench's fastcxr img/s for its stage (Keras
        freezing), when both ran in this check."""
        import numpy as np

        from fastcxr.config import PAPER_STAGES

        e2e = self.summary.get("end_to_end")
        rows = self.summary.get("bench", {}).get("rows", [])
        if not e2e:
            return
        bench = {r["unfreeze"]: r["fastcxr_img_s"] for r in rows if r["freeze_style"] == "keras"}
        spec = {s.name: s.unfreeze for s in PAPER_STAGES}
        for e in e2e["epochs"]:
            b = bench.get(spec.get(e["stage"]))
            e["bench_img_s"], e["vs_bench"] = b, (e["img_s"] / b if b else None)
        got = [e["vs_bench"] for e in e2e["epochs"] if e["vs_bench"] is not None]
        e2e["median_vs_bench"] = float(np.median(got)) if got else None

    def targets(self) -> list[dict]:
        out = []

        def add(name, value, target, above=True, row=None):
            met = None if value is None else (value >= target if above else value < target)
            if self.args.smoke:  # a tiny model on a CPU is not what the targets are about
                met = None
            t = {"name": name, "value": value, "target": target, "met": met,
                 "smoke": self.args.smoke}  # fmt: skip
            if row is not None and row.get("wide"):  # rounds disagree: not a measurement
                t["met"], t["wide"] = None, row.get("wide_reason") or "rounds disagree"
            out.append(t)

        for r in self.summary.get("bench", {}).get("rows", []):
            add(f"fastcxr/limit {r['stage']}", r["fastcxr_vs_limit_median"],
                TARGETS["fastcxr_vs_limit"], row=r)  # fmt: skip
            if r.get("fastcxr_vs_defaults_median") is not None:
                key = "vs_defaults_unfrozen" if r["unfreeze"] == "all" else "vs_defaults_frozen"
                add(f"fastcxr/defaults {r['stage']}", r["fastcxr_vs_defaults_median"],
                    TARGETS[key], row=r)  # fmt: skip
            if r["unfreeze"] == "conv5":
                add("conv5 + head img/s", r["fastcxr_img_s"], TARGETS["conv5_img_s"], row=r)
        for r in self.summary.get("bench_compile", {}).get("rows", []):
            if r["unfreeze"] == "all":
                add("compiled all img/s", r["fastcxr_img_s"], TARGETS["compiled_all_img_s"],
                    row=r)  # fmt: skip
        e2e = self.summary.get("end_to_end")
        if e2e:
            for e in e2e["epochs"]:
                if e.get("vs_bench") is not None:
                    add(f"end-to-end/bench {e['formulation']} {e['network']} {e['stage']}",
                        e["vs_bench"], TARGETS["e2e_vs_bench"])  # fmt: skip
            add("projected paper Exp. II hours (end-to-end)", e2e["projected_paper_hours"],
                TARGETS["paper_hours"], above=False)  # fmt: skip
        proj = self.summary.get("bench", {}).get("projection", {})
        if proj.get("available"):
            add("projected paper Exp. II hours (bench)", proj["hours"], TARGETS["paper_hours"],
                above=False)  # fmt: skip
        return out

    def run(self) -> int:
        self.log(f"gpu-check ({'smoke, CPU' if self.args.smoke else 'GPU'}), budget "
                 f"{self.args.budget:.0f} s, work folder {self.work}")  # fmt: skip
        self.check("environment", self.environment)
        if self.checks[-1]["ok"] is False:
            return self.finish()
        try:
            self._run_checks()
        except KeyboardInterrupt:
            self._add(self.current, False, 0.0, reason="interrupted (SIGINT/SIGTERM)")
            self.finish()
            return 130
        return self.finish()

    def _run_checks(self) -> None:
        # the speed table first (bench, end-to-end): what a short GPU session is for
        checks = {"bench": self.bench, "end-to-end": self.end_to_end,
                  "pytest-gpu": self.pytest_gpu, "bench-compile": self.bench_compile}  # fmt: skip
        for name in dict.fromkeys(self.args.only or checks):
            if name in checks:
                self.current = name
                self.check(name, checks[name])

    def finish(self) -> int:
        self.summary["checks"] = self.checks
        self.e2e_vs_bench()
        self.summary["targets"] = self.targets()
        self.summary["seconds"] = round(time.monotonic() - self.t0, 1)
        failed = any(c["ok"] is False for c in self.checks)
        skipped = any(  # the GPU tests skipping on a CPU smoke run leave it complete
            c["ok"] is None and not (self.args.smoke and c["name"] == "pytest-gpu")
            for c in self.checks
        )
        # ok: true only when every check ran and passed (the GPU tests may skip in smoke
        # mode); null when one was skipped (incomplete: nothing failed, not all measured)
        self.summary["ok"] = False if failed else (None if skipped else True)
        path = self.out / "gpu-check.json"
        tmp = path.with_suffix(".part")
        tmp.write_text(json.dumps(self.summary, indent=2, default=str))
        tmp.replace(path)
        for c in self.checks:
            word = {True: "ok", False: "FAILED", None: "skipped"}[c["ok"]]
            self.log(f"{c['name']:>14}: {word:7} {c['seconds']:6.1f} s  {c.get('reason', '')}")
        for t in self.summary["targets"]:
            met = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
            if t.get("wide"):
                met = f"n/a (wide: {t['wide']})"
            v = "-" if t["value"] is None else f"{t['value']:.3g}"
            self.log(f"target {t['name']}: {v} (target {t['target']}) {met}")
        word = {True: "passed", False: "FAILED", None: "INCOMPLETE (checks skipped)"}
        self.log(f"gpu-check {word[self.summary['ok']]} in {self.summary['seconds']:.0f} s; "
                 f"summary in {path}")  # fmt: skip
        if not self.args.keep:
            shutil.rmtree(self.work, ignore_errors=True)
        return {True: 0, False: 1, None: 3}[self.summary["ok"]]


def gpu_test_files() -> list[str]:
    """The test files that hold `gpu`-marked tests (relative to the repository)."""
    return sorted(
        str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
        if "mark.gpu" in p.read_text()
    )  # fmt: skip


def _junit(path: Path) -> list[dict]:
    """[{name, outcome, seconds, message}] from a pytest JUnit XML report."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                outcome = "failed" if tag in ("failure", "error") else "skipped"
                message = (el.get("message") or "")[:500]
        tests.append({"name": f"{case.get('classname')}::{case.get('name')}",
                      "outcome": outcome, "seconds": float(case.get("time") or 0),
                      "message": message})  # fmt: skip
    return tests


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=os.environ.get("GPU_CHECK_OUT", "reports/build/gpu"))
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny architecture and size")
    ap.add_argument(
        "--budget",
        type=float,
        default=540.0,
        help="seconds for the whole check (default 540: 9 minutes)",
    )
    ap.add_argument(
        "--only",
        type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
        help="comma-separated checks to run, in this order (environment always "
        "runs first): pytest-gpu, bench, end-to-end, bench-compile",
    )
    ap.add_argument("--work", help="scratch folder (default: a new temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder")
    args = ap.parse_args(argv)
    unknown = set(args.only or ()) - {"pytest-gpu", "bench", "end-to-end", "bench-compile"}
    if unknown:
        ap.error(f"--only: unknown check(s) {', '.join(sorted(unknown))}")
    if args.budget <= 0:
        ap.error(f"--budget must be a positive number of seconds, not {args.budget:g}")

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupt)
    return Checker(args).run()


if __name__ == "__main__":
    sys.exit(main())
