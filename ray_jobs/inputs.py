"""What a job's INPUTS name: folders and prefixes (:func:`~ray_jobs.listing.list_images`) or manifest files
of URIs (.txt, .csv, .parquet), each object once (:func:`list_inputs`)."""

from __future__ import annotations

import csv
import errno
import io
import logging
import os
from typing import Iterable

from .listing import IMAGE_EXTENSIONS, list_images, stat_objects
from .storage import ObjectInfo, S3Options, is_dir, local_path, mistyped_scheme, read_bytes, resolve

log = logging.getLogger(__name__)

# CSV header names of the URI column, in order of preference; other header rows are read as data.
URI_COLUMNS = ("uri", "url", "path", "image path", "image_path", "key", "file", "filename", "file_name",
               "filepath", "image")


def list_inputs(
    inputs: str | Iterable[str], s3: S3Options | None = None, manifest: bool = False
) -> list[ObjectInfo]:
    """Objects of several prefixes (:func:`list_images`) or manifests (:func:`read_manifest` +
    :func:`stat_objects`), in input order, each URI once (first occurrence wins)."""
    out: dict[str, ObjectInfo] = {}
    named = 0
    for item in [inputs] if isinstance(inputs, str) else inputs:
        infos = stat_objects(read_manifest(item, s3), s3) if manifest else list_images(item, s3)
        named += len(infos)
        for info in infos:
            out.setdefault(info.uri, info)
    if named > len(out):  # a folder and one inside it, a photo named twice: one row each, said once
        log.warning("%d of the %d objects the inputs list were listed by more than one input: each is scored once",
                    named - len(out), named)
    return list(out.values())


def _manifest_entries(uri: str, s3: S3Options | None) -> list[str]:
    name = uri.lower().rstrip("/")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        import pyarrow as pa

        fs, path = resolve(uri, s3)
        with fs.open_input_file(path) as f:
            try:
                pf = pq.ParquetFile(f)
            except pa.ArrowInvalid as e:
                raise ValueError(f"{uri}: not a readable Parquet manifest ({e})") from None
            if "uri" not in pf.schema_arrow.names:
                raise ValueError(f"{uri}: parquet manifest has no 'uri' column")
            cells = ["" if v is None else str(v) for v in pf.read(columns=["uri"]).column("uri").to_pylist()]
            return _kept(uri, cells, strip=False)  # as written: a key may start or end with a space
    try:
        text = read_bytes(uri, s3).decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{uri}: a manifest is UTF-8 text ({e})") from None
    if name.endswith(".csv"):
        try:
            rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        except csv.Error as e:  # e.g. a field over the csv module's 128 KiB limit
            raise ValueError(f"{uri}: not a readable CSV manifest ({e})") from None
        if not rows:
            return []
        # Row 1 is a header only when it names the URI column and holds nothing like an entry: a guess
        # would drop an entry like IMG_0001, and "shots/a.jpg,image" is a photo with a label.
        header = [c.strip().lower() for c in rows[0]]
        entry_like = any("://" in c or c.endswith(IMAGE_EXTENSIONS) for c in header)
        names = [n for n in URI_COLUMNS if n in header] if not entry_like else []
        col = header.index(names[0]) if names else 0
        return _kept(uri, [r[col] if len(r) > col else "" for r in rows[1 if names else 0 :]])
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _kept(uri: str, cells: list[str], strip: bool = True) -> list[str]:
    """A table manifest's URI cells (stripped, unless ``strip`` is False); empty ones (a row with other cells
    filled) are counted in a warning."""
    kept = [c.strip() if strip else c for c in cells if (c.strip() if strip else c)]
    if len(kept) < len(cells):
        log.warning("%s: %d row(s) with an empty URI cell skipped", uri, len(cells) - len(kept))
    return kept


def read_manifest(uri: str, s3: S3Options | None = None) -> list[str]:
    """URIs from a .txt (one per line, ``#`` comments), .csv or .parquet manifest.

    Parquet uses column ``uri``; CSV the column a header row names (``uri``, else one of
    :data:`URI_COLUMNS`; a row holding a photo name or URI is no header), without such a header the
    first column of every row. Relative entries are
    resolved against the manifest's directory, ``file:`` entries become plain paths, duplicates are
    dropped keeping the first occurrence. Use :func:`stat_objects` on the result. Entries written a
    slash short (``s3:/b/x.jpg``) refuse the manifest: taken as relative paths they would all be
    ``not_found`` rows.
    """
    if is_dir(uri, s3):
        raise IsADirectoryError(errno.EISDIR, "a manifest is a .txt, .csv or .parquet file, not a folder", uri)
    out: list[str] = []
    seen: set[str] = set()
    local_manifest = local_path(uri)
    entries = _manifest_entries(uri, s3)
    if typos := [e for e in entries if mistyped_scheme(e)]:
        raise ValueError(f"{uri}: {len(typos)} of {len(entries)} entries look like URIs a slash short "
                         f"(first: {typos[0]!r}); write {mistyped_scheme(typos[0])}://…")
    for entry in entries:
        if "://" in entry or entry.startswith("file:") or os.path.isabs(entry):
            resolved = local_path(entry) or entry
        elif local_manifest is not None:
            resolved = os.path.normpath(os.path.join(os.path.dirname(local_manifest), entry))
        else:
            scheme, key = uri.split("://", 1)
            resolved = f"{scheme}://{object_key(key.rsplit('/', 1)[0], entry, uri)}"
        if resolved not in seen:
            seen.add(resolved)
            out.append(resolved)
    if len(out) < len(entries):
        log.warning("%s: %d entr(ies) naming an object already listed skipped (each object is scored once)",
                    uri, len(entries) - len(out))
    return out


def object_key(folder: str, entry: str, manifest: str) -> str:
    """``entry`` (relative, written in the file ``manifest``) under ``folder`` (``bucket/prefix``): ``.`` and
    ``..`` resolved, other segments kept as written, empty ones too (an S3 key may hold ``//``: collapsing it
    names another object); ValueError for an entry that climbs above the bucket."""
    parts = folder.split("/")
    for segment in entry.split("/"):
        if segment == "..":
            if len(parts) == 1:
                raise ValueError(f"{manifest}: entry {entry!r} climbs above the bucket {parts[0]!r}")
            parts.pop()
        elif segment != ".":
            parts.append(segment)
    return "/".join(parts)
