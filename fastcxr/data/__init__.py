"""Data: a dataset on disk, the rows a run trains and is scored on, and its loaders.

* `dataset` — `Dataset` (a manifest, its folder, its hash) and the built-in synthetic dataset.
* `datablock` — label policy and scored test set (`apply_policy`), fastai's DataBlock path
  and `network_data`, which picks it or the cache loader for one network.
* `cache_loader` — the fast path's uint8 cache loader (`CacheDL`), augmented on the device.
"""

from fastcxr.data.datablock import (
    GRAY_MEAN,
    GRAY_STD,
    DataError,
    LoadCXR,
    NetworkData,
    apply_policy,
    certain_labels,
    check_files,
    network_data,
    require_thresholds,
    scored,
)

__all__ = [
    "GRAY_MEAN",
    "GRAY_STD",
    "DataError",
    "LoadCXR",
    "NetworkData",
    "apply_policy",
    "certain_labels",
    "check_files",
    "network_data",
    "require_thresholds",
    "scored",
]
