"""Batch preparation (``piqa_core.stages.prepare_batch``): one bad image or a failed batched detection never
takes the batch's other rows down, and no work is done twice."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import piqa_core.stages as stages
from piqa_core.config import get_preset
from piqa_core.faces import FaceResult
from piqa_core.preprocess import make_crops


def _png(size: tuple[int, int], colour: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    img = Image.new("RGB", size, colour)
    img.paste((255, 255, 255), (size[0] // 4, size[1] // 4, size[0] // 2, size[1] // 2))
    img.save(buf, "PNG")
    return buf.getvalue()


class _Detector:
    """A face at the top-left quarter of every image but one size; raises on batches over ``most`` images
    (as a device out of memory would) and on any batch holding an image of width ``bad_width``."""

    needs_pixels = True

    def __init__(self, most: int = 100, bad_width: int = -1, no_face_width: int = -1) -> None:
        self.most, self.bad_width, self.no_face_width, self.calls = most, bad_width, no_face_width, []

    def detect_each(self, inputs, sizes):
        self.calls.append(len(inputs))
        if len(inputs) > self.most or any(w == self.bad_width for w, _ in sizes):
            raise RuntimeError("CUDA out of memory")
        return [FaceResult(None, 0.0, 0) if w == self.no_face_width else FaceResult((0.0, 0.0, w / 2, h / 2), 0.9, 1)
                for w, h in sizes]


ITEMS = [_png((320, 300), (200, 30, 30)), _png((330, 300), (30, 200, 30)), _png((340, 300), (30, 30, 200))]


def test_a_batch_whose_detection_fails_is_detected_row_by_row_with_the_same_results() -> None:
    cfg = get_preset("tiny")
    whole = stages.prepare_batch(ITEMS, cfg, _Detector())
    fallback = _Detector(most=1)
    rows = stages.prepare_batch(ITEMS, cfg, fallback)
    assert fallback.calls == [3, 1, 1, 1]
    assert list(rows["status"]) == ["ok"] * 3
    for name in ("face_box", "face_confidence", "whole", "face", "patches"):
        np.testing.assert_array_equal(rows[name], whole[name])


def test_an_image_whose_detection_fails_alone_is_an_internal_row_alone() -> None:
    rows = stages.prepare_batch(ITEMS, get_preset("tiny"), _Detector(bad_width=330))
    assert list(rows["status"]) == ["ok", "error", "ok"]
    assert rows["error_code"][1] == "internal" and rows["error_message"][1].startswith("RuntimeError: CUDA out of")
    assert rows["face_found"][0] and rows["face_found"][2]


@pytest.mark.parametrize(("mode", "calls"), [("five", 3), ("center", 3), ("random", 4)])
def test_without_a_face_the_whole_images_crops_serve_the_face_branch(monkeypatch, mode: str, calls: int) -> None:
    made = []
    monkeypatch.setattr(stages, "make_crops", lambda *a, **k: made.append(1) or make_crops(*a, **k))
    cfg = get_preset("tiny")
    rows = stages.prepare_batch(ITEMS[:2], cfg, _Detector(no_face_width=320), crop_mode=mode,
                                rng=np.random.default_rng(0))
    assert len(made) == calls  # 2 + 1: image 0 has no face (random crops: drawn anew for each branch)
    assert not rows["face_found"][0] and rows["face_found"][1]
    if mode != "random":
        np.testing.assert_array_equal(rows["face"][0], rows["whole"][0])
        img = Image.open(io.BytesIO(ITEMS[0]))
        np.testing.assert_array_equal(rows["face"][0], make_crops(img, cfg.preprocess, mode))


def test_a_predictor_leaves_the_callers_networks_as_they_are() -> None:
    from piqa_core.checkpoints import build_bundle

    bundle = build_bundle("tiny", seed=0)
    model = bundle.model.eval()
    shared = stages.Predictor(bundle.config, model, None, torch.device("cpu"))
    assert shared.model is model  # fp32, eval, on the device: used as it is, no copy
    model.backbone.to(torch.float64)  # a caller's float64 copy is not cast to fp32 behind its back
    other = stages.Predictor(bundle.config, model, None, torch.device("cpu"))
    assert other.model is not model and next(model.backbone.parameters()).dtype == torch.float64
    assert next(other.model.backbone.parameters()).dtype == torch.float32


def test_a_detector_that_fails_every_row_fails_the_batch() -> None:
    """A broken detector or device (a sticky CUDA error) is an error, not an internal row for every image."""
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        stages.prepare_batch(ITEMS, get_preset("tiny"), _Detector(most=0))
    one = stages.prepare_batch(ITEMS[:1], get_preset("tiny"), _Detector(most=0))  # alone: its own row
    assert one["error_code"][0] == "internal"


def test_a_detector_that_answers_for_fewer_images_is_not_taken_at_its_word() -> None:
    class Short(_Detector):
        def detect_each(self, inputs, sizes):
            return super().detect_each(inputs, sizes)[:1]  # one answer, whatever was asked

    rows = stages.prepare_batch(ITEMS, get_preset("tiny"), Short())
    assert list(rows["status"]) == ["ok"] * 3  # retried row by row: each answered alone
