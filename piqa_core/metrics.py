"""Per-group IQA metrics: SRCC, KRCC, PLCC / RMSE / MAE after a 4-parameter logistic fit.

Follows the official DN-PIQA ``performance_fit``: the logistic is fitted mapping predictions to
MOS, PLCC/RMSE/MAE use the fitted values, SRCC/KRCC use the raw predictions. PIQ23 labels are
only comparable within a scene, so metrics are computed per group (scene) and then summarised
by the mean (the DN-PIQA paper) and the median (PIQ23's README); ``pooled`` ignores groups.

Differences from the official code, all for robustness:
- an analytic Jacobian (see ``_logistic_4_jac``) and ``maxfev=10000`` instead of 1e8;
- if the logistic fit fails (no convergence, fewer than 4 points, non-finite or flat result)
  a linear fit is used instead, a ``LogisticFitWarning`` is emitted and the group's ``fit``
  field says ``"linear"``.
- groups with n < 3, or constant predictions or labels, get nan metrics and ``fit="none"``
  (the official code would crash or warn); so do groups named in ``evaluate(all_groups=…)``
  without any item (n = 0: every image of theirs failed to score).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Sequence

import numpy as np
from scipy import stats
from scipy.optimize import OptimizeWarning, curve_fit
from scipy.special import expit

METRICS = ("srcc", "krcc", "plcc", "rmse", "mae")
MIN_GROUP = 3


class LogisticFitWarning(RuntimeWarning):
    """The 4-parameter logistic fit failed; a linear fit was used instead."""


def logistic_4(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    """(b1 - b2) / (1 + exp(-(x - b3) / |b4|)) + b2, as in the official ``logistic_func``."""
    return (b1 - b2) * expit((np.asarray(x, dtype=float) - b3) / abs(b4)) + b2


def _logistic_4_jac(x: np.ndarray, b1: float, b2: float, b3: float, b4: float) -> np.ndarray:
    # Analytic Jacobian: with finite differences (the official code) a start value
    # b3 = mean(pred) ~ 1e-17 gets a ~1e-25 step, so b3 never moves and the fit stalls.
    a = abs(b4)
    u = (np.asarray(x, dtype=float) - b3) / a
    s = expit(u)
    ds = (b1 - b2) * s * (1.0 - s)
    return np.stack([s, 1.0 - s, -ds / a, -ds * u / a * np.sign(b4)], axis=1)


def fit_logistic(pred: Sequence[float], mos: Sequence[float]) -> np.ndarray:
    """Fit ``mos ~ logistic_4(pred)``; returns ``[b1, b2, b3, |b4|]`` (4 values).

    On failure returns the linear fit ``[slope, intercept]`` (2 values) and emits a
    ``LogisticFitWarning``; ``apply_fit`` handles both forms.
    """
    x, y = np.asarray(pred, dtype=float), np.asarray(mos, dtype=float)
    p0 = [np.max(y), np.min(y), np.mean(x), 0.5]
    try:
        with warnings.catch_warnings(), np.errstate(divide="ignore", invalid="ignore"):
            # an exact fit has no covariance estimate; the parameters are still fine
            warnings.simplefilter("ignore", OptimizeWarning)
            params, _ = curve_fit(logistic_4, x, y, p0=p0, jac=_logistic_4_jac, maxfev=10000)
        params[3] = abs(params[3])
        fitted = logistic_4(x, *params)
        if not (np.all(np.isfinite(params)) and np.all(np.isfinite(fitted))) or np.ptp(fitted) == 0:
            raise RuntimeError("non-finite or flat logistic fit")
        return params
    except (RuntimeError, ValueError, TypeError) as exc:
        warnings.warn(f"logistic fit failed ({exc}); using a linear fit", LogisticFitWarning,
                      stacklevel=2)
        return np.polyfit(x, y, 1)


def apply_fit(params: np.ndarray, pred: Sequence[float]) -> np.ndarray:
    """Map predictions through a ``fit_logistic`` result (logistic or linear fallback)."""
    x = np.asarray(pred, dtype=float)
    return logistic_4(x, *params) if len(params) == 4 else np.polyval(params, x)


def _nan_metrics(n: int) -> dict[str, Any]:
    return {"n": n, **{m: math.nan for m in METRICS}, "fit": "none"}


def group_metrics(pred: Sequence[float], mos: Sequence[float]) -> dict[str, Any]:
    """Metrics for one group: ``n, srcc, krcc, plcc, rmse, mae, fit`` (fit: logistic|linear|none).

    n < 3 or constant pred/mos -> nan metrics and ``fit="none"``. Non-finite values raise.
    """
    x, y = np.asarray(pred, dtype=float).ravel(), np.asarray(mos, dtype=float).ravel()
    if x.shape != y.shape:
        raise ValueError(f"pred and mos differ in length: {x.size} vs {y.size}")
    if not (np.all(np.isfinite(x)) and np.all(np.isfinite(y))):
        raise ValueError("pred and mos must be finite (drop failed rows before evaluating)")
    n = int(x.size)
    if n < MIN_GROUP or np.ptp(x) == 0 or np.ptp(y) == 0:
        return _nan_metrics(n)
    params = fit_logistic(x, y)
    fitted = apply_fit(params, x)
    err = fitted - y
    return {
        "n": n,
        "srcc": float(stats.spearmanr(x, y)[0]),
        "krcc": float(stats.kendalltau(x, y)[0]),
        "plcc": float(stats.pearsonr(fitted, y)[0]),
        "rmse": float(np.sqrt(np.mean(err**2))),
        "mae": float(np.mean(np.abs(err))),
        "fit": "logistic" if len(params) == 4 else "linear",
    }


def _summary(rows: list[dict[str, Any]], reduce: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"groups": len(rows),
                           "valid_groups": sum(math.isfinite(r["srcc"]) for r in rows)}
    for m in METRICS:
        vals = np.array([r[m] for r in rows], dtype=float)
        vals = vals[np.isfinite(vals)]
        out[m] = float(reduce(vals)) if vals.size else math.nan
    return out


def _json(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN
    return v if v is None or isinstance(v, (str, int, float, bool)) else str(v)


@dataclass
class EvalReport:
    """Per-group metrics (sorted by group) with mean/median over groups and pooled metrics.

    ``mean``/``median`` skip nan groups and carry ``groups`` and ``valid_groups`` counts.
    """

    per_group: list[dict[str, Any]]
    mean: dict[str, Any]
    median: dict[str, Any]
    pooled: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable copy: nan -> None, numpy scalars -> Python, other groups -> str."""
        def conv(d: dict[str, Any]) -> dict[str, Any]:
            return {k: _json(v) for k, v in d.items()}
        return {"per_group": [conv(r) for r in self.per_group], "mean": conv(self.mean),
                "median": conv(self.median), "pooled": conv(self.pooled)}

    def to_frame(self) -> Any:
        """Per-group table as a pandas DataFrame (pandas imported lazily)."""
        import pandas as pd
        return pd.DataFrame(self.per_group)

    def format_table(self, digits: int = 4) -> str:
        """Fixed-width text table: one row per group, then mean, median and pooled rows."""
        names = [str(r["group"]) for r in self.per_group] + ["mean", "median", "pooled"]
        w = max(5, *(len(s) for s in names))
        nw = max(7, digits + 4)
        head = f"{'group':<{w}}  {'n':>7}" + "".join(f"  {m:>{nw}}" for m in METRICS) + "  fit     "

        def line(name: str, n: str, d: dict[str, Any], fit: str) -> str:
            nums = "".join(f"  {d[m]:>{nw}.{digits}f}" if math.isfinite(d[m]) else f"  {'nan':>{nw}}"
                           for m in METRICS)
            return f"{name:<{w}}  {n:>7}{nums}  {fit:<8}"

        rule = "-" * len(head)
        rows = [line(str(r["group"]), str(r["n"]), r, r["fit"]) for r in self.per_group]
        # n column of the summaries: groups with finite metrics / all groups
        summaries = [line(name, f"{d['valid_groups']}/{d['groups']}g", d, "")
                     for name, d in (("mean", self.mean), ("median", self.median))]
        pooled = line("pooled", str(self.pooled["n"]), self.pooled, self.pooled["fit"])
        return "\n".join([head, rule, *rows, rule, *summaries, pooled])


def _sorted_groups(keys: list[Hashable]) -> list[Hashable]:
    try:
        return sorted(keys)
    except TypeError:  # mixed, unorderable group types
        return sorted(keys, key=lambda k: (type(k).__name__, str(k)))


def evaluate(pred: Sequence[float], mos: Sequence[float], groups: Sequence[Hashable],
             all_groups: Iterable[Hashable] = ()) -> EvalReport:
    """Per-group metrics, their nan-aware mean and median, and pooled metrics over all items.

    ``all_groups``: groups to list even when no item of theirs is given (every image failed to
    score); they get ``n=0``, nan metrics and ``fit="none"``, and count in ``groups`` (not in
    ``valid_groups``).
    """
    x, y = np.asarray(pred, dtype=float).ravel(), np.asarray(mos, dtype=float).ravel()
    if not (x.size == y.size == len(groups)):
        raise ValueError(f"lengths differ: pred={x.size}, mos={y.size}, groups={len(groups)}")
    members: dict[Hashable, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    for g in all_groups:
        members.setdefault(g, [])
    rows = []
    for g in _sorted_groups(list(members)):
        idx = np.asarray(members[g], dtype=np.intp)
        rows.append({"group": g, **group_metrics(x[idx], y[idx])})
    return EvalReport(per_group=rows, mean=_summary(rows, np.mean),
                      median=_summary(rows, np.median), pooled=group_metrics(x, y))
