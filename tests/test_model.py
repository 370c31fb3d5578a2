import pytest
import torch

from piqa_core.config import get_preset
from piqa_core.model import DualBranchPIQA


def _inputs(b, size, aux=495, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, 3, size, size, generator=g), torch.randn(b, 3, size, size, generator=g),
            torch.randn(b, aux, generator=g))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DualBranchPIQA(get_preset("tiny").model).eval()


def test_tiny_forward_shapes(tiny):
    whole, face, aux = _inputs(3, 64)
    assert tiny(whole, face, aux).shape == (3,)
    feats = tiny.forward_features(whole, face, aux)
    assert feats.shape == (3, 2 * tiny.num_features + 495)
    assert tiny.forward_head(feats, pre_logits=True).shape == (3, 128)


def test_the_head_runs_in_fp32_under_bf16_autocast(tiny):
    whole, face, aux = _inputs(2, 64)
    aux = aux * 8 + 24  # LIQE-like magnitudes, where bf16's step is 0.125
    seen = []
    hook = tiny.head[0].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, out.dtype)))
    try:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            feats = tiny.forward_features(whole, face, aux)
            scores = tiny.forward_head(feats)
    finally:
        hook.remove()
    assert seen == [(torch.float32, torch.float32)] and scores.dtype == torch.float32
    with torch.no_grad():  # the same features through the head outside autocast: bit-identical
        assert torch.equal(scores, tiny.forward_head(feats.float()))


def test_tiny_is_small(tiny):
    n = sum(p.numel() for p in tiny.parameters())
    assert 1_000_000 <= n <= 5_000_000, n


def test_head_is_official_mlp(tiny):
    kinds = [type(m).__name__ for m in tiny.head]
    assert kinds == ["Linear", "ReLU", "Dropout", "Linear"]
    assert tiny.head[2].p == 0.1 and tiny.head[0].out_features == 128 and tiny.head[3].out_features == 1


def test_features_are_concatenated_whole_face_aux(tiny):
    whole, face, aux = _inputs(2, 64)
    feats = tiny.forward_features(whole, face, aux)
    f = tiny.num_features
    assert torch.allclose(feats[:, :f], tiny.backbone(whole))
    assert torch.allclose(feats[:, f:2 * f], tiny.backbone_face(face))
    assert torch.equal(feats[:, 2 * f:], aux)


def test_score_crops_is_mean_of_per_crop_scores(tiny):
    g = torch.Generator().manual_seed(1)
    whole, face = torch.randn(2, 5, 3, 64, 64, generator=g), torch.randn(2, 5, 3, 64, 64, generator=g)
    aux = torch.randn(2, 495, generator=g)
    got = tiny.score_crops(whole, face, aux)
    want = torch.stack([
        torch.stack([tiny(whole[i, k:k + 1], face[i, k:k + 1], aux[i:i + 1]) for k in range(5)]).mean()
        for i in range(2)
    ])
    assert torch.allclose(got, want, atol=1e-5)
    # batch independence: the official tiling was only right at batch 1
    assert torch.allclose(tiny.score_crops(whole[1:], face[1:], aux[1:]), got[1:], atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 10, 64])
def test_chunked_passes_give_the_same_scores(tiny, chunk):
    g = torch.Generator().manual_seed(2)
    whole, face = torch.randn(2, 5, 3, 64, 64, generator=g), torch.randn(2, 5, 3, 64, 64, generator=g)
    aux = torch.randn(2, 495, generator=g)
    with torch.inference_mode():
        assert torch.allclose(tiny.score_crops(whole, face, aux, chunk=chunk), tiny.score_crops(whole, face, aux),
                              atol=1e-6)


def test_aux_width_is_checked(tiny):
    whole, face, _ = _inputs(1, 64)
    with pytest.raises(ValueError, match="495"):
        tiny(whole, face, None)
    with pytest.raises(ValueError, match="495"):
        tiny(whole, face, torch.zeros(1, 10))


def test_no_aux_variant():
    cfg = get_preset("tiny")
    cfg.model.aux_dim = 0
    model = DualBranchPIQA(cfg.model).eval()
    whole, face, _ = _inputs(2, 64)
    assert model(whole, face).shape == (2,)
    assert model.head[0].in_features == 2 * model.num_features


@pytest.mark.slow
def test_full_dn_piqa_forward_shape():
    model = DualBranchPIQA(get_preset("dn-piqa").model).eval()
    assert model.num_features == 1024
    assert model.head[0].in_features == 2048 + 495
    with torch.inference_mode():
        out = model(*_inputs(1, 384))
    assert out.shape == (1,) and torch.isfinite(out).all()
