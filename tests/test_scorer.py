"""The in-process Scorer: inputs of every kind, error rows, batching, and parity with the official steps."""


import threading

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms

from piqa_core.checkpoints import build_bundle, save_checkpoint
from piqa_core.faces import crop_face
from piqa_core.liqe import extract_patches
from piqa_core.scorer import Scorer
from tests.corpus import astronaut, astronaut_jpeg_bytes


@pytest.fixture(scope="module")
def scorer():
    return Scorer.from_pretrained("tiny", random_weights=True, device="cpu")


def test_accepts_paths_bytes_pil_and_arrays(scorer, tmp_path):
    img = np.asarray(astronaut())
    path = tmp_path / "a.png"
    Image.fromarray(img).save(path)
    rows = scorer.score([str(path), path.read_bytes(), Image.fromarray(img), img], batch_size=3)
    assert [r["status"] for r in rows] == ["ok"] * 4
    scores = [r["score"] for r in rows]
    assert np.allclose(scores, scores[0], atol=1e-5)
    assert rows[0]["width"] == 512 and rows[0]["height"] == 512
    assert rows[0]["liqe_scene_top"] in {"animal", "cityscape", "human", "indoor", "landscape", "night",
                                         "plant", "still_life", "others"}


def test_one_image_not_in_a_list_is_refused_not_taken_apart(scorer, tmp_path):
    img = np.asarray(astronaut())
    for one in (str(tmp_path / "a.png"), tmp_path / "a.png", astronaut_jpeg_bytes(), Image.fromarray(img), img):
        with pytest.raises(TypeError, match=rf"got one {type(one).__name__}: pass \[image\] to score one"):
            scorer.score(one)


def test_an_item_that_is_no_image_is_refused_before_any_work(scorer, monkeypatch):
    monkeypatch.setattr(scorer, "score_chunks", lambda *a: pytest.fail("scored before checking the items"))
    for bad in (5, None, {"uri": "a.jpg"}):
        with pytest.raises(TypeError, match=rf"item 1 is a {type(bad).__name__}: pass paths, encoded bytes"):
            scorer.score([astronaut_jpeg_bytes(), bad])


def test_a_read_that_failed_upstream_becomes_its_error_row(scorer):
    from piqa_core.errors import ImageError

    [row] = scorer.score([ImageError("not_found", "gone")])
    assert (row["status"], row["error_code"], row["error_message"]) == ("error", "not_found", "gone")


def test_bad_inputs_become_error_rows_in_order(scorer, tmp_path):
    good = astronaut_jpeg_bytes()
    rows = scorer.score([good, b"", b"not an image", str(tmp_path / "missing.jpg"), good[: len(good) // 2], good])
    assert [r["status"] for r in rows] == ["ok", "error", "error", "error", "error", "ok"]
    assert [r["error_code"] for r in rows] == [None, "empty_file", "not_an_image", "not_found", "truncated", None]
    assert rows[1]["score"] is None and rows[0]["score"] == pytest.approx(rows[5]["score"], abs=1e-5)


def test_batch_size_does_not_change_scores(scorer):
    rng = np.random.default_rng(0)
    imgs = [rng.integers(0, 255, (rng.integers(240, 400), rng.integers(240, 400), 3), dtype=np.uint8)
            for _ in range(5)]
    a = [r["score"] for r in scorer.score(imgs, batch_size=1)]
    b = [r["score"] for r in scorer.score(imgs, batch_size=5)]
    assert np.allclose(a, b, atol=1e-5)


def test_center_mode_scores_one_crop(scorer):
    center = Scorer(scorer.bundle, device="cpu", crop_mode="center")
    cols = center.score_columns([astronaut()])
    assert cols["whole"].shape[1] == 1 and cols["face"].shape[1] == 1


def test_scores_match_the_official_steps(scorer):
    """Re-derive the score with the official code's operations (torchvision transforms, PIL crop,
    LIQE from the full-resolution tensor) and compare with the Scorer."""
    cfg = scorer.config
    img = Image.fromarray(np.asarray(astronaut())[:, 40:])  # non-square
    cols = scorer.score_columns([img])
    face = scorer.detector.detect_images([img])[0]
    face_img = crop_face(img, face, cfg.face.margin)
    tf = transforms.Compose([
        transforms.Resize(cfg.preprocess.resize), transforms.FiveCrop(cfg.preprocess.crop),
        lambda crops: torch.stack([transforms.Normalize(cfg.preprocess.mean, cfg.preprocess.std)(
            transforms.ToTensor()(c)) for c in crops]),
    ])
    patches = torch.from_numpy(extract_patches(np.asarray(img), cfg.liqe))[None]
    with torch.inference_mode():
        aux = scorer.bundle.liqe(patches)
        out = scorer.model(tf(img), tf(face_img), torch.cat([aux] * 5))
    assert float(out.mean()) == pytest.approx(float(cols["score"][0]), abs=1e-5)
    assert cols["face_found"][0] == face.found


def test_from_pretrained_directory_matches_in_memory(tmp_path, scorer):
    save_checkpoint(scorer.bundle, tmp_path / "m")
    loaded = Scorer.from_pretrained(tmp_path / "m", device="cpu")
    assert loaded.sha256 == scorer.sha256
    img = np.asarray(astronaut())
    assert loaded.score([img])[0]["score"] == pytest.approx(scorer.score([img])[0]["score"], abs=1e-6)


def test_from_pretrained_remote_follows_a_rewritten_source(tmp_path, monkeypatch):
    """A remote model directory written again (a retrained model/) is fetched again, not served stale."""
    from tests.test_weight_cache import _source

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # the cache: tmp_path/piqa
    fetch, read, fetched, _ = _source(tmp_path)

    def load() -> str:
        return Scorer.from_pretrained("s3://b/model", device="cpu", fetch=fetch, read=read).sha256

    first = save_checkpoint(build_bundle("tiny", seed=1), tmp_path / "src")
    assert load() == first and load() == first and len(fetched) == 1  # the second from the cache
    second = save_checkpoint(build_bundle("tiny", seed=2), tmp_path / "src")
    assert load() == second and len(fetched) == 2


def test_batch_size_of_the_scorer_is_the_default_and_crop_modes_are_checked(scorer, monkeypatch):
    fixed = Scorer(scorer.bundle, device="cpu", batch_size=3, calls=1)
    sizes, real = [], fixed.score_columns
    monkeypatch.setattr(fixed, "score_columns", lambda items: sizes.append(len(items)) or real(items))
    img = np.asarray(astronaut())
    assert len(fixed.score([img] * 7)) == 7 and sizes == [3, 3, 1]
    assert len(fixed.score([img] * 2, batch_size=1)) == 2 and sizes[3:] == [1, 1]
    for mode in ("centre", "random"):  # a typo, and training's crop (scores would differ every call)
        with pytest.raises(ValueError, match="crop_mode must be one of"):
            Scorer(scorer.bundle, device="cpu", crop_mode=mode)


def test_bf16_precision_is_close_on_cpu_and_leaves_the_bundle_fp32(scorer):
    bundle = build_bundle("tiny")
    fast = Scorer(bundle, device="cpu", precision="bf16")
    assert next(fast.model.backbone.parameters()).dtype == torch.bfloat16
    liqe = fast.predictor.liqe
    assert liqe.clip.visual.conv1.weight.dtype == torch.bfloat16
    # one number scales all 495 LIQE logits: rounded to bf16, exp(ln 100) would be 99.0
    assert liqe.clip.logit_scale.dtype == liqe.text_features.dtype == torch.float32
    assert liqe.clip.logit_scale.exp().item() == pytest.approx(bundle.liqe.clip.logit_scale.exp().item(), rel=1e-6)
    torch.testing.assert_close(liqe.text_features, bundle.liqe.text_features, rtol=0, atol=0)
    # bf16 would round LIQE features of 16-32 to 0.125; and the head is never rounded through bf16 on the way
    for got, want in zip(fast.model.head.parameters(), bundle.model.head.parameters()):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    img = np.asarray(astronaut())
    assert fast.score([img])[0]["score"] == pytest.approx(scorer.score([img])[0]["score"], abs=0.05)
    # bf16 ran on copies: the bundle still hashes and scores as the fp32 model it was
    assert next(bundle.model.parameters()).dtype == bundle.liqe.text_features.dtype == torch.float32
    assert fast.sha256 == bundle.sha256 == scorer.sha256
    assert Scorer(bundle, device="cpu").score([img])[0]["score"] == scorer.score([img])[0]["score"]


def test_a_non_finite_score_is_an_error_row_not_an_ok_nan():
    bundle = build_bundle("tiny", seed=1)
    scorer = Scorer(bundle, device="cpu")
    good = astronaut_jpeg_bytes()
    healthy = scorer.score([good])[0]
    with torch.no_grad():
        bundle.model.head[-1].bias.fill_(float("inf"))  # what diverged training or a damaged file gives
    rows = scorer.score([good, b"", good])
    assert healthy["status"] == "ok" and np.isfinite(healthy["score"])
    assert [(r["status"], r["error_code"], r["score"]) for r in rows] == [
        ("error", "non_finite_score", None), ("error", "empty_file", None), ("error", "non_finite_score", None)]
    assert rows[0]["error_message"] == "the model returned inf (diverged or damaged weights?)"


def test_random_weights_are_marked():
    bundle = build_bundle("tiny")
    assert Scorer(bundle, device="cpu").bundle.random_init


def test_the_caller_chooses_the_device_not_the_constructor():
    with pytest.raises(TypeError, match="device"):
        Scorer(build_bundle("tiny"))  # a library constructor picks no device; from_pretrained does


def test_compiled_static_batches_match_eager(scorer):
    from piqa_core.stages import Predictor

    bundle = build_bundle("tiny")
    compiled = Predictor(bundle.config, bundle.model, bundle.liqe, torch.device("cpu"), compile=True, batch_size=4)
    cols = scorer.score_columns([np.asarray(astronaut())] * 3 + [b""] + [np.asarray(astronaut())[:, 100:]] * 3)
    got = compiled(cols)["score"]
    assert np.isnan(got[3]) and np.allclose(np.delete(got, 3), np.delete(cols["score"], 3), atol=1e-4)


def _tf32_flags() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_forward_never_flips_tf32_flags_under_other_threads(scorer):
    """Face detection may run on another thread during a forward: the flags it sees must not change."""
    before, seen = _tf32_flags(), []
    pred = scorer.predictor
    model_fn = pred._model_fn
    pred._model_fn = lambda *a, **kw: seen.append(_tf32_flags()) or model_fn(*a, **kw)
    try:
        scorer.score([np.asarray(astronaut())])
    finally:
        pred._model_fn = model_fn
    assert seen == [before] and _tf32_flags() == before


@pytest.mark.parametrize("precision,flags", [("fp32", (False, False)), ("tf32", (True, True)),
                                             ("bf16", (False, True))])
def test_use_tf32_sets_flags_per_precision(precision, flags):
    from piqa_core.stages import use_tf32

    saved = _tf32_flags()
    try:
        use_tf32(precision)
        assert _tf32_flags() == flags
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.gpu
@pytest.mark.parametrize("precision,tol", [("fp32", 1e-3), ("tf32", 5e-3), ("bf16", 0.05)])
def test_cuda_matches_cpu(scorer, precision, tol):
    gpu = Scorer(build_bundle("tiny"), device="cuda", precision=precision)
    imgs = [np.asarray(astronaut()), np.asarray(astronaut())[50:, 30:]]
    want = [r["score"] for r in scorer.score(imgs)]
    got = [r["score"] for r in gpu.score(imgs)]
    assert np.allclose(got, want, atol=tol), (got, want)


def test_cpu_batches_run_as_one_call_per_thread_with_the_same_scores(scorer):
    rng = np.random.default_rng(1)
    imgs = [rng.integers(0, 255, (300, 260, 3), dtype=np.uint8) for _ in range(5)]
    one = Scorer(scorer.bundle, device="cpu", calls=1)
    two = Scorer(scorer.bundle, device="cpu", calls=2)
    calls = []
    score_columns = two.score_columns

    def record(items):
        calls.append((len(items), threading.current_thread().name, torch.get_num_threads()))
        return score_columns(items)

    two.score_columns = record
    want = [r["score"] for r in one.score(imgs, batch_size=8)]
    got = [r["score"] for r in two.score(imgs, batch_size=8)]
    assert np.allclose(got, want, atol=1e-5)
    # 5 images, batch 8, 2 calls: chunks of 3 and 2 so that both calls get one, on 1 torch thread each
    assert sorted(n for n, _, _ in calls) == [2, 3]
    assert all(name.startswith("piqa-call") and threads == 1 for _, name, threads in calls)


def test_fewer_items_than_calls_run_as_one_call_on_all_threads_in_one_batch(scorer):
    four = Scorer(scorer.bundle, device="cpu", calls=4)
    seen = []
    score_columns = four.score_columns
    four.score_columns = lambda items: (seen.append((len(items), threading.current_thread().name)),
                                        score_columns(items))[1]
    assert [r["status"] for r in four.score([astronaut()] * 3)] == ["ok"] * 3
    assert seen == [(3, threading.current_thread().name)]  # not three passes of one image


def test_default_calls_follow_the_device(scorer):
    assert Scorer(scorer.bundle, device="cpu").calls == torch.get_num_threads()
    assert Scorer(scorer.bundle, device="cpu", calls=3).calls == 3


def test_scorers_sharing_a_bundle_leave_its_networks_as_they_were():
    from piqa_core.stages import Predictor

    bundle = build_bundle("tiny", seed=5)
    bundle.model.train()  # e.g. a model in the middle of training
    attention = lambda: [m.fused_attn for m in bundle.model.modules() if hasattr(m, "fused_attn")]  # noqa: E731
    before = attention()
    first = Scorer(bundle, device="cpu")
    assert bundle.model.training and not first.model.training
    elsewhere = Predictor(bundle.config, bundle.model, bundle.liqe, torch.device("meta"), fused_attn=True)
    assert next(elsewhere.model.parameters()).device.type == "meta"
    assert all(m.fused_attn for m in elsewhere.model.modules() if hasattr(m, "fused_attn"))
    networks = (bundle.model, bundle.liqe)
    assert all(t.device.type == "cpu" for n in networks for t in (*n.parameters(), *n.buffers()))
    assert attention() == before and False in before  # timm's Swin default, left alone
    assert first.score([astronaut_jpeg_bytes()])[0]["status"] == "ok"  # the first one still runs on the CPU
    bundle.model.eval()  # already as a CPU scorer wants it: used as is, no copy
    assert Scorer(bundle, device="cpu").model is bundle.model
    handed = Predictor(bundle.config, bundle.model, bundle.liqe, torch.device("meta"), own=True)
    assert handed.model is bundle.model and next(bundle.model.parameters()).device.type == "meta"


def test_one_lazily_opened_image_given_several_times_scores_alike_on_every_call():
    import io

    data = astronaut_jpeg_bytes(90, 1024, 768)
    two_calls = Scorer.from_pretrained("tiny", random_weights=True, device="cpu", calls=2)
    want = two_calls.score([data])[0]["score"]
    for _ in range(3):  # Pillow's load is not thread-safe: both calls loading it gave internal rows, other scores
        rows = two_calls.score([Image.open(io.BytesIO(data))] * 8, batch_size=2)
        assert [r["status"] for r in rows] == ["ok"] * 8
        assert np.allclose([r["score"] for r in rows], want, atol=1e-5)
