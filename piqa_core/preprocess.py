"""Decode with typed errors, and the official Resize -> crop -> Normalize transform.

The transform has ONE implementation, shared by training and scoring. It reproduces the
official DN-PIQA path: ``PIL -> convert('RGB') -> Resize(448) -> FiveCrop/RandomCrop/CenterCrop(384)
-> ToTensor -> Normalize``. Like the official code, no EXIF orientation is applied.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import re
import struct
import threading
import warnings
import zlib
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np
import torch
import torchvision.transforms.functional as TF
from PIL import Image, TiffImagePlugin, UnidentifiedImageError
from torchvision.transforms import InterpolationMode

from piqa_core.config import PreprocessConfig
from piqa_core.errors import ERROR_CODES, ImageError, not_a_file  # noqa: F401  (ERROR_CODES re-exported)
from piqa_core.image_formats import (DECODABLE_FORMATS, TIFF_SIGNATURES, WARNINGS_LOCK, looks_decodable, open_image,
                                     without_bomb_warning)


# Modes whose official `img.convert('RGB')` is faithful (alpha is dropped, as officially).
_CONVERT_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"})
# 16-bit grey: PIL's convert would clip to 255, so these are scaled (>> 8) instead.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})
# Formats whose 32-bit "I" mode holds 16-bit samples (older Pillow PNG, PGM with maxval > 255).
_SIXTEEN_BIT_I_FORMATS = frozenset({"PNG", "PPM"})
_CROP_MODES = ("five", "center", "random")

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray]


def _is_sixteen_bit(mode: str, fmt: str | None) -> bool:
    return mode in _SIXTEEN_BIT_MODES or (mode == "I" and fmt in _SIXTEEN_BIT_I_FORMATS)


def _metadata_bomb(e: Exception) -> bool:
    """PIL's refusal of compressed PNG text or ICC profile chunks that inflate past its limits."""
    msg = str(e)
    return isinstance(e, ValueError) and (msg.startswith("Decompressed data too large")
                                          or msg.startswith("Too much memory used in text chunks"))


def _said(e: BaseException) -> str:
    """PIL's message without the address of our BytesIO ("cannot identify image file <_io.BytesIO object at
    0x7f…>"), which made every such row's error_message unique."""
    return re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", str(e))


def _bomb(e: Image.DecompressionBombError, cfg: PreprocessConfig) -> ImageError:
    """PIL's own refusal (above twice its limit, before our header check) in the header check's words."""
    pixels = re.search(r"\((\d+) pixels\)", str(e))
    said = f"{pixels[1]} pixels" if pixels else _said(e)
    return ImageError("decompression_bomb", f"{said} exceeds max_pixels={cfg.max_pixels}")


# The crops are cut from the image resized to `resize` on its short side: a long thin strip under the pixel
# limit (224x400000, 90 MP) would be resized to 448x800000, over a gigabyte per copy. Photos come nowhere
# near (a 12 MP 4:3 photo resizes to 0.27 MP; the limit allows aspect ratios up to ~600:1 at 448).
MAX_RESIZED_PIXELS = 120_000_000


def _check_header(size: tuple[int, int], mode: str, cfg: PreprocessConfig, fmt: str | None) -> None:
    """Guards that need only the header: pixel count, short side, mode."""
    w, h = size
    if w * h > cfg.max_pixels:
        raise ImageError("decompression_bomb", f"{w}x{h} = {w * h} pixels exceeds max_pixels={cfg.max_pixels}")
    if min(w, h) < cfg.min_side:
        raise ImageError("too_small", f"{w}x{h}: shorter side is below min_side={cfg.min_side}")
    if (resized := cfg.resize * cfg.resize * max(w, h) // min(w, h)) > MAX_RESIZED_PIXELS:
        raise ImageError("decompression_bomb", f"{w}x{h}: resized to {cfg.resize} px on its short side it would "
                                               f"hold {resized} pixels, over {MAX_RESIZED_PIXELS}")
    if mode not in _CONVERT_MODES and not _is_sixteen_bit(mode, fmt):
        raise ImageError("unsupported_mode", f"image mode {mode!r} (format {fmt}) cannot be mapped to 8-bit RGB")


def _to_rgb(img: Image.Image, fmt: str | None) -> Image.Image:
    """Convert a loaded image to RGB as the official code does, but scale 16-bit grey to 8 bits."""
    mode = img.mode
    if mode in _CONVERT_MODES:
        return img if mode == "RGB" else img.convert("RGB")
    if _is_sixteen_bit(mode, fmt):
        arr = np.asarray(img)  # uint16 (with the mode's byte order) or int32 for "I"
        if arr.min(initial=0) < 0 or arr.max(initial=0) > 0xFFFF:
            raise ImageError("unsupported_mode", f"mode {mode!r} holds values outside 16 bits")
        grey = (arr.astype(np.uint32) >> 8).astype(np.uint8)
        if fmt == "TIFF" and img.tag_v2.get(262) == 0:  # "white is zero": Pillow inverts 8-bit ones only
            grey = 255 - grey
        return Image.fromarray(grey, mode="L").convert("RGB")
    raise ImageError("unsupported_mode", f"image mode {mode!r} (format {fmt}) cannot be mapped to 8-bit RGB")


def _finish(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """Header guards, frame 0, full load, RGB conversion for an opened (maybe lazy) image."""
    fmt = img.format
    if img.tell() != 0:  # frame 0 is decoded, so it is checked (not n_frames: for GIF that scans every frame)
        img.seek(0)
    _check_header(img.size, img.mode, cfg, fmt)
    try:
        without_bomb_warning(img.load)  # GIF frames re-check PIL's lower limit while loading
    except Image.DecompressionBombError as e:
        raise _bomb(e, cfg) from e
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, zlib.error) as e:
        if _metadata_bomb(e):  # text chunks after the pixels are read at the end of the load
            raise ImageError("decompression_bomb", f"metadata: {_said(e)}") from e
        if "out of memory" in str(e):  # Pillow's decoders say so as an OSError: the machine's state, not the file's
            raise ImageError("internal", f"decoding ran out of memory: {e}") from e
        raise ImageError("truncated", f"image data is truncated or corrupt: {_said(e)}") from e
    return _to_rgb(img, fmt)


# Progressive JPEGs have ~10 scans (Pillow, libjpeg, mozjpeg's scripts); every scan is a pass over the
# whole image, however few bytes it takes: a 94 KiB 12 MP JPEG of 1,000 repeated 26-byte scans took
# 6.5 s to decode instead of 0.11 s (2-core VM), so a few hundred KiB could hold a minute of CPU.
MAX_JPEG_SCANS = 100


def check_jpeg_scans(data: bytes) -> None:
    """Refuse a JPEG with more than :data:`MAX_JPEG_SCANS` scans before any decoder sees it."""
    if data.startswith(b"\xff\xd8\xff"):
        # SOS markers (FF DA), counted in C: entropy-coded data never holds them (FF is stuffed as FF 00);
        # metadata rarely does (an EXIF thumbnail's own scans), well within the limit.
        if (scans := data.count(b"\xff\xda")) > MAX_JPEG_SCANS:
            raise ImageError("decompression_bomb", f"{scans} JPEG scans (at most {MAX_JPEG_SCANS} are decoded; "
                                                   "photos have about 10): each would cost a pass over the image")


def _unsupported_tiff_layout(data: bytes) -> str | None:
    """Why a well-formed TIFF that failed to open is one Pillow has no mode for (float RGB, 16-bit grey
    with alpha, …), else None: Image.open hides that reason behind "cannot identify"."""
    if not data.startswith(TIFF_SIGNATURES):
        return None
    try:
        # Rare (a TIFF that failed to open), and serialised: two overlapping catch_warnings corrupt the
        # process-wide warning state.
        with WARNINGS_LOCK, warnings.catch_warnings(record=True) as damaged:
            warnings.simplefilter("always")
            TiffImagePlugin.TiffImageFile(io.BytesIO(data))
    except SyntaxError as e:
        # A directory cut short ("Truncated File Read") can name no mode either: that file is damaged.
        return str(e) if str(e) == "unknown pixel mode" and not damaged else None
    except Exception:  # noqa: BLE001 — damaged in another way: the caller's verdict stands
        return None
    return None


def decode_image(data: bytes, cfg: PreprocessConfig) -> Image.Image:
    """Decode encoded bytes into a fully loaded RGB image (frame 0), or raise ImageError.

    Pixel count, short side and mode are checked from the header before any pixel is decoded.
    No EXIF transpose is applied: the official DN-PIQA path has none.
    """
    try:
        if len(data) == 0:
            raise ImageError("empty_file", "the file is empty (0 bytes)")
        check_jpeg_scans(data)
        try:
            img = open_image(data)
        except Image.DecompressionBombError as e:
            # PIL refuses above 2 * Image.MAX_IMAGE_PIXELS (~179 MP) before we see the header.
            raise _bomb(e, cfg) from e
        except (OSError, SyntaxError, ValueError, EOFError, struct.error) as e:
            if _metadata_bomb(e):
                raise ImageError("decompression_bomb", f"metadata: {_said(e)}") from e
            if (layout := _unsupported_tiff_layout(data)) is not None:
                raise ImageError("unsupported_mode", f"a TIFF layout that cannot be decoded: {layout}") from e
            # A WEBP's RIFF size or a TIFF's index at the end fails the open, not the load, when cut short.
            if looks_decodable(data):
                raise ImageError("truncated", f"image header unreadable, truncated or corrupt: {_said(e)}") from e
            if isinstance(e, UnidentifiedImageError):
                supported = ", ".join(DECODABLE_FORMATS)
                raise ImageError("not_an_image", f"not an image in a supported format ({supported})") from e
            raise ImageError("not_an_image", f"unreadable image header: {_said(e)}") from e
        # No `with img:` — closing would free the pixels we return; the source is a BytesIO.
        return _finish(img, cfg)
    except ImageError:
        raise
    except Exception as e:  # a bad input must never fail the job: report it as a row
        raise ImageError("internal", f"{type(e).__name__}: {_said(e)}") from e


def _from_array(arr: np.ndarray, cfg: PreprocessConfig) -> Image.Image:
    if arr.dtype.kind != "u" or arr.dtype.itemsize > 2 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ImageError("unsupported_mode",
                         f"array must be uint8 or uint16, HxWx3 or HxW, got {arr.dtype} {arr.shape}")
    h, w = arr.shape[:2]
    _check_header((w, h), "RGB", cfg, None)
    if arr.dtype.itemsize == 2:  # to 8 bits as a 16-bit file is (its high byte), either byte order
        arr = (arr.astype(np.uint16) >> 8).astype(np.uint8)
    img = Image.fromarray(np.ascontiguousarray(arr), mode="L" if arr.ndim == 2 else "RGB")
    return img.convert("RGB") if arr.ndim == 2 else img


# One lock per caller image object being prepared: a list may hold one lazily opened image several
# times, and Pillow's load/seek are not thread-safe (two calls loading one image gave `internal` rows
# and wrong scores). Keyed by id, counted so the entry goes when the last user leaves.
_caller_locks: dict[int, list] = {}
_caller_locks_guard = threading.Lock()


@contextlib.contextmanager
def _caller_image_lock(img: Image.Image) -> Iterator[None]:
    with _caller_locks_guard:
        entry = _caller_locks.setdefault(id(img), [threading.Lock(), 0])
        entry[1] += 1
    try:
        with entry[0]:
            yield
    finally:
        with _caller_locks_guard:
            entry[1] -= 1
            if not entry[1]:
                del _caller_locks[id(img)]


def _finish_caller_image(img: Image.Image, cfg: PreprocessConfig) -> Image.Image:
    """``_finish`` for a caller's image, which is left on the frame it was on."""
    with _caller_image_lock(img):
        frame = img.tell()
        if frame == 0:
            return _finish(img, cfg)
        try:
            out = _finish(img, cfg)
            return out.copy() if out is img else out  # frame 0's pixels, before seeking back replaces them
        finally:
            img.seek(frame)


def load_image(src: ImageSource, cfg: PreprocessConfig) -> Image.Image:
    """RGB image from a local path, encoded bytes, a PIL image or a uint8/uint16 array (HxWx3 or HxW)."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if (not_file := not_a_file(str(path))) is not None:  # reading a FIFO would wait for ever
            raise not_file
        try:
            data = path.read_bytes()
        except FileNotFoundError as e:
            raise ImageError("not_found", f"no such file: {path}") from e
        except OSError as e:
            raise ImageError("read_failed", f"cannot read {path}: {e}") from e
        return decode_image(data, cfg)
    if isinstance(src, (bytes, bytearray, memoryview)):
        return decode_image(bytes(src), cfg)
    try:
        if isinstance(src, Image.Image):
            return _finish_caller_image(src, cfg)
        if isinstance(src, np.ndarray):
            return _from_array(src, cfg)
    except ImageError:
        raise
    except Exception as e:
        raise ImageError("internal", f"{type(e).__name__}: {_said(e)}") from e
    raise TypeError(f"unsupported image source type {type(src).__name__}")


def resize_short(img: Image.Image, size: int) -> Image.Image:
    """Shorter side to `size`: exactly torchvision `Resize(size)` on a PIL image (bilinear, antialiased)."""
    return TF.resize(img, size, interpolation=InterpolationMode.BILINEAR)


def crop_positions(width: int, height: int, crop: int, mode: str) -> list[tuple[int, int]]:
    """(left, top) of each crop: 'five' in FiveCrop order (tl, tr, bl, br, center), or 'center'."""
    if crop > width or crop > height:
        raise ValueError(f"crop {crop} is larger than the image {width}x{height}")
    # CenterCrop's rounding (Python round, half to even), reused by FiveCrop's centre crop.
    center = (int(round((width - crop) / 2.0)), int(round((height - crop) / 2.0)))
    if mode == "center":
        return [center]
    if mode == "five":
        right, bottom = width - crop, height - crop
        return [(0, 0), (right, 0), (0, bottom), (right, bottom), center]
    raise ValueError(f"crop mode must be 'five' or 'center', got {mode!r}")


def make_crops(
    img: Image.Image,
    cfg: PreprocessConfig,
    mode: str | None = None,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """uint8 (K, crop, crop, 3) crops after resize_short(cfg.resize): K=5 'five', K=1 'center'/'random'."""
    mode = cfg.crop_mode if mode is None else mode
    if mode not in _CROP_MODES:
        raise ValueError(f"crop mode must be one of {_CROP_MODES}, got {mode!r}")
    arr = np.asarray(resize_short(img.convert("RGB") if img.mode != "RGB" else img, cfg.resize))
    h, w = arr.shape[:2]
    c = cfg.crop
    if mode == "random":
        if c > w or c > h:
            raise ValueError(f"crop {c} is larger than the image {w}x{h}")
        rng = np.random.default_rng() if rng is None else rng
        # Same distribution as RandomCrop.get_params: top in [0, h-c], left in [0, w-c].
        top = int(rng.integers(0, h - c + 1))
        left = int(rng.integers(0, w - c + 1))
        positions = [(left, top)]
    else:
        positions = crop_positions(w, h, c, mode)
    return np.stack([arr[top : top + c, left : left + c] for left, top in positions])


def normalize(crops: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., H, W, 3) -> float32 (..., 3, H, W): ToTensor then Normalize, on the input's device."""
    if crops.dtype != torch.uint8 or crops.ndim < 3 or crops.shape[-1] != 3:
        raise ValueError(f"expected uint8 (..., H, W, 3), got {crops.dtype} {tuple(crops.shape)}")
    # Channels-first while still uint8 (4x less to move), then in place: each out-of-place op
    # would allocate (and page-fault) a fresh float buffer; the arithmetic is the same.
    x = crops.movedim(-1, -3).contiguous().to(torch.float32)
    m, s = _channel_constant(tuple(mean), crops.device), _channel_constant(tuple(std), crops.device)
    return x.div_(255).sub_(m).div_(s)


@functools.lru_cache(maxsize=32)
def _channel_constant(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """(3, 1, 1) float32 on ``device``, made once: a fresh one per call was a blocking host-to-device
    copy, i.e. a stream sync, in every forward on a GPU."""
    return torch.tensor(values, dtype=torch.float32, device=device).view(3, 1, 1)
