"""Official-style pair lists (``IMAGE``, ``IMAGE second``, e.g. the DN-PIQA ``exp.csv``) as index pairs
into a :class:`~ray_jobs.labels.LabelTable`; images are named by file name."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
import pandas as pd

from piqa_core.losses import pairs_from_names

from .labels import LabelError, LabelTable, listed_items, read_frame, require_columns, text_cells
from .storage import S3Options

PAIR_COLUMNS = ("IMAGE", "IMAGE second")


def load_pairs(uri: str, table: LabelTable, s3: S3Options | None = None,
               known: Iterable[str] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """An official-style pair list (``IMAGE``, ``IMAGE second``, self-pairs kept) as indices into ``table``.

    Names outside ``known`` (all labelled names; default: the table's) and ``table.unused`` raise
    ``LabelError``, as does a name matching several images of ``table`` or ``known`` (a set cannot
    show repeats: pass the full table's name column). Dropped with one stderr warning, and counted in
    the returned stats: pairs with an image that is labelled but not in ``table`` (another split, or
    left out by a split list), and pairs across groups (JOD labels compare only within a scene).
    """
    df = read_frame(uri, s3)
    require_columns(df, PAIR_COLUMNS, uri, "pair list")
    known = list(known) if known is not None else None
    names = table.frame["name"].tolist()
    index = {n: i for i, n in enumerate(names)}
    a, b = ([v or "<empty>" for v in text_cells(df[c])] for c in PAIR_COLUMNS)
    used = set(a) | set(b)
    unknown = sorted(used - (set(known) if known is not None else set(index)) - table.unused)
    if unknown:
        raise LabelError(f"{uri}: " + listed_items(unknown, "image name(s) in the pair list are not labelled"))
    repeats = Counter(names) | Counter(known if known is not None else ())
    ambiguous = [f"{n}: " + ", ".join(u for u, m in zip(table.uris, names) if m == n)
                 for n in sorted(used) if repeats[n] > 1]
    if ambiguous:
        raise LabelError(f"{uri}: " + listed_items(ambiguous, "image name(s) in the pair list match several "
                                               "labelled images (pairs name images by file name)"))
    inside = [i for i in range(len(a)) if a[i] in index and b[i] in index]
    pairs = pairs_from_names([a[i] for i in inside], [b[i] for i in inside], index)
    groups = np.asarray(table.groups, dtype=object)
    same = groups[pairs[:, 0]] == groups[pairs[:, 1]]
    stats = {"rows": len(a), "kept": int(same.sum()), "dropped": len(a) - int(same.sum()),
             "outside_split": len(a) - len(inside), "cross_group": int((~same).sum())}
    if stats["dropped"]:
        print(f"warning: pair list {uri}: dropped {stats['dropped']} of {len(a)} pair(s): "
              f"{stats['outside_split']} with an image outside this split (another split, or left out by the "
              f"split lists), {stats['cross_group']} across groups (JOD labels compare only within a scene)",
              file=sys.stderr)
    return pairs[same], stats


PAIR_SCORE_COLUMNS = ("JOD", "JOD second")


def carries_scores(uri: str, s3: S3Options | None = None) -> bool:
    """Whether a pair list has the ``JOD`` and ``JOD second`` columns :func:`pair_list_scores` takes."""
    return _has_scores(read_frame(uri, s3))


def _has_scores(df: pd.DataFrame) -> bool:
    return set(PAIR_SCORE_COLUMNS) <= set(df.columns)


def pair_list_scores(uri: str, train: LabelTable,
                     s3: S3Options | None = None) -> tuple[np.ndarray, dict[str, Any]] | None:
    """The train images' scores with those a pair list carries (``JOD``, ``JOD second``) in place, as the
    official script trains on them; ``None`` when the list has no such columns.

    The official ``exp.csv``'s paths say ``Exposure\\``: its JODs need not be the overall labels, so which
    one a run trains on is a choice (``--pair-scores``). ``LabelError`` for an
    image the list scores twice differently or not as a finite number. The stats count the images it
    scores and how many differ from ``train``'s own score (``max_diff``: the largest difference).
    """
    df = read_frame(uri, s3)
    if not _has_scores(df):
        return None
    names = [v for c in PAIR_COLUMNS for v in text_cells(df[c])]
    values = np.concatenate([pd.to_numeric(df[c], errors="coerce").to_numpy(np.float64) for c in PAIR_SCORE_COLUMNS])
    index = {n: i for i, n in enumerate(train.frame["name"])}
    listed: dict[int, set[float]] = {}
    for name, value in zip(names, values):
        if name in index:
            listed.setdefault(index[name], set()).add(float(value))
    bad = [f"{train.frame['name'][i]}: {sorted(v)}" for i, v in listed.items()
           if len(v) > 1 or not np.isfinite(next(iter(v)))]
    if bad:
        raise LabelError(f"{uri}: " + listed_items(bad, "image(s) the pair list scores more than once differently "
                                                   "or not as a finite number (JOD, JOD second)"))
    scores = train.scores.astype(np.float64)
    rows = np.fromiter(listed, int, len(listed))
    new = np.array([next(iter(listed[i])) for i in rows], np.float64)
    diff = np.abs(new - scores[rows])
    scores[rows] = new
    stats = {"scored": len(rows), "differ": int((diff > 1e-5).sum()), "max_diff": float(diff.max(initial=0.0))}
    return scores.astype(np.float32), stats
