"""Synthetic benchmark photos: the astronaut portrait resized to a target size, varied per image."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def synthetic_jpegs(n: int, width: int, height: int, quality: int = 90) -> list[bytes]:
    """``n`` distinct JPEGs of ``width``x``height`` with a real face in them."""
    import skimage.data

    base = Image.fromarray(skimage.data.astronaut())
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        scale = max(width / base.width, height / base.height)
        img = base.resize((int(base.width * scale) + 1, int(base.height * scale) + 1), Image.BILINEAR)
        left = int(rng.integers(0, img.width - width + 1))
        img = img.crop((left, 0, left + width, height))
        arr = np.asarray(img).astype(np.int16) + rng.integers(-8, 9, size=(1, 1, 3))
        buf = io.BytesIO()
        Image.fromarray(arr.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality - i % 20)
        out.append(buf.getvalue())
    return out
