"""A dataset on disk (`Dataset`: a manifest, its folder and hash) and the built-in synthetic
one (`builtin_dataset`)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from fastcxr.manifest import file_sha256, read_manifest
from fastcxr.preprocessing import Preprocessing
from fastcxr.runtime.distributed import barrier, init, is_main

Log = Callable[[dict], None]


@dataclass(frozen=True)
class Dataset:
    """A manifest on disk: its rows, the folder its image paths are relative to, and its hash."""

    manifest: Path
    df: pd.DataFrame
    synthetic: bool = False

    @property
    def root(self) -> Path:
        return self.manifest.parent

    @classmethod
    def load(cls, manifest: str | Path, synthetic: bool = False) -> Dataset:
        p = Path(manifest)
        p = p / "manifest.csv" if p.is_dir() else p
        return cls(p.resolve(), read_manifest(p), synthetic)

    def preprocessing(self, size: int) -> Preprocessing:
        """The preprocessing its images were made with (`prepare.json`), trained at `size`."""
        return Preprocessing.of_dataset(self.manifest, size)

    def describe(self) -> dict:
        return {
            "manifest": str(self.manifest),
            "sha256": file_sha256(self.manifest),
            "synthetic": self.synthetic,
            "images": len(self.df),
        }


def fastcxr_home() -> Path:
    """Where generated data live: $FASTCXR_HOME, default ~/.cache/fastcxr."""
    return Path(os.environ.get("FASTCXR_HOME") or Path.home() / ".cache" / "fastcxr")


def builtin_dataset(
    size: int, home: str | Path | None = None, log: Log | None = None, workers: int | None = None
) -> Dataset:
    """The built-in synthetic MIMIC-CXR, generated once and prepared once per image size."""
    from fastcxr.prepare.mimic import prepare_mimic
    from fastcxr.prepare.synthetic import SyntheticSpec, write_synthetic_mimic

    home = Path(home or fastcxr_home())
    spec = SyntheticSpec()
    raw = home / f"synthetic-mimic-seed{spec.seed}"
    prepared = raw / f"prepared-{size}"
    init()  # with several processes, rank 0 builds the data while the others wait
    if is_main():
        if not (raw / ".complete").exists():
            if log:
                log(
                    {
                        "event": "data",
                        "message": f"generating the built-in synthetic dataset in {raw}",
                    }
                )
            write_synthetic_mimic(raw, spec)
            (raw / ".complete").write_text("ok\n")
        if not (prepared / "prepare.json").exists():
            if log:
                log({"event": "data", "message": f"preparing it at {size}x{size} in {prepared}"})
            prepare_mimic(raw, prepared, size=size, workers=workers)
    barrier()
    return Dataset.load(prepared / "manifest.csv", synthetic=True)
