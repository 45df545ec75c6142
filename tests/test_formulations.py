import itertools

import numpy as np
import pytest
import torch
from sklearn.utils.class_weight import compute_class_weight

from fastcxr.formulations import (
    FORMULATIONS,
    encode_powerset,
    get_formulation,
    inverse_frequency_weights,
    powerset_marginals,
)


def test_study_encoding():
    y = np.array([[0, 0], [0, 1], [1, 0], [1, 1]])
    assert encode_powerset(y).tolist() == [0, 1, 2, 3]  # DESIGN.md: (1,0) → 2 is Edema only


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_encoding_is_binary_number_of_the_label_vector(k):
    for bits in itertools.product([0, 1], repeat=k):
        assert encode_powerset(np.array([bits]))[0] == int("".join(map(str, bits)), 2)


@pytest.mark.parametrize("k", [2, 3])
def test_marginals_sum_the_classes_where_the_finding_is_one(k):
    p = np.random.default_rng(k).dirichlet(np.ones(2**k), size=50)
    got = powerset_marginals(p)
    for i in range(k):
        cols = [c for c in range(2**k) if (c >> (k - 1 - i)) & 1]
        np.testing.assert_allclose(got[:, i], p[:, cols].sum(1))
    if k == 2:
        np.testing.assert_allclose(got[:, 0], p[:, 2] + p[:, 3])  # Edema
        np.testing.assert_allclose(got[:, 1], p[:, 1] + p[:, 3])  # Effusion


def test_inverse_frequency_weights_match_sklearn_balanced():
    codes = np.random.default_rng(0).choice(4, size=500, p=[0.34, 0.17, 0.07, 0.42])
    expect = compute_class_weight("balanced", classes=np.arange(4), y=codes)
    np.testing.assert_allclose(inverse_frequency_weights(codes, 4), expect)


def test_absent_class_warns_with_counts():
    with pytest.warns(UserWarning, match=r"no training images: \[2\].*\[3, 1, 0, 2\]"):
        w = inverse_frequency_weights(np.array([0, 0, 0, 1, 3, 3]), 4)
    assert w[2] == 0 and w[0] > 0


def test_registry_networks_and_heads():
    f = ("Edema", "Pleural Effusion")
    assert set(FORMULATIONS) == {"single", "multilabel", "multiclass"}
    single, ml, mc = (get_formulation(n) for n in ("single", "multilabel", "multiclass"))
    assert [n.findings for n in single.networks(f)] == [("Edema",), ("Pleural Effusion",)]
    assert [single.n_out(n) for n in single.networks(f)] == [1, 1]
    assert ml.n_out(ml.networks(f)[0]) == 2 and mc.n_out(mc.networks(f)[0]) == 4
    with pytest.raises(ValueError, match="unknown formulation"):
        get_formulation("powerset")


def test_multiclass_probabilities_and_weighted_loss():
    mc = get_formulation("multiclass")
    net = mc.networks(("Edema", "Pleural Effusion"))[0]
    y = np.array([[0, 0]] * 6 + [[0, 1]] * 3 + [[1, 0]] + [[1, 1]] * 2)
    loss = mc.loss(net, y)
    logits, target = torch.randn(5, 4), torch.tensor([0, 1, 2, 3, 2])
    w = torch.tensor(
        compute_class_weight("balanced", classes=np.arange(4), y=encode_powerset(y)),
        dtype=torch.float32,
    )
    expect = torch.nn.functional.cross_entropy(logits, target, weight=w)
    torch.testing.assert_close(loss(logits, target), expect)
    probs = mc.probabilities(net, torch.softmax(logits, 1))
    np.testing.assert_allclose(probs.sum(1) <= 2, True)
    assert probs.shape == (5, 2)
