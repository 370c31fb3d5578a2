"""Which encoded formats are inputs, and the one way their bytes are opened.

Torch-free on purpose: the audit report opens photos for thumbnails without paying for torch.
"""

from __future__ import annotations

import io
import threading
import warnings
from typing import Callable, TypeVar

from PIL import Image

T = TypeVar("T")

# Pillow format names (``Image.format``) of the inputs we decode (PPM: also PGM/PBM, 16-bit PGM
# included). Nothing else is even identified: EPS would start Ghostscript on load, and every other
# plugin is a parser of untrusted bytes for a format we never list.
DECODABLE_FORMATS: tuple[str, ...] = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "TIFF", "BMP", "PPM")
# MPO has no opener of its own: Pillow's JPEG opener returns it.
_OPEN_FORMATS = tuple(f for f in DECODABLE_FORMATS if f != "MPO")


# Our own max_pixels check is authoritative, and PIL's warning threshold (~89 MP) is below the default
# max_pixels: its warning is ignored, by one filter set at import (for the process, as it must be).
# catch_warnings() around each decode swapped the process-wide filter list from every decoding thread
# at once, which left stray filters behind and could swallow every later warning in the process.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Held around the rare catch_warnings() left (warnings made errors, a damaged TIFF's check): two of them
# overlapping is what corrupts the process-wide state.
WARNINGS_LOCK = threading.Lock()


def without_bomb_warning(fn: Callable[[], T]) -> T:
    """``fn()``, PIL's DecompressionBombWarning ignored even where warnings were made errors after our
    filter was set (pytest's ``-W error``, ``simplefilter("error")``), whose filters come before ours."""
    try:
        return fn()
    except Image.DecompressionBombWarning:
        with WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return fn()


def open_image(data: bytes) -> Image.Image:
    """Lazy PIL image (header parsed, no pixels) of encoded bytes in one of :data:`DECODABLE_FORMATS`;
    PIL's exceptions pass through (UnidentifiedImageError for any other content)."""
    return without_bomb_warning(lambda: Image.open(io.BytesIO(data), formats=_OPEN_FORMATS))


# Unambiguous leading bytes of the formats above (BMP's "BM" and PPM's "P6" are too short to tell).
TIFF_SIGNATURES = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic TIFF, BigTIFF
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", *TIFF_SIGNATURES)


def looks_decodable(data: bytes) -> bool:
    """Whether ``data`` starts like a file of a format we decode: one that then fails to open is damaged."""
    return data.startswith(_SIGNATURES) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")
