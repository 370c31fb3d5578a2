"""Training loss and pair sampling for DN-PIQA retraining.

The fidelity loss reproduces the official DN-PIQA ``train.py`` (and LIQE's ``fidelity_loss``)
exactly: for a pair of items with predicted scores ``s1, s2`` and labels ``l1, l2``

    p = 0.5 * (1 + erf((s1 - s2) / sqrt(2)))      # = Phi(s1 - s2), Phi = standard normal CDF
    g = 0.5 * (1 + erf((l1 - l2) / sqrt(2)))      # = Phi(l1 - l2), labels detached
    loss = 1 - sqrt(p * g + 1e-8) - sqrt((1 - p) * (1 - g) + 1e-8)

Note the official code divides the difference by sqrt(2) *inside erf*, which is exactly the
standard normal CDF of the raw difference (not Phi of the difference divided by sqrt(2)).

PIQ23 labels (JOD) are only comparable within one scene, so pairs are drawn within a group.
"""

from __future__ import annotations

import math
from typing import Hashable, Mapping, Sequence

import numpy as np
import torch

EPS = 1e-8  # the official constant, added inside both square roots
_REDUCTIONS = ("mean", "sum", "none")


def _phi(x: torch.Tensor) -> torch.Tensor:
    """Standard normal CDF, written as in the official code."""
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def fidelity_loss(
    pred_1: torch.Tensor,
    pred_2: torch.Tensor,
    label_1: torch.Tensor | np.ndarray | Sequence[float] | float,
    label_2: torch.Tensor | np.ndarray | Sequence[float] | float,
    reduction: str = "mean",
) -> torch.Tensor:
    """Official DN-PIQA fidelity loss for pairs ``(pred_1[k], pred_2[k])``.

    All four inputs are flattened and must hold the same number of elements (flattening avoids
    the silent (B,1) - (B,) -> (B,B) broadcast the official code guards with ``[:, None]``).
    Labels never carry gradients. ``reduction="none"`` returns the per-pair loss in
    ``pred_1``'s shape. Half-precision predictions are computed in float32: the 1e-8 constant
    underflows in bf16/fp16.
    """
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    dtype = pred_1.dtype if pred_1.dtype == torch.float64 else torch.float32
    s1 = pred_1.reshape(-1).to(dtype)
    s2 = pred_2.reshape(-1).to(dtype)
    l1 = torch.as_tensor(label_1, device=pred_1.device).detach().reshape(-1).to(dtype)
    l2 = torch.as_tensor(label_2, device=pred_1.device).detach().reshape(-1).to(dtype)
    n = s1.numel()
    if not (s2.numel() == n and l1.numel() == n and l2.numel() == n):
        raise ValueError(
            f"fidelity_loss: element counts differ: pred_1={n}, pred_2={s2.numel()}, "
            f"label_1={l1.numel()}, label_2={l2.numel()}"
        )
    p = _phi(s1 - s2)
    g = _phi(l1 - l2)
    loss = 1.0 - torch.sqrt(p * g + EPS) - torch.sqrt((1.0 - p) * (1.0 - g) + EPS)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss.reshape(pred_1.shape)


def _group_codes(groups: Sequence[Hashable]) -> np.ndarray:
    """Integer code per item, numbered by first appearance (deterministic)."""
    table: dict[Hashable, int] = {}
    return np.fromiter((table.setdefault(g, len(table)) for g in groups), dtype=np.int64,
                       count=len(groups))


def _empty_pairs() -> np.ndarray:
    return np.empty((0, 2), dtype=np.int64)


def sample_pairs(
    groups: Sequence[Hashable],
    rng: np.random.Generator,
    pairs_per_item: int = 1,
) -> np.ndarray:
    """Random within-group pairs: shape (M, 2), ``int64`` indices into ``groups``.

    Every item of a group with at least two members appears as the first element exactly
    ``pairs_per_item`` times, each time with a partner drawn uniformly from the *other* members
    of its group (independent draws, so a partner can repeat). Items of singleton groups yield
    no pair. Rows are ordered by first index, then draw. Deterministic for a given ``rng``
    state: re-sample each epoch by passing that epoch's generator.
    """
    if pairs_per_item < 0:
        raise ValueError(f"pairs_per_item must be >= 0, got {pairs_per_item}")
    codes = _group_codes(groups)
    if codes.size == 0 or pairs_per_item == 0:
        return _empty_pairs()
    order = np.argsort(codes, kind="stable")  # members of each group, contiguous
    counts = np.bincount(codes)
    starts = np.cumsum(counts) - counts
    pos = np.empty_like(codes)
    pos[order] = np.arange(codes.size) - starts[codes[order]]
    first = np.flatnonzero(counts[codes] >= 2)
    if first.size == 0:
        return _empty_pairs()
    size = counts[codes[first]]
    # draw among the n-1 others, then skip over the item's own slot
    r = rng.integers(0, (size - 1)[:, None], size=(first.size, pairs_per_item))
    r = r + (r >= pos[first][:, None])
    partner = order[starts[codes[first]][:, None] + r]
    return np.stack([np.repeat(first, pairs_per_item), partner.reshape(-1)], axis=1).astype(np.int64)


def all_pairs(groups: Sequence[Hashable]) -> np.ndarray:
    """Every unordered within-group pair ``(i, j)`` with ``i < j``, rows sorted; shape (M, 2).

    A group of n items contributes n(n-1)/2 rows: meant for small validation sets.
    """
    codes = _group_codes(groups)
    chunks = []
    for c in range(int(codes.max()) + 1 if codes.size else 0):
        members = np.flatnonzero(codes == c)
        a, b = np.triu_indices(members.size, k=1)
        chunks.append(np.stack([members[a], members[b]], axis=1))
    if not chunks:
        return _empty_pairs()
    pairs = np.concatenate(chunks).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def pairs_from_names(
    names_1: Sequence[str],
    names_2: Sequence[str],
    index_of: Mapping[str, int],
) -> np.ndarray:
    """Index pairs from a pair list such as the official ``exp.csv`` (``IMAGE``, ``IMAGE second``).

    Rows are kept as given, including self-pairs (the official ``exp.csv`` has some); group
    membership is not checked. Raises ``KeyError`` naming the first unknown image.
    """
    if len(names_1) != len(names_2):
        raise ValueError(f"pair list columns differ in length: {len(names_1)} vs {len(names_2)}")
    out = np.empty((len(names_1), 2), dtype=np.int64)
    for k, (a, b) in enumerate(zip(names_1, names_2)):
        for col, name in ((0, a), (1, b)):
            try:
                out[k, col] = index_of[name]
            except KeyError:
                raise KeyError(f"pair list row {k}: unknown image {name!r}") from None
    return out
