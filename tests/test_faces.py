"""Face detection and crop. Detector tests use a randomly initialised RetinaFace (no weights exist
here): they check the batching, decoding and box mapping, not detection quality."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from retinaface.box_utils import encode
from retinaface.network import RetinaFace
from skimage import data

from piqa_core.config import FaceConfig
from piqa_core.faces import (
    VARIANCE,
    FaceDetector,
    FaceResult,
    _priors,
    crop_face,
    detector_input,
    for_inference,
)

LONG = 160


def _rgb(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(1, 256, (h, w, 3), dtype=np.uint8))  # no true black pixel


def _padded_slice(img: Image.Image, rect: tuple[int, int, int, int], pad: int) -> np.ndarray:
    arr = np.pad(np.asarray(img), ((pad, pad), (pad, pad), (0, 0)))
    x1, y1, x2, y2 = rect
    return arr[y1 + pad : y2 + pad, x1 + pad : x2 + pad]


# ---------------------------------------------------------------- crop


def test_crop_partly_outside_is_black_outside_and_identical_inside():
    img = _rgb(100, 80)
    face = FaceResult((5.0, 10.0, 50.0, 70.0), 0.9, 1)
    out = crop_face(img, face, margin=20)
    assert out.size == (50 - 5 + 40, 70 - 10 + 40)  # (85, 100)
    got = np.asarray(out)
    np.testing.assert_array_equal(got, _padded_slice(img, (-15, -10, 70, 90), pad=50))
    assert (got[:, :15] == 0).all() and (got[:10] == 0).all()  # left of x=0, above y=0
    assert (got[10:90, 15:] != 0).all()  # every in-image pixel kept (the source has no zeros)
    assert got.shape[0] == 100 and (got[90:] == 0).all()  # below y=80


def test_crop_margin_20_inside_image():
    img = _rgb(200, 150, seed=1)
    out = crop_face(img, FaceResult((60.0, 40.0, 110.0, 100.0), 0.8, 1), margin=20)
    assert out.size == (90, 100)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(img)[20:120, 40:130])


def test_crop_float_box_rounds_like_pil():
    img = _rgb(120, 100, seed=2)
    box = (10.5, 11.5, 30.4, 40.6)
    out = crop_face(img, FaceResult(box, 0.9, 1), margin=20)
    # Python round, half to even: -9.5 -> -10, -8.5 -> -8, 50.4 -> 50, 60.6 -> 61
    assert out.size == (50 - (-10), 61 - (-8))
    official = img.crop([box[0] - 20, box[1] - 20, box[2] + 20, box[3] + 20])
    np.testing.assert_array_equal(np.asarray(out), np.asarray(official))
    np.testing.assert_array_equal(np.asarray(out), _padded_slice(img, (-10, -8, 50, 61), pad=20))


def test_no_face_falls_back_to_whole_image():
    img = _rgb(64, 48)
    none = FaceResult(None)
    assert not none.found and none.confidence == 0.0 and none.n_faces == 0
    assert crop_face(img, none, margin=20) is img
    assert FaceResult((0.0, 0.0, 1.0, 1.0), 0.9, 1).found


# ---------------------------------------------------------------- detector input


def test_detector_input_downscales_long_side():
    arr, scale = detector_input(_rgb(512, 384), LONG)
    assert arr.shape == (120, 160, 3) and arr.dtype == np.uint8
    assert scale == pytest.approx(160 / 512)
    arr, scale = detector_input(_rgb(300, 1000), LONG)
    assert arr.shape == (160, 48, 3) and scale == pytest.approx(0.16)


def test_detector_input_upscales_small_photos_and_converts_to_rgb():
    # predict_single's LongestMaxSize brings small photos up to size too
    img = _rgb(100, 50)
    arr, scale = detector_input(img, LONG)
    assert arr.shape == (80, 160, 3) and scale == pytest.approx(1.6)
    np.testing.assert_array_equal(arr, np.asarray(img.resize((160, 80), Image.Resampling.BILINEAR)))
    arr, _ = detector_input(img.convert("L"), LONG)
    assert arr.shape == (80, 160, 3)
    exact = _rgb(160, 90)
    arr, scale = detector_input(exact, LONG)
    assert scale == 1.0
    np.testing.assert_array_equal(arr, np.asarray(exact))


# ---------------------------------------------------------------- detector (random weights)


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    torch.manual_seed(0)
    # Random weights: 0.5 keeps roughly the upper half of the ~0.5 softmax scores, so results
    # are not empty (checked below).
    return FaceDetector(FaceConfig(detect_long_side=LONG, confidence_threshold=0.5))


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_state_dict_keys_are_package_keys_with_net_prefix(detector):
    torch.manual_seed(0)
    ref = RetinaFace(name="Resnet50", pretrained=False, in_channels=256, out_channels=256,
                     return_layers={"layer2": 1, "layer3": 2, "layer4": 3})
    assert set(detector.state_dict()) == {f"net.{k}" for k in ref.state_dict()}
    detector.train()
    assert not detector.training and not detector.net.training


def _assert_same(a: list[FaceResult], b: list[FaceResult]) -> None:
    assert [r.n_faces for r in a] == [r.n_faces for r in b]
    for ra, rb in zip(a, b):
        assert ra.found == rb.found
        if ra.found:
            np.testing.assert_allclose(ra.box, rb.box, atol=1e-3)
            assert ra.confidence == pytest.approx(rb.confidence, abs=1e-4)


def test_batch_equals_one_by_one_on_own_canvas(detector, monkeypatch):
    images = [Image.fromarray(data.astronaut()), _rgb(300, 200, 3), _rgb(90, 140, 4), _rgb(290, 210, 8)]
    single = [detector.detect_images([im])[0] for im in images]
    shapes = []
    forward = detector.net.forward
    monkeypatch.setattr(detector.net, "forward", lambda x: shapes.append(tuple(x.shape)) or forward(x))
    batch = detector.detect_images(images)
    _assert_same(batch, single)
    # one pass per canvas (own size rounded up to 32), never a square letterbox: 300x200 and 290x210 share
    # one; 90x140 is brought up to 103x160 first
    assert sorted(shapes) == sorted([(1, 3, 160, 160), (2, 3, 128, 160), (1, 3, 160, 128)])
    assert any(r.n_faces > 0 for r in batch)
    for r, im in zip(batch, images):
        if r.found:
            x1, y1, x2, y2 = r.box
            assert 0 <= x1 <= x2 <= im.width and 0 <= y1 <= y2 <= im.height


def test_batch_padding_to_max_size(detector):
    # Different sizes that all pad to 160x160: the per-image bookkeeping (valid area, scale,
    # NMS) must give what a batch of one gives. Results are only padding-independent when the
    # padded size matches: a CNN sees its padding (hence the per-image canvases of detect_each).
    images = [_rgb(160, 150, 5), _rgb(150, 140, 6), _rgb(140, 130, 7)]
    inputs = [detector_input(im, LONG) for im in images]
    batch = detector.detect(inputs)
    single = [detector.detect([x])[0] for x in inputs]
    _assert_same(batch, single)
    assert any(r.n_faces > 0 for r in batch)


def test_astronaut_inference(detector):
    img = Image.fromarray(data.astronaut())
    (res,) = detector.detect_images([img])
    assert res.found and 0.5 < res.confidence <= 1.0 and res.n_faces >= 1
    x1, y1, x2, y2 = res.box
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    crop = crop_face(img, res, margin=20)
    assert crop.size == (round(x2 + 20) - round(x1 - 20), round(y2 + 20) - round(y1 - 20))


def test_for_inference_folds_every_batchnorm_and_keeps_the_outputs():
    torch.manual_seed(1)
    det = FaceDetector(FaceConfig(detect_long_side=LONG, confidence_threshold=0.5))
    # Random-init BatchNorm is the identity; real statistics make a wrong conv/BN pairing visible.
    gen = torch.Generator().manual_seed(2)
    for bn in (m for m in det.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        for t, lo, hi in ((bn.running_mean, -0.5, 0.5), (bn.running_var, 0.5, 2.0), (bn.weight, 0.5, 1.5),
                          (bn.bias, -0.2, 0.2)):
            t.data.copy_(torch.rand(t.shape, generator=gen) * (hi - lo) + lo)
    before = {k: v.clone() for k, v in det.state_dict().items()}
    fused = for_inference(det, "cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert fused.net.body.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    after = det.state_dict()  # the original is untouched: it still saves in the package's layout
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())

    x = torch.randn(2, 3, 128, 160)
    with torch.inference_mode():
        ref, out = det.net(x), fused.net(x.contiguous(memory_format=torch.channels_last))
    for a, b in zip(ref, out):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    images = [Image.fromarray(data.astronaut()), _rgb(300, 200, 3)]
    _assert_same(fused.detect_images(images), det.detect_images(images))
    assert for_inference(None, "cpu") is None


def test_empty_batch(detector):
    assert detector.detect([]) == []


# ---------------------------------------------------------------- decode, independent of weights


def _fake_net(hp: int, wp: int, per_image: list[list[tuple[tuple[float, float, float, float], int, float]]]):
    """A forward returning, for each image, logit 6 (face) at given priors with encoded boxes
    (detector pixels on the padded canvas), and a background logit everywhere else."""
    priors = _priors(hp, wp)
    n = priors.shape[0]
    loc = torch.zeros(len(per_image), n, 4)
    conf = torch.tensor([3.0, -3.0]).repeat(len(per_image), n, 1)
    for b, faces in enumerate(per_image):
        for box, k, logit in faces:
            norm = torch.tensor([box]) / torch.tensor([wp, hp, wp, hp])
            loc[b, k] = encode(norm, priors[k : k + 1], list(VARIANCE))[0]
            conf[b, k] = torch.tensor([0.0, logit])

    def forward(x: torch.Tensor):
        assert x.shape[2:] == (hp, wp)
        return loc, conf, torch.zeros(len(per_image), n, 10)

    return forward


def _prior_near(hp: int, wp: int, cx: float, cy: float) -> int:
    p = _priors(hp, wp)
    d = (p[:, 0] * wp - cx) ** 2 + (p[:, 1] * hp - cy) ** 2
    return int(torch.argmin(d))


def test_decode_scale_pad_and_clip(detector, monkeypatch):
    # Image 0: original 600x400 seen at 150x100 (scale 0.25); image 1: 120x90, not downscaled.
    # The batch pads to 128x160.
    hp, wp = 128, 160
    a0 = (np.zeros((100, 150, 3), np.uint8), 0.25)
    a1 = (np.zeros((90, 120, 3), np.uint8), 1.0)
    face0 = (40.0, 30.0, 90.0, 70.0)
    dup0 = (42.0, 31.0, 91.0, 72.0)  # overlaps face0 -> removed by NMS
    edge0 = (120.0, 60.0, 170.0, 110.0)  # centre inside, corner past the image -> clipped
    pad0 = (140.0, 20.0, 170.0, 50.0)  # centre x=155 >= 150: in the padding -> dropped
    face1 = (10.0, 20.0, 50.0, 60.0)
    fake = _fake_net(hp, wp, [
        [(face0, _prior_near(hp, wp, 65, 50), 6.0), (dup0, _prior_near(hp, wp, 50, 40), 5.0),
         (edge0, _prior_near(hp, wp, 145, 85), 4.0), (pad0, _prior_near(hp, wp, 155, 35), 8.0)],
        [(face1, _prior_near(hp, wp, 30, 40), 2.0)],
    ])
    monkeypatch.setattr(detector.net, "forward", fake)
    r0, r1 = detector.detect([a0, a1], sizes=[(600, 400), (120, 90)])

    assert r0.n_faces == 2  # face0 and edge0
    np.testing.assert_allclose(r0.box, [160.0, 120.0, 360.0, 280.0], atol=1e-3)
    assert r0.confidence == pytest.approx(torch.softmax(torch.tensor([0.0, 6.0]), 0)[1].item(), abs=1e-5)
    assert r1.n_faces == 1
    np.testing.assert_allclose(r1.box, face1, atol=1e-3)

    # Without sizes the original size is inferred from the scale (exact here: 150 / 0.25 = 600).
    r0b, _ = detector.detect([a0, a1])
    np.testing.assert_allclose(r0b.box, r0.box, atol=1e-3)

    # The edge box alone: mapped x4 then clipped to the 600x400 image.
    fake = _fake_net(hp, wp, [[(edge0, _prior_near(hp, wp, 145, 85), 4.0)], []])
    monkeypatch.setattr(detector.net, "forward", fake)
    r0, r1 = detector.detect([a0, a1], sizes=[(600, 400), (120, 90)])
    np.testing.assert_allclose(r0.box, [480.0, 240.0, 600.0, 400.0], atol=1e-3)
    assert not r1.found and r1.n_faces == 0 and r1.confidence == 0.0

    # Two faces: the more confident one wins though its prior comes later (first-found would take face0).
    later = _prior_near(hp, wp, 145, 85)
    assert later > _prior_near(hp, wp, 65, 50)
    fake = _fake_net(hp, wp, [[(face0, _prior_near(hp, wp, 65, 50), 6.0), (edge0, later, 7.0)], []])
    monkeypatch.setattr(detector.net, "forward", fake)
    r0, _ = detector.detect([a0, a1], sizes=[(600, 400), (120, 90)])
    assert r0.n_faces == 2
    np.testing.assert_allclose(r0.box, [480.0, 240.0, 600.0, 400.0], atol=1e-3)


def test_faces_past_any_edge_are_dropped_alike(detector, monkeypatch):
    # A 160x128 image (no padding): boxes centred 10 px past the left and right edges are mirror
    # images of each other; neither is a face in this photo. The one centred inside is.
    hp, wp = 128, 160
    left, right, top = (-40.0, 40.0, 20.0, 80.0), (140.0, 40.0, 200.0, 80.0), (60.0, -50.0, 100.0, 30.0)
    inside = (60.0, 40.0, 100.0, 80.0)
    cases = {"left": (left, _prior_near(hp, wp, 0, 60)), "right": (right, _prior_near(hp, wp, 159, 60)),
             "top": (top, _prior_near(hp, wp, 80, 0))}
    for name, (box, k) in cases.items():
        monkeypatch.setattr(detector.net, "forward", _fake_net(hp, wp, [[(box, k, 8.0)]]))
        (r,) = detector.detect([(np.zeros((hp, wp, 3), np.uint8), 1.0)])
        assert not r.found and r.n_faces == 0, name
    monkeypatch.setattr(detector.net, "forward", _fake_net(hp, wp, [[(left, cases["left"][1], 8.0),
                                                                     (inside, _prior_near(hp, wp, 80, 60), 3.0)]]))
    (r,) = detector.detect([(np.zeros((hp, wp, 3), np.uint8), 1.0)])
    assert r.n_faces == 1
    np.testing.assert_allclose(r.box, inside, atol=1e-3)


def test_nms_never_suppresses_across_images_of_a_batch(detector, monkeypatch):
    # The batch's NMS runs in one call: the same face in images 0 and 2 must survive in both,
    # each image's own duplicate must not, and the empty image between them stays empty.
    hp, wp = 128, 160
    inputs = [(np.zeros((120, 160, 3), np.uint8), 1.0)] * 3
    face, dup = (40.0, 30.0, 90.0, 70.0), (42.0, 31.0, 91.0, 72.0)
    k_face, k_dup = _prior_near(hp, wp, 65, 50), _prior_near(hp, wp, 50, 40)
    one = [(face, k_face, 6.0), (dup, k_dup, 5.0)]
    monkeypatch.setattr(detector.net, "forward", _fake_net(hp, wp, [one, [], one]))
    r0, r1, r2 = detector.detect(inputs)
    assert (r0.n_faces, r1.n_faces, r2.n_faces) == (1, 0, 1)
    assert not r1.found and r1.confidence == 0.0
    np.testing.assert_allclose(r0.box, face, atol=1e-3)
    assert r2.box == r0.box and r2.confidence == r0.confidence
