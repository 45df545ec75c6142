"""Three ways to frame a k-finding task: separate binaries, multi-label, label powerset.

Each formulation says which networks to train, what each network's targets and loss are, and
how its outputs become per-finding probabilities, so every formulation is compared on equal
terms (one probability per finding and test image).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from fastai.data.block import CategoryBlock, MultiCategoryBlock, TransformBlock
from fastai.losses import BCEWithLogitsLossFlat, CrossEntropyLossFlat

from fastcxr.errors import UsageError


# -- label powerset ------------------------------------------------------------------------
def powerset_bits(k: int) -> np.ndarray:
    """(2^k, k) matrix: row c holds the label vector of class c, first finding = high bit.

    For k=2 (Edema, Effusion): (0,0)→0, (0,1)→1, (1,0)→2, (1,1)→3, as in the study.
    """
    c = np.arange(2**k)[:, None]
    return (c >> np.arange(k - 1, -1, -1)[None, :]) & 1


def encode_powerset(y: np.ndarray) -> np.ndarray:
    """(n, k) 0/1 labels → (n,) class index."""
    y = np.asarray(y, np.int64)
    return y @ (1 << np.arange(y.shape[1] - 1, -1, -1))


def powerset_marginals(p: np.ndarray) -> np.ndarray:
    """(n, 2^k) class probabilities → (n, k): P(finding) = sum of P(classes where it is 1)."""
    k = int(round(np.log2(p.shape[1])))
    return np.asarray(p) @ powerset_bits(k)


def inverse_frequency_weights(codes: np.ndarray, n_classes: int) -> np.ndarray:
    """Class weights n / (n_present * count_c); absent classes get 0 and a warning."""
    counts = np.bincount(np.asarray(codes, np.int64), minlength=n_classes)
    present = counts > 0
    if not present.all():
        warnings.warn(
            f"label-powerset classes with no training images: "
            f"{np.flatnonzero(~present).tolist()} (class counts {counts.tolist()}); they get "
            "weight 0 and the network will not learn to predict them",
            stacklevel=2,
        )
    w = np.zeros(n_classes)
    w[present] = counts.sum() / (present.sum() * counts[present])
    return w


# -- the registry ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Network:
    """One network a formulation trains: the findings it predicts."""

    findings: tuple[str, ...]

    @property
    def name(self) -> str:
        return "+".join(f.lower().replace(" ", "_") for f in self.findings)


class Formulation:
    name: str = ""
    description: str = ""

    def networks(self, findings: Sequence[str]) -> list[Network]:
        return [Network(tuple(findings))]

    def block(self, net: Network) -> TransformBlock:
        return MultiCategoryBlock(encoded=True, vocab=list(net.findings))

    def targets(self, y: np.ndarray) -> np.ndarray:
        """(n, k) 0/1 labels of the network's findings → what the DataBlock's y reads."""
        return np.asarray(y, np.float32)

    def n_out(self, net: Network) -> int:
        return len(net.findings)

    def loss(self, net: Network, y_train: np.ndarray, device=None):
        return BCEWithLogitsLossFlat()

    def probabilities(self, net: Network, activated: torch.Tensor) -> np.ndarray:
        """Activated outputs (what fastai's get_preds returns) → (n, k) per-finding probs."""
        return activated.float().cpu().numpy()


class Single(Formulation):
    name = "single"
    description = "one binary classifier per finding (1 sigmoid output each, BCE)"

    def networks(self, findings):
        return [Network((f,)) for f in findings]


class MultiLabel(Formulation):
    name = "multilabel"
    description = "one network, one sigmoid output per finding (BCE)"


class MultiClass(Formulation):
    name = "multiclass"
    description = "label powerset: softmax over 2^k combinations, inverse-frequency weighted CE"

    def block(self, net):
        return CategoryBlock(vocab=list(range(2 ** len(net.findings))))

    def targets(self, y):
        return encode_powerset(y)

    def n_out(self, net):
        return 2 ** len(net.findings)

    def loss(self, net, y_train, device=None):
        w = inverse_frequency_weights(encode_powerset(y_train), self.n_out(net))
        return CrossEntropyLossFlat(weight=torch.tensor(w, dtype=torch.float32, device=device))

    def probabilities(self, net, activated):
        return powerset_marginals(activated.float().cpu().numpy())


FORMULATIONS: dict[str, Formulation] = {f.name: f for f in (Single(), MultiLabel(), MultiClass())}


def get_formulation(name: str) -> Formulation:
    try:
        return FORMULATIONS[name]
    except KeyError:
        raise UsageError(
            f"unknown formulation {name!r}; choose from {list(FORMULATIONS)}"
        ) from None
