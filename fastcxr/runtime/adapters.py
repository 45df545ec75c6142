"""The private parts of fastai and torch that fastcxr relies on, in one place.

fastcxr's fast loader, optimizer wrapper, data-parallel trainer and compile timing read a few
attributes that fastai and torch do not document (their names start with an underscore, or they
are internals of a documented class). Every such access goes through a function of this module,
written against **fastai 2.8.12** and **torch 2.14.1**. When an installed version no longer has
what a function reads, it raises `LibraryChanged` naming the library, the attribute and the
version it was written against: at its first use, not as an `AttributeError` deep inside a
training loop. `tests/test_adapter.py` checks each one against the installed libraries, with
its meaning (not only its presence).

The private *methods* fastcxr overrides (`HOOKS`) are checked by `check_hooks` when an object
that overrides them is built: an override of a hook the library renamed would otherwise be
dead code, silently.
"""

from __future__ import annotations

import importlib

from fastcxr.errors import FastcxrError

FASTAI = "2.8.12"  # the versions this module was written against
TORCH = "2.14.1"

# (module, class, private method fastcxr overrides there): fastcxr.runtime.fastpath.GroupedAdamW,
# fastcxr.train.ddp.ShardedDL and fastcxr.train.ddp.DataParallel
HOOKS = (
    ("fastai.optimizer", "OptimWrapper", "_set_hyper"),
    ("fastai.distributed", "DistributedDL", "_broadcast"),
    ("fastai.distributed", "DistributedTrainer", "_wrap_dl"),
)


class LibraryChanged(FastcxrError, RuntimeError):
    """An installed fastai or torch lacks an internal fastcxr was written against."""


def _changed(library: str, what: str, written: str, meaning: str) -> LibraryChanged:
    import fastai
    import torch

    installed = {"fastai": fastai.__version__, "torch": torch.__version__}[library]
    return LibraryChanged(
        f"{library} {installed} has no {what} ({meaning}); fastcxr's adapter "
        f"(fastcxr/runtime/adapters.py) was written against {library} {written}: install that "
        f"version, or update the adapter"
    )


def worker_settings(dl) -> tuple[int, bool]:
    """(worker processes, persistent?) of a fastai `DataLoader` (fastai 2.8.12).

    fastai keeps them on its private `_FakeLoader`, `dl.fake_l` (`dl.num_workers` is always 1
    there); `one_batch` sets `fake_l.num_workers` to 0 while it runs."""
    fake = getattr(dl, "fake_l", None)
    if fake is None:
        raise _changed("fastai", "DataLoader.fake_l", FASTAI, "the loader's worker settings")
    try:
        return int(fake.num_workers), bool(fake.persistent_workers)
    except AttributeError:
        raise _changed(
            "fastai", "DataLoader.fake_l.num_workers/persistent_workers", FASTAI,
            "the loader's worker count and persistence",
        ) from None  # fmt: skip


def stop_workers(loader) -> None:
    """Stop the worker processes of a torch `DataLoader`'s persistent iterator, in order
    (torch 2.14.1: `loader._iterator`, set once a loader with `persistent_workers` is iterated;
    its `_shutdown_workers()`). Nothing to do when it was never iterated or has no workers."""
    if not hasattr(loader, "_iterator"):
        raise _changed("torch", "DataLoader._iterator", TORCH, "a loader's persistent iterator")
    it = loader._iterator
    if it is None or getattr(loader, "num_workers", 0) == 0:
        return
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is None:
        raise _changed(
            "torch", f"{type(it).__name__}._shutdown_workers", TORCH, "how its workers stop"
        )
    shutdown()


def disown_workers(loader) -> None:
    """In a process forked from the one that owns `loader` (a loader worker): mark the copy of
    its persistent iterator as shut down (torch 2.14.1: `_iterator._shutdown`), so that the
    copy's `__del__` does not run `_shutdown_workers()` from here — through the queues and
    events it shares with the owner, that would signal the owner's workers to stop, and it
    fails on `is_alive()` ("can only test a child process")."""
    it = getattr(loader, "_iterator", None)
    if it is None:
        return
    if not hasattr(it, "_shutdown"):
        raise _changed("torch", f"{type(it).__name__}._shutdown", TORCH, "an iterator's state")
    it._shutdown = True


def compile_count() -> int:
    """A counter that moves whenever dynamo captures (compiles) something (torch 2.14.1:
    the sum of `torch._dynamo.utils.counters["stats"]`)."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        raise _changed(
            "torch", "torch._dynamo.utils.counters", TORCH, "dynamo's compile counters"
        ) from None
    return sum(counters["stats"].values())


_LIMITS = ("cache_size_limit", "accumulated_cache_size_limit")


def compile_cache_limits() -> tuple[int, int]:
    """dynamo's (per-frame, accumulated) compiled-graph limits (torch 2.14.1:
    `torch._dynamo.config.cache_size_limit`, `.accumulated_cache_size_limit`); past them
    dynamo silently runs the frame eagerly."""
    cfg = _dynamo_config()
    return tuple(getattr(cfg, k) for k in _LIMITS)


def set_compile_cache_limits(limits: tuple[int, int]) -> None:
    """Set what `compile_cache_limits` reads."""
    cfg = _dynamo_config()
    for k, v in zip(_LIMITS, limits):
        setattr(cfg, k, v)


def raise_compile_cache_limits(per_frame: int = 64, accumulated: int = 256) -> None:
    """At least `per_frame` graphs per frame and `accumulated` in all: each stage (which
    parameters train), train/eval mode and last-batch size is a graph of its own."""
    now = compile_cache_limits()
    set_compile_cache_limits((max(now[0], per_frame), max(now[1], accumulated)))


def _dynamo_config():
    import torch._dynamo

    cfg = torch._dynamo.config
    for k in _LIMITS:
        if not hasattr(cfg, k):
            raise _changed("torch", f"torch._dynamo.config.{k}", TORCH, "dynamo's graph limits")
    return cfg


def torch_hyper_key(opt, key: str) -> str:
    """The torch param-group key of fastai hyper-parameter `key` ("lr", "wd", "mom", …) in a
    fastai `OptimWrapper` (fastai 2.8.12: its `bwd_map`)."""
    bwd = getattr(opt, "bwd_map", None)
    if bwd is None:
        raise _changed("fastai", "OptimWrapper.bwd_map", FASTAI, "fastai → torch hyper names")
    return bwd[key]


def original_loaders(trainer) -> list:
    """The loaders fastai's `DistributedTrainer` replaced with sharded ones in its
    `before_fit` (fastai 2.8.12: `trainer.old_dls`)."""
    old = getattr(trainer, "old_dls", None)
    if old is None:
        raise _changed(
            "fastai", "DistributedTrainer.old_dls", FASTAI, "the loaders before sharding"
        )
    return list(old)


def check_hooks(*hooks: tuple[str, str, str]) -> None:
    """Each (module, class, method) of `hooks` (default: all of `HOOKS`) still exists: the
    private method fastcxr overrides is still the one the library calls."""
    for module, cls, name in hooks or HOOKS:
        base = getattr(importlib.import_module(module), cls, None)
        if base is None or not callable(getattr(base, name, None)):
            library = module.partition(".")[0]
            raise _changed(
                library, f"{cls}.{name}", {"fastai": FASTAI, "torch": TORCH}[library],
                "the hook fastcxr overrides",
            )  # fmt: skip


__all__ = [
    "FASTAI",
    "HOOKS",
    "TORCH",
    "LibraryChanged",
    "check_hooks",
    "compile_cache_limits",
    "compile_count",
    "original_loaders",
    "raise_compile_cache_limits",
    "set_compile_cache_limits",
    "stop_workers",
    "torch_hyper_key",
    "worker_settings",
]
