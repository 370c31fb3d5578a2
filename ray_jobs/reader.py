"""The read stage: object bytes in, or the error code its row will carry.

Torch-free on purpose: Ray runs it in short-lived task workers, and importing torch there would
cost seconds of CPU per worker.
"""

from __future__ import annotations

import numpy as np

from piqa_core.errors import ImageError

from .storage import ObjectInfo, ObjectTooLarge, S3Options, read_bytes

DEFAULT_MAX_BYTES = 256 * 1024 * 1024


def fetch(info: ObjectInfo, s3: S3Options | None, max_bytes: int) -> bytes | ImageError:
    """The object's bytes, or the error its row will carry."""
    try:
        return read_bytes(info.uri, s3, max_bytes=max_bytes)
    except FileNotFoundError:
        return ImageError("not_found", f"{info.uri} does not exist (deleted after listing?)")
    except ObjectTooLarge as e:
        return ImageError("too_large", str(e))
    except OSError as e:
        return ImageError("read_failed", f"{type(e).__name__}: {e}")


def read_objects(batch: dict[str, np.ndarray], s3: S3Options, max_bytes: int) -> dict[str, np.ndarray]:
    """Adds the objects' bytes; a failed read becomes ``read_error_*`` for its row, never an exception."""
    n = len(batch["uri"])
    data = np.empty(n, dtype=object)
    codes, messages = np.full(n, "", dtype=object), np.full(n, "", dtype=object)
    for i, uri in enumerate(batch["uri"]):
        got = fetch(ObjectInfo(str(uri), int(batch["bytes"][i]), str(batch["etag_or_mtime"][i])), s3, max_bytes)
        if isinstance(got, ImageError):
            data[i], codes[i], messages[i] = b"", got.code, got.message
        else:
            data[i] = got
    return {**batch, "data": data, "read_error_code": codes, "read_error_message": messages}
