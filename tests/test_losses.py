"""Fidelity loss (official DN-PIQA formula) and within-group pair sampling."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from piqa_core.losses import all_pairs, fidelity_loss, pairs_from_names, sample_pairs


def _phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def _ref(s1: float, s2: float, l1: float, l2: float) -> float:
    p, g = _phi(s1 - s2), _phi(l1 - l2)
    return 1.0 - math.sqrt(p * g + 1e-8) - math.sqrt((1.0 - p) * (1.0 - g) + 1e-8)


CASES = [(0.3, -0.2, 1.5, 0.5), (2.0, 1.0, -1.0, 0.7), (0.0, 0.0, 3.2, 3.2), (-1.2, 0.4, -0.4, -2.9)]


def _t(vals, dtype=torch.float64, grad=False):
    return torch.tensor(vals, dtype=dtype, requires_grad=grad)


@pytest.mark.parametrize("s1,s2,l1,l2", CASES)
def test_hand_computed_values(s1, s2, l1, l2):
    got = fidelity_loss(_t([s1]), _t([s2]), _t([l1]), _t([l2]))
    assert got.item() == pytest.approx(_ref(s1, s2, l1, l2), abs=1e-12)


def test_known_number_and_float32():
    # p = Phi(1) = 0.841345, g = Phi(0) = 0.5
    p = 0.8413447460685429
    want = 1 - math.sqrt(0.5 * p + 1e-8) - math.sqrt(0.5 * (1 - p) + 1e-8)
    assert _ref(1.0, 0.0, 0.0, 0.0) == pytest.approx(want, abs=1e-12)
    got = fidelity_loss(_t([1.0], torch.float32), _t([0.0], torch.float32), [0.0], [0.0])
    assert got.dtype == torch.float32 and got.item() == pytest.approx(want, abs=1e-6)


def test_saturated_limits_match_formula():
    # p == g == 1 (and == 0): the formula gives 1 - sqrt(1 + 1e-8) - sqrt(1e-8) ~ -1e-4
    want = 1.0 - math.sqrt(1.0 + 1e-8) - math.sqrt(1e-8)
    hi = fidelity_loss(_t([40.0]), _t([0.0]), _t([50.0]), _t([0.0]))
    lo = fidelity_loss(_t([0.0]), _t([40.0]), _t([0.0]), _t([50.0]))
    assert hi.item() == pytest.approx(want, abs=1e-15)
    assert lo.item() == pytest.approx(want, abs=1e-15)
    assert abs(want) < 2e-4
    # opposite saturation: maximal disagreement -> loss ~ 1
    worst = fidelity_loss(_t([40.0]), _t([0.0]), _t([0.0]), _t([50.0]))
    assert worst.item() == pytest.approx(1.0 - 2 * math.sqrt(1e-8), abs=1e-12)


def test_symmetric_under_swapping_both_pairs():
    g = torch.Generator().manual_seed(0)
    s1, s2, l1, l2 = (torch.randn(32, generator=g, dtype=torch.float64) for _ in range(4))
    a = fidelity_loss(s1, s2, l1, l2, reduction="none")
    b = fidelity_loss(s2, s1, l2, l1, reduction="none")
    torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_gradient_to_predictions_only_with_right_sign():
    s1, s2 = _t([0.1, -0.5], grad=True), _t([0.2, 0.3], grad=True)
    l1, l2 = _t([2.0, 1.0], grad=True), _t([1.0, 0.0], grad=True)  # l1 > l2 in both pairs
    fidelity_loss(s1, s2, l1, l2).backward()
    assert l1.grad is None and l2.grad is None
    assert torch.all(s1.grad < 0) and torch.all(s2.grad > 0)  # raising s1 lowers the loss
    # and a small step along -grad does lower it
    with torch.no_grad():
        before = fidelity_loss(s1, s2, l1, l2).item()
        after = fidelity_loss(s1 + 0.01, s2, l1, l2).item()
    assert after < before


def test_reductions_and_shapes():
    s1, s2 = torch.randn(5, 1), torch.randn(5, 1)
    l1, l2 = torch.randn(5), torch.randn(5)  # (B,) labels vs (B,1) preds must not broadcast
    none = fidelity_loss(s1, s2, l1, l2, reduction="none")
    assert none.shape == (5, 1)
    torch.testing.assert_close(fidelity_loss(s1, s2, l1, l2), none.mean())
    torch.testing.assert_close(fidelity_loss(s1, s2, l1, l2, reduction="sum"), none.sum())
    with pytest.raises(ValueError, match="reduction"):
        fidelity_loss(s1, s2, l1, l2, reduction="avg")
    with pytest.raises(ValueError, match="element counts"):
        fidelity_loss(s1, s2, l1[:4], l2)


def test_half_precision_computed_in_float32():
    s = torch.tensor([40.0], dtype=torch.bfloat16)
    got = fidelity_loss(s, torch.zeros(1, dtype=torch.bfloat16), [50.0], [0.0])
    assert got.dtype == torch.float32 and got.item() == pytest.approx(-1e-4, abs=1e-6)


GROUPS = ["a"] * 5 + ["b"] * 2 + ["c"] + ["d"] * 3 + ["a", "b"]  # interleaved, one singleton


def test_sample_pairs_within_groups_and_counts():
    pairs = sample_pairs(GROUPS, np.random.default_rng(0), pairs_per_item=3)
    assert pairs.dtype == np.int64 and pairs.shape == (3 * (len(GROUPS) - 1), 2)
    assert np.all(pairs[:, 0] != pairs[:, 1])
    assert all(GROUPS[i] == GROUPS[j] for i, j in pairs)
    firsts = Counter(pairs[:, 0].tolist())
    assert 7 not in firsts and 7 not in pairs[:, 1]  # the singleton "c"
    assert all(firsts[i] == 3 for i in range(len(GROUPS)) if i != 7)
    assert np.all(np.diff(pairs[:, 0]) >= 0)


def test_sample_pairs_partners_cover_group():
    groups = ["x"] * 4
    pairs = sample_pairs(groups, np.random.default_rng(1), pairs_per_item=200)
    for i in range(4):
        partners = set(pairs[pairs[:, 0] == i, 1].tolist())
        assert partners == set(range(4)) - {i}


def test_sample_pairs_deterministic_and_epochs_differ():
    a = sample_pairs(GROUPS, np.random.default_rng(7))
    b = sample_pairs(GROUPS, np.random.default_rng(7))
    np.testing.assert_array_equal(a, b)
    rng = np.random.default_rng(7)
    epochs = [sample_pairs(GROUPS * 4, rng) for _ in range(2)]
    assert not np.array_equal(epochs[0], epochs[1])


def test_sample_pairs_empty_cases():
    assert sample_pairs([], np.random.default_rng(0)).shape == (0, 2)
    assert sample_pairs(["a", "b", "c"], np.random.default_rng(0)).shape == (0, 2)
    assert sample_pairs(GROUPS, np.random.default_rng(0), pairs_per_item=0).shape == (0, 2)
    with pytest.raises(ValueError):
        sample_pairs(GROUPS, np.random.default_rng(0), pairs_per_item=-1)


def test_all_pairs_counts_and_order():
    pairs = all_pairs(GROUPS)
    sizes = Counter(GROUPS)
    assert len(pairs) == sum(n * (n - 1) // 2 for n in sizes.values())  # 15 + 3 + 0 + 3
    assert np.all(pairs[:, 0] < pairs[:, 1])
    assert all(GROUPS[i] == GROUPS[j] for i, j in pairs)
    assert len({tuple(p) for p in pairs.tolist()}) == len(pairs)
    assert pairs.tolist() == sorted(pairs.tolist())
    assert all_pairs([]).shape == (0, 2)


def test_pairs_from_names():
    index_of = {"1380_Indoor_Scene_13.jpg": 0, "1316_Indoor_Scene_13.jpg": 1}
    got = pairs_from_names(["1380_Indoor_Scene_13.jpg", "1380_Indoor_Scene_13.jpg"],
                           ["1316_Indoor_Scene_13.jpg", "1380_Indoor_Scene_13.jpg"], index_of)
    np.testing.assert_array_equal(got, [[0, 1], [0, 0]])  # self-pairs kept, as in exp.csv
    with pytest.raises(KeyError, match="missing.jpg"):
        pairs_from_names(["1380_Indoor_Scene_13.jpg"], ["missing.jpg"], index_of)
    with pytest.raises(ValueError):
        pairs_from_names(["a"], [], index_of)
