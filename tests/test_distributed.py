"""Two processes on the CPU (gloo), launched the standard way (torchrun)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from tiny import TINY_TRAIN, fastcxr

from fastcxr.manifest import read_manifest

pytest.importorskip("accelerate")

ARGS = [
    *TINY_TRAIN,
    "--stages",
    "all",
    "--epochs",
    "2",
    "--formulation",
    "multilabel",
    "--json",
]


@pytest.mark.slow
@pytest.mark.parametrize("loader", ["datablock", "fast"])
def test_two_processes_on_cpu(prepared, tmp_path, loader):
    """Both loaders: fastai's `DistributedDL` shards the DataBlock loader; `ShardedCacheDL`
    shards the fast loader, one persistent worker per process."""
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = fastcxr(
        "train", "--data", prepared, *ARGS, "--loader", loader,
        *(["--workers", "1"] if loader == "fast" else []),  # persistent workers under DDP
        "--runs", tmp_path, "--name", "ddp",
        launch=(torchrun or "torchrun", "--nproc_per_node", "2"),
    )  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    two = json.loads(res.stdout)  # exactly one JSON document: only rank 0 reports
    one = subprocess.run(
        fastcxr("train", "--data", prepared, *ARGS, "--runs", tmp_path, "--name", "single"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert one.returncode == 0, one.stderr[-3000:]
    single = json.loads(one.stdout)
    assert two.keys() == single.keys() and two["findings"].keys() == single["findings"].keys()
    run = tmp_path / "ddp"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["environment"]["processes"] == 2 and cfg["speed"]["loader"] == loader
    preds = pd.read_csv(run / "predictions.csv")
    manifest = pd.read_csv(prepared / "manifest.csv")
    test = preds[preds["split"] == "test"]
    # metrics on the whole test set: every test image once, none duplicated by a gather
    assert test["image"].is_unique
    assert set(test["image"]) == set(
        pd.read_csv(tmp_path / "single" / "predictions.csv").query("split == 'test'")["image"]
    )
    assert set(test["image"]) <= set(manifest["image"])
    assert test["p_Edema"].between(0, 1).all()
    assert json.loads((run / "record.json").read_text())["complete"]


def test_shards_of_the_fast_loader_keep_their_workers(prepared):
    """Each process's shard of the fast loader, served by its persistent workers, holds the
    batches fastai's `DistributedDL` would give it (same shuffle, padding and slicing); the
    two shards cover the epoch; the same worker processes serve every epoch."""
    from fastai.torch_basics import set_seed

    from fastcxr.data.cache_loader import CacheDL
    from fastcxr.train.ddp import ShardedCacheDL, ShardedDL

    df = read_manifest(prepared / "manifest.csv")
    files = [prepared / p for p in df["image"]]
    y = np.arange(len(df), dtype=np.int64)  # the target is the row: the order is visible

    def shard(kind, rank, workers):
        set_seed(3)
        dl = CacheDL(
            files, y, size=32, bs=4, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=True,
        )  # fmt: skip
        sh = kind(dl, rank=rank, world_size=2, device=torch.device("cpu"))
        sh._broadcast = lambda t, rank: list(t)  # one process plays both ranks
        return sh

    for rank in (0, 1):
        ours, fastais = shard(ShardedCacheDL, rank, 2), shard(ShardedDL, rank, 0)
        pids, epochs = set(), []
        for _ in range(2):
            got = [(x.clone(), t.clone()) for x, t in ours]
            pids |= {w.pid for w in ours.dl._loader._iterator._workers}
            want = list(fastais)
            assert len(got) == len(want) == (len(df) // 2) // 4
            for (xa, ya), (xb, yb) in zip(got, want):
                torch.testing.assert_close(xa, xb)
                assert torch.equal(ya, yb)
            epochs.append(torch.cat([t for _, t in got]))
        assert not torch.equal(*epochs)  # reshuffled every epoch
        assert len(pids) == 2 and all(_alive(p) for p in pids)  # the same two processes
    # rank 0 and rank 1 split the epoch between them: an image is in both shards only where
    # fastai pads an odd epoch with a repeat
    a, b = (torch.cat([t for _, t in shard(ShardedCacheDL, r, 0)]) for r in (0, 1))
    assert len(set(a.tolist()) & set(b.tolist())) <= len(df) % 2
    assert len(a) + len(b) >= 2 * 4 * ((len(df) // 2) // 4)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
