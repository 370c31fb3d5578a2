"""Object-storage IO: URI -> filesystem, listing, manifests, bytes in and out.

Local paths (plain or ``file://``) -> pyarrow LocalFileSystem; ``s3://`` -> pyarrow S3FileSystem
with the endpoint always passed explicitly (some pyarrow versions ignore ``AWS_ENDPOINT_URL``;
pyarrow does not follow region redirects: set ``AWS_REGION`` outside us-east-1); other fsspec URLs
(gs://, az://, memory://) -> ``PyFileSystem(FSSpecHandler)``. Remote listings/stats use fsspec
(s3fs), whose listings carry ETags (pyarrow's FileInfo has none). Credentials come from
:class:`S3Options` or the standard AWS chain, and are never logged.
"""

from __future__ import annotations

import csv
import errno
import io
import os
import posixpath
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Iterable
from urllib.parse import unquote, urlparse

import fsspec
import pyarrow.fs as pafs

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")
_S3_SCHEMES = ("s3", "s3a", "s3n")


@dataclass(repr=False)
class S3Options:
    """S3-compatible storage settings. ``None`` fields: endpoint/region from the environment
    (:meth:`from_env`), credentials from the standard AWS chain."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    session_token: str | None = None
    anonymous: bool | None = None

    @classmethod
    def from_env(cls) -> S3Options:
        """Endpoint and region from the environment; credentials stay with the AWS chain."""
        env = os.environ
        return cls(
            endpoint_url=env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        )

    def __repr__(self) -> str:
        secret = ("access_key", "secret_key", "session_token")
        fields = ", ".join(
            f"{k}={'***' if k in secret and v is not None else repr(v)}"
            for k, v in vars(self).items()
        )
        return f"S3Options({fields})"

    __str__ = __repr__

    def filled(self) -> S3Options:
        """A copy whose unset endpoint/region come from the environment, so that pyarrow (which
        may ignore ``AWS_ENDPOINT_URL``) and s3fs (which honours it) always agree."""
        env = S3Options.from_env()
        return replace(self, endpoint_url=self.endpoint_url or env.endpoint_url,
                       region=self.region or env.region)


@dataclass
class ObjectInfo:
    """One listed/stat'ed object. ``size == -1`` marks a missing object (it still becomes a row)."""

    uri: str
    size: int
    etag_or_mtime: str


class ObjectTooLarge(ValueError):
    """The object is larger than the caller's ``max_bytes``."""

    def __init__(self, uri: str, size: int, max_bytes: int):
        super().__init__(f"{uri}: {size} bytes exceeds the limit of {max_bytes} bytes")
        self.uri, self.size, self.max_bytes = uri, size, max_bytes


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def local_path(uri: str) -> str | None:
    """Absolute local path for a plain path or ``file:`` URI, else ``None``."""
    if uri.startswith("file:"):
        return os.path.abspath(unquote(urlparse(uri).path))
    if "://" in uri:
        return None
    return os.path.abspath(os.path.expanduser(uri))


def join(uri: str, *parts: str) -> str:
    """Join path segments onto a local path or a ``scheme://`` URI."""
    parts = tuple(p.strip("/") for p in parts if p.strip("/"))
    return os.path.join(uri, *parts) if "://" not in uri else "/".join([uri.rstrip("/"), *parts])


def _pyarrow_s3(o: S3Options) -> pafs.S3FileSystem:
    kw: dict[str, Any] = {}
    if o.endpoint_url:
        u = urlparse(o.endpoint_url if "://" in o.endpoint_url else "https://" + o.endpoint_url)
        kw.update(endpoint_override=u.netloc + u.path.rstrip("/"), scheme=u.scheme)
    if o.region:
        kw["region"] = o.region
    if o.anonymous:
        kw["anonymous"] = True
    elif o.access_key and o.secret_key:
        kw.update(access_key=o.access_key, secret_key=o.secret_key, session_token=o.session_token)
    return pafs.S3FileSystem(**kw)


def resolve(uri: str, s3: S3Options | None = None) -> tuple[pafs.FileSystem, str]:
    """Return ``(pyarrow filesystem, path inside it)`` for a local path or URI."""
    local = local_path(uri)
    if local is not None:
        return pafs.LocalFileSystem(), local
    scheme = _scheme(uri)
    if scheme in _S3_SCHEMES:
        return _pyarrow_s3((s3 or S3Options()).filled()), uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def fsspec_filesystem(uri: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs with the explicit endpoint for ``s3://``).

    s3fs instances are not cached and keep no listing cache, so listings are never stale.
    """
    scheme = _scheme(uri)
    if scheme in _S3_SCHEMES:
        o = (s3 or S3Options()).filled()
        client_kwargs = {"region_name": o.region} if o.region else {}
        return fsspec.filesystem(
            "s3", anon=bool(o.anonymous), key=o.access_key, secret=o.secret_key,
            token=o.session_token, endpoint_url=o.endpoint_url, client_kwargs=client_kwargs,
            skip_instance_cache=True, use_listings_cache=False,
        )
    if local_path(uri) is not None:
        return fsspec.filesystem("file")
    return fsspec.core.url_to_fs(uri)[0]


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


def _local_info(path: str) -> ObjectInfo:
    """Size and mtime; ``size=-1`` when the file vanished after the walk saw it (or is a dangling
    link), so it still gets its row (the read stage records ``not_found``)."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, PermissionError):
        return ObjectInfo(path, -1, "")
    return ObjectInfo(path, st.st_size, str(st.st_mtime_ns))


def _remote_info(fs: fsspec.AbstractFileSystem, scheme: str, path: str, info: dict) -> ObjectInfo:
    uri = f"{scheme}://{path}" if scheme in _S3_SCHEMES else fs.unstrip_protocol(path)
    return ObjectInfo(uri, int(info.get("size") or 0), _remote_version(info))


def list_images(
    prefix_uri: str,
    s3: S3Options | None = None,
    extensions: Iterable[str] | None = IMAGE_EXTENSIONS,
    recursive: bool = True,
) -> list[ObjectInfo]:
    """Files under a prefix (or one named object), sorted by URI; zero-byte files are kept.

    ``extensions`` is a case-insensitive suffix filter (``None`` = every file); an object named
    directly is returned whatever its extension. A missing prefix raises FileNotFoundError.
    """
    exts = tuple("." + e.lower().lstrip(".") for e in extensions) if extensions is not None else ()

    def keep(name: str) -> bool:
        return extensions is None or name.lower().endswith(exts)

    local = local_path(prefix_uri)
    if local is not None:
        if os.path.isfile(local):
            return [_local_info(local)]
        if not os.path.isdir(local):
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", prefix_uri)
        walk = os.walk(local) if recursive else [next(os.walk(local))]
        out = [_local_info(os.path.join(d, f)) for d, _, fs in walk for f in fs if keep(f)]
    else:
        scheme, fs = _scheme(prefix_uri), fsspec_filesystem(prefix_uri, s3)
        path = fs._strip_protocol(prefix_uri).rstrip("/")
        try:
            found = fs.find(path, detail=True, maxdepth=None if recursive else 1)
            if not found and not fs.exists(path):
                raise FileNotFoundError(path)
        except FileNotFoundError as e:  # also raised by s3fs for a missing bucket
            raise FileNotFoundError(errno.ENOENT, "No such object or prefix", prefix_uri) from e
        if list(found) == [path]:  # the URI names one object (fsspec's find may omit details)
            return [_remote_info(fs, scheme, path, fs.info(path))]
        out = [
            _remote_info(fs, scheme, name, info)
            for name, info in found.items()
            if info.get("type") == "file" and not name.endswith("/") and keep(name)
        ]
    return sorted(out, key=lambda o: o.uri)


def stat_objects(uris: Iterable[str], s3: S3Options | None = None) -> list[ObjectInfo]:
    """Stat each URI in order; missing (or forbidden) objects get ``size=-1, etag_or_mtime=""``.

    S3 answers 403 instead of 404 without ListBucket permission, hence PermissionError counts as
    missing too; the read step later records the real error. Remote HEADs run 16 at a time.
    """
    fss: dict[str, fsspec.AbstractFileSystem] = {}

    def one(uri: str) -> ObjectInfo:
        local = local_path(uri)
        try:
            if local is not None:
                return _local_info(local) if os.path.isfile(local) else ObjectInfo(local, -1, "")
            fs = fss[_scheme(uri)]
            path = fs._strip_protocol(uri)
            info = fs.info(path)
            if info.get("type") != "file":
                return ObjectInfo(uri, -1, "")
            return _remote_info(fs, _scheme(uri), path, info)
        except (FileNotFoundError, PermissionError):
            return ObjectInfo(local or uri, -1, "")

    uris = list(uris)
    for u in uris:
        if local_path(u) is None and _scheme(u) not in fss:
            fss[_scheme(u)] = fsspec_filesystem(u, s3)
    with ThreadPoolExecutor(max_workers=16) as pool:
        return list(pool.map(one, uris))


def list_inputs(
    inputs: str | Iterable[str], s3: S3Options | None = None, manifest: bool = False
) -> list[ObjectInfo]:
    """Objects of several prefixes (:func:`list_images`) or manifests (:func:`read_manifest` +
    :func:`stat_objects`), in input order, each URI once (first occurrence wins)."""
    out: dict[str, ObjectInfo] = {}
    for item in [inputs] if isinstance(inputs, str) else inputs:
        infos = stat_objects(read_manifest(item, s3), s3) if manifest else list_images(item, s3)
        for info in infos:
            out.setdefault(info.uri, info)
    return list(out.values())


def _manifest_entries(uri: str, s3: S3Options | None) -> list[str]:
    name = uri.lower().rstrip("/")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        fs, path = resolve(uri, s3)
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            if "uri" not in pf.schema_arrow.names:
                raise ValueError(f"{uri}: parquet manifest has no 'uri' column")
            return [str(v) for v in pf.read(columns=["uri"]).column("uri").to_pylist() if v]
    text = read_bytes(uri, s3).decode("utf-8-sig")
    if name.endswith(".csv"):
        rows = [r for r in csv.reader(io.StringIO(text)) if any(c.strip() for c in r)]
        if not rows:
            return []
        header = [c.strip().lower() for c in rows[0]]
        if "uri" in header:
            col = header.index("uri")
            return [r[col].strip() for r in rows[1:] if len(r) > col and r[col].strip()]
        # No 'uri' header: first column. Row 1 is a header unless its cell looks like a path.
        has_header = not any(ch in rows[0][0] for ch in "./\\")
        return [r[0].strip() for r in rows[1 if has_header else 0 :] if r[0].strip()]
    lines = (ln.strip() for ln in text.splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def read_manifest(uri: str, s3: S3Options | None = None) -> list[str]:
    """URIs from a .txt (one per line, ``#`` comments), .csv or .parquet manifest.

    CSV/Parquet use column ``uri`` (CSV: else the first column). Relative entries are resolved
    against the manifest's directory, ``file:`` entries become plain paths, duplicates are
    dropped keeping the first occurrence. Use :func:`stat_objects` on the result.
    """
    out: list[str] = []
    seen: set[str] = set()
    local_manifest = local_path(uri)
    for entry in _manifest_entries(uri, s3):
        if "://" in entry or entry.startswith("file:") or os.path.isabs(entry):
            resolved = local_path(entry) or entry
        elif local_manifest is not None:
            resolved = os.path.normpath(os.path.join(os.path.dirname(local_manifest), entry))
        else:
            scheme, key = uri.split("://", 1)
            key = posixpath.normpath(posixpath.join(posixpath.dirname(key), entry))
            resolved = f"{scheme}://{key}"
        if resolved not in seen:
            seen.add(resolved)
            out.append(resolved)
    return out


def read_bytes(uri: str, s3: S3Options | None = None, max_bytes: int | None = None) -> bytes:
    """Whole object; FileNotFoundError if missing, ObjectTooLarge if over ``max_bytes``.

    The size is checked before any byte is read (one HEAD on S3, then one GET).
    """
    fs, path = resolve(uri, s3)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, "No such object", uri) from e
    with f:
        if max_bytes is not None and f.size() > max_bytes:
            raise ObjectTooLarge(uri, f.size(), max_bytes)
        return f.read()


def read_text(uri: str, s3: S3Options | None = None, encoding: str = "utf-8") -> str:
    return read_bytes(uri, s3).decode(encoding)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """True for an existing file or directory/prefix."""
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, s3: S3Options | None = None) -> bool:
    """True for an existing directory (or, on S3, a prefix with objects under it)."""
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Write (overwrite) an object; local parent directories are created."""
    fs, path = resolve(uri, s3)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path))
    elif not isinstance(fs, pafs.S3FileSystem):  # S3 has no directories: no marker objects
        fs.create_dir(posixpath.dirname(path))
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(uri: str, text: str, s3: S3Options | None = None, encoding: str = "utf-8") -> None:
    write_bytes(uri, text.encode(encoding), s3)


def atomic_write_bytes(uri: str, data: bytes, s3: S3Options | None = None) -> None:
    """Readers see the old content or the new, never a partial file.

    Local: temp file in the same directory, fsync, ``os.replace``. S3 (and GCS/Azure blobs): an
    object becomes visible only when its single PUT (or multipart completion) succeeds, so a
    plain write is already atomic.
    """
    path = local_path(uri)
    if path is None:
        write_bytes(uri, data, s3)
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
