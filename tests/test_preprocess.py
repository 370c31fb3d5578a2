"""Decoding: the bad-file corpus, guards before decoding, mode mapping, input kinds."""

from __future__ import annotations

import io
import os
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import EpsImagePlugin, Image, ImageFile

from piqa_core.config import PreprocessConfig
from piqa_core.preprocess import (
    DECODABLE_FORMATS,
    ERROR_CODES,
    ImageError,
    decode_image,
    load_image,
)
from tests.corpus import (
    SIXTEEN_BIT_MARK,
    astronaut,
    astronaut_jpeg_bytes,
    build_corpus,
    sixteen_bit_grey,
    sixteen_bit_rgb,
)

CFG = PreprocessConfig()
TINY = PreprocessConfig(resize=72, crop=64, min_side=16)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str | None]]:
    d = tmp_path_factory.mktemp("corpus")
    return d, build_corpus(d)


def _names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        return sorted(build_corpus(Path(d)))


CORPUS_NAMES = _names()


def _decode(corpus: tuple[Path, dict[str, str | None]], name: str) -> Image.Image:
    return decode_image((corpus[0] / name).read_bytes(), CFG)


# ---------------------------------------------------------------- decoding


@pytest.mark.parametrize("name", CORPUS_NAMES)
def test_corpus_entry_gives_expected_code(corpus, name: str) -> None:
    d, expected = corpus
    data = (d / name).read_bytes()
    if expected[name] is None:
        img = decode_image(data, CFG)
        assert img.mode == "RGB"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            assert img.size == Image.open(io.BytesIO(data)).size
        assert np.asarray(img).shape == (img.height, img.width, 3)
    else:
        with pytest.raises(ImageError) as ei:
            decode_image(data, CFG)
        assert ei.value.code == expected[name]
        assert expected[name] in str(ei.value) and ei.value.message in str(ei.value)


def test_corpus_covers_every_decode_code(corpus) -> None:
    codes = set(corpus[1].values())
    want = {"empty_file", "not_an_image", "truncated", "decompression_bomb", "unsupported_mode", "too_small"}
    assert codes >= want | {None}


@pytest.mark.parametrize("name", ["grey16.png", "grey16.tif", "grey16.pgm"])
def test_16bit_grey_is_scaled_not_clipped(corpus, name: str) -> None:
    arr = np.asarray(_decode(corpus, name))
    want = (sixteen_bit_grey() >> 8).astype(np.uint8)
    assert tuple(arr[0, 0]) == (0xAB, 0xAB, 0xAB)
    np.testing.assert_array_equal(arr[..., 0], want)
    np.testing.assert_array_equal(arr[..., 0], arr[..., 2])
    assert (arr < 255).mean() > 0.9  # clipping would make nearly everything 255


def test_a_decoder_out_of_memory_is_internal_not_a_damaged_file(monkeypatch) -> None:
    from PIL import ImageFile

    def no_memory(self, *args, **kwargs):
        raise OSError("out of memory error when reading image file")  # what Pillow's decoders raise

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_memory)
    with pytest.raises(ImageError) as err:
        decode_image(astronaut_jpeg_bytes(90, 320, 256), CFG)
    assert err.value.code == "internal"  # transient: the audit retries it; "truncated" never would be


def test_16bit_white_is_zero_tiff_is_not_a_negative() -> None:
    import tifffile

    decoded = {}
    for bits, value in ((8, 78), (16, 20000)):  # 20000 >> 8 == 78
        buf = io.BytesIO()
        grey = np.full((256, 256), value, np.uint8 if bits == 8 else np.uint16)
        tifffile.imwrite(buf, grey, photometric="miniswhite")
        decoded[bits] = np.asarray(decode_image(buf.getvalue(), CFG))[0, 0]
    assert tuple(decoded[8]) == (177,) * 3  # Pillow's own inversion of 8-bit files
    assert tuple(decoded[16]) == tuple(decoded[8])


def test_16bit_rgb_png_keeps_high_byte(corpus) -> None:
    arr = np.asarray(_decode(corpus, "rgb16.png"))
    assert tuple(arr[0, 0]) == (SIXTEEN_BIT_MARK >> 8,) * 3
    np.testing.assert_array_equal(arr, (sixteen_bit_rgb() >> 8).astype(np.uint8))


def test_pil_16bit_grey_image_is_scaled() -> None:
    img = Image.fromarray(sixteen_bit_grey())
    assert img.mode == "I;16"
    assert tuple(np.asarray(load_image(img, CFG))[0, 0]) == (0xAB,) * 3


def test_alpha_dropped_and_cmyk_grey_faithful(corpus) -> None:
    ref = np.asarray(astronaut(320, 256)).astype(np.int16)
    np.testing.assert_array_equal(np.asarray(_decode(corpus, "rgba.png")), ref)
    cmyk = np.asarray(_decode(corpus, "cmyk.jpg")).astype(np.int16)
    assert np.abs(cmyk - ref).mean() < 6  # an inverted-CMYK mistake would be ~100
    grey = np.asarray(_decode(corpus, "grey.jpg"))
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


HEADER_CASES = [
    ("bomb_12000.png", "decompression_bomb"),
    ("bomb_30000.png", "decompression_bomb"),
    ("strip_20000x20.png", "too_small"),
    ("float32.tif", "unsupported_mode"),
]


@pytest.mark.parametrize("name,code", HEADER_CASES)
def test_header_guards_fire_before_decoding(corpus, monkeypatch, name: str, code: str) -> None:
    def no_load(self, *a, **k):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_load)
    monkeypatch.setattr(Image.Image, "load", no_load)
    t0 = time.perf_counter()
    with pytest.raises(ImageError) as ei:
        _decode(corpus, name)
    assert ei.value.code == code
    assert time.perf_counter() - t0 < 1.0


def test_max_pixels_and_min_side_come_from_config() -> None:
    data = astronaut_jpeg_bytes(90, 320, 256)
    with pytest.raises(ImageError, match="decompression_bomb"):
        decode_image(data, PreprocessConfig(max_pixels=320 * 256 - 1))
    with pytest.raises(ImageError, match="too_small"):
        decode_image(data, PreprocessConfig(min_side=257))
    assert decode_image(data, PreprocessConfig(max_pixels=320 * 256, min_side=256)).size == (320, 256)


def test_pil_global_limit_never_gives_another_code(monkeypatch) -> None:
    data = astronaut_jpeg_bytes(90, 320, 256)  # 81,920 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50_000)  # PIL would only warn
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert decode_image(data, CFG).size == (320, 256)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 20_000)  # PIL refuses: the same code as ours
    with pytest.raises(ImageError) as ei:
        decode_image(data, CFG)
    assert ei.value.code == "decompression_bomb"


def test_truncated_images_are_not_loaded_globally(corpus) -> None:
    assert not ImageFile.LOAD_TRUNCATED_IMAGES
    with pytest.raises(ImageError):
        _decode(corpus, "truncated.jpg")
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


EPS = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 300\n"
       b"newpath 0 0 moveto 300 300 lineto stroke\nshowpage\n%%EOF\n")


def test_eps_named_jpg_is_not_an_image_and_never_starts_ghostscript(tmp_path: Path, monkeypatch) -> None:
    assert Image.open(io.BytesIO(EPS)).format == "EPS"  # what an unrestricted open identifies

    def no_ghostscript(*args, **kwargs):
        raise AssertionError("Ghostscript was started")

    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", no_ghostscript)
    path = tmp_path / "photo.jpg"
    path.write_bytes(EPS)
    with pytest.raises(ImageError) as ei:
        load_image(path, CFG)
    assert ei.value.code == "not_an_image" and "supported format (JPEG, MPO" in ei.value.message


@pytest.mark.parametrize("fmt", ["PCX", "TGA", "ICO"])
def test_unlisted_pillow_formats_are_not_images(fmt: str) -> None:
    buf = io.BytesIO()
    astronaut(256, 256).save(buf, fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).format == fmt
    with pytest.raises(ImageError) as ei:
        decode_image(buf.getvalue(), CFG)
    assert ei.value.code == "not_an_image"


def test_mpo_decodes_its_first_frame() -> None:
    buf, first = io.BytesIO(), astronaut(320, 256)
    first.save(buf, "MPO", save_all=True, append_images=[Image.new("RGB", first.size, (0, 255, 0))])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    want = np.asarray(decode_image(astronaut_jpeg_bytes(75, 320, 256), CFG)).astype(np.int16)
    got = np.asarray(decode_image(buf.getvalue(), CFG)).astype(np.int16)
    assert got.shape == want.shape and np.abs(got - want).mean() < 1.0


def test_every_decodable_format_has_a_pillow_opener() -> None:
    Image.init()
    assert {"JPEG", "MPO", "PNG", "WEBP", "BMP", "TIFF", "GIF"} <= set(DECODABLE_FORMATS)
    assert set(DECODABLE_FORMATS) - {"MPO"} <= set(Image.OPEN)
    buf = io.BytesIO()
    astronaut(256, 256).save(buf, "BMP")
    assert decode_image(buf.getvalue(), CFG).size == (256, 256)


def test_unexpected_failure_is_internal(monkeypatch) -> None:
    grey = _encode_grey_jpeg()  # needs convert('RGB'), which we make fail

    def boom(self, *a, **k):
        raise RuntimeError("boom")

    monkeypatch.setattr(Image.Image, "convert", boom)
    with pytest.raises(ImageError) as ei:
        decode_image(grey, CFG)
    assert ei.value.code == "internal" and "boom" in ei.value.message


def _encode_grey_jpeg() -> bytes:
    buf = io.BytesIO()
    astronaut(256, 256).convert("L").save(buf, "JPEG")
    return buf.getvalue()


def test_image_error_contract() -> None:
    e = ImageError("too_small", "3x3 is tiny")
    assert (e.code, e.message, str(e)) == ("too_small", "3x3 is tiny", "too_small: 3x3 is tiny")
    assert len(ERROR_CODES) == 13 and {"too_large", "invalid_name", "not_a_file"} <= set(ERROR_CODES)
    with pytest.raises(ValueError):
        ImageError("nope", "x")


# ---------------------------------------------------------------- load_image


def test_load_image_sources(tmp_path: Path) -> None:
    data = astronaut_jpeg_bytes(90, 320, 256)
    path = tmp_path / "a.jpg"
    path.write_bytes(data)
    ref = np.asarray(decode_image(data, CFG))
    for src in (str(path), path, data, bytearray(data), Image.open(path)):
        np.testing.assert_array_equal(np.asarray(load_image(src, CFG)), ref)
    np.testing.assert_array_equal(np.asarray(load_image(ref, CFG)), ref)
    grey = np.asarray(load_image(ref[..., 0].copy(), CFG))
    assert grey.shape == ref.shape and (grey[..., 1] == ref[..., 0]).all()
    assert load_image(Image.fromarray(ref).convert("RGBA"), CFG).mode == "RGB"
    wide = ref.astype(np.uint16) << 8 | 200  # 16 bits (a raw converter's output): its high byte, as for 16-bit files
    np.testing.assert_array_equal(np.asarray(load_image(wide, CFG)), ref)
    np.testing.assert_array_equal(np.asarray(load_image(wide[..., 1], CFG))[..., 0], ref[..., 1])
    np.testing.assert_array_equal(np.asarray(load_image(wide.astype(">u2"), CFG)), ref)


@pytest.mark.parametrize("src,code", [
    (lambda p: p / "missing.jpg", "not_found"),
    (lambda p: str(p / "missing.jpg"), "not_found"),
    (lambda p: p, "not_a_file"),  # a directory: as the Ray reader says it (read_failed would be retried)
    (lambda p: os.mkfifo(p / "pipe.jpg") or p / "pipe.jpg", "not_a_file"),  # read, it would block for ever
    (lambda p: (p / "loop.jpg").symlink_to(p / "loop.jpg") or p / "loop.jpg", "not_a_file"),
    (lambda p: (p / "dangling.jpg").symlink_to(p / "gone.jpg") or p / "dangling.jpg", "not_a_file"),
    (lambda p: np.zeros((300, 300, 3), np.float32), "unsupported_mode"),
    (lambda p: np.zeros((300, 300, 4), np.uint8), "unsupported_mode"),
    (lambda p: np.zeros((100, 300, 3), np.uint8), "too_small"),
    (lambda p: Image.new("F", (300, 300)), "unsupported_mode"),
    (lambda p: Image.new("I", (300, 300)), "unsupported_mode"),
    (lambda p: Image.new("La", (300, 300)), "unsupported_mode"),  # Pillow cannot convert it to RGB
    (lambda p: b"", "empty_file"),
])
@pytest.mark.timeout(60)  # the FIFO case would block for ever, were the read not refused
def test_load_image_errors(tmp_path: Path, src, code: str) -> None:
    with pytest.raises(ImageError) as ei:
        load_image(src(tmp_path), CFG)
    assert ei.value.code == code


def test_load_image_rejects_unknown_type() -> None:
    with pytest.raises(TypeError):
        load_image(12345, CFG)  # type: ignore[arg-type]


def test_error_messages_are_stable_and_name_the_limit_in_force(corpus) -> None:
    """PIL's texts carried our BytesIO's address (every row's message unique, so none could be grouped)
    and, above twice PIL's own limit, quoted that limit (~179 MP) instead of max_pixels."""
    fake = b"\xff\xd8\xff\xe0" + b"\x00" * 64  # a JPEG signature and nothing a decoder can use
    said = set()
    for _ in range(2):
        with pytest.raises(ImageError) as ei:
            decode_image(fake, CFG)
        said.add(ei.value.message)
    [message] = said
    assert "0x" not in message and "BytesIO" not in message, message
    with pytest.raises(ImageError) as ei:
        _decode(corpus, "bomb_30000.png")
    assert ei.value.message == f"{30000 * 30000} pixels exceeds max_pixels={CFG.max_pixels}"
    assert message == "image header unreadable, truncated or corrupt: cannot identify image file"


def test_a_strip_that_the_resize_would_blow_up_is_refused_from_its_header() -> None:
    buf = io.BytesIO()
    Image.new("L", (224, 300_000)).save(buf, "PNG")  # 67 MP, under max_pixels; 448x600000 once resized
    with pytest.raises(ImageError, match=r"^decompression_bomb: 224x300000: resized to 448 px on its short side it "
                                         r"would hold 268800000 pixels, over 120000000$"):
        decode_image(buf.getvalue(), PreprocessConfig())
    buf = io.BytesIO()
    Image.new("L", (224, 10_000)).save(buf, "PNG")  # a 45:1 panorama strip is fine
    assert decode_image(buf.getvalue(), PreprocessConfig()).size == (224, 10_000)


def test_concurrent_decodes_leave_the_process_warning_state_as_it_was() -> None:
    """Decode threads each swapped the process-wide filter list (catch_warnings): overlapping swaps left
    stray filters behind and could leave warnings going to a dead list for the rest of the process."""
    import threading

    import tifffile

    buf = io.BytesIO()
    tifffile.imwrite(buf, np.zeros((300, 300, 3), np.float32))  # float RGB: refused through the recording path
    tif = buf.getvalue()
    buf = io.BytesIO()
    Image.new("RGB", (300, 300)).save(buf, "PNG")
    png = buf.getvalue()
    impl, filters = warnings._showwarnmsg_impl, list(warnings.filters)

    def work(data: bytes) -> None:
        for _ in range(150):
            try:
                decode_image(data, CFG)
            except ImageError:
                pass

    threads = [threading.Thread(target=work, args=(d,)) for d in (tif, png, tif, png)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert warnings._showwarnmsg_impl is impl and warnings.filters == filters
