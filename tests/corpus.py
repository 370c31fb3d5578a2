"""A corpus of bad and odd image files, shared by the preprocessing, scoring and pipeline tests.

`build_corpus(dir)` writes the files and returns {filename: expected error code, or None when
the file must decode fine}. Photo content is skimage's astronaut (512x512 RGB, has a face).
"""

from __future__ import annotations

import io
import struct
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, features
from skimage import data as skdata

# Known 16-bit sample at pixel (0, 0) of the 16-bit files; it must decode to 0xAB.
SIXTEEN_BIT_MARK = 0xABCD


@lru_cache(maxsize=1)
def _astronaut() -> np.ndarray:
    return skdata.astronaut()


def astronaut(width: int = 512, height: int = 512) -> Image.Image:
    """The astronaut photo as an RGB PIL image, resized to width x height when asked."""
    img = Image.fromarray(_astronaut())
    return img if (width, height) == img.size else img.resize((width, height), Image.BILINEAR)


def astronaut_jpeg_bytes(quality: int = 90, width: int = 512, height: int = 512) -> bytes:
    buf = io.BytesIO()
    astronaut(width, height).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _encode(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _tifffile(arr: np.ndarray, **kw: object) -> bytes:
    """TIFF layouts Pillow cannot write (float RGB, extra samples, BigTIFF)."""
    import tifffile  # scikit-image's dependency

    buf = io.BytesIO()
    tifffile.imwrite(buf, arr, **kw)
    return buf.getvalue()


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def raw_png(width: int, height: int, bit_depth: int, color_type: int, rows: bytes | None) -> bytes:
    """A hand-built PNG (valid CRCs). rows: unfiltered scanline bytes; None -> a few zero bytes only."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = zlib.compress(rows if rows is not None else b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def sixteen_bit_grey() -> np.ndarray:
    """uint16 256x256: astronaut grey in the high byte, noise in the low byte, (0,0) = 0xABCD."""
    grey = np.asarray(astronaut(256, 256).convert("L"), dtype=np.uint16)
    low = np.random.default_rng(0).integers(0, 256, grey.shape, dtype=np.uint16)
    out = (grey << 8) | low
    out[0, 0] = SIXTEEN_BIT_MARK
    return out


def sixteen_bit_rgb() -> np.ndarray:
    """uint16 256x256x3: astronaut in the high bytes, noise in the low bytes, (0,0) = 0xABCD."""
    rgb = np.asarray(astronaut(256, 256), dtype=np.uint16)
    low = np.random.default_rng(1).integers(0, 256, rgb.shape, dtype=np.uint16)
    out = (rgb << 8) | low
    out[0, 0] = SIXTEEN_BIT_MARK
    return out


def _png16(arr: np.ndarray) -> bytes:
    """16-bit grey (HxW) or RGB (HxWx3) PNG; Pillow cannot write 16-bit RGB, so build it by hand."""
    h, w = arr.shape[:2]
    color_type = 0 if arr.ndim == 2 else 2
    be = arr.astype(">u2").reshape(h, -1).view(np.uint8)
    rows = np.concatenate([np.zeros((h, 1), np.uint8), be], axis=1).tobytes()  # filter 0 per row
    return raw_png(w, h, 16, color_type, rows)


def gif_frames() -> list[Image.Image]:
    """Three palette frames: the astronaut, then two flat colours (frame 0 must be picked)."""
    first = astronaut(256, 256).quantize(colors=64, dither=Image.Dither.NONE)
    return [first] + [Image.new("RGB", (256, 256), c).quantize(colors=4) for c in ((255, 0, 0), (0, 0, 255))]


def build_corpus(dirpath: Path) -> dict[str, str | None]:
    """Write the corpus into `dirpath`; return {filename: expected error code or None}."""
    dirpath = Path(dirpath)
    dirpath.mkdir(parents=True, exist_ok=True)
    rgb = astronaut(320, 256)
    grey = np.asarray(rgb.convert("L"))
    frames = gif_frames()
    rgb_frames = [f.convert("RGB") for f in frames]
    second_page = Image.new("RGB", rgb.size, (0, 255, 0))
    full_jpeg = astronaut_jpeg_bytes(90, 600, 400)
    full_png = _encode(astronaut(300, 256), "PNG")
    corrupt_png = bytearray(full_png)
    corrupt_png[len(full_png) // 2 : len(full_png) // 2 + 64] = b"\xff" * 64  # inside IDAT: zlib/CRC error
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    deflate_tif = _encode(rgb, "TIFF", compression="tiff_deflate")
    big_tif = _tifffile(np.asarray(rgb), bigtiff=True, compression="zlib")
    progressive = _encode(Image.new("RGB", (640, 480), (120, 130, 140)), "JPEG", quality=90, progressive=True)
    last_scan = progressive.rindex(b"\xff\xda")  # repeated: a few bytes each, a pass over the image each
    scan_bomb = progressive[:-2] + progressive[last_scan:-2] * 150 + b"\xff\xd9"
    end_of_ihdr, start_of_iend = 8 + 25, len(full_png) - 12
    # 8 MB of text or ICC profile in a few kB: PIL refuses to inflate metadata past 1 MB per chunk.
    text_bomb = _png_chunk(b"zTXt", b"note\0\0" + zlib.compress(b"a" * (8 << 20)))
    icc_bomb = _png_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (8 << 20)))

    files: dict[str, tuple[bytes, str | None]] = {
        # --- errors ---
        "empty.jpg": (b"", "empty_file"),
        "random_bytes.jpg": (b"\x00\x17" + noise, "not_an_image"),
        "text.png": (b"this is not a PNG, just some text\n" * 10, "not_an_image"),
        "truncated.jpg": (full_jpeg[: len(full_jpeg) // 2], "truncated"),
        "truncated.png": (full_png[: len(full_png) // 2], "truncated"),
        "corrupt_idat.png": (bytes(corrupt_png), "truncated"),
        # The index of a compressed TIFF sits at its end: cut short, the file fails to open, not to load.
        "truncated_deflate.tif": (deflate_tif[: len(deflate_tif) * 19 // 20], "truncated"),
        "truncated_bigtiff.tif": (big_tif[:200], "truncated"),
        # 900 MP: above PIL's own hard limit too (PIL raises before our header check).
        "bomb_30000.png": (raw_png(30000, 30000, 8, 2, None), "decompression_bomb"),
        # 144 MP: above max_pixels=120M but under PIL's hard limit: our header check must fire.
        "bomb_12000.png": (raw_png(12000, 12000, 8, 2, None), "decompression_bomb"),
        "text_bomb.png": (full_png[:end_of_ihdr] + text_bomb + full_png[end_of_ihdr:], "decompression_bomb"),
        "text_bomb_after_pixels.png": (full_png[:start_of_iend] + text_bomb + full_png[start_of_iend:],
                                       "decompression_bomb"),
        "icc_bomb.png": (full_png[:end_of_ihdr] + icc_bomb + full_png[end_of_ihdr:], "decompression_bomb"),
        "scan_bomb.jpg": (scan_bomb, "decompression_bomb"),
        "one_pixel.png": (_encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG"), "too_small"),
        "strip_20000x20.png": (_encode(Image.new("L", (20000, 20), 128), "PNG"), "too_small"),
        "float32.tif": (_encode(Image.fromarray(grey.astype(np.float32) / 255.0), "TIFF"), "unsupported_mode"),
        "int32.tif": (_encode(Image.fromarray(grey.astype(np.int32) * 1000), "TIFF"), "unsupported_mode"),
        # Layouts Pillow has no mode for: the open fails ("cannot identify"), though nothing is damaged.
        "float32_rgb.tif": (_tifffile(np.asarray(rgb, np.float32) / 255, photometric="rgb"), "unsupported_mode"),
        "grey16_alpha.tif": (_tifffile(np.stack([grey.astype(np.uint16) * 257] * 2, -1), photometric="minisblack",
                                       extrasamples=["unassalpha"]), "unsupported_mode"),
        # --- must decode ---
        "rgb.jpg": (astronaut_jpeg_bytes(90, 320, 256), None),
        "cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG", quality=95), None),
        "progressive.jpg": (_encode(rgb, "JPEG", quality=90, progressive=True), None),  # ~10 scans: fine
        "grey.jpg": (_encode(rgb.convert("L"), "JPEG", quality=90), None),
        "rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), None),
        "la.png": (_encode(rgb.convert("LA"), "PNG"), None),
        "bilevel.png": (_encode(rgb.convert("1"), "PNG"), None),
        "palette.png": (_encode(frames[0], "PNG", transparency=0), None),
        "grey16.png": (_encode(Image.fromarray(sixteen_bit_grey()), "PNG"), None),
        "rgb16.png": (_png16(sixteen_bit_rgb()), None),
        "grey16.pgm": (b"P5\n256 256\n65535\n" + sixteen_bit_grey().astype(">u2").tobytes(), None),
        "grey16.tif": (_encode(Image.fromarray(sixteen_bit_grey()), "TIFF"), None),
        "animated.gif": (_encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100), None),
        "animated.png": (_encode(rgb_frames[0], "PNG", save_all=True, append_images=rgb_frames[1:]), None),
        "multipage.tif": (_encode(rgb, "TIFF", save_all=True, append_images=[second_page]), None),
    }
    if features.check("webp"):
        files["rgb.webp"] = (_encode(rgb, "WEBP", quality=90), None)
        webp = _encode(rgb, "WEBP", quality=90)
        files["truncated.webp"] = (webp[: len(webp) * 19 // 20], "truncated")  # its RIFF size fails the open
    for name, (payload, _) in files.items():
        (dirpath / name).write_bytes(payload)
    return {name: code for name, (_, code) in files.items()}
