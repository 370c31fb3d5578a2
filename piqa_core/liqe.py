"""LIQE auxiliary features: CLIP ViT-B/32 scored against 495 quality prompts.

Reproduces the official LIQE inference used by DN-PIQA (full-resolution image, CLIP-normalised,
224x224 patches on a stride-32 grid, 15 of them picked as indices ``(N // 15) * i`` in row-major
order, logits averaged over the patches), but slices out only the 15 selected patches instead of
materialising the whole unfold.

Edge cases the official code leaves open:
- a side shorter than ``patch``: no patch exists (the official code crashes); we raise
  ``ValueError``. Decoding refuses such images first (``min_side`` is never below ``patch``: the
  ``too_small`` error code), so scoring never reaches it.
- fewer grid positions than ``num`` (N < 15): ``N // 15 == 0`` so the official rule selects
  patch 0 fifteen times; we replicate that exactly.
"""

from __future__ import annotations

import itertools

import numpy as np
from PIL import Image
import open_clip
import torch
import torch.nn.functional as F
from open_clip.model import CLIP, CLIPTextCfg, CLIPVisionCfg
from torch import nn

from .config import LiqeConfig
from .preprocess import normalize

QUALITIES = ("bad", "poor", "fair", "good", "perfect")
SCENES = ("animal", "cityscape", "human", "indoor", "landscape", "night", "plant", "still_life", "others")
DISTORTIONS = (
    "jpeg2000 compression", "jpeg compression", "noise", "blur", "color", "contrast",
    "overexposure", "underexposure", "spatial", "quantization", "other",
)
NUM_PROMPTS = len(QUALITIES) * len(SCENES) * len(DISTORTIONS)  # 495


def prompts() -> list[str]:
    """The 495 LIQE prompts in the official (quality, scene, distortion) order."""
    return [
        f"a photo of a {c} with {d} artifacts, which is of {q} quality"
        for q, c, d in itertools.product(QUALITIES, SCENES, DISTORTIONS)
    ]


def patch_grid(height: int, width: int, patch: int = 224, stride: int = 32) -> tuple[int, int]:
    """(rows, cols) of the ``unfold(patch, stride)`` grid; ValueError if a side < patch."""
    if height < patch or width < patch:
        raise ValueError(f"image {width}x{height} is smaller than one {patch}x{patch} LIQE patch")
    return (height - patch) // stride + 1, (width - patch) // stride + 1


def patch_positions(
    height: int, width: int, patch: int = 224, stride: int = 32, num: int = 15
) -> list[tuple[int, int]]:
    """(top, left) of the selected patches: grid indices ``(N // num) * i``, row-major.

    With N < num the step is 0 and patch 0 is repeated ``num`` times, as in the official code.
    """
    rows, cols = patch_grid(height, width, patch, stride)
    step = (rows * cols) // num
    return [((step * i) // cols * stride, (step * i) % cols * stride) for i in range(num)]


def extract_patches(image: np.ndarray | Image.Image, cfg: LiqeConfig) -> np.ndarray:
    """The ``num_patches`` selected patches of an RGB image as (num, p, p, 3) uint8.

    A PIL image is cropped patch by patch, which avoids converting a 12 MP photo to an array
    (~70 ms) just to read fifteen 224² windows of it; the pixels are the same.
    """
    if isinstance(image, Image.Image):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode}")
        w, h = image.size
        get = lambda top, left: np.asarray(image.crop((left, top, left + p, top + p)))  # noqa: E731
    else:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 array, got {image.shape} {image.dtype}")
        h, w = image.shape[:2]
        get = lambda top, left: image[top : top + p, left : left + p]  # noqa: E731
    p = cfg.patch
    out = np.empty((cfg.num_patches, p, p, 3), dtype=np.uint8)
    for k, (top, left) in enumerate(patch_positions(h, w, p, cfg.stride, cfg.num_patches)):
        out[k] = get(top, left)
    return out


class LIQE(nn.Module):
    """open_clip CLIP (OpenAI layout, QuickGELU) plus cached prompt text features."""

    def __init__(self, cfg: LiqeConfig) -> None:
        super().__init__()
        self.cfg = cfg
        cc = cfg.clip_cfg
        self.clip = CLIP(
            cc["embed_dim"],
            vision_cfg=CLIPVisionCfg(**cc["vision_cfg"]),
            text_cfg=CLIPTextCfg(**cc["text_cfg"]),
            quick_gelu=True,
        )
        self.register_buffer("text_features", torch.zeros(NUM_PROMPTS, cc["embed_dim"]))

    @torch.no_grad()
    def refresh_text_features(self, chunk: int = 128) -> None:
        """Recompute the unit-norm prompt embeddings (call after loading CLIP weights)."""
        ctx = self.cfg.clip_cfg["text_cfg"].get("context_length", 77)
        tokens = open_clip.tokenizer.tokenize(prompts(), context_length=ctx)
        dev = self.text_features.device
        feats = [self.clip.encode_text(t.to(dev)).float() for t in tokens.split(chunk)]
        self.text_features.copy_(F.normalize(torch.cat(feats), dim=-1))

    def to_compute(self, device: torch.device, dtype: torch.dtype) -> LIQE:
        """Move to ``device`` with CLIP's towers in ``dtype``; the logit scale and prompt embeddings stay fp32.

        exp(logit_scale) multiplies all 495 logits: rounded to bf16 (ln 100 -> 4.59375) it becomes
        99.0 and shifts every feature by ~1 %.
        """
        scale, feats = self.clip.logit_scale.detach().float(), self.text_features.float()
        self.to(device, dtype)
        self.clip.logit_scale.data = scale.to(device)
        self.text_features = feats.to(device)
        return self

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches (B, num, p, p, 3) -> (B, 495) float32 logits averaged over each image's patches."""
        # Same arithmetic as ToTensor + Normalize on the whole image, so results match bit for bit.
        return self.forward_float(normalize(patches, self.cfg.mean, self.cfg.std))

    def forward_float(self, x: torch.Tensor) -> torch.Tensor:
        """CLIP-normalised float patches (B, num, 3, p, p) -> (B, 495) float32."""
        b, n = x.shape[:2]
        feats = self.clip.encode_image(x.flatten(0, 1).to(self.clip.visual.conv1.weight.dtype))
        # fp32 also under a caller's autocast: a bf16 product would move logits of ~10 by up to 0.1.
        with torch.autocast(x.device.type, enabled=False):
            feats = F.normalize(feats.float(), dim=-1)
            logits = self.clip.logit_scale.exp().float() * feats @ self.text_features.float().T
        # Per-image mean (the official view(1, 15, -1) is only right for batch 1).
        return logits.view(b, n, -1).mean(1)


def _marginals(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the 495 prompts reshaped to (B, qualities, scenes, distortions)."""
    return logits.float().softmax(-1).view(-1, len(QUALITIES), len(SCENES), len(DISTORTIONS))


def top_scene(logits: torch.Tensor) -> list[str]:
    """Per image, the LIQE scene with the highest marginal probability."""
    p = _marginals(logits).sum(dim=(1, 3))
    return [SCENES[i] for i in p.argmax(-1).tolist()]


def quality_score(logits: torch.Tensor) -> torch.Tensor:
    """LIQE's own quality estimate in [1, 5]: sum_q p(q) * q."""
    p = _marginals(logits).sum(dim=(2, 3))
    levels = torch.arange(1, len(QUALITIES) + 1, dtype=p.dtype, device=p.device)
    return p @ levels
