"""`fastcxr.runtime.adapters` against the installed fastai and torch: every private attribute
fastcxr reads is still there, with the meaning fastcxr relies on; a missing one fails loudly."""

import multiprocessing as mp
import time

import numpy as np
import pytest
import torch
from fastai.data.load import DataLoader
from fastai.optimizer import OptimWrapper
from PIL import Image

from fastcxr.data.cache_loader import CacheDL
from fastcxr.runtime import adapters
from fastcxr.runtime.adapters import LibraryChanged
from fastcxr.runtime.fastpath import GroupedAdamW


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pids, timeout=10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if _alive(p)]
        if not left:
            return []
        time.sleep(0.05)
    return left


def test_every_adapter_names_the_version_it_was_written_against():
    for fn in (adapters.worker_settings, adapters.torch_hyper_key, adapters.original_loaders):
        assert adapters.FASTAI in fn.__doc__, fn.__name__
    for fn in (adapters.stop_workers, adapters.compile_count, adapters.compile_cache_limits):
        assert adapters.TORCH in fn.__doc__, fn.__name__


def test_fastai_worker_settings_mean_what_the_fast_loader_needs():
    assert adapters.worker_settings(DataLoader(range(8), bs=4)) == (0, False)
    dl = DataLoader(range(8), bs=4, num_workers=2, persistent_workers=True)
    assert adapters.worker_settings(dl) == (2, True)

    class Seen(DataLoader):
        def create_batch(self, b):
            self.during = adapters.worker_settings(self)
            return super().create_batch(b)

    seen = Seen(range(8), bs=4, num_workers=2)
    seen.one_batch()  # fastai switches its workers off while it runs
    assert seen.during == (0, False) and adapters.worker_settings(seen) == (2, False)


def test_torch_workers_are_stopped_by_the_adapter():
    data = torch.utils.data.TensorDataset(torch.arange(32.0))
    loader = torch.utils.data.DataLoader(data, batch_size=4, num_workers=2, persistent_workers=True)
    adapters.stop_workers(loader)  # never iterated: nothing to stop
    before = {p.pid for p in mp.active_children()}
    assert len(list(loader)) == 8
    workers = [p.pid for p in mp.active_children() if p.pid not in before]
    assert len(workers) == 2 and all(_alive(p) for p in workers)  # persistent: still there
    adapters.stop_workers(loader)
    assert _wait_gone(workers) == []
    adapters.stop_workers(loader)  # twice is harmless
    plain = torch.utils.data.DataLoader(data, batch_size=4)
    next(iter(plain))
    adapters.stop_workers(plain)  # no workers: nothing to stop


def test_a_missing_internal_is_a_clear_error():
    with pytest.raises(LibraryChanged, match=r"fastai .* no DataLoader\.fake_l.*fastai 2\.8\.12"):
        adapters.worker_settings(object())
    with pytest.raises(LibraryChanged, match=r"torch .* no DataLoader\._iterator.*torch 2\.14"):
        adapters.stop_workers(object())
    with pytest.raises(LibraryChanged, match="OptimWrapper.bwd_map"):
        adapters.torch_hyper_key(object(), "lr")
    with pytest.raises(LibraryChanged, match="DistributedTrainer.old_dls"):
        adapters.original_loaders(object())
    with pytest.raises(LibraryChanged, match=r"OptimWrapper\._gone"):
        adapters.check_hooks(("fastai.optimizer", "OptimWrapper", "_gone"))
    assert issubclass(LibraryChanged, RuntimeError)


def test_the_private_hooks_fastcxr_overrides_still_exist_and_are_called():
    adapters.check_hooks()  # all of them
    # `OptimWrapper.set_hyper` still goes through `_set_hyper` (GroupedAdamW's override)
    w = torch.nn.Parameter(torch.ones(2, 2))
    b = torch.nn.Parameter(torch.ones(2))
    opt = GroupedAdamW([[w, b]], lr=1e-3)
    opt.set_hyper("wd", [0.1])
    assert [g["weight_decay"] for g in opt.opt.param_groups] == [0.1, 0.0]
    plain = OptimWrapper([w], opt=torch.optim.AdamW)
    assert adapters.torch_hyper_key(plain, "wd") == "weight_decay"
    assert adapters.torch_hyper_key(plain, "lr") == "lr"


def test_compile_counter_and_cache_limits():
    saved = adapters.compile_cache_limits()
    try:
        adapters.set_compile_cache_limits((3, 7))
        assert adapters.compile_cache_limits() == (3, 7)
        adapters.raise_compile_cache_limits(64, 256)
        assert adapters.compile_cache_limits() == (64, 256)
    finally:
        adapters.set_compile_cache_limits(saved)
    assert adapters.compile_cache_limits() == saved
    before = adapters.compile_count()
    f = torch.compile(lambda x: x * 2 + 1, backend="eager")
    f(torch.ones(3))
    assert adapters.compile_count() != before


def test_data_parallel_trainer_keeps_the_original_loaders():
    """fastai's `DistributedTrainer.before_fit` still keeps the loaders it replaces where
    `fastcxr.train.ddp.DataParallel` reads them (to put back the unsharded validation loader)."""
    pytest.importorskip("accelerate")
    from fastai.data.core import DataLoaders
    from fastai.learner import Learner

    from fastcxr.train.ddp import DataParallel, ShardedDL

    dls = DataLoaders(DataLoader(range(8), bs=4), DataLoader(range(4), bs=4), device="cpu")
    originals = list(dls.loaders)
    learn = Learner(dls, torch.nn.Linear(1, 1), loss_func=torch.nn.MSELoss())
    trainer = DataParallel()
    trainer.learn = learn
    trainer.before_fit()
    assert adapters.original_loaders(trainer) == originals
    train, valid = learn.dls.loaders
    assert isinstance(train, ShardedDL) and train.dl is originals[0] and valid is originals[1]


def test_cache_loader_still_iterates_with_its_persistent_workers(tmp_path):
    files = []
    for i in range(12):
        p = tmp_path / f"{i}.png"
        Image.fromarray(np.full((16, 16), 20 * i, np.uint8)).save(p)
        files.append(p)
    y = np.arange(12, dtype=np.int64)
    dl = CacheDL(files, y, 16, bs=4, num_workers=2, persistent_workers=True, device="cpu")
    assert dl.workers == (2, True) and dl.new(shuffle=True).workers == (2, True)
    before = {p.pid for p in mp.active_children()}
    for _ in range(2):
        seen = []
        for x, t in dl:
            assert x.shape == (4, 1, 16, 16) and x.dtype == torch.float32
            seen += t.tolist()
        assert sorted(seen) == list(range(12))
    workers = [p.pid for p in mp.active_children() if p.pid not in before]
    assert len(workers) == 2  # the same two served both epochs
    x, _ = dl.one_batch()  # in this process
    assert x.shape == (4, 1, 16, 16)
    dl.close()
    assert _wait_gone(workers) == []
    assert len(list(dl)) == 3  # a closed loader starts new workers when iterated again
    dl.close()
