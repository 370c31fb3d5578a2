"""Per-group IQA metrics, logistic fit, summaries and the report."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
from scipy import stats

from piqa_core.metrics import (
    EvalReport,
    LogisticFitWarning,
    apply_fit,
    evaluate,
    fit_logistic,
    group_metrics,
    logistic_4,
)

TRUE = (5.0, 1.0, 0.3, 0.7)


def test_logistic_4_formula_and_abs_b4():
    x = np.array([-1.0, 0.3, 2.0])
    want = (5.0 - 1.0) / (1 + np.exp(-(x - 0.3) / 0.7)) + 1.0
    np.testing.assert_allclose(logistic_4(x, *TRUE), want)
    np.testing.assert_allclose(logistic_4(x, 5.0, 1.0, 0.3, -0.7), want)
    assert logistic_4(np.array([-1e4]), *TRUE)[0] == pytest.approx(1.0)  # no overflow error


def test_analytic_jacobian_matches_finite_differences():
    from scipy.optimize import approx_fprime

    from piqa_core.metrics import _logistic_4_jac

    x, b = np.linspace(-2, 3, 7), np.array([4.0, 1.5, 0.2, -0.6])  # negative b4: sign handled
    num = np.stack([approx_fprime(b, lambda bb, xi=xi: logistic_4(xi, *bb), 1e-7) for xi in x])
    np.testing.assert_allclose(_logistic_4_jac(x, *b), num, atol=1e-5)


def test_srcc_krcc_match_scipy():
    rng = np.random.default_rng(0)
    pred, mos = rng.normal(size=40), rng.normal(size=40)
    m = group_metrics(pred, mos)
    assert m["n"] == 40
    assert m["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)
    assert m["krcc"] == pytest.approx(stats.kendalltau(pred, mos)[0], abs=1e-12)


def test_fit_recovers_known_logistic():
    rng = np.random.default_rng(1)
    pred = rng.uniform(-3, 3, size=200)
    mos = logistic_4(pred, *TRUE) + rng.normal(scale=0.02, size=200)
    params = fit_logistic(pred, mos)
    assert params.shape == (4,)
    np.testing.assert_allclose(params, TRUE, atol=0.05)
    m = group_metrics(pred, mos)
    assert m["fit"] == "logistic" and m["plcc"] > 0.999
    assert m["rmse"] == pytest.approx(0.02, abs=0.005)


def test_rmse_mae_exact_fit_and_wiring():
    pred = np.linspace(-2, 2, 30)  # mean(pred) ~ -4e-17: stalls a finite-difference fit
    m = group_metrics(pred, logistic_4(pred, *TRUE))
    assert m["rmse"] < 1e-3 and m["mae"] < 1e-3 and m["plcc"] == pytest.approx(1.0, abs=1e-9)
    # on noisy data: rmse/mae are those of the fitted values, computed here independently
    rng = np.random.default_rng(2)
    mos = logistic_4(pred, *TRUE) + rng.normal(scale=0.3, size=30)
    fitted = logistic_4(pred, *fit_logistic(pred, mos))
    m = group_metrics(pred, mos)
    assert m["rmse"] == pytest.approx(math.sqrt(np.mean((fitted - mos) ** 2)), rel=1e-9)
    assert m["mae"] == pytest.approx(np.mean(np.abs(fitted - mos)), rel=1e-9)
    assert m["plcc"] == pytest.approx(stats.pearsonr(fitted, mos)[0], rel=1e-9)


def test_linear_fallback_warns():
    pred, mos = np.array([0.0, 1.0, 2.0]), np.array([1.0, 3.0, 5.0])  # 3 points < 4 parameters
    with pytest.warns(LogisticFitWarning):
        params = fit_logistic(pred, mos)
    assert params.shape == (2,)
    np.testing.assert_allclose(apply_fit(params, pred), mos, atol=1e-9)
    with pytest.warns(LogisticFitWarning):
        m = group_metrics(pred, mos)
    assert m["fit"] == "linear" and m["rmse"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("pred,mos", [([1.0, 2.0], [1.0, 2.0]), ([1.0] * 5, [1, 2, 3, 4, 5]),
                                      ([1, 2, 3, 4, 5], [2.0] * 5), ([], [])])
def test_degenerate_groups_are_nan(pred, mos):
    m = group_metrics(pred, mos)
    assert m["n"] == len(pred) and m["fit"] == "none"
    assert all(math.isnan(m[k]) for k in ("srcc", "krcc", "plcc", "rmse", "mae"))


def test_bad_inputs_raise():
    with pytest.raises(ValueError):
        group_metrics([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="finite"):
        group_metrics([1, 2, float("nan")], [1, 2, 3])
    with pytest.raises(ValueError):
        evaluate([1, 2, 3], [1, 2, 3], ["a", "a"])


def _three_groups():
    # "up": srcc 1, "down": srcc -1, "mid": ranks (1,3,2,4) -> 1 - 6*2/(4*15) = 0.8,
    # "tiny": 2 items -> nan, skipped by mean/median
    pred = [1, 2, 3, 4] * 3 + [1, 2]
    mos = [10, 20, 30, 40] + [4, 3, 2, 1] + [1, 3, 2, 4] + [0, 1]
    groups = ["up"] * 4 + ["down"] * 4 + ["mid"] * 4 + ["tiny"] * 2
    order = np.random.default_rng(3).permutation(len(pred))  # interleave the groups
    return ([float(pred[i]) for i in order], [float(mos[i]) for i in order],
            [groups[i] for i in order])


def _report() -> EvalReport:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogisticFitWarning)  # 4-point groups may fall back
        return evaluate(*_three_groups())


def test_evaluate_per_group_mean_median():
    rep = _report()
    assert [r["group"] for r in rep.per_group] == ["down", "mid", "tiny", "up"]
    srcc = {r["group"]: r["srcc"] for r in rep.per_group}
    assert srcc["up"] == pytest.approx(1.0) and srcc["down"] == pytest.approx(-1.0)
    assert srcc["mid"] == pytest.approx(0.8) and math.isnan(srcc["tiny"])
    assert rep.mean["srcc"] == pytest.approx((1.0 - 1.0 + 0.8) / 3, abs=1e-12)
    assert rep.median["srcc"] == pytest.approx(0.8, abs=1e-12)
    assert rep.mean["groups"] == 4 and rep.mean["valid_groups"] == 3
    pred, mos, _ = _three_groups()
    assert rep.pooled["n"] == 14
    assert rep.pooled["srcc"] == pytest.approx(stats.spearmanr(pred, mos)[0], abs=1e-12)


def test_to_dict_is_json_and_table_readable():
    rep = _report()
    d = json.loads(json.dumps(rep.to_dict(), allow_nan=False))
    assert d["median"]["srcc"] == pytest.approx(0.8)
    assert {r["group"] for r in d["per_group"]} == {"up", "down", "mid", "tiny"}
    assert [r for r in d["per_group"] if r["group"] == "tiny"][0]["srcc"] is None
    table = rep.format_table()
    for word in ("up", "down", "mid", "tiny", "mean", "median", "pooled", "srcc"):
        assert word in table
    lines = table.splitlines()
    assert len(lines) == 1 + 1 + 4 + 1 + 3
    assert len({len(line) for line in lines}) == 1  # fixed width, nan rows included
    assert rep.to_frame().shape[0] == 4


def test_numeric_group_keys_sorted_and_serialised():
    rng = np.random.default_rng(4)
    pred, mos = rng.normal(size=20), rng.normal(size=20)
    groups = np.array([10, 2] * 10)
    rep = evaluate(pred, mos, groups)
    assert [r["group"] for r in rep.per_group] == [2, 10]
    assert [r["group"] for r in rep.to_dict()["per_group"]] == [2, 10]


def test_groups_without_items_are_listed_with_n_0():
    """Groups whose every image failed to score: listed (n=0, nan), counted in ``groups``, not in valid."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LogisticFitWarning)
        pred, mos, groups = _three_groups()
        rep = evaluate(pred, mos, groups, all_groups=[*groups, "gone", "down"])
        plain = evaluate(pred, mos, groups)
    assert [r["group"] for r in rep.per_group] == ["down", "gone", "mid", "tiny", "up"]
    gone = rep.per_group[1]
    assert gone["n"] == 0 and gone["fit"] == "none" and all(math.isnan(gone[m]) for m in ("srcc", "plcc", "mae"))
    assert rep.mean["groups"] == 5 and rep.mean["valid_groups"] == 3 and rep.median["groups"] == 5
    assert rep.mean["srcc"] == plain.mean["srcc"] and rep.pooled == plain.pooled
    assert json.loads(json.dumps(rep.to_dict(), allow_nan=False))["per_group"][1]["srcc"] is None
    lines = rep.format_table().splitlines()
    assert len({len(line) for line in lines}) == 1 and lines[3].split()[:3] == ["gone", "0", "nan"]
    assert "3/5g" in rep.format_table()
    # nothing scored at all: every group still listed
    empty = evaluate([], [], [], all_groups=["a", "b"])
    assert [(r["group"], r["n"]) for r in empty.per_group] == [("a", 0), ("b", 0)]
    assert empty.mean["groups"] == 2 and empty.mean["valid_groups"] == 0 and empty.pooled["n"] == 0
