"""Typed input errors: every bad input becomes one output row with one of these codes.

Torch-free on purpose: the Ray read stage imports it without paying for torch.
"""

from __future__ import annotations

import errno
import os
import stat

ERROR_CODES = (
    "not_found",
    "empty_file",
    "not_an_image",
    "truncated",
    "decompression_bomb",
    "unsupported_mode",
    "too_small",
    "too_large",
    "read_failed",
    "not_a_file",
    "invalid_name",
    "non_finite_score",
    "internal",
)


class ImageError(Exception):
    """A bad input image; `code` is one of ERROR_CODES, `message` says what was wrong."""

    def __init__(self, code: str, message: str) -> None:
        if code not in ERROR_CODES:
            raise ValueError(f"unknown image error code {code!r}")
        super().__init__(code, message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


_NOT_FILES = ((stat.S_ISFIFO, "named pipe (FIFO)"), (stat.S_ISSOCK, "socket"), (stat.S_ISCHR, "character device"),
              (stat.S_ISBLK, "block device"))


def not_a_file(path: str, name: str | None = None) -> ImageError | None:
    """The ``not_a_file`` error of a local path that is there but is no regular file (a directory, a FIFO,
    whose read would wait for a writer for ever, a socket, a device), is a link loop or a link to a missing
    file; None for a regular file and for a path that cannot be stat'ed (missing, no access: reading it
    says why), and the ``invalid_name`` error of a path no file can have (a NUL byte, as a manifest may
    write). ``name``: the path as the row shows it."""
    name = name or path
    try:
        mode = os.stat(path).st_mode
    except ValueError:  # "embedded null byte": no file system has such a name
        return ImageError("invalid_name", f"{name!r} holds a NUL byte, which no file name can")
    except OSError as e:
        if e.errno == errno.ELOOP:  # else read_failed, retried every night
            return ImageError("not_a_file", f"{name} is a symbolic link loop, not a regular file: it is not read")
        # Else not_found, which the audit retries every night. A verdict instead: the listing records
        # the link's stat, which changes when its target comes back, and the photo is scored then.
        if e.errno in (errno.ENOENT, errno.ENOTDIR) and os.path.islink(path):
            target = os.fsencode(os.path.realpath(path)).decode("utf-8", "backslashreplace")  # rows are UTF-8
            return ImageError("not_a_file", f"{name} is a symbolic link to a missing file ({target}): it is not read")
        return None
    if stat.S_ISDIR(mode):
        return ImageError("not_a_file", f"{name} is a directory, not a file")
    kind = next((kind for test, kind in _NOT_FILES if test(mode)), None)
    return ImageError("not_a_file", f"{name} is a {kind}, not a regular file: it is not read") if kind else None
