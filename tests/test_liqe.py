import itertools
import time
import tracemalloc

import numpy as np
import pytest
import torch

from piqa_core.config import CLIP_MEAN, CLIP_STD, LiqeConfig, get_preset
from piqa_core.liqe import (
    LIQE,
    SCENES,
    extract_patches,
    patch_grid,
    patch_positions,
    prompts,
    quality_score,
    top_scene,
)


def official_patches(img: np.ndarray, patch: int = 224, stride: int = 32, num: int = 15) -> torch.Tensor:
    """The official unfold -> permute -> reshape -> index, on a (H, W, 3) array (batch 1)."""
    x = torch.from_numpy(img).permute(2, 0, 1).unsqueeze(0)
    x = x.unfold(2, patch, stride).unfold(3, patch, stride).permute(2, 3, 0, 1, 4, 5).reshape(-1, 3, patch, patch)
    sel_step = x.size(0) // num
    return x[[sel_step * i for i in range(num)]]


@pytest.fixture(scope="module")
def tiny_liqe() -> LIQE:
    torch.manual_seed(0)
    lq = LIQE(get_preset("tiny").liqe).eval()
    lq.refresh_text_features()
    return lq


def test_prompts():
    ps = prompts()
    assert len(ps) == 495 == len(set(ps))
    assert ps[0] == "a photo of a animal with jpeg2000 compression artifacts, which is of bad quality"
    # index 247 = q 2 (fair), scene 4 (landscape), distortion 5 (contrast)
    assert ps[2 * 99 + 4 * 11 + 5] == "a photo of a landscape with contrast artifacts, which is of fair quality"
    assert ps[-1] == "a photo of a others with other artifacts, which is of perfect quality"


@pytest.mark.parametrize(
    "h,w",
    [
        (224, 224),  # N = 1
        (256, 300),  # N = 6 < 15: patch 0 fifteen times
        (224, 800),  # N = 19
        (500, 260),  # N = 18
        (640, 480),  # N = 126
        (288, 352),  # N = 15
        (352, 384),  # N = 30
        (250, 301),  # remainders dropped
    ],
)
def test_patches_match_official(h, w):
    rng = np.random.default_rng(h * 1000 + w)
    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    cfg = LiqeConfig()
    ours = extract_patches(img, cfg)
    assert ours.shape == (15, 224, 224, 3) and ours.dtype == np.uint8
    ref = official_patches(img).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(ours, ref)
    rows, cols = patch_grid(h, w)
    assert ((h - 224) // 32 + 1, (w - 224) // 32 + 1) == (rows, cols)
    if rows * cols < 15:
        assert patch_positions(h, w) == [(0, 0)] * 15


def test_positions_general_parameters():
    # Small patch/stride/num so many shapes are cheap to check against unfold.
    rng = np.random.default_rng(1)
    for h, w, patch, stride, num in itertools.product((5, 9, 17, 30), (5, 12, 31), (5, 7), (1, 3, 4), (1, 4, 15)):
        if h < patch or w < patch:
            continue
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        cfg = LiqeConfig(patch=patch, stride=stride, num_patches=num)
        ref = official_patches(img, patch, stride, num).permute(0, 2, 3, 1).numpy()
        np.testing.assert_array_equal(extract_patches(img, cfg), ref)


@pytest.mark.parametrize("h,w", [(223, 500), (500, 223), (100, 100)])
def test_too_small_raises(h, w):
    with pytest.raises(ValueError):
        patch_grid(h, w)
    with pytest.raises(ValueError):
        extract_patches(np.zeros((h, w, 3), np.uint8), LiqeConfig())


def test_extract_patches_12mp_cheap():
    img = np.full((4000, 3000, 3), 7, dtype=np.uint8)
    tracemalloc.start()
    t0 = time.perf_counter()
    out = extract_patches(img, LiqeConfig())
    dt = time.perf_counter() - t0
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert out.shape == (15, 224, 224, 3)
    assert peak < 10 * 2**20, peak  # the 15 patches are 2.3 MB
    assert dt < 0.5, dt
    rows, cols = patch_grid(4000, 3000)
    step = rows * cols // 15
    top, left = patch_positions(4000, 3000)[14]
    assert (top // 32) * cols + left // 32 == 14 * step


def test_forward_shape_and_batch_independence(tiny_liqe):
    rng = np.random.default_rng(0)
    a = extract_patches(rng.integers(0, 256, (288, 352, 3), dtype=np.uint8), tiny_liqe.cfg)
    b = extract_patches(rng.integers(0, 256, (224, 300, 3), dtype=np.uint8), tiny_liqe.cfg)
    batch = torch.from_numpy(np.stack([a, b]))
    with torch.no_grad():
        both = tiny_liqe(batch)
        alone = torch.cat([tiny_liqe(batch[:1]), tiny_liqe(batch[1:])])
    assert both.shape == (2, 495) and both.dtype == torch.float32
    assert not torch.allclose(both[0], both[1])
    torch.testing.assert_close(both, alone, atol=1e-5, rtol=0)


def test_forward_matches_official_reference(tiny_liqe):
    img = np.random.default_rng(2).integers(0, 256, (352, 384, 3), dtype=np.uint8)  # N = 30, step 2
    clip = tiny_liqe.clip
    with torch.no_grad():
        x = torch.from_numpy(img).permute(2, 0, 1).float().div(255).unsqueeze(0)
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        x = (x - mean) / std
        x = x.unfold(2, 224, 32).unfold(3, 224, 32).permute(2, 3, 0, 1, 4, 5).reshape(-1, 3, 224, 224)
        sel_step = x.size(0) // 15
        x = x[[sel_step * i for i in range(15)]]
        feats = clip.encode_image(x)
        feats = feats / feats.norm(dim=1, keepdim=True)
        tok = __import__("open_clip").tokenizer.tokenize(prompts())
        text = clip.encode_text(tok)
        text = text / text.norm(dim=1, keepdim=True)
        ref = (clip.logit_scale.exp() * feats @ text.T).view(1, 15, -1).mean(1)
        ours = tiny_liqe(torch.from_numpy(extract_patches(img, tiny_liqe.cfg)).unsqueeze(0))
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_text_features_and_heads(tiny_liqe):
    tf = tiny_liqe.text_features
    assert tf.shape == (495, 64)
    torch.testing.assert_close(tf.norm(dim=-1), torch.ones(495))
    assert "text_features" in tiny_liqe.state_dict()
    assert "mean" not in tiny_liqe.state_dict()
    logits = torch.zeros(2, 495)
    logits[0, 2 * 99 + SCENES.index("night") * 11 + 3] = 50.0  # fair, night, blur
    logits[1, 4 * 99 + SCENES.index("human") * 11 + 0] = 50.0  # perfect, human
    assert top_scene(logits) == ["night", "human"]
    torch.testing.assert_close(quality_score(logits), torch.tensor([3.0, 5.0]), atol=1e-3, rtol=0)
    torch.testing.assert_close(quality_score(torch.zeros(1, 495)), torch.tensor([3.0]))


def test_openai_state_dict_layout(tiny_liqe):
    keys = set(tiny_liqe.clip.state_dict())
    for k in (
        "visual.proj",
        "visual.conv1.weight",
        "visual.class_embedding",
        "visual.positional_embedding",
        "visual.ln_pre.weight",
        "visual.ln_post.weight",
        "visual.transformer.resblocks.0.attn.in_proj_weight",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "token_embedding.weight",
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "ln_final.weight",
        "transformer.resblocks.0.attn.in_proj_weight",
        "transformer.resblocks.0.mlp.c_proj.weight",
    ):
        assert k in keys, k
    assert "attn_mask" not in keys  # OpenAI's CLIP does not save it either
    assert not [k for k in keys if k.startswith("text.") or "logit_bias" in k]


def test_pil_input_gives_the_same_patches():
    from PIL import Image

    from piqa_core.config import get_preset

    cfg = get_preset("tiny").liqe
    arr = np.random.default_rng(3).integers(0, 256, (301, 517, 3), dtype=np.uint8)
    assert np.array_equal(extract_patches(Image.fromarray(arr), cfg), extract_patches(arr, cfg))


def test_the_logits_stay_fp32_under_a_callers_autocast(tiny_liqe, monkeypatch):
    """The towers follow a caller's autocast; the cosine logits did too, moving by up to ~0.1 in bf16."""
    feats = torch.randn(2 * 15, tiny_liqe.text_features.shape[1], generator=torch.Generator().manual_seed(0))
    monkeypatch.setattr(tiny_liqe.clip, "encode_image", lambda x: feats)  # the towers' part held fixed
    x = torch.zeros(2, 15, 3, 4, 4)
    with torch.no_grad():
        plain = tiny_liqe.forward_float(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            under = tiny_liqe.forward_float(x)
    assert under.dtype == torch.float32 and plain.abs().max() > 1
    torch.testing.assert_close(under, plain, atol=1e-5, rtol=0)
