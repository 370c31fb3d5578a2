"""Training's feature cache: what scoring detected is what training crops, to the pixel."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image
from skimage import data as skdata

from piqa_core.config import get_preset
from piqa_core.faces import FaceResult, face_crop_box
from piqa_core.training import FeatureCache, fill_cache

# float32 moves this coordinate from just above .5 to exactly .5, where round() goes to even instead:
# round(x - 20) is 1069 in float64 and 1068 after a float32 round trip.
BOX = (1088.5000568190756, 40.25, 1300.75, 260.5)


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skdata.astronaut()).resize((1400, 1000)).save(buf, "JPEG")
    return buf.getvalue()


class _FixedDetector:
    """Stands in for RetinaFace: one face at BOX in every image."""

    def detect_each(self, inputs, sizes):
        return [FaceResult(BOX, 0.93, 1) for _ in inputs]


def test_fill_cache_keeps_the_detected_box_exactly() -> None:
    assert round(np.float32(BOX[0]) - 20) != round(BOX[0] - 20)  # the case is a real one
    cache = FeatureCache("fp")
    fill_cache([_jpeg()], ["a.jpg"], get_preset("tiny"), _FixedDetector(), None, cache, torch.device("cpu"))
    assert cache.faces["a.jpg"].box == BOX
    assert face_crop_box(cache.faces["a.jpg"], 20)[0] == 1069


def test_cache_file_round_trip_keeps_boxes_exactly() -> None:
    cache = FeatureCache("fp")
    cache.put("a.jpg", FaceResult(BOX, 0.93, 2), np.arange(4, dtype=np.float32))
    cache.put("b.jpg", FaceResult(None, 0.0, 0), np.ones(4, np.float32))
    back = FeatureCache("fp")
    back.add_columns(FeatureCache.read_npz(cache.to_npz()))
    assert back.faces["a.jpg"].box == BOX and back.faces["a.jpg"].n_faces == 2
    assert back.faces["b.jpg"].box is None
    np.testing.assert_array_equal(back.aux["a.jpg"], np.arange(4))
