"""What the tests share: training options for a one-block ResNet on 32x32 images with
in-process data, and the command line that runs fastcxr in this environment."""

import sys
import time

import torch

TINY_TRAIN = ["--arch", "resnet10", "--size", "32", "--batch-size", "16", "--workers", "0"]


def fastcxr(*args, launch: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """`fastcxr ARGS` as a subprocess command line, started by `launch` (Python, or torchrun)."""
    return [*launch, "-m", "fastcxr", *map(str, args)]


def epochs_done(ckpt) -> int:
    """Epochs a training checkpoint holds (0 while it is not written yet, or being written)."""
    try:
        return len(torch.load(ckpt, weights_only=True)["history"])
    except Exception:
        return 0


def wait_for(ckpt, n, proc, timeout=240):
    """Polls until at least `n` epochs are checkpointed by the running `proc`."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if epochs_done(ckpt) >= n:
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.01)
    raise AssertionError(f"fewer than {n} epochs checkpointed after {timeout} s")
