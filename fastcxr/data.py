"""Manifest → fastai `DataLoaders` for one network of a formulation."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.data.block import DataBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import ColReader, ColSplitter, Normalize
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.core import PILImageBW
from fastai.vision.data import ImageBlock
from PIL import Image

from fastcxr.config import TrainConfig
from fastcxr.dicom import read_dicom
from fastcxr.fastpath import AUGMENT, GRAY_MEAN, GRAY_STD, Speed, cache_loaders, resolve_speed
from fastcxr.findings import LabelPolicy
from fastcxr.formulations import Formulation, Network


class DataError(ValueError):
    """Data that cannot be trained on (empty split, one-class label, …)."""


class CXRImage(PILImageBW):
    """A grayscale radiograph from a cached PNG/JPG or straight from a DICOM file."""

    intensity = "voi"

    @classmethod
    def create(cls, fn, **kwargs):
        if isinstance(fn, (str, Path)) and Path(fn).suffix.lower() in (".dcm", ".dicom"):
            return cls(Image.fromarray(read_dicom(fn, mode=cls.intensity)))
        return super().create(fn, **kwargs)


@dataclass
class NetworkData:
    dls: DataLoaders
    test_dl: TfmdDL
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    y_train: np.ndarray  # (n, k) 0/1 labels of the network's findings
    speed: Speed


def apply_policy(manifest: pd.DataFrame, cfg: TrainConfig, findings) -> pd.DataFrame:
    """Rows usable under the run's label policy, findings as 0/1, split sizes checked."""
    df = LabelPolicy.parse(cfg.uncertain, cfg.blank).apply(manifest, findings)
    for split in ("train", "valid", "test"):
        if not (df["split"] == split).any():
            raise DataError(
                f"the {split!r} split is empty under the label policy "
                f"(uncertain={cfg.uncertain}, blank={cfg.blank})"
            )
    train = df[df["split"] == "train"]
    for f in findings:
        classes = np.unique(train[f])
        if len(classes) < 2:
            raise DataError(
                f"finding {f!r} has only class {classes.tolist()} in the training "
                "split: nothing to learn"
            )
    return df


def network_data(
    df: pd.DataFrame,
    root: str | Path,
    form: Formulation,
    net: Network,
    cfg: TrainConfig,
    device=None,
    speed: Speed | None = None,
) -> NetworkData:
    """DataLoaders (train/valid) and a labelled test DataLoader for `net`: the fast cache
    loader (`fastcxr.fastpath`) or fastai's DataBlock, as `speed` (resolved from `cfg`) says."""
    speed = speed or resolve_speed(cfg, device)
    df = df.copy()
    y = df[list(net.findings)].to_numpy(np.int64)
    targets = form.targets(y)
    df["_y"] = list(targets) if targets.ndim == 2 else targets.tolist()
    df["_is_valid"] = df["split"] == "valid"
    tv = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    test = df[df["split"] == "test"].reset_index(drop=True)
    train_rows, valid_rows = tv[~tv["_is_valid"]], tv[tv["_is_valid"]]
    y_train = y[df["split"].to_numpy() == "train"]
    if speed.loader == "fast":
        root = Path(root).resolve()
        device = device if device is not None else torch.device(speed.device)  # never None:
        # a fastai loader without a device leaves batches (and so the model) on the CPU
        split = df["split"].to_numpy()
        parts = [
            ([root / p for p in df.loc[split == s, "image"]], targets[split == s])
            for s in ("train", "valid", "test")
        ]
        train_dl, valid_dl, test_dl = cache_loaders(
            *parts, size=cfg.size, batch_size=cfg.batch_size, augment=cfg.augment,
            speed=speed, device=device,
        )  # fmt: skip
        dls = DataLoaders(train_dl, valid_dl, device=device)
        return NetworkData(dls, test_dl, train_rows, valid_rows, test, y_train, speed)
    first = Path(root) / tv["image"].iloc[0]
    item_tfms = []
    if first.suffix.lower() in (".dcm", ".dicom") or Image.open(first).size != (cfg.size,) * 2:
        item_tfms = [Resize(cfg.size, method="squish")]
    batch_tfms = []
    if cfg.augment:  # no flips: the heart's side is anatomy, not noise
        batch_tfms += aug_transforms(do_flip=False, max_warp=0.0, size=cfg.size, **AUGMENT)
    batch_tfms.append(Normalize.from_stats([GRAY_MEAN], [GRAY_STD]))
    block = DataBlock(
        blocks=(ImageBlock(cls=CXRImage), form.block(net)),
        get_x=ColReader("image", pref=f"{Path(root).resolve()}{os.sep}"),
        get_y=ColReader("_y"),
        splitter=ColSplitter("_is_valid"),
        item_tfms=item_tfms,
        batch_tfms=batch_tfms,
    )
    workers = speed.workers
    dls = block.dataloaders(
        tv, bs=cfg.batch_size, num_workers=workers, device=device, persistent_workers=workers > 0
    )
    test_dl = dls.test_dl(test, with_labels=True)
    return NetworkData(dls, test_dl, train_rows, valid_rows, test, y_train, speed)
