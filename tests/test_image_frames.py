"""Which frame is decoded: frame 0 of animations and multi-page files, whatever frame a caller's image is on."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from piqa_core.config import PreprocessConfig
from piqa_core.preprocess import ImageError, decode_image, load_image
from tests.corpus import astronaut, build_corpus, gif_frames

CFG = PreprocessConfig()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    d = tmp_path_factory.mktemp("corpus")
    return d, build_corpus(d)


def _decode(corpus: tuple[Path, dict[str, str | None]], name: str) -> Image.Image:
    return decode_image((corpus[0] / name).read_bytes(), CFG)


@pytest.mark.parametrize("name", ["animated.gif", "animated.png"])
def test_animation_gives_frame_0(corpus, name: str) -> None:
    with Image.open(corpus[0] / name) as src:
        assert src.n_frames == 3
    want = np.asarray(gif_frames()[0].convert("RGB"))
    np.testing.assert_array_equal(np.asarray(_decode(corpus, name)), want)


@pytest.mark.parametrize("name", ["animated.gif", "animated.png"])  # APNG frames are RGB: _to_rgb returns img
def test_pil_input_seeked_elsewhere_gives_frame_0_and_stays_where_it_was(corpus, name: str) -> None:
    img = Image.open(corpus[0] / name)
    img.seek(2)
    frame_2 = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(np.asarray(load_image(img, CFG)), np.asarray(gif_frames()[0].convert("RGB")))
    assert img.tell() == 2 and np.array_equal(np.asarray(img.convert("RGB")), frame_2)


def test_multipage_tiff_gives_page_0(corpus) -> None:
    np.testing.assert_array_equal(np.asarray(_decode(corpus, "multipage.tif")), np.asarray(astronaut(320, 256)))


def test_a_caller_image_on_a_later_page_is_checked_as_page_0(tmp_path: Path) -> None:
    """The size and pixel guards looked at the caller's current page, then page 0 was decoded unchecked."""
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), (9, 9, 9)).save(buf, "TIFF", save_all=True, append_images=[astronaut(320, 256)])
    img = Image.open(buf)
    img.seek(1)
    with pytest.raises(ImageError) as ei:
        load_image(img, CFG)
    assert ei.value.code == "too_small" and img.tell() == 1
    big = io.BytesIO()
    Image.new("RGB", (600, 600)).save(big, "TIFF", save_all=True, append_images=[astronaut(320, 256)])
    img = Image.open(big)
    img.seek(1)
    with pytest.raises(ImageError) as ei:
        load_image(img, PreprocessConfig(max_pixels=200_000))
    assert ei.value.code == "decompression_bomb" and "360000 pixels" in ei.value.message
