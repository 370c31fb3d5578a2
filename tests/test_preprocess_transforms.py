"""The transforms every path shares: Resize + FiveCrop/CenterCrop/RandomCrop bit-identical to torchvision,
crop positions, and ToTensor + Normalize."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from piqa_core.config import IMAGENET_MEAN, IMAGENET_STD, PreprocessConfig
from piqa_core.preprocess import crop_positions, make_crops, normalize, resize_short
from tests.corpus import astronaut
from tests.test_preprocess import CFG, TINY


SIZES = [(512, 512), (640, 480), (480, 640), (1001, 777)]


@pytest.mark.parametrize("size", SIZES)
def test_crops_bit_identical_to_torchvision(size: tuple[int, int]) -> None:
    img = astronaut(*size)
    resized = resize_short(img, 448)
    ref_resized = T.Resize(448)(img)
    assert resized.size == ref_resized.size and min(resized.size) == 448
    np.testing.assert_array_equal(np.asarray(resized), np.asarray(ref_resized))

    five = make_crops(img, CFG, "five")
    ref_five = T.Compose([T.Resize(448), T.FiveCrop(384)])(img)
    assert five.shape == (5, 384, 384, 3) and five.dtype == np.uint8
    for ours, ref in zip(five, ref_five):
        np.testing.assert_array_equal(ours, np.asarray(ref))

    center = make_crops(img, CFG, "center")
    assert center.shape == (1, 384, 384, 3)
    np.testing.assert_array_equal(center[0], np.asarray(T.Compose([T.Resize(448), T.CenterCrop(384)])(img)))


def test_crop_positions_match_torchvision_rounding() -> None:
    for w in range(8, 15):
        for h in range(8, 15):
            grid = torch.arange(w * h).view(1, h, w)

            def pos(t: torch.Tensor) -> tuple[int, int]:
                return int(t[0, 0, 0]) % w, int(t[0, 0, 0]) // w

            for c in (5, 6, 7, 8):
                assert crop_positions(w, h, c, "five") == [pos(t) for t in T.FiveCrop(c)(grid)]
                assert crop_positions(w, h, c, "center") == [pos(T.CenterCrop(c)(grid))]
    with pytest.raises(ValueError):
        crop_positions(10, 10, 11, "five")
    with pytest.raises(ValueError):
        crop_positions(10, 10, 5, "random")


def test_make_crops_mode_default_and_validation() -> None:
    img = astronaut(96, 80)
    assert make_crops(img, TINY).shape == (5, 64, 64, 3)
    center_cfg = PreprocessConfig(resize=72, crop=64, crop_mode="center")
    assert make_crops(img, center_cfg).shape == (1, 64, 64, 3)
    with pytest.raises(ValueError):
        make_crops(img, TINY, "ten")


def test_random_crop_in_bounds_and_deterministic() -> None:
    img = astronaut(96, 80)
    resized = np.asarray(resize_short(img, TINY.resize))  # 86 x 72
    h, w = resized.shape[:2]
    a = make_crops(img, TINY, "random", np.random.default_rng(7))
    b = make_crops(img, TINY, "random", np.random.default_rng(7))
    assert a.shape == (1, 64, 64, 3)
    np.testing.assert_array_equal(a, b)
    windows = {(l, t): resized[t : t + 64, l : l + 64] for t in range(h - 63) for l in range(w - 63)}
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(300):
        crop = make_crops(img, TINY, "random", rng)[0]
        hits = [pos for pos, win in windows.items() if np.array_equal(win, crop)]
        assert hits, "random crop is not a window of the resized image"
        seen.update(hits)
    lefts, tops = {p[0] for p in seen}, {p[1] for p in seen}
    assert min(lefts) == 0 and max(lefts) == w - 64 and min(tops) == 0 and max(tops) == h - 64


def test_normalize_matches_totensor_normalize() -> None:
    crops = make_crops(astronaut(512, 512), TINY, "five")
    out = normalize(torch.from_numpy(crops), IMAGENET_MEAN, IMAGENET_STD)
    assert out.shape == (5, 3, 64, 64) and out.dtype == torch.float32
    ref_t = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    ref = torch.stack([ref_t(Image.fromarray(c)) for c in crops])
    assert torch.allclose(out, ref, atol=1e-6, rtol=0)
    batched = normalize(torch.from_numpy(np.stack([crops, crops])), IMAGENET_MEAN, IMAGENET_STD)
    assert batched.shape == (2, 5, 3, 64, 64) and torch.equal(batched[1], out)
    meta = normalize(torch.empty((2, 8, 8, 3), dtype=torch.uint8, device="meta"), IMAGENET_MEAN, IMAGENET_STD)
    assert meta.device.type == "meta" and meta.shape == (2, 3, 8, 8)
    with pytest.raises(ValueError):
        normalize(torch.zeros((8, 8, 3)), IMAGENET_MEAN, IMAGENET_STD)


def test_normalize_makes_its_constants_once_and_they_serve_training_too():
    from piqa_core.preprocess import _channel_constant

    mean, std = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)  # first use, inside inference mode (scoring)
    x = torch.randint(0, 256, (2, 6, 6, 3), dtype=torch.uint8)
    with torch.inference_mode():
        scored = normalize(x, mean, std)
    assert _channel_constant(mean, x.device) is _channel_constant(mean, x.device)  # no new tensor (no GPU sync)
    want = (x.permute(0, 3, 1, 2).float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(scored, want, rtol=0, atol=1e-6)
    w = torch.ones(1, requires_grad=True)  # training, outside inference mode, with the same constants
    (normalize(x, mean, std) * w).sum().backward()
    assert w.grad is not None
