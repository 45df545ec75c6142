"""The fast path (uint8 cache loader, on-device normalise/augment, bf16, fused AdamW, compile)
against fastai's plain DataBlock path, and the `fastcxr bench` command."""

import gc
import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from tiny import TINY_TRAIN, fastcxr

from fastcxr.bench import project_compare
from fastcxr.config import DEMO, PAPER_STAGES
from fastcxr.data import GRAY_MEAN, GRAY_STD, apply_policy, network_data
from fastcxr.data.cache_loader import gpu_augment
from fastcxr.formulations import get_formulation
from fastcxr.manifest import read_manifest
from fastcxr.runtime.fastpath import default_workers, resolve_speed
from fastcxr.train.learner import make_learner

FINDINGS = ("Edema", "Pleural Effusion")
CFG = DEMO.replace(size=32, batch_size=8, workers=0)


def _learners(prepared, formulation, device="cpu", **fast):
    """The same network built on the DataBlock path and on the fast path, same weights."""
    form = get_formulation(formulation)
    net = form.networks(FINDINGS)[0]
    df = apply_policy(read_manifest(prepared / "manifest.csv"), CFG, FINDINGS)
    out = []
    for cfg in (
        CFG.replace(loader="datablock", precision="fp32"),
        CFG.replace(loader="fast", **fast),
    ):
        speed = resolve_speed(cfg, device)
        nd = network_data(df, prepared, form, net, cfg, device=device, speed=speed)
        out.append((nd, make_learner(nd, form, net, cfg)))
    out[1][1].model.load_state_dict(out[0][1].model.state_dict())
    for _, learn in out:
        learn.model.to(device)  # get_preds alone does not move it (fit would)
    return form, net, out


def _probs(form, net, nd, learn):
    preds, targets = learn.get_preds(dl=nd.test_dl)
    return form.probabilities(net, preds), targets.cpu().numpy()


def test_fast_loader_batches_equal_the_datablock_batches(prepared):
    _, _, [(db, _), (fast, _)] = _learners(prepared, "multilabel", precision="fp32")
    xd, yd = db.test_dl.one_batch()
    xf, yf = fast.test_dl.one_batch()
    assert type(xf) is torch.Tensor  # plain tensors reach the model
    assert xf.shape == (16, 1, 32, 32)  # evaluation batches are twice the training batch
    np.testing.assert_allclose(xf[:8].numpy(), torch.as_tensor(xd).numpy(), atol=1e-6)
    np.testing.assert_array_equal(yf[:8].numpy(), torch.as_tensor(yd).numpy())
    # computed independently: the cached PNG, scaled and normalised by hand
    row = db.test.iloc[0]
    png = np.asarray(Image.open(prepared / row["image"]), np.float32) / 255
    np.testing.assert_allclose(xf[0, 0].numpy(), (png - GRAY_MEAN) / GRAY_STD, atol=1e-5)


@pytest.mark.parametrize("formulation", ["multilabel", "multiclass"])
@pytest.mark.slow
def test_fast_path_predicts_what_the_fastai_path_predicts(prepared, formulation):
    form, net, [(db, ldb), (fast, lfast)] = _learners(prepared, formulation, precision="fp32")
    p_db, y_db = _probs(form, net, db, ldb)
    p_fast, y_fast = _probs(form, net, fast, lfast)
    np.testing.assert_array_equal(y_db, y_fast)
    np.testing.assert_allclose(p_fast, p_db, atol=1e-5)


def test_bf16_fast_path_within_bf16_tolerance(prepared):
    form, net, [(db, ldb), (fast, lfast)] = _learners(prepared, "multilabel", precision="bf16")
    p_db, _ = _probs(form, net, db, ldb)
    p_bf16, _ = _probs(form, net, fast, lfast)
    diff = np.abs(p_bf16 - p_db)
    assert diff.max() > 0  # bf16 autocast really ran
    assert diff.max() < 0.03  # bf16 keeps 8 bits of mantissa
    assert np.corrcoef(p_bf16.ravel(), p_db.ravel())[0, 1] > 0.99


def test_device_smooth_loss_equals_fastais():
    from types import SimpleNamespace

    from fastai.learner import AvgSmoothLoss

    from fastcxr.runtime.fastpath import DeviceSmoothLoss

    a, b = AvgSmoothLoss(), DeviceSmoothLoss()
    expect, count = 0.0, 0
    for v in [0.9, 0.7, 0.75, 0.4, 0.35]:
        learn = SimpleNamespace(loss=torch.tensor([v, v + 0.1]))
        a.accumulate(learn)
        b.accumulate(learn)
        count += 1
        expect = 0.98 * expect + 0.02 * (v + 0.05)  # by hand: debiased EMA of batch means
        assert math.isclose(float(b.value), expect / (1 - 0.98**count), rel_tol=1e-5)
        assert math.isclose(float(b.value), float(a.value), rel_tol=1e-6)


@pytest.mark.slow
def test_grouped_adamw_steps_like_fastais_adam():
    """Same gradients, same per-block LRs and weight decay: the torch AdamW behind fastai's
    interface moves every parameter as fastai's Adam does, norm weights and biases included
    (no decay on them), and `freeze_to` sees one group per block."""
    import copy

    from fastai.data.core import DataLoaders
    from fastai.learner import Learner
    from fastai.optimizer import Adam

    from fastcxr.models import block_splitter, build_model
    from fastcxr.runtime.fastpath import GroupedAdamW

    torch.manual_seed(0)
    model = build_model("resnet10", 2)
    learners = [
        Learner(
            DataLoaders(), m, loss_func=torch.nn.MSELoss(), splitter=block_splitter, opt_func=f
        )  # fmt: skip
        for m, f in ((model, Adam), (copy.deepcopy(model), partial_grouped()))
    ]
    n_groups = None
    for learn in learners:
        learn.create_opt()
        learn.opt.set_hypers(lr=list(np.geomspace(1e-3, 1e-2, len(learn.opt.param_lists))))
        learn.opt.set_hypers(wd=0.1)
        n_groups = n_groups or len(learn.opt.param_lists)
        assert len(learn.opt.param_lists) == n_groups
    assert isinstance(learners[1].opt, GroupedAdamW)
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in learners[0].model.parameters()]
        for learn in learners:
            for p, gr in zip(learn.model.parameters(), grads):
                p.grad = gr.clone()
            learn.opt.step()
    for (name, a), b in zip(learners[0].model.named_parameters(), learners[1].model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)
    # freeze_to works on the per-block groups
    learners[1].freeze_to(-2)
    trainable = [p.requires_grad for p in learners[1].model.parameters()]
    assert any(trainable) and not all(trainable)


def partial_grouped():
    from functools import partial

    from fastcxr.runtime.fastpath import GroupedAdamW

    return partial(GroupedAdamW, betas=(0.9, 0.99), eps=1e-5, foreach=True)


def test_gpu_augment():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 20, 20, generator=g) * 0.8 + 0.1
    torch.testing.assert_close(gpu_augment(x, p=0.0), x, atol=1e-5, rtol=0)
    # every transform at zero magnitude is the identity too
    torch.testing.assert_close(
        gpu_augment(x, max_rotate=0.0, max_zoom=1.0, max_lighting=0.0, p=1.0), x, atol=1e-4, rtol=0
    )
    torch.manual_seed(1)
    y = gpu_augment(x, max_rotate=20.0, max_zoom=1.3, max_lighting=0.5, p=1.0)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1
    assert (y - x).abs().mean(dim=(1, 2, 3)).min() > 1e-3  # each image changed
    # a bright dot off-centre moves under rotation; the total intensity stays about the same
    dot = torch.zeros(1, 1, 41, 41)
    dot[0, 0, 20, 35] = 1.0
    torch.manual_seed(0)
    rot = gpu_augment(dot, max_rotate=30.0, max_zoom=1.0, max_lighting=0.0, p=1.0)
    assert rot[0, 0, 20, 35] < 0.9


def _train(prepared, runs, name, *extra):
    cmd = fastcxr(
        "train", "--data", prepared, *TINY_TRAIN, "--stages", "head,all", "--epochs", "1",
        "--runs", runs, "--name", name, "--json", *extra,
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_fast_loaders_always_name_the_device(prepared):
    """Without a device a fastai loader leaves batches, and hence the model, on the CPU."""
    form = get_formulation("multilabel")
    net = form.networks(FINDINGS)[0]
    df = apply_policy(read_manifest(prepared / "manifest.csv"), CFG, FINDINGS)
    cfg = CFG.replace(loader="fast")
    speed = resolve_speed(cfg, "cpu")
    nd = network_data(df, prepared, form, net, cfg, device=None, speed=speed)
    for dl in (nd.dls.train, nd.dls.valid, nd.test_dl):
        assert dl.device == torch.device(speed.device)


@pytest.mark.slow
def test_compile_time_is_reported_apart(prepared, tmp_path):
    """`--compile` (aot_eager: no C compiler needed) trains; the batches that compiled graphs
    are counted as compile time, not training time."""
    res = _train(
        prepared, tmp_path, "c", "--loader", "fast", "--compile", "--compile-backend", "aot_eager"
    )
    assert res["compile_seconds"] > 0
    cfg = json.loads((tmp_path / "c" / "config.json").read_text())
    assert cfg["speed"]["compile"] and cfg["speed"]["loader"] == "fast"
    assert cfg["speed"]["fused_optimizer"]
    hist = pd.read_csv(tmp_path / "c" / "history.csv")
    assert math.isclose(hist["compile_seconds"].sum(), res["compile_seconds"], rel_tol=1e-6)
    for n in ("Edema", "Pleural Effusion"):
        assert 0 <= res["findings"][n]["auc"] <= 1


@pytest.mark.slow
def test_compile_needs_the_fast_loader(prepared, tmp_path):
    cmd = fastcxr(
        "train", "--data", prepared, "--loader", "datablock", "--compile", "--runs", tmp_path
    )
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "fast loader" in r.stderr


@pytest.mark.slow
def test_bench_json(tmp_path):
    cmd = fastcxr(
        "bench", "--arch", "resnet10", "--size", "32", "--batch-size", "4", "--warmup", "1",
        "--steps", "2", "--stages", "head,conv5,all", "--workers", "0",
        "--cache", tmp_path / "cache", "--json",
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["device"] == "cpu" and res["speed"]["loader"] == "fast"
    assert [(x["stage"], x["freeze_style"]) for x in res["rows"]] == [
        (s, f) for f in ("keras", "fastai") for s in ("head", "conv5", "all")
    ]
    for row in res["rows"]:
        for k in ("limit_img_s", "fastcxr_img_s", "defaults_img_s"):
            assert row[k] > 0
        assert math.isclose(row["fastcxr_vs_limit"], row["fastcxr_img_s"] / row["limit_img_s"])
        assert math.isclose(
            row["fastcxr_vs_defaults"], row["fastcxr_img_s"] / row["defaults_img_s"]
        )
    # the fastai-defaults baseline is one measurement per stage, shared by both styles
    by = {(x["stage"], x["freeze_style"]): x["defaults_img_s"] for x in res["rows"]}
    assert by[("head", "keras")] == by[("head", "fastai")]
    assert res["projection"] == {
        "available": False,
        "missing_stages": ["conv5_block-1", "conv4_block-3"],
    }
    # the cache is reused: same files, same manifest
    manifest = tmp_path / "cache" / "manifest.csv"
    before = manifest.stat().st_mtime_ns
    assert len(pd.read_csv(manifest)) == res["cache_images"]
    r2 = subprocess.run(cmd[:-1] + ["--no-defaults", "--freeze-style", "keras"], text=True,
                        capture_output=True, timeout=600)  # fmt: skip
    assert r2.returncode == 0, r2.stderr
    assert manifest.stat().st_mtime_ns == before
    assert "fastcxr / limit" in r2.stdout and "defaults" not in r2.stdout


@pytest.mark.slow
def test_bench_compiled_reports_compile_time_of_each_measurement(tmp_path):
    cmd = fastcxr(
        "bench", "--arch", "resnet10", "--size", "32", "--batch-size", "4", "--warmup", "1",
        "--steps", "2", "--stages", "head", "--freeze-style", "keras", "--no-defaults",
        "--workers", "0", "--compile", "--compile-backend", "aot_eager",
        "--cache", tmp_path / "cache", "--json",
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["rows"]
    # both compiled the model from scratch (no graph reused from the other measurement)
    assert row["compile_s"]["fastcxr"] > 0 and row["compile_s"]["limit"] > 0
    assert "defaults_img_s" not in row


def test_projection_arithmetic():
    ips = {"head": 800.0, "conv5_block-1": 700.0, "conv5": 600.0, "conv4_block-3": 400.0}
    rows = [{"unfreeze": u, "freeze_style": "keras", "fastcxr_img_s": v} for u, v in ips.items()]
    p = project_compare(rows, eval_ips=1000.0, style="keras", train_images=34_000)
    per_epoch = [34_000 / ips[s.unfreeze] + 3_400 / 1000.0 for s in PAPER_STAGES]
    assert math.isclose(p["hours"], 4 * 10 * sum(per_epoch) / 3600)
    assert p["networks"] == 4 and p["epochs_per_stage"] == 10


@pytest.mark.gpu
def test_fast_path_on_the_gpu_matches_fp32_fastai(prepared):
    form, net, [(db, ldb), (fast, lfast)] = _learners(
        prepared, "multilabel", device="cuda", precision="bf16"
    )
    assert fast.dls.device.type == "cuda"
    p_db, _ = _probs(form, net, db, ldb)
    p_fast, _ = _probs(form, net, fast, lfast)
    assert np.abs(p_fast - p_db).max() < 0.03


@pytest.mark.gpu
def test_compiled_bf16_training_on_the_gpu(prepared, tmp_path):
    res = _train(prepared, tmp_path, "g", "--loader", "auto", "--compile")
    cfg = json.loads((tmp_path / "g" / "config.json").read_text())["speed"]
    assert cfg["loader"] == "fast" and cfg["precision"] == "bf16" and cfg["channels_last"]
    assert res["compile_seconds"] > 0
    for n in ("Edema", "Pleural Effusion"):
        assert 0 <= res["findings"][n]["auc"] <= 1


@pytest.mark.gpu
def test_bench_on_the_gpu(tmp_path):
    cmd = fastcxr(
        "bench", "--arch", "resnet18", "--size", "64", "--batch-size", "16", "--warmup", "2",
        "--steps", "4", "--stages", "head,all", "--cache", tmp_path / "cache", "--json",
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["device"] != "cpu" and res["speed"]["precision"] == "bf16"
    assert all(row["fastcxr_img_s"] > 0 for row in res["rows"])


def test_worker_processes_give_the_same_batches_and_persist(prepared):
    """Batches from 2 persistent worker processes equal in-process ones (same seeded shuffle);
    the epoch order changes between epochs; the workers are reused, not restarted."""
    from fastai.torch_basics import set_seed

    from fastcxr.data.cache_loader import CacheDL

    df = read_manifest(prepared / "manifest.csv")
    files = [prepared / p for p in df["image"]]
    y = np.arange(len(df), dtype=np.int64)  # the target is the row: the order is visible

    def epochs(workers, n=2):
        set_seed(7)
        dl = CacheDL(
            files, y, size=32, bs=8, shuffle=True, drop_last=True, num_workers=workers,
            persistent_workers=True,
        )  # fmt: skip
        out, pids = [], set()
        for _ in range(n):
            out.append([(x.clone(), t.clone()) for x, t in dl])
            if workers:
                pids |= {w.pid for w in dl._loader._iterator._workers}
        return out, pids

    (e0, _), (e2, pids) = epochs(0), epochs(2)
    for a, b in zip(e0, e2):
        assert len(a) == len(b) == len(df) // 8
        for (xa, ya), (xb, yb) in zip(a, b):
            torch.testing.assert_close(xa, xb)
            assert torch.equal(ya, yb)
    first, second = (torch.cat([t for _, t in ep]) for ep in e2)
    assert not torch.equal(first, second)  # reshuffled
    assert len(set(first.tolist())) == len(first)  # no image twice in an epoch
    assert len(pids) == 2  # the same two processes served both epochs
    row = int(first[0])
    png = np.asarray(Image.open(files[row]), np.float32) / 255
    np.testing.assert_allclose(e2[0][0][0][0, 0].numpy(), (png - GRAY_MEAN) / GRAY_STD, atol=1e-5)
    # a loader freed by the cyclic collector stops its workers in order: without that, each
    # worker waited out a 5 s timeout, and the workers of every discarded loader piled up
    t0 = time.perf_counter()
    gc.collect()
    assert time.perf_counter() - t0 < 4.0
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.parametrize(
    ("cores", "processes", "fast", "plain"),
    [(16, None, 15, 8), (16, "4", 3, 3), (16, "8", 1, 1), (2, None, 1, 1), (4, "8", 0, 0)],
)
def test_default_workers_share_the_cores(monkeypatch, cores, processes, fast, plain):
    """Every core but one for one process; the node's training processes split the cores."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    if processes is None:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", processes)
    assert (default_workers(True), default_workers(False)) == (fast, plain)


def test_a_networks_loader_workers_stop_with_it_and_later_workers_leave_them_alone(prepared):
    """Two networks' fast loaders in turn, 2 workers each (a GPU node has 15 per loader, 3
    loaders per network): the second network's workers are forked while the first's are alive
    and must not stop them when they free their inherited copies (torch's `__del__` did, from
    the child: "can only test a child process"); `NetworkData.close` stops a network's workers.
    Before, every network's workers lived until the process ended, and there stopping them
    took 5 s each: a `compare --preset paper` on an H200 hung for minutes after its last epoch.
    """
    form = get_formulation("single")
    df = apply_policy(read_manifest(prepared / "manifest.csv"), CFG, FINDINGS)
    cfg = CFG.replace(loader="fast", workers=2)
    speed = resolve_speed(cfg, "cpu")
    first, second = (
        network_data(df, prepared, form, net, cfg, device="cpu", speed=speed)
        for net in form.networks(FINDINGS)
    )

    def workers_of(nd):
        return [w for dl in (*nd.dls.loaders, nd.test_dl) for w in dl._loader._iterator._workers]

    for nd in (first, second):
        for dl in (*nd.dls.loaders, nd.test_dl):
            assert sum(len(y) for _, y in dl) > 0
    mine = workers_of(first)
    assert len(mine) == 6 and all(w.is_alive() for w in mine)

    inherited = [dl._loader for dl in (*first.dls.loaders, first.test_dl)]
    n_valid = sum(len(y) for _, y in first.dls.valid)

    def free_inherited_copies():  # what a forked worker's garbage collector may do
        for loader in inherited:
            loader._iterator.__del__()
        # the child's copies of the loaders forget the parent's workers: iterating one there
        # starts the child's own (reading from the parent's queues would steal its batches)
        assert all(dl._loader is None for dl in (*first.dls.loaders, first.test_dl))
        assert sum(len(y) for _, y in first.dls.valid) == n_valid
        first.dls.valid.close()

    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=free_inherited_copies)
    child.start()
    child.join(60)
    assert child.exitcode == 0  # (it failed on `is_alive`, after signalling the workers)
    assert all(w.is_alive() for w in mine)
    for _ in range(2):  # the first network's workers still serve, epoch after epoch
        assert sum(len(y) for _, y in first.dls.train) == len(first.train) // 8 * 8
    first.close()
    for w in mine:
        assert not w.is_alive() and w.exitcode == 0  # stopped in order, not terminated
    assert all(w.is_alive() for w in workers_of(second))
    second.close()


@pytest.mark.slow
def test_a_compare_with_loader_workers_prints_no_worker_errors(prepared, tmp_path):
    cmd = fastcxr(
        "train", "--data", prepared, *TINY_TRAIN[:-2], "--workers", "2", "--loader", "fast",
        "--formulation", "single", "--stages", "all", "--epochs", "1", "--runs", tmp_path,
        "--name", "w",
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "can only test a child process" not in r.stderr
    assert "Exception ignored" not in r.stderr


@pytest.mark.slow
def test_training_on_the_fast_path_prints_no_library_warning(prepared, tmp_path):
    """fastai warned "You are shadowing an attribute (smooth_loss)" in every run on the fast
    path (the Recorder's smoothed loss replaced through `Callback.__setattr__`)."""
    cmd = fastcxr(
        "train", "--data", prepared, *TINY_TRAIN, "--loader", "fast", "--stages", "all",
        "--epochs", "1", "--runs", tmp_path, "--name", "q",
        launch=(sys.executable, "-W", "error::UserWarning", "-W", "error::FutureWarning"),
    )  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "Warning" not in r.stderr, r.stderr
