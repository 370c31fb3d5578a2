"""Image files under folders and prefixes, and URIs, each stat'ed into an ObjectInfo (manifests: inputs.py).

Local folders are walked with ``os.walk`` (symlinked folders followed, each real folder once);
remote prefixes are listed with fsspec (s3fs), whose listings carry ETags. A missing object still
becomes an entry (``size=-1``) so that it gets its error row; an unreadable folder fails the listing.
Files a prefix holds beyond :data:`IMAGE_EXTENSIONS` are left out, and counted in one warning.
"""

from __future__ import annotations

import errno
import logging
import os
import posixpath
import stat
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, Iterator

import fsspec

from .storage import S3_SCHEMES, ObjectInfo, S3Options, fsspec_filesystem, local_path, uri_scheme

log = logging.getLogger(__name__)

# The names Pillow gives the formats the decoder reads (JPEG, MPO, PNG, WEBP, BMP, TIFF, GIF). Not .dib:
# Pillow opens that as its own DIB format, which the decoder does not accept; not .heic: no decoder.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".mpo", ".png", ".apng", ".webp", ".bmp", ".tif", ".tiff",
                    ".gif")
# An audit state kept inside a library (its CURRENT pointer or IN_PROGRESS marker beside runs/, states/,
# reports/): the audit leaves it out on purpose, so its files are not photos the listing dropped. The
# names are audit.py's; importing them from there would be circular.
STATE_MARKERS = frozenset({"CURRENT", "IN_PROGRESS"})
STATE_FOLDERS = ("runs/", "states/", "reports/")
# Windows writes these into photo folders; warning about them on every listing would bury the real news.
SYSTEM_FILES = frozenset({"thumbs.db", "desktop.ini"})
LEFT_OUT_EXAMPLES = 3
# etag_or_mtime of a local file whose path is not UTF-8: the only listing column that reaches the read
# stage unchanged, so that the read stage records the error instead of reading the printable URI.
NAME_NOT_UTF8 = "name-not-utf8"


# The reasons stat_each gives for an object that is missing, rather than one it could not check.
MISSING = (FileNotFoundError, NotADirectoryError)


class ListingError(OSError):
    """A folder under a listed prefix could not be read: the listing fails rather than drop its files
    (the audit would record them as deleted)."""


def _remote_version(info: dict[str, Any]) -> str:
    """ETag (quotes stripped) when the listing has one, else the modification time in UTC."""
    for key in ("ETag", "etag", "md5Hash"):
        if info.get(key):
            return str(info[key]).strip('"')
    for key in ("LastModified", "last_modified", "mtime", "updated", "created"):
        v = info.get(key)
        if isinstance(v, datetime):
            return v.astimezone(timezone.utc).isoformat()
        if isinstance(v, (int, float)):
            return datetime.fromtimestamp(v, timezone.utc).isoformat()
        if v:
            return str(v)
    return ""


def _printable(path: str) -> str:
    """``path`` with the bytes of a non-UTF-8 name as ``\\xNN`` (Arrow strings must be UTF-8)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _local_info(path: str) -> ObjectInfo:
    """Size and mtime; ``size=-1`` when the file vanished after the walk saw it, is a dangling link or
    cannot be stat'ed (a link to itself), so it still gets its row: the read stage records the error."""
    if _printable(path) != path:
        return ObjectInfo(_printable(path), -1, NAME_NOT_UTF8)
    try:
        st = os.stat(path)
    except OSError:
        return ObjectInfo(path, -1, "")
    return ObjectInfo(path, st.st_size, str(st.st_mtime_ns))


def _remote_info(fs: fsspec.AbstractFileSystem, scheme: str, path: str, info: dict) -> ObjectInfo:
    uri = f"{scheme}://{path}" if scheme in S3_SCHEMES else fs.unstrip_protocol(path)
    return ObjectInfo(uri, int(info.get("size") or 0), _remote_version(info))


def _walk_files(top: str, recursive: bool) -> Iterator[str]:
    """Files under a local folder. Symlinked folders are followed like symlinked files, each real folder
    once (a link loop ends there): under its path without a symlink when it lies under ``top``, else
    under the first link to it in sorted order. An unreadable folder raises :class:`ListingError`."""
    def fail(e: OSError) -> None:
        if isinstance(e, FileNotFoundError) and e.filename != top:
            return  # deleted since its parent was listed: its files are gone too
        raise ListingError(f"cannot list folder {_printable(e.filename or top)}: {e.strerror or e}") from e

    real_top = os.path.join(os.path.realpath(top), "")
    seen: set[tuple[int, int]] = set()
    links: list[str] = []

    def walk(start: str, via_link: bool) -> Iterator[str]:
        for folder, dirs, files in os.walk(start, onerror=fail, followlinks=via_link):
            try:
                st = os.stat(folder)
            except FileNotFoundError:
                continue
            # A folder under top reached through a link is listed under its own path by the first walk.
            if (st.st_dev, st.st_ino) in seen or (
                    via_link and os.path.join(os.path.realpath(folder), "").startswith(real_top)):
                dirs.clear()
                continue
            seen.add((st.st_dev, st.st_ino))
            dirs.sort()  # which of two links to one folder is listed must not depend on the disk's order
            if not recursive:
                dirs.clear()
            elif not via_link:
                links.extend(p for p in (os.path.join(folder, d) for d in dirs) if os.path.islink(p))
            yield from (os.path.join(folder, f) for f in files)

    # Links last: a new link to an album (say 0_favorites, sorted first) must not move its files to new
    # URIs. Sorted by path components, the links' folders are claimed in the order one walk met them.
    yield from walk(top, False)
    for link in sorted(links, key=lambda p: p.split(os.sep)):
        yield from walk(link, True)


def _remote_files(fs: fsspec.AbstractFileSystem, path: str, recursive: bool) -> dict[str, dict]:
    """Files under ``path`` (or the object itself), one ``ls`` per folder; a folder that cannot be
    listed raises."""
    found: dict[str, dict] = {}
    folders, seen = [path], set()
    while folders:
        folder = folders.pop()
        seen.add(folder)
        for info in fs.ls(folder, detail=True):
            name = info["name"].rstrip("/")
            if info["type"] != "directory" and info["name"].endswith("/"):
                continue  # an empty "folder" marker object ("lib/"), not a file named "lib"
            if info["type"] != "directory":
                found[name] = info
            elif recursive and name not in seen:
                folders.append(name)
    return found


def _photos_among(rels: list[str]) -> list[str]:
    """Of the paths (relative to the listed prefix, ``/``-separated) that the extension filter left out,
    those a user may miss: not hidden or ``_``-prefixed (``.DS_Store``, temp files, ``_SUCCESS``,
    ``__MACOSX/``), no Windows system file, not in an audit state."""
    states = {posixpath.dirname(r) for r in rels if posixpath.basename(r) in STATE_MARKERS}

    def in_state(rel: str) -> bool:
        for state in states:
            inner = rel[len(state) + 1:] if state else rel
            if (not state or rel.startswith(state + "/")) and (
                    inner in STATE_MARKERS or inner.startswith(STATE_FOLDERS)):
                return True
        return False

    return [r for r in rels
            if not any(part.startswith((".", "_")) for part in r.split("/"))
            and posixpath.basename(r).lower() not in SYSTEM_FILES and not in_state(r)]


def _warn_left_out(prefix_uri: str, rels: list[str], exts: tuple[str, ...]) -> None:
    """Log once how many files of ``prefix_uri`` were left out for their extension, naming a few."""
    photos = sorted(_printable(r) for r in _photos_among(rels))
    if photos:
        more = ", …" if len(photos) > LEFT_OUT_EXAMPLES else ""
        log.warning("%s: left out %d file(s) that are not images by extension (%s%s); the extensions scored: %s",
                    prefix_uri, len(photos), ", ".join(photos[:LEFT_OUT_EXAMPLES]), more, " ".join(exts))


def list_images(
    prefix_uri: str,
    s3: S3Options | None = None,
    extensions: Iterable[str] | None = IMAGE_EXTENSIONS,
    recursive: bool = True,
) -> list[ObjectInfo]:
    """Files under a prefix (or one named object), sorted by URI; zero-byte files are kept.

    ``extensions`` is a case-insensitive suffix filter (``None`` = every file); an object named
    directly is returned whatever its extension. The files it leaves out are counted in one warning
    (hidden ones, ``_``-prefixed ones and an audit state's files excepted). A missing prefix raises
    FileNotFoundError, an unreadable local folder :class:`ListingError`.
    """
    exts = tuple("." + e.lower().lstrip(".") for e in extensions) if extensions is not None else ()
    left_out: list[str] = []  # relative paths, "/"-separated

    def keep(name: str, rel: Callable[[], str]) -> bool:
        if extensions is None or name.lower().endswith(exts):
            return True
        left_out.append(rel())
        return False

    local = local_path(prefix_uri)
    if local is not None:
        # A file, or one that is there but no folder (a FIFO, a socket): one row, whose read says what
        # it is. A path that leads nowhere (a typo, a dangling link to an unmounted volume) is refused.
        try:
            is_folder = stat.S_ISDIR(os.stat(local).st_mode)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ListingError(errno.ELOOP, "a symbolic link that leads back to itself", prefix_uri) from None
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", prefix_uri) from None
        if not is_folder:
            return [_local_info(local)]
        out = [_local_info(p) for p in _walk_files(local, recursive)
               if keep(os.path.basename(p), lambda p=p: os.path.relpath(p, local).replace(os.sep, "/"))]
    else:
        scheme, fs = uri_scheme(prefix_uri), fsspec_filesystem(prefix_uri, s3)
        path = fs._strip_protocol(prefix_uri).rstrip("/")
        try:
            # s3fs lists a whole prefix in one flat, paginated listing that raises on errors; other
            # finds walk folders with fsspec's walk, which drops errors below the top folder.
            found = (fs.find(path, detail=True) if recursive and scheme in S3_SCHEMES
                     else _remote_files(fs, path, recursive))
            if not found and not fs.exists(path):
                raise FileNotFoundError(path)
        except FileNotFoundError as e:  # also raised by s3fs for a missing bucket
            raise FileNotFoundError(errno.ENOENT, "No such object or prefix", prefix_uri) from e
        if list(found) == [path]:  # the URI names one object (fsspec's find may omit details)
            return [_remote_info(fs, scheme, path, fs.info(path))]
        out = [
            _remote_info(fs, scheme, name, info)
            for name, info in found.items()
            if info.get("type") == "file" and not name.endswith("/")
            and keep(name, lambda name=name: name[len(path):].lstrip("/"))
        ]
    _warn_left_out(prefix_uri, left_out, exts)
    return sorted(out, key=lambda o: o.uri)


def stat_each(uris: Iterable[str], s3: S3Options | None = None) -> list[tuple[ObjectInfo, Exception | None]]:
    """Stat each URI in order: its ObjectInfo and, where that has ``size=-1``, why (else ``None``).

    The reason is one of :data:`MISSING` for an object that is missing or is no file (a folder, a
    prefix). Anything else says nothing of the object: access denied (S3 answers 403 even for a
    missing key without ListBucket permission), an unreachable endpoint, an unknown scheme, a missing
    fsspec backend. Remote HEADs run 16 at a time.
    """
    fss: dict[str, fsspec.AbstractFileSystem | Exception] = {}

    def not_a_file(uri: str) -> FileNotFoundError:
        return FileNotFoundError(errno.ENOENT, "No such file (or not a file)", uri)

    def one(uri: str) -> tuple[ObjectInfo, Exception | None]:
        local = local_path(uri)
        try:
            if local is not None:
                if os.path.isfile(local):
                    info = _local_info(local)
                    if info.etag_or_mtime == NAME_NOT_UTF8:
                        return info, ValueError(f"{info.uri}: the file name is not UTF-8")
                    return info, None if info.size >= 0 else not_a_file(local)  # gone since isfile
                os.stat(local)  # raises the real error: missing, or a folder it may not enter
                return ObjectInfo(local, -1, ""), not_a_file(local)
            fs = fss[uri_scheme(uri)]
            if isinstance(fs, Exception):
                return ObjectInfo(uri, -1, ""), fs
            path = fs._strip_protocol(uri)
            info = fs.info(path)
            if info.get("type") != "file":
                return ObjectInfo(uri, -1, ""), not_a_file(uri)
            return _remote_info(fs, uri_scheme(uri), path, info), None
        except Exception as e:  # noqa: BLE001 - one bad entry must not fail the listing
            return ObjectInfo(local or uri, -1, ""), e

    uris = list(uris)
    for u in uris:
        if local_path(u) is None and uri_scheme(u) not in fss:
            try:
                fss[uri_scheme(u)] = fsspec_filesystem(u, s3)
            except Exception as e:  # noqa: BLE001 - e.g. htps://, gs:// without gcsfs
                fss[uri_scheme(u)] = e
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, uris))


def stat_objects(uris: Iterable[str], s3: S3Options | None = None) -> list[ObjectInfo]:
    """:func:`stat_each` without the reasons: every object that cannot be stat'ed, missing or not, gets
    ``size=-1`` (still a row), and the read step later records the real error in that row."""
    return [info for info, _ in stat_each(uris, s3)]
