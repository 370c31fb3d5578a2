"""Typed input errors: every bad input becomes one output row with one of these codes.

Torch-free on purpose: the Ray read stage imports it without paying for torch.
"""

from __future__ import annotations

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
