"""Several nodes (issue #21): two torchrun agents on this machine, one process each, meeting
on 127.0.0.1 (c10d rendezvous, gloo), train one formulation as two "nodes" of one job.

Only global rank 0 prints and writes, so what rank 1 decided is invisible from outside. Each
process therefore runs the unchanged command line through a small driver (`SPY`, below)
that wraps `fastcxr.study.train_formulation`, as the CLI calls it, and dumps what that rank
returned and logged: its epochs, early-stopping decisions, test metrics and environment.
"""

import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tiny import TINY_TRAIN

from fastcxr.runtime.fastpath import default_workers

pytest.importorskip("accelerate")

# The driver each torchrun agent starts: the `fastcxr` command line, with this rank's view
# of the run written to $SPY/rank{RANK}.json.
SPY = """
import json, os, sys
from pathlib import Path

from fastcxr import study
from fastcxr.cli import app
from fastcxr.runtime.fastpath import default_workers

inner = study.train_formulation


def spy(data, formulation, cfg, run_dir, log=None, **kw):
    events = []

    def record(ev):
        events.append(dict(ev))
        if log:
            log(ev)

    summary = inner(data, formulation, cfg, run_dir, record, **kw)
    env = {k: os.environ.get(k) for k in ("RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE")}
    view = {"env": env, "workers": default_workers(True), "summary": summary, "events": events}
    Path(os.environ["SPY"], f"rank{env['RANK']}.json").write_text(json.dumps(view))
    return summary


study.train_formulation = spy
sys.argv[0] = "fastcxr"
app()
"""


def _without(option: str, args: list[str]) -> list[str]:
    i = args.index(option)
    return args[:i] + args[i + 2 :]


EPOCHS, PATIENCE = 5, 1
FINDINGS = ("Edema", "Pleural Effusion")  # the default
# A learning rate too small to help: the validation loss soon gets worse (BatchNorm's
# running statistics drift), so early stopping ends the stage before EPOCHS.
ARGS = [
    *_without("--workers", TINY_TRAIN),
    "--loader", "fast",  # no --workers: the default share of the node's cores
    "--stages", "all", "--epochs", EPOCHS, "--patience", PATIENCE, "--lr", "1e-6",
    "--formulation", "multilabel", "--name", "mn", "--json",
]  # fmt: skip
TIMING = ("wall_seconds", "train_seconds", "seconds_per_epoch", "seconds", "compile_seconds")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_nodes(cmds, nodes, logs: Path, timeout: float) -> list[tuple[str, str]]:
    """Each node's command at once (in its node's folder, stdout and stderr kept in `logs`);
    their (stdout, stderr) once all exit 0 within `timeout` seconds."""
    logs.mkdir()
    procs = []
    for cmd, node in zip(cmds, nodes):
        env = {**os.environ, "SPY": str(node / "spy"), "OMP_NUM_THREADS": "1"}
        with (
            open(logs / f"{node.name}.out", "w") as out,
            open(logs / f"{node.name}.err", "w") as err,
        ):
            procs.append(subprocess.Popen(cmd, cwd=node, env=env, stdout=out, stderr=err))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and any(p.poll() is None for p in procs):
            if any(p.poll() for p in procs):  # one failed: the other would wait for it
                break
            time.sleep(0.2)
    finally:
        hung = [p for p in procs if p.poll() is None]
        for p in hung:  # ranks that disagree wait for each other until killed
            for pid in _process_tree(p.pid):  # torchrun starts workers in their own sessions
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            p.wait()
    outs = [
        ((logs / f"{n.name}.out").read_text(), (logs / f"{n.name}.err").read_text()) for n in nodes
    ]
    for p, node, (_, err) in zip(procs, nodes, outs):
        assert p.returncode == 0, (
            f"{node.name} ({'killed' if p in hung else 'failed'}): {err[-3000:]}"
        )
    return outs


def _process_tree(pid: int) -> list[int]:
    """`pid` and its descendants (Linux /proc), parents first."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop(0))
        todo += children.get(tree[-1], [])
    return tree


def _without_timing(x):
    """A summary without its clock readings (which differ between processes)."""
    if isinstance(x, dict):
        return {k: _without_timing(v) for k, v in x.items() if k not in TIMING}
    if isinstance(x, list):
        return [_without_timing(v) for v in x]
    return x


def _early_stop(valid_losses: list[float], patience: int, max_epochs: int) -> tuple[int, int]:
    """(epochs run, best epoch) of a stage that stops after `patience` epochs without a
    strictly lower validation loss."""
    best, best_epoch, wait = float("inf"), 0, 0
    for epoch, loss in enumerate(valid_losses, 1):
        if loss < best:
            best, best_epoch, wait = loss, epoch, 0
        else:
            wait += 1
        if wait >= patience or epoch == max_epochs:
            return epoch, best_epoch
    raise AssertionError(f"the stage ended without a reason after {valid_losses}")


@pytest.mark.slow
def test_two_nodes_train_one_record(prepared, tmp_path):
    """`torchrun --nnodes 2 --nproc_per_node 1`, twice, each "node" with its own --runs:
    one complete record, by global rank 0 alone; both ranks saw the same validation losses,
    stopped at the same epoch and reached the same test metrics; the fast loader's default
    workers are the node's cores, not a share of the world's."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    driver = tmp_path / "spy.py"
    driver.write_text(SPY)
    endpoint = f"127.0.0.1:{_free_port()}"
    before = sorted((str(p), p.stat().st_mtime_ns) for p in prepared.rglob("*"))
    nodes = [tmp_path / f"node{i}" for i in (0, 1)]  # each node's own disk
    cmds = [
        [
            torchrun, "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(i),
            "--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, str(driver),
            "train", "--data", str(prepared), *map(str, ARGS), "--runs", str(node / "runs"),
        ]
        for i, node in enumerate(nodes)
    ]  # fmt: skip
    for node in nodes:
        (node / "spy").mkdir(parents=True)
    outs = _run_nodes(cmds, nodes, tmp_path / "logs", timeout=240)

    # which agent got global rank 0 is the rendezvous's choice (c10d ignores --node_rank)
    views = [json.loads(next((n / "spy").glob("rank*.json")).read_text()) for n in nodes]
    ranks = [v["env"]["RANK"] for v in views]
    assert sorted(ranks) == ["0", "1"]
    main, other = (0, 1) if ranks[0] == "0" else (1, 0)
    for v in views:
        assert v["env"]["WORLD_SIZE"] == "2" and v["env"]["LOCAL_WORLD_SIZE"] == "1"
    assert views[other]["env"]["GROUP_RANK"] == "1"  # the second node's process

    # one complete record, written by global rank 0 on its node's disk
    run = nodes[main] / "runs" / "mn"
    record = json.loads((run / "record.json").read_text())
    assert record.pop("complete") is True
    digest = hashlib.sha256((run / "predictions.csv").read_bytes()).hexdigest()
    assert record.pop("predictions_sha256") == digest  # kept by the record, not the summary
    printed = json.loads(outs[main][0])  # the one JSON document: rank 0's
    assert printed.pop("run_dir") == str(run) and printed.pop("synthetic") in (True, False)
    assert printed == record
    assert record == views[main]["summary"]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["processes"] == 2
    test = pd.read_csv(run / "predictions.csv").query("split == 'test'")
    manifest = pd.read_csv(prepared / "manifest.csv").query("split == 'test'")
    scored = manifest[manifest[list(FINDINGS)].isin([0, 1]).any(axis=1)]  # the test-set rule
    # every scored test image once: none lost or duplicated between the ranks
    assert test["image"].is_unique and set(test["image"]) == set(scored["image"])
    assert not (run / "checkpoints").exists()
    # the other node wrote nothing: no run folder where it was pointed, no report, no data
    assert not (nodes[other] / "runs").exists()
    assert sorted(p.name for p in nodes[other].rglob("*")) == ["rank1.json", "spy"]
    assert outs[other][0] == "" and " epoch " not in outs[other][1]
    assert " epoch " in outs[main][1]
    assert sorted((str(p), p.stat().st_mtime_ns) for p in prepared.rglob("*")) == before

    # every rank: the same validation losses, so the same early-stopping decisions, taken
    # where a patience of PATIENCE says, before EPOCHS; the same test metrics
    losses = []
    for v in views:
        epochs = [e for e in v["events"] if "epoch" in e]
        assert [e["epoch"] for e in epochs] == list(range(1, len(epochs) + 1))
        stage = v["summary"]["networks"][0]["stages"][0]
        valid = [e["valid_loss"] for e in epochs]
        assert (stage["epochs"], stage["best_epoch"]) == _early_stop(valid, PATIENCE, EPOCHS)
        assert stage["epochs"] < EPOCHS  # early stopping did decide
        losses.append(valid)
    assert losses[0] == losses[1]
    assert (
        pd.read_csv(run / "history.csv", float_precision="round_trip")["valid_loss"].tolist()
        == losses[other]
    )
    assert _without_timing(views[other]["summary"]) == _without_timing(record)

    # the fast loader's default workers: the node's cores, shared by its one process
    # (LOCAL_WORLD_SIZE 1), not the world's two
    assert cfg["speed"]["loader"] == "fast"
    share = len(os.sched_getaffinity(0)) - 1
    assert cfg["speed"]["workers"] == share
    assert [v["workers"] for v in views] == [share, share]


@pytest.mark.parametrize(
    ("cores", "local", "world", "fast", "plain"),
    # per world, these would be 7, 3, 0 and 1 workers
    [(16, "1", "2", 15, 8), (16, "2", "4", 7, 7), (2, "1", "2", 1, 1), (8, "2", "8", 3, 3)],
)
def test_default_workers_divide_the_node_not_the_world(
    monkeypatch, cores, local, world, fast, plain
):
    """On each node the loader's workers share that node's cores among its own training
    processes (`LOCAL_WORLD_SIZE`), however many nodes the job spans (`WORLD_SIZE`)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", str(int(world) - 1))
    monkeypatch.setenv("GROUP_RANK", str(int(world) // int(local) - 1))
    assert (default_workers(True), default_workers(False)) == (fast, plain)
