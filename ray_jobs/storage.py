"""Object-storage IO: URI -> filesystem, bytes in and out (listing inputs: :mod:`ray_jobs.listing`).

Local paths (plain or ``file://``) -> pyarrow LocalFileSystem; ``s3://`` -> pyarrow S3FileSystem
with the endpoint always passed explicitly (some pyarrow versions ignore ``AWS_ENDPOINT_URL``;
pyarrow does not follow region redirects: set ``AWS_REGION`` outside us-east-1); other fsspec URLs
(gs://, az://, memory://) -> ``PyFileSystem(FSSpecHandler)``. Remote listings/stats use fsspec
(s3fs), whose listings carry ETags (pyarrow's FileInfo has none). Credentials come from
:class:`S3Options` or the standard AWS chain, and are never logged.
"""

from __future__ import annotations

import errno
import functools
import os
import posixpath
import re
import tempfile
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import unquote, urlparse

import fsspec
import pyarrow.fs as pafs

S3_SCHEMES = ("s3", "s3a", "s3n")
# "s3:/bucket/x" or "gs:bucket/x" (a slash short) would otherwise be a relative local path: outputs
# written into the job's working directory, on a pod that goes away with them.
_SCHEME_TYPO = re.compile(r"^(s3[an]?|gs|gcs|az|abfss?|hdfs|https?):(?!//)", re.IGNORECASE)


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
    """One listed/stat'ed object. ``size == -1`` marks a missing object (it still becomes a row), or,
    with ``etag_or_mtime == NAME_NOT_UTF8``, a local file whose name is not UTF-8."""

    uri: str
    size: int
    etag_or_mtime: str


class ObjectTooLarge(ValueError):
    """The object is larger than the caller's ``max_bytes``."""

    def __init__(self, uri: str, size: int, max_bytes: int, size_known: bool = True):
        said = f"{size} bytes exceeds" if size_known else f"more than {max_bytes} bytes (size not announced) exceeds"
        super().__init__(f"{uri}: {said} the limit of {max_bytes} bytes")
        self.uri, self.size, self.max_bytes = uri, size, max_bytes


class OutputUnreadable(OSError):
    """An output file that exists could not be opened (no read permission, the store unreachable):
    reading on without it would score its inputs twice or undercount a run."""


def uri_scheme(uri: str) -> str:
    return uri.split("://", 1)[0].lower() if "://" in uri else ""


def mistyped_scheme(uri: str) -> str | None:
    """The scheme of a URI written a slash short (``s3:/bucket/x`` -> ``s3``), else ``None``."""
    m = _SCHEME_TYPO.match(uri)
    return m.group(1) if m else None


def local_path(uri: str) -> str | None:
    """Absolute local path for a plain path or ``file:`` URI, else ``None``."""
    if scheme := mistyped_scheme(uri):
        raise ValueError(f"{uri!r} looks like a mistyped {scheme}:// URI (it would name a local folder "
                         f"'{scheme}:' in the working directory); write {scheme}://…")
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
    """One filesystem per process, settings and AWS environment: each new one starts its own credential
    chain, which on EKS (IRSA), ECS or EC2 is an STS, container or instance-metadata call, so one per
    object read would be one such call per photo, and throttled at scale."""
    aws_env = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_")))
    return _pyarrow_s3_for(tuple(vars(o).items()), aws_env)


@functools.lru_cache(maxsize=16)
def _pyarrow_s3_for(settings: tuple[tuple[str, Any], ...], aws_env: tuple[tuple[str, str], ...]) -> pafs.S3FileSystem:
    o = S3Options(**dict(settings))
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
    scheme = uri_scheme(uri)
    if scheme in S3_SCHEMES:
        return _pyarrow_s3((s3 or S3Options()).filled()), uri.split("://", 1)[1].rstrip("/")
    fs, path = fsspec.core.url_to_fs(uri)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path


def fsspec_filesystem(uri: str, s3: S3Options | None = None) -> fsspec.AbstractFileSystem:
    """An fsspec filesystem for ``uri`` (s3fs with the explicit endpoint for ``s3://``).

    s3fs instances are not cached and keep no listing cache, so listings are never stale.
    """
    scheme = uri_scheme(uri)
    if scheme in S3_SCHEMES:
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


def read_bytes(uri: str, s3: S3Options | None = None, max_bytes: int | None = None) -> bytes:
    """Whole object; FileNotFoundError if missing, ObjectTooLarge if over ``max_bytes``.

    The size is checked before any byte is read (one HEAD on S3, then one GET).
    """
    if _pyarrow_misnames(uri):
        return _read_bytes_fsspec(uri, *_s3fs(uri, s3), max_bytes)
    if local_path(uri) is None and uri_scheme(uri) not in S3_SCHEMES:
        # pyarrow's wrapper of an fsspec store (gs://, az://, https://) reports every failure, a 503 or
        # a timeout too, as a missing file: read through fsspec, whose errors say what happened.
        return _read_bytes_fsspec(uri, *fsspec.core.url_to_fs(uri), max_bytes)
    fs, path = resolve(uri, s3)
    try:
        f = fs.open_input_file(path)
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, "No such object", uri) from e
    with f:
        if max_bytes is not None and f.size() > max_bytes:
            raise ObjectTooLarge(uri, f.size(), max_bytes)
        return f.read()


def _pyarrow_misnames(uri: str) -> bool:
    """An S3 key pyarrow cannot send as written: it refuses an empty segment ("photos//a.jpg",
    ArrowInvalid) and collapses "." and ".." segments, so "p/./a.jpg" would read "p/a.jpg". S3 keeps
    such keys as written, listings return them, and s3fs sends them unchanged."""
    if uri_scheme(uri) not in S3_SCHEMES:
        return False
    key = uri.split("://", 1)[1].partition("/")[2].rstrip("/")
    return bool(key) and any(seg in ("", ".", "..") for seg in key.split("/"))


def _s3fs(uri: str, s3: S3Options | None) -> tuple[fsspec.AbstractFileSystem, str]:
    """s3fs and the key path, for the keys :func:`_pyarrow_misnames`."""
    return fsspec_filesystem(uri, s3), uri.split("://", 1)[1]


def _read_bytes_fsspec(uri: str, fs: fsspec.AbstractFileSystem, path: str, max_bytes: int | None) -> bytes:
    """``read_bytes`` through fsspec: s3fs for the keys :func:`_pyarrow_misnames`, other remote stores."""
    try:
        try:
            info = fs.info(path)
        except FileNotFoundError:  # fsspec's HTTP store says so for any failed HEAD (a 503 too): the GET tells
            info = {}
        if info.get("type") == "directory":
            raise IsADirectoryError(errno.EISDIR, "Is a directory", uri)
        size = info.get("size")  # None where a server does not say (HTTP without Content-Length)
        if max_bytes is not None and size is not None and size > max_bytes:
            raise ObjectTooLarge(uri, size, max_bytes)
        if max_bytes is not None and size is None and info:  # a failed HEAD (info {}) leaves the GET to say why
            return _read_at_most(uri, fs, path, max_bytes)
        data = fs.cat_file(path)
        if max_bytes is not None and len(data) > max_bytes:
            raise ObjectTooLarge(uri, len(data), max_bytes)
        return data
    except FileNotFoundError as e:
        raise FileNotFoundError(errno.ENOENT, "No such object", uri) from e
    except (OSError, ObjectTooLarge):
        raise
    except Exception as e:  # botocore's own (no endpoint, no credentials): an I/O failure, as pyarrow says it
        raise OSError(f"{uri}: {type(e).__name__}: {e}") from e


def _read_at_most(uri: str, fs: fsspec.AbstractFileSystem, path: str, max_bytes: int) -> bytes:
    """A body of unannounced size, streamed and cut off past ``max_bytes``: a whole download first would
    hold an endless or huge body in memory before the limit applied."""
    chunks, got = [], 0
    with fs.open(path, "rb") as f:
        while got <= max_bytes:
            chunk = f.read(min(_STREAM_CHUNK, max_bytes + 1 - got))
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            got += len(chunk)
    raise ObjectTooLarge(uri, got, max_bytes, size_known=False)


_STREAM_CHUNK = 4 * 1024 * 1024


def read_text(uri: str, s3: S3Options | None = None, encoding: str = "utf-8") -> str:
    return read_bytes(uri, s3).decode(encoding)


def exists(uri: str, s3: S3Options | None = None) -> bool:
    """True for an existing file or directory/prefix."""
    if _pyarrow_misnames(uri):
        fs, path = _s3fs(uri, s3)
        return fs.exists(path)
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_dir(uri: str, s3: S3Options | None = None) -> bool:
    """True for an existing directory (or, on S3, a prefix with objects under it)."""
    if _pyarrow_misnames(uri):
        fs, path = _s3fs(uri, s3)
        return fs.isdir(path)
    fs, path = resolve(uri, s3)
    return fs.get_file_info(path).type == pafs.FileType.Directory


def check_writable(folder_uri: str, s3: S3Options | None = None) -> None:
    """Fail now, not after hours of scoring, where a local output folder could not be made or written.

    Object stores are not probed (a probe object would need a delete permission the jobs otherwise
    do not); a denied write there fails at the write.
    """
    path = local_path(folder_uri)
    if path is None:
        return
    # Nothing is created here: the deepest folder that exists stands for the ones the job will make.
    existing = os.path.abspath(path)
    while not os.path.lexists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise NotADirectoryError(errno.ENOTDIR, "Not a directory", existing)
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".piqa-write-check-")
    except PermissionError as e:
        raise PermissionError(e.errno, e.strerror, existing) from None
    os.close(fd)
    os.unlink(probe)


def parent_uri(uri: str) -> str:
    """The folder/prefix holding ``uri`` (``.`` for a bare local file name)."""
    return posixpath.dirname(uri.rstrip("/")) or "."


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
