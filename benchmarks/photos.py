"""Synthetic benchmark photos: the astronaut portrait resized to a target size, varied per image."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image


def _cover(img: Image.Image, width: int, height: int) -> Image.Image:
    """``img`` scaled (bilinear) so that it covers ``width``x``height``."""
    scale = max(width / img.width, height / img.height)
    return img.resize((int(img.width * scale) + 1, int(img.height * scale) + 1), Image.BILINEAR)


def synthetic_jpegs(n: int, width: int, height: int, quality: int = 90, workers: int = 1) -> list[bytes]:
    """``n`` distinct JPEGs of ``width``x``height`` with a real face in them, ``workers`` at a time.

    Photo ``i`` takes its crop offset and colour shift from seed ``i`` and JPEG quality
    ``quality - i % 20``: the same photos however many are made or in what order.
    """
    import skimage.data

    base = _cover(Image.fromarray(skimage.data.astronaut()), width, height)

    def one(i: int) -> bytes:
        rng = np.random.default_rng(i)
        left = int(rng.integers(0, base.width - width + 1))
        top = int(rng.integers(0, base.height - height + 1))
        arr = np.asarray(base.crop((left, top, left + width, top + height))).astype(np.int16)
        arr = arr + rng.integers(-8, 9, size=(1, 1, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality - i % 20)
        return buf.getvalue()

    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(one, range(n)))


SCENES = ("astronaut", "camera", "coffee", "chelsea", "rocket", "stereo_motorcycle")


def _scene(name: str, width: int, height: int) -> Image.Image:
    """A ``skimage.data`` photo as RGB, scaled to cover ``width``x``height`` and centre-cropped."""
    import skimage.data

    arr = getattr(skimage.data, name)()
    arr = arr[0] if isinstance(arr, tuple) else arr  # stereo pairs: the left view
    img = _cover(Image.fromarray(arr).convert("RGB"), width, height)
    left, top = (img.width - width) // 2, (img.height - height) // 2
    return img.crop((left, top, left + width, top + height))


def _distort(img: Image.Image, kind: str, level: float, rng: np.random.Generator) -> tuple[Image.Image, int]:
    """One distortion at one level; returns the image and the JPEG quality to save it with."""
    from PIL import ImageEnhance, ImageFilter

    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(level)), 95
    if kind == "noise":
        arr = np.asarray(img).astype(np.float32) + rng.normal(0, level, (img.height, img.width, 1))
        return Image.fromarray(arr.clip(0, 255).astype(np.uint8)), 95
    if kind == "jpeg":
        return img, int(level)
    if kind == "downscale":
        small = img.resize((max(1, round(img.width / level)), max(1, round(img.height / level))), Image.BILINEAR)
        return small.resize(img.size, Image.BILINEAR), 95
    if kind == "dark":
        return ImageEnhance.Brightness(img).enhance(level), 95
    return img, 95


LADDER = (("pristine", 0), ("blur", 1.5), ("blur", 4), ("noise", 8), ("noise", 25), ("jpeg", 30), ("jpeg", 8),
          ("downscale", 3), ("downscale", 8), ("dark", 0.45), ("dark", 0.2))


def graded_jpegs(n: int, width: int, height: int) -> list[bytes]:
    """``n`` JPEGs spanning quality: real scenes (two with faces) under a ladder of blur, noise,
    compression, down-scaling and under-exposure. Scores of a trained model spread widely over
    them, which is what a precision-agreement check (rank correlation) needs."""
    rng = np.random.default_rng(0)
    scenes = {name: _scene(name, width, height) for name in SCENES}
    out = []
    for i in range(n):
        kind, level = LADDER[(i // len(SCENES)) % len(LADDER)]
        img, quality = _distort(scenes[SCENES[i % len(SCENES)]], kind, level, rng)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out
