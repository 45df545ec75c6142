"""What the tests share: training options for a one-block ResNet on 32x32 images with
in-process data, and the command line that runs fastcxr in this environment."""

import sys

TINY_TRAIN = ["--arch", "resnet10", "--size", "32", "--batch-size", "16", "--workers", "0"]


def fastcxr(*args, launch: tuple[str, ...] = (sys.executable,)) -> list[str]:
    """`fastcxr ARGS` as a subprocess command line, started by `launch` (Python, or torchrun)."""
    return [*launch, "-m", "fastcxr", *map(str, args)]
