"""The device preparation path (piqa_core.gpu_prep) against the PIL path (stages.prepare_batch).

On CPU, torchvision's libjpeg decodes bit-identically to Pillow's libjpeg-turbo (checked below), so
these tests isolate the on-device resampling, crops and detector batching. The ``gpu`` test runs the
same comparison with nvJPEG on CUDA. Networks are random-init tiny models: parity, not quality.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter
from scipy.stats import spearmanr
from skimage import data as skdata

import piqa_core.gpu_prep as gp
from piqa_core.checkpoints import build_bundle
from piqa_core.config import get_preset
from piqa_core.faces import FaceResult, detector_input, face_crop_box
from piqa_core.preprocess import ImageError, resize_short
from piqa_core.stages import Predictor, prepare_batch
from tests.corpus import astronaut, astronaut_jpeg_bytes, build_corpus

META = ("status", "error_code", "error_message", "width", "height", "face_found", "n_faces")


def _enc(img: Image.Image, fmt: str = "JPEG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _bomb_jpeg() -> bytes:
    """A small JPEG whose SOF0 claims 12000x12000 (144 MP > max_pixels): must never be decoded."""
    data = bytearray(astronaut_jpeg_bytes(90, 256, 256))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (12000).to_bytes(2, "big") * 2
    return bytes(data)


def mixed_items() -> tuple[list[str], list, list[bool]]:
    """(names, items, goes-to-nvJPEG) for the error-code / routing comparison."""
    nonsquare = astronaut_jpeg_bytes(85, 600, 400)
    noise = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    rows = [
        ("nonsquare", nonsquare, True),
        ("grey", _enc(astronaut(320, 256).convert("L"), quality=90), True),
        ("png", _enc(astronaut(300, 256), "PNG"), False),
        ("cmyk", _enc(astronaut(320, 256).convert("CMYK"), quality=95), False),
        ("truncated", nonsquare[: len(nonsquare) // 2], False),
        ("empty", b"", False),
        ("random", b"\x00\x17" + noise, False),
        ("too_small", astronaut_jpeg_bytes(90, 200, 150), False),
        ("bomb", _bomb_jpeg(), False),
        ("read_failed", ImageError("read_failed", "upstream read failed"), False),
    ]
    return [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]


def varied_items() -> list[bytes]:
    """12 JPEGs with a spread of (random-model) scores: JPEG q5, blur, under/over-exposure x 3 photos.
    The blurred ones are progressive (SOF2)."""
    out = []
    for a in (skdata.astronaut(), skdata.coffee(), skdata.chelsea()):
        im = Image.fromarray(a)
        out += [_enc(im, quality=5), _enc(im.filter(ImageFilter.GaussianBlur(6)), quality=90, progressive=True),
                _enc(ImageEnhance.Brightness(im).enhance(0.35), quality=90),
                _enc(ImageEnhance.Brightness(im).enhance(1.8), quality=90)]
    return out


def host(cols: dict) -> dict:
    return {k: v.cpu().numpy() if isinstance(v, torch.Tensor) else v for k, v in cols.items()}


def diff(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16))


@pytest.fixture(scope="module")
def bundle():
    return build_bundle("tiny")


@pytest.fixture(scope="module")
def prepared(bundle):
    """Both paths over the mixed list + the 12 varied photos (one detector batch each)."""
    names, items, _ = mixed_items()
    items = items + varied_items()
    ref = prepare_batch(items, bundle.config, bundle.detector)
    dev = gp.prepare_batch_on_device(items, bundle.config, bundle.detector, torch.device("cpu"))
    return names, items, ref, dev


# ---------------------------------------------------------------- cheap unit checks


def test_routing_is_header_only_and_conservative():
    cfg = get_preset("tiny")
    names, items, want = mixed_items()
    got = [isinstance(it, bytes) and gp.nvjpeg_candidate(it, cfg) for it in items]
    assert dict(zip(names, got)) == dict(zip(names, want))
    good = astronaut_jpeg_bytes(90)
    assert not gp.nvjpeg_candidate(good + b"trailing", cfg)  # no EOI at the end: PIL decides
    progressive = varied_items()[1]
    assert gp._sof_marker(good) == 0xC0 and gp._sof_marker(progressive) == 0xC2
    assert gp.nvjpeg_candidate(progressive, cfg)


def test_cpu_decode_is_bit_identical_to_pil():
    names, items, route = mixed_items()
    blobs = [it for it, r in zip(items, route) if r]
    for blob, got in zip(blobs, gp._decode(blobs, torch.device("cpu"))):
        want = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"))
        np.testing.assert_array_equal(got.permute(1, 2, 0).numpy(), want)


@pytest.mark.parametrize("size", [(512, 512), (600, 400), (451, 300), (150, 170), (3001, 2001)])
def test_resize_matches_pil(size):
    w, h = size
    img = Image.fromarray(skdata.coffee()).resize((w, h), Image.BICUBIC)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    for s in (448, 72):
        d = diff(gp.resize_short_tensor(t, s).permute(1, 2, 0).numpy(), np.asarray(resize_short(img, s)))
        # Measured: max 1 except 512->448 (max 2, mean 0.022: float32 vs Pillow's fixed point at exact halves).
        assert d.max() <= 2 and d.mean() < 0.03, (size, s, d.max(), d.mean())
    for side in (640, 160):
        small, scale = gp.detector_input_tensor(t, side)
        want, want_scale = detector_input(img, side)
        d = diff(small.permute(1, 2, 0).numpy(), want)
        # Measured: max 1 and mean <= 0.03, except 512->640 up (exact halves again: max 2 on 7e-5 of values).
        assert scale == want_scale and small.shape[1:] == want.shape[:2], (size, side)
        assert d.max() <= 2 and (d > 1).mean() < 1e-3 and d.mean() < 0.06, (size, side, d.max(), d.mean())


@pytest.mark.parametrize("shape, size, reducing_gap", [
    ((1001, 449), (998, 448), None),  # a tall face crop to 448: Pillow 13 goes vertically first
    ((449, 1001), (448, 998), None),
    ((300, 200), (200, 151), None),  # the height loses 100 pixels, more than twice the width's 49
    ((300, 200), (200, 149), None),  # ... not more than twice the width's 51
    ((3000, 900), (640, 192), 3.0),  # the detector's copy: the order is chosen on the reduced image
    ((900, 3000), (192, 640), 3.0),
])
def test_resize_runs_the_passes_in_pillows_order(shape, size, reducing_gap):
    """Rounding between the passes makes the order show: the other one is off by 1 on 10-25 % of values."""
    arr = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(arr).resize(size[::-1], Image.BILINEAR, reducing_gap=reducing_gap))
    got = gp.resize_tensor(torch.from_numpy(arr).permute(2, 0, 1), *size, reducing_gap=reducing_gap)
    d = diff(got.permute(1, 2, 0).numpy(), want)
    assert d.max() <= 1 and (d > 0).mean() < 0.01, (shape, size, (d > 0).mean())


@pytest.mark.parametrize("factor", [2, 3, 4, 5, 6, 7])
def test_reduce_is_pillow_reduce_exactly(factor):
    """Pillow's integer ``reduce``: fixed-point block means, partial edge blocks, 1xN / Nx1 included."""
    rng = np.random.default_rng(factor)
    for fx, fy in ((factor, factor), (factor, 1), (1, factor), (factor, 2), (3, factor)):
        for w, h in ((97, 61), (64, 48), (factor * 11 + 1, factor * 7 + factor - 1), (factor - 1, factor + 1)):
            for arr in (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), np.full((h, w, 3), 255, np.uint8)):
                want = np.asarray(Image.fromarray(arr).reduce((fx, fy)))
                x = torch.from_numpy(arr).permute(2, 0, 1)[None].float()
                got = gp.reduce_tensor(x, fx, fy)[0].permute(1, 2, 0).to(torch.uint8).numpy()
                np.testing.assert_array_equal(got, want, err_msg=str((fx, fy, w, h)))


@pytest.mark.parametrize("size, side", [((1700, 1101), 160), ((2650, 1751), 160)])  # reduce 3x3, 5x5
def test_detector_input_with_reduce_matches_pil(size, side):
    w, h = size
    out_w, out_h = side, round(h * side / w)
    assert int(w / out_w / 3) == int(h / out_h / 3) == {1700: 3, 2650: 5}[w]
    for arr in (np.asarray(Image.fromarray(skdata.coffee()).resize(size, Image.BICUBIC)),
                np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)):
        small, scale = gp.detector_input_tensor(torch.from_numpy(arr.copy()).permute(2, 0, 1), side)
        want, want_scale = detector_input(Image.fromarray(arr), side)
        assert scale == want_scale and small.shape[1:] == want.shape[:2]
        d = diff(small.permute(1, 2, 0).numpy(), want)
        # Measured: max 1 on 0.008-0.018 % (3x) and 0.04-0.06 % (5x) of values, from the bilinear
        # passes only; a float block mean instead of Pillow's fixed point: 10-11 % (3x), 4 % (5x).
        assert d.max() <= 1 and (d > 0).mean() < 2e-3, (size, d.max(), (d > 0).mean())


def test_crop_is_pil_crop_with_black_outside():
    img = astronaut(120, 90)
    t = torch.from_numpy(np.array(img)).permute(2, 0, 1)
    for rect in [(10, 5, 60, 70), (-15, -10, 70, 100), (100, 80, 160, 130), (-5, -5, 0, 0), (-30, 20, -1, 40)]:
        got = gp.crop_pil_semantics(t, rect).permute(1, 2, 0).numpy()
        np.testing.assert_array_equal(got, np.asarray(img.crop(rect)))


def test_reduce_multipliers_are_uploaded_once_per_block_size_and_device():
    gp._reduce_multipliers_on.cache_clear()
    x = torch.rand(1, 3, 61, 83) * 255
    first = gp.reduce_tensor(x.round(), 2, 2)
    assert torch.equal(gp.reduce_tensor(x.round(), 2, 2), first)
    info = gp._reduce_multipliers_on.cache_info()
    assert (info.misses, info.hits) == (1, 1)


@pytest.mark.parametrize("mode", ["center", "random"])
def test_other_crop_modes(bundle, mode):
    items = [astronaut_jpeg_bytes(90, 600, 400), astronaut_jpeg_bytes(90, 300, 500)]
    ref = prepare_batch(items, bundle.config, None, mode, rng=np.random.default_rng(3))
    got = gp.prepare_batch_on_device(items, bundle.config, None, "cpu", mode, rng=np.random.default_rng(3))
    assert got["whole"].shape == ref["whole"].shape == (2, 1, 64, 64, 3)
    for k in ("whole", "face"):  # same rng draws -> same positions
        assert diff(got[k].numpy(), ref[k]).max() <= 1


# ---------------------------------------------------------------- full parity (detector + predictor)


def test_bad_file_corpus_gives_the_prep_stage_codes(bundle, tmp_path):
    """The whole corpus the pipeline tests use: the device path (here on CPU) and the prep actors'
    path give every file the same error code (on a GPU the score actors run this path)."""
    expected = build_corpus(tmp_path)
    items = [(tmp_path / name).read_bytes() for name in expected]
    ref = prepare_batch(items, bundle.config, bundle.detector)
    dev = gp.prepare_batch_on_device(items, bundle.config, bundle.detector, torch.device("cpu"))
    assert list(dev["error_code"]) == list(ref["error_code"])
    assert [c or None for c in dev["error_code"]] == list(expected.values())


@pytest.mark.slow
def test_rows_codes_and_faces_match_prepare_batch(prepared):
    names, items, ref, dev = prepared
    for k in META:
        assert list(dev[k]) == list(ref[k]), k
    n = len(names)
    assert dict(zip(names, dev["error_code"][:n])) == {
        "nonsquare": "", "grey": "", "png": "", "cmyk": "",
        "truncated": "truncated", "empty": "empty_file", "random": "not_an_image", "too_small": "too_small",
        "bomb": "decompression_bomb", "read_failed": "read_failed"}
    assert dev["face_found"].sum() > 0
    # The detector inputs differ by <= 1 level on ~0.5 % of values, so boxes move a little
    # (measured on CPU: max 0.13 px in original pixels, confidence 1e-4).
    np.testing.assert_allclose(dev["face_box"], ref["face_box"], atol=0.5)
    np.testing.assert_allclose(dev["face_confidence"], ref["face_confidence"], atol=1e-3)
    for k in ("whole", "face", "patches"):
        t = dev[k]
        assert isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.device.type == "cpu"
        assert tuple(t.shape) == ref[k].shape


def _same_rect(ref: dict, dev: dict, i: int, margin: int) -> bool:
    rect = lambda cols: face_crop_box(FaceResult(tuple(cols["face_box"][i])), margin) \
        if cols["face_found"][i] else None  # noqa: E731
    return rect(ref) == rect(dev)


@pytest.mark.slow
def test_pixels_match_prepare_batch(bundle, prepared):
    *_, ref, dev = prepared
    ok = ref["status"] == "ok"
    np.testing.assert_array_equal(dev["patches"].numpy()[ok], ref["patches"][ok])  # exact slices
    # Measured on CPU over 18 photos: whole max 1, mean 0.0008 per value; face (same crop rect)
    # max 1, mean 0.0012. One face rect in 18 moved by 1 px (box rounding), so its crop differs more.
    d = diff(dev["whole"].numpy()[ok], ref["whole"][ok])
    assert d.max() <= 1 and d.mean() < 0.005, (d.max(), d.mean())
    same = [i for i in np.flatnonzero(ok) if _same_rect(ref, dev, i, bundle.config.face.margin)]
    assert len(same) >= ok.sum() - 2
    d = diff(dev["face"].numpy()[same], ref["face"][same])
    assert d.max() <= 1 and d.mean() < 0.005, (d.max(), d.mean())


@pytest.mark.slow
def test_scores_match_prepare_batch(bundle, prepared):
    names, _, ref, dev = prepared
    varied = slice(len(names), None)  # the 12 photos with a spread of scores (all rows: ~2x the time)
    pred = Predictor(bundle.config, bundle.model, bundle.liqe, torch.device("cpu"))
    want = pred({k: v[varied] for k, v in ref.items()})["score"]
    got = pred(host({k: v[varied] for k, v in dev.items()}))["score"]
    d = np.abs(got - want)
    # Measured on CPU: max 6.7e-4 on the one photo whose face rect moved 1 px, <= 1.8e-5 elsewhere;
    # mean 4e-5; score std 0.086; SRCC 1.0.
    same = [i - len(names) for i in range(len(names), len(ref["status"]))
            if _same_rect(ref, dev, i, bundle.config.face.margin)]
    assert d.max() < 5e-3 and d[same].max() < 1e-4, d
    assert spearmanr(got, want)[0] >= 0.99


@pytest.mark.gpu
@pytest.mark.slow
def test_cuda_nvjpeg_parity(monkeypatch):
    """nvJPEG + CUDA transforms vs the PIL path with the same CUDA detector; prints what it measured."""
    b = build_bundle("tiny")
    cfg, cuda = b.config, torch.device("cuda")
    det = b.detector.to(cuda)
    names, items, route = mixed_items()
    items = items + varied_items()
    real, calls = gp.decode_jpeg, []

    def spy(data, **kw):
        calls.append((len(data), str(kw.get("device"))))
        return real(data, **kw)

    monkeypatch.setattr(gp, "decode_jpeg", spy)
    dev = gp.prepare_batch_on_device(items, cfg, det, cuda)
    ref = prepare_batch(items, cfg, det)
    assert calls == [(sum(route) + 12, "cuda")], f"nvJPEG refused some files (per-item retries): {calls}"
    for k in META[:5]:
        assert list(dev[k]) == list(ref[k]), k
    assert all(dev[k].device.type == "cuda" for k in ("whole", "face", "patches"))

    ok = ref["status"] == "ok"
    d = {k: diff(dev[k].cpu().numpy()[ok], ref[k][ok]) for k in ("whole", "face", "patches")}
    box = np.nanmax(np.abs(dev["face_box"] - ref["face_box"])) if ref["face_found"].any() else 0.0
    pred = Predictor(cfg, b.model, b.liqe, cuda)
    want, got = pred(ref)["score"], pred(host(dev))["score"]
    varied = slice(len(names), None)
    srcc = spearmanr(got[varied], want[varied])[0]
    print("\nCUDA parity: " + ", ".join(f"{k} max {v.max()} mean {v.mean():.4f}" for k, v in d.items())
          + f"; face box max |d| {box:.3f} px; score max |d| {np.abs(got[ok] - want[ok]).max():.2e}"
          f" (std {want[varied].std():.3f}); SRCC {srcc:.4f}")
    assert list(dev["face_found"]) == list(ref["face_found"])
    assert box <= 2.0
    # torchvision's nvJPEG call upsamples 4:2:0 chroma nearest-neighbour, Pillow interpolates ("fancy"):
    # emulated on CPU that is mean 0.3-0.7, max ~28 per value at full resolution (LIQE patches).
    assert all(v.mean() < 2.0 for v in d.values()), {k: float(v.mean()) for k, v in d.items()}
    assert np.abs(got[ok] - want[ok]).max() < 0.01 and srcc >= 0.99
