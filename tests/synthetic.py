"""A small, real learning task for the training tests: graded distortions of skimage photos.

Each source photo is one group (scene). Every photo appears pristine and with one of four distortions
(Gaussian blur, Gaussian noise, JPEG, over-exposure) at four levels; the label is ``4 - level`` (the
pristine image scores 4), so within a group a stronger distortion always means a lower label.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageFilter
from skimage import data as skdata

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "motorcycle", "camera", "coins", "moon", "clock")
LEVELS = 4
BLUR = (2.0, 4.0, 7.0, 12.0)  # radius, pixels at the 224 px short side
NOISE = (25.0, 50.0, 80.0, 120.0)  # sigma, 8-bit
JPEG = (12, 6, 3, 1)  # quality
EXPOSURE = (1.6, 2.4, 3.4, 5.0)  # gain, clipped


def photo(name: str, short_side: int = 256) -> Image.Image:
    arr = skdata.stereo_motorcycle()[0] if name == "motorcycle" else getattr(skdata, name)()
    img = Image.fromarray(arr if arr.ndim == 2 else arr[..., :3]).convert("RGB")
    w, h = img.size
    s = short_side / min(w, h)
    return img.resize((round(w * s), round(h * s)), Image.BILINEAR)


def distort(img: Image.Image, kind: str, level: int, rng: np.random.Generator) -> Image.Image:
    """``level`` in 1..LEVELS."""
    i = level - 1
    if kind == "blur":
        return img.filter(ImageFilter.GaussianBlur(BLUR[i]))
    if kind == "noise":
        arr = np.asarray(img, np.float32) + rng.normal(0, NOISE[i], (img.size[1], img.size[0], 3))
        return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))
    if kind == "jpeg":
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=JPEG[i])
        return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")
    if kind == "exposure":
        return Image.fromarray(np.clip(np.asarray(img, np.float32) * EXPOSURE[i], 0, 255).astype(np.uint8))
    raise ValueError(kind)


def _variant(base: Image.Image, v: int) -> Image.Image:
    """A slightly different framing of the photo (90 % window at one of several offsets)."""
    w, h = base.size
    cw, ch = int(w * 0.9), int(h * 0.9)
    ox, oy = [(0, 0), (w - cw, h - ch), (w - cw, 0), (0, h - ch), ((w - cw) // 2, (h - ch) // 2)][v % 5]
    return base.crop((ox, oy, ox + cw, oy + ch)).resize(base.size, Image.BILINEAR)


def make_dataset(root: Path, photos: tuple[str, ...] = PHOTOS, kinds: tuple[str, ...] = ("blur", "noise", "jpeg", "exposure"),
                 short_side: int = 256, seed: int = 0, mode: str = "single", variants: int = 3) -> Path:
    """Write PNGs under ``root/images/<photo>/`` and ``root/labels.csv`` (uri relative, score, group)."""
    rng = np.random.default_rng(seed)
    rows = []
    for name in photos:
        base = photo(name, short_side)
        folder = root / "images" / name
        folder.mkdir(parents=True, exist_ok=True)
        if mode == "single":
            variants_ = [("pristine0", 0, base)] + [(f"{k}{lv}", lv, distort(base, k, lv, rng))
                                                    for k in kinds for lv in range(1, LEVELS + 1)]
        elif mode == "ladder":
            variants_ = []
            for lv in range(0, LEVELS + 1):
                for v in range(variants):
                    img = _variant(base, v)
                    for k in kinds:
                        img = distort(img, k, lv, rng) if lv else img
                    variants_.append((f"l{lv}v{v}", lv, img))
        else:  # mix: every distortion at an independent random level; label from the total
            variants_ = []
            for j in range(LEVELS * len(kinds) + 1):
                lvls = rng.integers(0, LEVELS + 1, len(kinds))
                img = _variant(base, j)
                for k, lv in zip(kinds, lvls):
                    img = distort(img, k, int(lv), rng) if lv else img
                variants_.append((f"m{j}", float(lvls.mean()), img))
        for stem, level, img in variants_:
            path = folder / f"{stem}.png"
            img.save(path, compress_level=1)
            rows.append({"uri": f"images/{name}/{path.name}", "score": float(LEVELS - level), "group": name})
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return labels
