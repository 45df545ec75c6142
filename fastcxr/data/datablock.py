"""Manifest rows → one network's loaders: the label policy on train/valid and the scored test
set (`apply_policy`), then fastai's DataBlock path or the fast path's cache loader
(`network_data`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from fastai.data.block import DataBlock, TransformBlock
from fastai.data.core import DataLoaders, TfmdDL
from fastai.data.transforms import ColReader, ColSplitter, IntToFloatTensor, Normalize, Transform
from fastai.vision.augment import aug_transforms
from fastai.vision.core import PILImageBW
from PIL import Image

from fastcxr.config import TrainConfig
from fastcxr.data.cache_loader import cache_loaders, close_loaders
from fastcxr.errors import FastcxrError
from fastcxr.findings import NO_FINDING, LabelPolicy, derive_no_finding
from fastcxr.formulations import Formulation, Network
from fastcxr.preprocessing import GRAY_MEAN, GRAY_STD, Preprocessing
from fastcxr.runtime.fastpath import AUGMENT, Speed, resolve_speed


class DataError(FastcxrError, ValueError):
    """Data that cannot be trained on (empty split, one-class label, …)."""


class LoadCXR(Transform):
    """Image path → `PILImageBW` through the run's `Preprocessing` (the same function the fast
    loader and `predict` use, so every path sees the same pixels)."""

    def __init__(self, prep: Preprocessing):
        super().__init__()
        self.prep = prep

    def encodes(self, fn: str | Path) -> PILImageBW:
        return PILImageBW(Image.fromarray(self.prep.load(Path(fn))))


@dataclass
class NetworkData:
    dls: DataLoaders
    test_dl: TfmdDL
    train: pd.DataFrame
    valid: pd.DataFrame
    test: pd.DataFrame
    y_train: np.ndarray  # (n, k) 0/1 labels of the network's findings
    speed: Speed
    preprocessing: Preprocessing | None = None

    def close(self) -> None:
        """Stop the loaders' worker processes (the fast path's persist across epochs): once a
        network is done, so that the next network's workers are not forked beside them."""
        close_loaders(*self.dls.loaders, self.test_dl)


def scored(finding: str) -> str:
    """Column of a finding's label as scored: 0/1 where the raw label is 0 or 1, else NaN."""
    return f"_scored_{finding}"


def certain_labels(raw: pd.Series) -> np.ndarray:
    """Raw labels → float 0/1 where certain (1 or 0), NaN for uncertain (-1) and blank."""
    v = pd.to_numeric(raw, errors="coerce").to_numpy(float)
    return np.where(np.isin(v, (0.0, 1.0)), v, np.nan)


def apply_policy(manifest: pd.DataFrame, cfg: TrainConfig, findings) -> pd.DataFrame:
    """Train and valid rows under the run's label policy (findings as 0/1), and the test rows
    that are scored; split sizes and classes checked.

    The policy shapes training and the validation loss only. The test set does not depend on
    it: a test image is scored for a finding when its raw label for that finding is 0 or 1,
    the same images for every policy, formulation and seed. Test rows hold NaN for a finding
    they are not scored on. Every row also carries `scored(f)`: its certain label (or NaN),
    which thresholds (validation) and metrics (test) use.
    """
    policy = LabelPolicy.parse(cfg.uncertain, cfg.blank)
    policy.apply(manifest.iloc[:0], findings)  # the columns exist
    if NO_FINDING in findings:  # MIMIC-CXR and CheXpert: 1 or blank (NO_FINDING_RULE)
        manifest = derive_no_finding(manifest)
    raw = manifest.copy()
    for f in findings:
        raw[scored(f)] = certain_labels(raw[f])
    tv = policy.apply(raw[raw["split"].isin(["train", "valid"])], findings)
    test = raw[raw["split"] == "test"]
    test = test[test[[scored(f) for f in findings]].notna().any(axis=1)].copy()
    for f in findings:
        test[f] = test[scored(f)]
    train, valid = tv[tv["split"] == "train"], tv[tv["split"] == "valid"]
    for split, rows in (("train", train), ("valid", valid)):
        if rows.empty:
            raise DataError(
                f"the {split!r} split is empty under the label policy "
                f"(uncertain={cfg.uncertain}, blank={cfg.blank})"
            )
    if test.empty:
        raise DataError(f"the 'test' split has no image labelled 0 or 1 for {list(findings)}")
    for f in findings:
        classes = np.unique(train[f])
        if len(classes) < 2:
            n_all = int((manifest["split"] == "train").sum())
            hint = ""
            if cfg.blank != "zeros" and len(train) < n_all:
                blank = {g: int(manifest.loc[manifest["split"] == "train", g].isna().sum())
                         for g in findings}  # fmt: skip
                most = max(blank, key=blank.get)
                hint = (f"; the policy (uncertain={cfg.uncertain}, blank={cfg.blank}) kept "
                        f"{len(train)} of {n_all} training images — {blank[most]} are blank "
                        f"for {most}: try --blank 'drop,{most}=zeros'")  # fmt: skip
            raise DataError(
                f"finding {f!r} has only class {classes.tolist()} in the training "
                f"split: nothing to learn{hint}"
            )
        if test[f].isna().all():
            raise DataError(f"finding {f!r} has no test image labelled 0 or 1: nothing to score")
    return pd.concat([tv, test.reset_index(drop=True)], ignore_index=True)


def check_files(df: pd.DataFrame, root: str | Path) -> None:
    """Every image the run will read exists, checked before any training."""
    root = Path(root)
    missing = [p for p in df["image"].astype(str) if not (root / p).is_file()]
    if missing:
        shown = ", ".join(missing[:5]) + (" …" if len(missing) > 5 else "")
        raise DataError(
            f"{len(missing)} image(s) named by the manifest do not exist under {root}: {shown}"
        )
    check_images_across_splits(df, root)


def check_images_across_splits(df: pd.DataFrame, root: str | Path) -> None:
    """No test image is a training or validation image under another name (a symlink, a hard
    link, a byte-identical copy), nor a training image a validation one: `DataError` naming
    the pairs (`leakage.same_files`)."""
    from fastcxr.leakage import same_files

    root = Path(root)
    split = df["split"].astype(str)
    paths = {s: [str(root / p) for p in df.loc[split == s, "image"].astype(str)]
             for s in ("train", "valid", "test")}  # fmt: skip
    pairs = []
    for a, b in (("train", "test"), ("valid", "test"), ("train", "valid")):
        pairs += [(a, b, p, q, how) for p, q, how in same_files(paths[a], paths[b])]
    if pairs:
        shown = "; ".join(
            f"{os.path.relpath(q, root)} ({b}) = {os.path.relpath(p, root)} ({a}): {how}"
            for a, b, p, q, how in pairs[:3]
        ) + (" …" if len(pairs) > 3 else "")
        raise DataError(
            f"{len(pairs)} image(s) appear in two splits under different names (data "
            f"leakage): {shown}"
        )


def require_thresholds(df: pd.DataFrame, findings) -> None:
    """Every finding needs both classes among its validation images labelled 0 or 1: its
    decision threshold is chosen there."""
    valid = df[df["split"] == "valid"]
    for f in findings:
        v = valid[scored(f)].dropna().unique()
        if len(v) < 2:
            has = f"only class {v.astype(int).tolist()}" if len(v) else "no label 0 or 1"
            raise DataError(
                f"finding {f!r} has {has} in the validation split: no decision threshold "
                "can be chosen on it"
            )


def network_data(
    df: pd.DataFrame,
    root: str | Path,
    form: Formulation,
    net: Network,
    cfg: TrainConfig,
    device=None,
    speed: Speed | None = None,
    preprocessing: Preprocessing | None = None,
) -> NetworkData:
    """DataLoaders (train/valid) and a labelled test DataLoader for `net`: the fast cache
    loader (`fastcxr.runtime.fastpath`) or fastai's DataBlock, as `speed` (resolved from
    `cfg`) says."""
    speed = speed or resolve_speed(cfg, device)
    prep = preprocessing or Preprocessing(cfg.size)
    df = df.copy()
    # test rows may hold NaN (a finding they are not scored on): their loader targets are
    # placeholders, never read; metrics use the `scored` columns
    y = df[list(net.findings)].fillna(0).to_numpy(np.int64)
    targets = form.targets(y)
    df["_y"] = list(targets) if targets.ndim == 2 else targets.tolist()
    df["_is_valid"] = df["split"] == "valid"
    tv = df[df["split"].isin(["train", "valid"])].reset_index(drop=True)
    test = df[df["split"] == "test"].reset_index(drop=True)
    train_rows, valid_rows = tv[~tv["_is_valid"]], tv[tv["_is_valid"]]
    y_train = y[df["split"].to_numpy() == "train"]
    if speed.loader == "fast":
        root = Path(root).resolve()
        device = torch.device(device if device is not None else speed.device)  # never None:
        # a fastai loader without a device leaves batches (and so the model) on the CPU
        split = df["split"].to_numpy()
        parts = [
            ([root / p for p in df.loc[split == s, "image"]], targets[split == s])
            for s in ("train", "valid", "test")
        ]
        train_dl, valid_dl, test_dl = cache_loaders(
            *parts, size=cfg.size, batch_size=cfg.batch_size, augment=cfg.augment,
            speed=speed, device=device, mode=prep.intensity,
        )  # fmt: skip
        dls = DataLoaders(train_dl, valid_dl, device=device)
        return NetworkData(dls, test_dl, train_rows, valid_rows, test, y_train, speed, prep)
    batch_tfms = []
    if cfg.augment:  # no flips: the heart's side is anatomy, not noise
        batch_tfms += aug_transforms(do_flip=False, max_warp=0.0, size=cfg.size, **AUGMENT)
    batch_tfms.append(Normalize.from_stats([GRAY_MEAN], [GRAY_STD]))
    block = DataBlock(
        blocks=(TransformBlock([LoadCXR(prep)], batch_tfms=IntToFloatTensor), form.block(net)),
        get_x=ColReader("image", pref=f"{Path(root).resolve()}{os.sep}"),
        get_y=ColReader("_y"),
        splitter=ColSplitter("_is_valid"),
        batch_tfms=batch_tfms,
    )
    workers = speed.workers
    dls = block.dataloaders(
        tv, bs=cfg.batch_size, num_workers=workers, device=device, persistent_workers=workers > 0
    )
    test_dl = dls.test_dl(test, with_labels=True)
    return NetworkData(dls, test_dl, train_rows, valid_rows, test, y_train, speed, prep)
