"""The read stage: object bytes in, or the error code its row will carry.

Torch-free on purpose: Ray runs it in short-lived task workers, and importing torch there would
cost seconds of CPU per worker.
"""

from __future__ import annotations

import errno
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Sequence

import numpy as np

from piqa_core.errors import ImageError, not_a_file

from .listing import NAME_NOT_UTF8
from .storage import ObjectInfo, ObjectTooLarge, S3Options, is_dir, local_path, read_bytes

DEFAULT_MAX_BYTES = 256 * 1024 * 1024
# Object-store GETs are latency-bound (tens of ms before the first byte on S3): read one at a time,
# a read task would feed a few dozen images/s, well under one GPU's rate.
READ_THREADS = 16
# A failed read that may pass on a second try (a reset connection, S3's 503 SlowDown after pyarrow's
# own retries) is tried again after these pauses before its row records read_failed: --resume counts
# error rows as done, so a blip would otherwise cost the photo its score until someone rescored it.
RETRY_PAUSES_S = (0.5, 2.0)


def fetch(info: ObjectInfo, s3: S3Options | None, max_bytes: int) -> bytes | ImageError:
    """The object's bytes, or the error its row will carry."""
    if info.size < 0 and info.etag_or_mtime == NAME_NOT_UTF8:  # the URI is a printable stand-in, not a path
        return ImageError("invalid_name", f"{info.uri}: the file name is not valid UTF-8; rename it to score it")
    if (not_file := _not_a_file(info.uri)) is not None:
        return not_file
    try:
        return _read(info, s3, max_bytes)
    except FileNotFoundError:
        if info.size < 0 and _is_directory(info.uri, s3):  # a manifest naming an S3 prefix: no object, objects below
            return ImageError("not_a_file", f"{info.uri} is a prefix (folder) with objects under it, not an object")
        when = "was not found when listed" if info.size < 0 else "does not exist (deleted after listing?)"
        return ImageError("not_found", f"{info.uri} {when}")
    except ObjectTooLarge as e:
        return ImageError("too_large", str(e))
    except IsADirectoryError:
        return ImageError("not_a_file", f"{info.uri} is a directory, not a file")
    except _FINAL as e:
        return ImageError("read_failed", f"{type(e).__name__}: {e}")
    except OSError as e:
        return ImageError("read_failed", f"{type(e).__name__}: {e} ({len(RETRY_PAUSES_S) + 1} attempts)")


# Failures a second try would not change. ValueError: an unknown scheme or a path the filesystem
# cannot encode (ObjectTooLarge is one too); ImportError: no fsspec backend for the scheme.
_FINAL = (FileNotFoundError, PermissionError, IsADirectoryError, ValueError, ImportError)


def _read(info: ObjectInfo, s3: S3Options | None, max_bytes: int) -> bytes:
    """``read_bytes``, tried again after each of :data:`RETRY_PAUSES_S` while it fails with an OSError
    that may pass. A directory fails at once: pyarrow reports it as a plain OSError."""
    for i, pause in enumerate(RETRY_PAUSES_S):
        try:
            return read_bytes(info.uri, s3, max_bytes=max_bytes)
        except _FINAL:
            raise
        except OSError:
            if i == 0 and _is_directory(info.uri, s3):
                raise IsADirectoryError(errno.EISDIR, "is a directory", info.uri) from None
            time.sleep(pause)
    return read_bytes(info.uri, s3, max_bytes=max_bytes)


def _not_a_file(uri: str) -> ImageError | None:
    """:func:`~piqa_core.errors.not_a_file` for a local path; None for other URIs."""
    try:
        path = local_path(uri)
    except ValueError:  # a mistyped scheme: the read reports it
        return None
    return not_a_file(path, uri) if path is not None else None


def _is_directory(uri: str, s3: S3Options | None) -> bool:
    try:
        return is_dir(uri, s3)
    except Exception:  # noqa: BLE001 - unknown: the read is retried as before
        return False


def fetch_all(infos: Sequence[ObjectInfo], s3: S3Options | None, max_bytes: int,
              threads: int = READ_THREADS) -> list[bytes | ImageError]:
    """:func:`fetch` for every object, up to ``threads`` at a time, in order."""
    if len(infos) < 2 or threads < 2:
        return [fetch(info, s3, max_bytes) for info in infos]
    with ThreadPoolExecutor(min(threads, len(infos)), thread_name_prefix="piqa-read") as pool:
        return list(pool.map(lambda info: fetch(info, s3, max_bytes), infos))


def read_objects(batch: dict[str, np.ndarray], s3: S3Options, max_bytes: int) -> dict[str, np.ndarray]:
    """Adds the objects' bytes; a failed read becomes ``read_error_*`` for its row, never an exception."""
    infos = [ObjectInfo(str(uri), int(size), str(tag))
             for uri, size, tag in zip(batch["uri"], batch["bytes"], batch["etag_or_mtime"])]
    return read_columns(batch, fetch_all(infos, s3, max_bytes))


def read_columns(batch: dict[str, np.ndarray], got: Sequence[bytes | ImageError]) -> dict[str, np.ndarray]:
    """``batch`` plus the read stage's columns (``data``, ``read_error_code``, ``read_error_message``)
    for each row's bytes or read error: the layout the prep and score actors take."""
    n = len(got)
    data = np.empty(n, dtype=object)
    codes, messages = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for i, item in enumerate(got):
        if isinstance(item, ImageError):
            data[i], codes[i], messages[i] = b"", item.code, item.message
        else:
            data[i] = item
    return {**batch, "data": data, "read_error_code": codes, "read_error_message": messages}
