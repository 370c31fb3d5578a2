"""Training labels: one row per image with ``uri, score, group, split`` (and ``name`` for pair lists).

Two sources:

* **PIQ23** (``--format piq23``): the dataset CSV (``IMAGE PATH, IMAGE, JOD, SCENE, …``) plus an image
  root; label = JOD, group = SCENE, uri = root / IMAGE PATH (Windows ``\\`` separators accepted). The
  root defaults to the CSV's directory; a relative local ``--images`` is taken from the current
  directory. Splits come from official split files (``ntire24_overall_scene_train.csv`` /
  ``_test.csv``: any CSV with an ``IMAGE`` column, or a text list of names) or from a ``split`` column.
* **A generic table** (``--format table``): CSV/Parquet with ``uri, score, group[, split]``; relative
  uris are resolved against the table's own directory.

Local image paths are absolute after loading (Ray Train workers run in another working directory).
Every row needs a uri, a finite score and a non-empty group; ``LabelError`` lists the offending rows
(0-based data rows of the label file).

Pair lists (``ray_jobs.pairs.load_pairs``) name images by file name: a name that matches several
images is an error; pairs across groups are dropped with a warning, since JOD labels compare only
within a scene.

Validation split: when the labels name none, ``with_validation`` holds out a deterministic fraction of
the items **within every group** of the train split, by a hash of the seed and each label's ``key``: its
image path as the label file writes it (PIQ23's ``IMAGE PATH``, a table's ``uri`` cell), so the choice
depends neither on row order nor on where the images are stored (``--images``, a copied bucket).
Within-group rather than whole-group hold-out keeps every scene represented
in validation; JOD labels are only comparable inside a scene, so a held-out scene would test a
different thing (use a split file for that). Groups that would keep fewer than 2 training items stay
all-train.
"""

from __future__ import annotations

import hashlib
import io
import os
import posixpath
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd

from .inputs import object_key
from .listing import MISSING, stat_each
from .storage import S3Options, join, local_path, read_bytes

SPLITS = ("train", "val", "test")
# What the validation hold-out hashes: "path", the label's own image path; "uri", the resolved uri (an
# image root moved elsewhere yields another split), which runs recorded before the choice existed used.
HOLDOUT_KEYS = ("path", "uri")
PIQ23_REQUIRED = ("IMAGE PATH", "IMAGE", "JOD", "SCENE")
TABLE_REQUIRED = ("uri", "score", "group")
_TEXT_COLUMNS = ("IMAGE", "IMAGE second", "IMAGE PATH", "SCENE", "uri", "group", "split")
_SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


class LabelError(ValueError):
    """Labels are malformed or reference images that do not exist; the message lists what."""


def listed_items(items: list[str], what: str, limit: int = 10) -> str:
    shown = "\n  ".join(items[:limit])
    more = f"\n  … and {len(items) - limit} more" if len(items) > limit else ""
    return f"{len(items)} {what}:\n  {shown}{more}"


def read_frame(uri: str, s3: S3Options | None = None) -> pd.DataFrame:
    """A CSV (utf-8, BOM tolerated) or Parquet file as a DataFrame of strings/numbers."""
    data = read_bytes(uri, s3)
    if uri.lower().endswith(".parquet"):
        return pd.read_parquet(io.BytesIO(data))
    # Names and group codes as written: inferred numbers would make scenes "07" and "7" one group, and
    # pandas' missing-value words would make a scene or file named "NA" or "None" a row without one.
    # Only blank cells are missing; a score cell that is not a number is refused as written.
    return pd.read_csv(io.StringIO(_utf8(data, uri)), dtype=dict.fromkeys(_TEXT_COLUMNS, str), keep_default_na=False)


def _utf8(data: bytes, uri: str) -> str:
    """A label or list file's text (a BOM tolerated); another encoding is refused naming the file."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        utf16 = " (it is UTF-16, e.g. Excel's \"Unicode Text\")" if data[:2] in (b"\xff\xfe", b"\xfe\xff") else ""
        raise LabelError(f"{uri}: not UTF-8 text{utf16}: byte {e.start} ({data[e.start:e.start + 1]!r}) is "
                         "invalid; save the file as UTF-8 (Excel: \"CSV UTF-8\")") from None


def require_columns(df: pd.DataFrame, columns: tuple[str, ...], uri: str, fmt: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise LabelError(f"{uri}: missing column(s) {missing} for the {fmt} format "
                         f"(needs {list(columns)}; found {list(df.columns)})")


def text_cells(col: pd.Series) -> list[str | None]:
    """Cells as strings; missing or blank ones as ``None`` (pandas 2 turns NaN into "nan" in ``astype(str)``)."""
    return [None if pd.isna(v) or not str(v).strip() else str(v) for v in col]


def _groups(col: pd.Series) -> list[str | None]:
    """Scene/group cells without surrounding blanks: ``"s1 "`` and ``"s1"`` are one scene, whose photos pair."""
    return [v and v.strip() for v in text_cells(col)]


def _blank(col: pd.Series) -> np.ndarray:
    # pandas 3 keeps NaN through astype(str), pandas 2 does not: test isna first.
    return (col.isna() | col.astype(str).str.strip().eq("")).to_numpy(bool)


def normalise_local(uri: str) -> str:
    """A local path or ``file:`` URI as one absolute path (``/x/img//p.jpg``, ``file:///x/img/p.jpg`` ->
    ``/x/img/p.jpg``), for the duplicate check only: the table keeps each uri as written, since the
    validation hold-out and the feature cache key on it. Other URIs stay as written (an S3 key may hold
    ``//`` or ``..``: collapsing them names another object)."""
    try:
        path = local_path(uri)
    except ValueError:  # a mistyped scheme ("s3:/b/x"): not a path to compare
        return uri
    if path is None:
        return uri
    # POSIX normpath keeps a leading "//" (implementation-defined), but on Linux and macOS it is "/".
    return "/" + path.lstrip("/") if os.name == "posix" and path.startswith("//") else path


def resolve_relative(entry: str, base_uri: str) -> str:
    """An absolute path / URI stays; a relative one is taken relative to ``base_uri``'s directory."""
    if "://" in entry or os.path.isabs(entry):
        return entry
    if "://" in base_uri:
        scheme, key = base_uri.split("://", 1)
        try:  # as a manifest's entries: "../x" never names another bucket, "a//b.jpg" stays that key
            return f"{scheme}://{object_key(key.rsplit('/', 1)[0], entry, base_uri).rstrip('/')}"
        except ValueError as e:
            raise LabelError(str(e)) from None
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(base_uri)), entry))


def _split_names(uri: str, s3: S3Options | None) -> set[str]:
    """Image names of an official split file: its ``IMAGE`` column, else one name per line."""
    if uri.lower().endswith((".csv", ".parquet")):
        df = read_frame(uri, s3)
        col = "IMAGE" if "IMAGE" in df.columns else ("uri" if "uri" in df.columns else None)
        if col is None:
            raise LabelError(f"{uri}: a split file needs an 'IMAGE' (or 'uri') column; found {list(df.columns)}")
        entries = [v for v in text_cells(df[col]) if v is not None]
    else:
        entries = [ln for ln in map(str.strip, _utf8(read_bytes(uri, s3), uri).splitlines())
                   if ln and not ln.startswith("#")]
    # By file name, as the official split files list images ("S1\\a.jpg" is a.jpg), however the list is written.
    return {posixpath.basename(v.strip().replace("\\", "/")) for v in entries}


def _row(f: pd.DataFrame, k: int) -> str:
    r = f.iloc[k]
    uri, score, group = ("<empty>" if pd.isna(v) or not str(v).strip() else v
                         for v in (r["uri"], r["score"], r["group"]))
    return f"row {f.index[k]}: uri {uri}, score {score}, group {group}"


@dataclass
class LabelTable:
    """Columns ``uri, score, group, split, name`` (name = image file name, used by pair lists), ``key``
    (the image path as the label file writes it, which the validation hold-out hashes), plus ``size,
    version`` once :meth:`check_images` has run.

    ``unused``: names of labelled images that the official split lists left out of the table.
    """

    frame: pd.DataFrame
    source: str = ""
    unused: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        # Checked before the index reset: after split lists drop rows, the index is still the file's row.
        f = self.frame
        no_split = _blank(f["split"])
        bad = sorted(set(f["split"][~no_split]) - set(SPLITS), key=str)
        if bad:
            raise LabelError(f"{self.source}: unknown split value(s) {bad}; use {list(SPLITS)}")
        no_uri = _blank(f["uri"])
        score = pd.to_numeric(f["score"], errors="coerce").to_numpy(np.float64)
        checks = ((no_uri, "row(s) without an image uri"),
                  (~np.isfinite(score), "row(s) without a finite score (missing, inf or -inf)"),
                  (_blank(f["group"]), "row(s) without a group (scene)"))
        problems = [listed_items([_row(f, k) for k in np.flatnonzero(mask)], what)
                    for mask, what in checks if mask.any()]
        if no_split.any():  # not defaulted: a blank cell may be a test image that must not train
            problems.append("blank split value in " + listed_items([_row(f, k) for k in np.flatnonzero(no_split)],
                                                              f"row(s) (use {list(SPLITS)})"))
        # Compared normalised, listed as written: "/d/a.jpg" and "file:///d/a.jpg" hash apart in the hold-out.
        first: dict[str, str] = {}
        dup = []
        for u in f["uri"][~no_uri].astype(str):
            k = normalise_local(u)
            if k in first:
                dup.append(u if first[k] == u else f"{u} (the same file as {first[k]})")
            first.setdefault(k, u)
        if dup:
            problems.append(listed_items(dup, "duplicated image uri(s)"))
        if problems:
            raise LabelError(f"{self.source}: " + "\n".join(problems))
        # Converted only now, so the rows listed above show a score cell as written ("3,5", not nan).
        self.frame = f.assign(score=score).reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def uris(self) -> list[str]:
        return self.frame["uri"].tolist()

    @property
    def scores(self) -> np.ndarray:
        return self.frame["score"].to_numpy(np.float32)

    @property
    def groups(self) -> list[str]:
        return self.frame["group"].astype(str).tolist()

    def subset(self, split: str) -> "LabelTable":
        return LabelTable(self.frame[self.frame["split"] == split].copy(), self.source, self.unused)

    def with_validation(self, fraction: float = 0.2, seed: int = 0, holdout_key: str = "path") -> "LabelTable":
        """Hold out ``fraction`` of each group's train items as ``val`` (no-op if a val split exists), chosen
        by the hash of ``holdout_key`` (one of :data:`HOLDOUT_KEYS`; a frame without ``key`` uses the uri)."""
        if holdout_key not in HOLDOUT_KEYS:
            raise LabelError(f"unknown hold-out key {holdout_key!r}; use one of {list(HOLDOUT_KEYS)}")
        if (self.frame["split"] == "val").any() or fraction <= 0:
            return self
        df = self.frame.copy()
        named = df["key"] if holdout_key == "path" and "key" in df else df["uri"]
        key = named.map(lambda u: hashlib.sha1(f"{seed}:{u}".encode()).hexdigest())
        for _, members in df[df["split"] == "train"].groupby("group", sort=False):
            n = len(members)
            k = min(int(np.floor(fraction * n + 0.5)), n - 2)
            if k > 0:
                df.loc[key[members.index].sort_values().index[:k], "split"] = "val"
        return LabelTable(df, self.source, self.unused)

    def check_images(self, s3: S3Options | None = None) -> None:
        """Raise ``LabelError`` listing every image that does not exist, and counting those that could not
        be checked (access denied, an unreachable endpoint: the first error shown); else record each one's
        ``size`` and ``version`` (ETag or mtime) columns, which with the uri tell one upload from the next."""
        uris = list(self.uris)
        checked = stat_each(uris[:1], s3)  # a wrong endpoint or credentials: said now, not after every retry
        if checked and (e := checked[0][1]) is not None and not isinstance(e, MISSING):
            raise LabelError(f"{self.source}: cannot check the labelled images: {type(e).__name__}: {e} "
                             f"(for {uris[0]})")
        checked += stat_each(uris[1:], s3)
        infos = [o for o, _ in checked]
        failed = [(o.uri, e) for o, e in checked if e is not None and not isinstance(e, MISSING)]
        # Quoted where blanks start or end it: "imgs/b.jpg " shown bare reads as a file that exists.
        missing = [repr(o.uri) if o.uri != o.uri.strip() else o.uri for o, e in checked if isinstance(e, MISSING)]
        problems = [f"cannot check {len(failed)} of {len(self)} labelled images: {type(e).__name__}: {e} "
                    f"(for {uri})" for uri, e in failed[:1]]
        if missing:
            problems.append(listed_items(missing, f"of {len(self)} labelled images not found"))
        if problems:
            raise LabelError(f"{self.source}: " + "\n".join(problems))
        self.frame["size"] = np.array([o.size for o in infos], np.int64)
        self.frame["version"] = [o.etag_or_mtime for o in infos]

    def describe(self) -> str:
        parts = []
        for s in SPLITS:
            sub = self.frame[self.frame["split"] == s]
            parts.append(f"{s} {len(sub)} ({sub['group'].nunique()} groups)")
        unused = f"; {len(self.unused)} more on neither split list (not used)" if self.unused else ""
        return f"{len(self)} labelled images in {self.frame['group'].nunique()} groups: " + ", ".join(parts) + unused


def from_piq23(csv_uri: str, images: str | None = None, train_list: str | None = None,
               test_list: str | None = None, s3: S3Options | None = None) -> LabelTable:
    """PIQ23 CSV + image root (default: the CSV's directory) + optional official split files."""
    df = read_frame(csv_uri, s3)
    require_columns(df, PIQ23_REQUIRED, csv_uri, "PIQ23")
    root = (local_path(images) or images) if images else resolve_relative(".", csv_uri)
    rel = [p and p.replace("\\", "/").lstrip("/") for p in text_cells(df["IMAGE PATH"])]
    out = pd.DataFrame({"uri": [p and join(root, p) for p in rel], "key": rel,
                        "score": df["JOD"], "group": _groups(df["SCENE"]),
                        "name": [n or (p and posixpath.basename(p)) for n, p in zip(text_cells(df["IMAGE"]), rel)]})
    unused: frozenset[str] = frozenset()
    if train_list or test_list:
        out["split"] = _split_from_lists(out["name"], train_list, test_list, s3)
        unused = frozenset(out["name"][out["split"] == ""].dropna())
        out = out[out["split"] != ""]
    else:
        out["split"] = _split_column(df)
    return LabelTable(out, csv_uri, unused)


def _split_from_lists(names: pd.Series, train_list: str | None, test_list: str | None,
                      s3: S3Options | None) -> list[str]:
    lists = {s: _split_names(u, s3) for s, u in (("train", train_list), ("test", test_list)) if u}
    known = set(names)
    for s, listed in lists.items():
        unknown = sorted(listed - known)
        if unknown:
            raise LabelError(f"{train_list if s == 'train' else test_list}: " +
                             listed_items(unknown, "listed image(s) not in the labels"))
    counts = Counter(names.dropna())
    several = sorted({f"{n} ({counts[n]} labelled images)"
                      for listed in lists.values() for n in listed if counts[n] > 1})
    if several:  # a list names images by file name: it cannot say which of them it meant
        raise LabelError(listed_items(several, "split-list name(s) matching several labelled images")
                         + "\nsplit lists name images by file name: give the labels unique IMAGE names, or use a "
                         "table with a split column")
    both = sorted(lists.get("train", set()) & lists.get("test", set()))
    if both:
        raise LabelError(listed_items(both, "image(s) listed in both the train and the test split"))
    # With only a test list, everything else trains (and vice versa: unlisted images are unused).
    default = "train" if "train" not in lists else ""
    return ["train" if n in lists.get("train", ()) else "test" if n in lists.get("test", ()) else default
            for n in names]


def _split_column(df: pd.DataFrame) -> list[str] | str:
    col = next((c for c in df.columns if c.lower() == "split"), None)
    if col is None:
        return "train"
    return [v and _SPLIT_ALIASES.get(v.strip().lower(), v.strip().lower()) for v in text_cells(df[col])]


def from_table(uri: str, s3: S3Options | None = None) -> LabelTable:
    """A generic ``uri, score, group[, split]`` CSV/Parquet; relative uris resolve against its folder."""
    df = read_frame(uri, s3)
    require_columns(df, TABLE_REQUIRED, uri, "table")
    cells = text_cells(df["uri"])
    uris = [u and resolve_relative(u, uri) for u in cells]
    out = pd.DataFrame({"uri": uris, "key": cells, "score": df["score"],
                        "group": _groups(df["group"]), "name": [u and posixpath.basename(u) for u in uris],
                        "split": _split_column(df)})
    return LabelTable(out, uri)


def load_labels(labels: str, images: str | None = None, fmt: str = "auto", train_list: str | None = None,
                test_list: str | None = None, val_fraction: float = 0.2, seed: int = 0,
                s3: S3Options | None = None, check_images: bool = True, holdout_key: str = "path") -> LabelTable:
    """Read labels in either format (``auto`` detects PIQ23 by its columns), add val, check images.

    A local ``labels`` is taken as one absolute path first (``file:`` URI, ``~``, relative): the
    uris resolved against its folder, which ``holdout_key="uri"`` hashes, are then the same however it
    is spelled (``piqa train`` and ``piqa eval --split val`` must agree on the split).
    """
    try:
        labels = local_path(labels) or labels
    except ValueError as e:  # a mistyped scheme
        raise LabelError(str(e)) from None
    if fmt == "auto":
        head = read_frame(labels, s3).columns
        fmt = "piq23" if {"IMAGE PATH", "JOD"} <= set(head) else "table"
    if fmt == "piq23":
        table = from_piq23(labels, images, train_list, test_list, s3)
    elif fmt == "table":
        if train_list or test_list or images:
            raise LabelError("--images / --train-list / --test-list apply to the PIQ23 format only; "
                             "a generic table carries its own uris and split column")
        table = from_table(labels, s3)
    else:
        raise LabelError(f"unknown label format {fmt!r}; use piq23, table or auto")
    if len(table) == 0:
        raise LabelError(f"{labels}: no labelled images (after applying the split lists)")
    table = table.with_validation(val_fraction, seed, holdout_key)
    if check_images:
        table.check_images(s3)
    return table
