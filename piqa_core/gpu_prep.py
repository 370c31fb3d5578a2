"""GPU preparation: nvJPEG decode and on-device resize/crops, the same columns as ``stages.prepare_batch``.

On a GPU node the CPU path (PIL decode ~56 ms, two full-image Resize(448) ~40 ms each, detector
downscale ~26 ms for a 12 MP JPEG) caps a node far below the model's throughput. Here plain 8-bit
baseline/progressive RGB or grey JPEGs are decoded by ``torchvision.io.decode_jpeg(device=...)``
(nvJPEG on CUDA, libjpeg on CPU) and every transform runs on ``device``. Anything else (PNG, CMYK,
MPO, trailing data, a decoder failure) is decoded by ``load_image`` (the PIL path, same error codes)
and uploaded; from there every row follows the same device code. A decoder that fails on every file
of a batch with one error is switched off for the process (one warning): all JPEGs then take the PIL path.

Resampling emulates Pillow's uint8 bilinear: one axis, round half up to uint8, the other axis, round
again, in Pillow's order of passes (``_vertical_first``). Measured against Pillow 13 (Resize(448) of
photos and uniform noise from 400x600 to 4032x3024, tall face-crop shapes included): one float pass
is off by 1 on 4-18 % of values; two passes on < 0.5 % of a photo's values (up to 1.3 % on noise),
max 1; at ratios with exact halves (512 -> 448) 2 % (photo) to 7 % (noise), max 2. The detector input emulates
``reducing_gap=3``: Pillow's integer ``reduce`` (bit-exact: block sums, then Pillow's fixed-point
division, partial edge blocks included), then bilinear over the reduced box. Measured on CPU against
``faces.detector_input`` (long side 640), max 1 everywhere: 6000x4000 (reduce 3) differs on 0.26 % of
values (astronaut/coffee photo) to 0.40 % (uniform noise), 11.5 % with a float block mean; 9600x6400
(reduce 5) on 0.01 %; 4000x3000 (reduce 2) 0.5-0.8 %, all of it from the bilinear passes.
``detect_on_device`` puts device tensors on the detector's per-image canvases and calls
``FaceDetector.detect_batch``.
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from typing import Sequence

import numpy as np
import PIL
import torch
from PIL import Image
import torch.nn.functional as F
from torchvision.io import ImageReadMode, decode_jpeg

from .config import PIQAConfig
from .faces import FaceDetector, FaceResult, face_crop_box, per_canvas
from .liqe import patch_positions
from .image_formats import open_image
from .preprocess import ImageError, _check_header, check_jpeg_scans, crop_positions, load_image
from .stages import ImageInput, detect_guarded, empty_columns, record_error

# torchvision 0.29 deprecates its image codecs, still the nvJPEG entry point. Filtered by message
# once: catch_warnings() swaps the process-wide filter list, unsafe under concurrent decode calls.
warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision",
                        category=DeprecationWarning)

_NVJPEG_SOF = (0xC0, 0xC1, 0xC2)  # Huffman baseline, extended sequential, progressive
_RGB_IDS = (82, 71, 66)  # component ids 'R', 'G', 'B': libjpeg then skips the YCbCr transform


def _sof_marker(data: bytes) -> int | None:
    """The SOFn marker byte of a JPEG (walks the header segments), or None."""
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return marker
        if marker == 0xDA:
            return None
        pos += 2 + int.from_bytes(data[pos + 2 : pos + 4], "big")
    return None


def nvjpeg_candidate(data: bytes, cfg: PIQAConfig) -> bool:
    """Header-only: may ``data`` go to nvJPEG? False sends it to the PIL path, which owns every error code."""
    try:
        check_jpeg_scans(data)
        img = open_image(data)
        _check_header(img.size, img.mode, cfg.preprocess, img.format)  # bombs never reach a decoder
        if img.format != "JPEG" or img.mode not in ("RGB", "L"):
            return False
        if img.mode == "RGB" and (img.info.get("adobe_transform") == 0 or tuple(c[0] for c in img.layer) == _RGB_IDS):
            return False
        # No EOI at the end: truncated (PIL says `truncated`, nvJPEG may not fail) or trailing data.
        return data[-2:] == b"\xff\xd9" and _sof_marker(data) in _NVJPEG_SOF
    except Exception:
        return False


# Device types ("cuda", "cpu") whose torchvision decoder failed on every file of a batch with one and
# the same error: broken in this process (no nvJPEG library, a failed handle), not a bad file. Their
# later batches go straight to the PIL path instead of N + 1 failing calls each.
_decoder_broken: dict[str, str] = {}
_decoder_lock = threading.Lock()


def decoder_broken(device: torch.device | str) -> str | None:
    """Why ``device``'s JPEG decoder was switched off in this process, or None while it is in use."""
    return _decoder_broken.get(torch.device(device).type)


def _error_kind(e: BaseException) -> tuple[type, str]:
    return type(e), (str(e).splitlines() or [""])[0]


def _decode(blobs: list[bytes], device: torch.device) -> list[torch.Tensor | None]:
    """uint8 (3, H, W) per blob on ``device``, None where the PIL path must decide.

    One batched call, then one by one to isolate a bad file. When the batch and every single-file
    retry (two files or more) fail with the same error and a known-good JPEG fails too, the decoder
    itself is broken: it is switched off for ``device.type`` in this process (one warning) and every
    later blob returns None. (Files damaged alike fail alike: the probe tells them from a broken decoder.)
    """
    def run(batch: list[bytes]) -> list[torch.Tensor]:
        # bytearray: torch warns on read-only buffers (the copy costs ~1 ms per 12 MP JPEG)
        return decode_jpeg([torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in batch],
                           mode=ImageReadMode.RGB, device=device)
    if not blobs:
        return []
    if device.type in _decoder_broken:
        return [None] * len(blobs)
    try:
        return list(run(blobs))
    except Exception as batch_error:
        out: list[torch.Tensor | None] = []
        kinds: set[tuple[type, str]] = set()
        for b in blobs:
            try:
                out.append(run([b])[0])
            except Exception as e:
                out.append(None)
                kinds.add(_error_kind(e))
        if len(blobs) >= 2 and all(t is None for t in out) and len(kinds) == 1 \
                and next(iter(kinds))[0] is type(batch_error) and not _probe_decodes(run):
            kind, msg = next(iter(kinds))
            with _decoder_lock:
                first = device.type not in _decoder_broken
                _decoder_broken.setdefault(device.type, f"{kind.__name__}: {msg[:200]}")
            if first:
                warnings.warn(f"torchvision decode_jpeg on {device.type} failed on all {len(blobs)} files of a "
                              f"batch, each alone too, with the same error ({kind.__name__}: {msg[:200]}); "
                              "JPEGs are decoded by PIL from now on in this process", RuntimeWarning, stacklevel=2)
        return out


@functools.lru_cache(maxsize=1)
def _probe_jpeg() -> bytes:
    """A small sound JPEG: decodes wherever a decoder works."""
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (90, 120, 150)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _probe_decodes(run) -> bool:
    try:
        run([_probe_jpeg()])
        return True
    except Exception:  # noqa: BLE001 — whatever it is, the decoder cannot decode a sound file
        return False


def _round_u8(x: torch.Tensor) -> torch.Tensor:
    # Pillow's fixed point rounds half up; exact halves come out of float32 as x.4999 or x.5001, and
    # the 1e-4 nudge (below Pillow's own coefficient error) measured fewer +-1 mismatches against it.
    return x.add(0.5 + 1e-4).floor_().clamp_(0, 255)


def _resize_axis(x: torch.Tensor, n: int, src: float, dim: int) -> torch.Tensor:
    """Antialiased bilinear along ``dim`` of float (1, C, H, W), mapping the first ``src`` input pixels onto ``n``."""
    if src == x.shape[dim]:
        if n == src:
            return x
        size = [x.shape[-2], x.shape[-1]]
        size[dim] = n
        return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    # A fractional box (after reduce): the scale is given, the output is cut to n.
    scale = [1.0, 1.0]
    scale[dim] = n / src
    y = F.interpolate(x, scale_factor=scale, mode="bilinear", antialias=True, align_corners=False,
                      recompute_scale_factor=False)
    return y.narrow(dim, 0, n)


def _reduce_multipliers(n: int) -> np.ndarray:
    """Pillow's ``division_UINT32(k, 8)`` for k = 1..n: float32 2**32 / (256 k), truncated."""
    k = np.arange(1, n + 1, dtype=np.float32)
    return (np.float32(2.0**32) / (np.float32(256) * k)).astype(np.int64)


@functools.lru_cache(maxsize=64)
def _reduce_multipliers_on(n: int, device: torch.device) -> torch.Tensor:
    """:func:`_reduce_multipliers` on ``device``, uploaded once: a pageable copy per image waits for the stream."""
    return torch.from_numpy(_reduce_multipliers(n)).to(device)


def _block_counts(size: int, factor: int, device: torch.device) -> torch.Tensor:
    """Pixels per block along one axis: ``factor`` each, the last block the remainder (if any)."""
    counts = torch.full((-(-size // factor),), factor, dtype=torch.int64, device=device)
    if size % factor:
        counts[-1] = size % factor
    return counts


def reduce_tensor(x: torch.Tensor, fx: int, fy: int) -> torch.Tensor:
    """Pillow's ``Image.reduce((fx, fy))`` of float (1, C, H, W) holding uint8 values, bit-exact.

    Pillow (src/libImaging/Reduce.c) sums each block (the last row/column of blocks is partial) and
    divides in fixed point: ``((sum + n // 2) * (2**32 // (256 n))) >> 24`` with ``n`` the block's
    pixel count and the multiplier computed in float32 and truncated. That lands one level below the
    rounded mean for some sums when ``n`` is not a power of two, so a float mean cannot reproduce it.
    Float32 block sums are exact integers up to 2**24 / 255 pixels per block.
    """
    h, w = x.shape[-2:]
    sums = F.avg_pool2d(x, (fy, fx), ceil_mode=True, divisor_override=1)  # padding-free: edge blocks are partial
    n = _block_counts(h, fy, x.device)[:, None] * _block_counts(w, fx, x.device)[None, :]
    mult = _reduce_multipliers_on(fx * fy, x.device)[n - 1]
    out = ((sums.round().to(torch.int64) + n // 2) * mult) >> 24
    return out.to(x.dtype)


def resize_tensor(img: torch.Tensor, height: int, width: int, reducing_gap: float | None = None) -> torch.Tensor:
    """uint8 (3, H, W) -> uint8 (3, height, width) like Pillow's ``resize(BILINEAR, reducing_gap)``."""
    h, w = img.shape[-2:]
    if (h, w) == (height, width):
        return img
    x = img[None].float()
    src_w, src_h = float(w), float(h)
    fx = max(1, int(w / width / reducing_gap)) if reducing_gap else 1
    fy = max(1, int(h / height / reducing_gap)) if reducing_gap else 1
    if fx > 1 or fy > 1:  # Pillow's reduce(): block means, partial blocks at the edges
        x = reduce_tensor(x, fx, fy)
        src_w, src_h = w / fx, h / fy
    if _vertical_first(*x.shape[-2:], height, width):
        x = _round_u8(_resize_axis(x, height, src_h, -2))
        x = _round_u8(_resize_axis(x, width, src_w, -1))
    else:
        x = _round_u8(_resize_axis(x, width, src_w, -1))
        x = _round_u8(_resize_axis(x, height, src_h, -2))
    return x[0].to(torch.uint8)


# Pillow 13 (python-pillow/Pillow#9549) resamples vertically first when the height loses more than twice
# as many pixels as the width; earlier Pillow always went horizontally first. Rounding between the passes
# makes the order show: the wrong one is off by 1 on a quarter of the values.
_PILLOW_VERTICAL_FIRST = int(PIL.__version__.split(".")[0]) >= 13


def _vertical_first(h: int, w: int, height: int, width: int) -> bool:
    """Pillow's pass order for an (h, w) image (after any reduce) resized to (height, width)."""
    return _PILLOW_VERTICAL_FIRST and height < h and h - height > 2 * (w - width)


def resize_short_tensor(img: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision ``Resize(size)``: short side -> size, long side -> int(size * long / short)."""
    h, w = img.shape[-2:]
    if w <= h:
        return resize_tensor(img, int(size * h / w), size)
    return resize_tensor(img, size, int(size * w / h))


def make_crops_tensor(img: torch.Tensor, cfg: PIQAConfig, mode: str,
                      rng: np.random.Generator | None = None) -> torch.Tensor:
    """uint8 (K, crop, crop, 3) like ``preprocess.make_crops`` (same positions, same rng draws)."""
    arr = resize_short_tensor(img, cfg.preprocess.resize)
    h, w = arr.shape[-2:]
    c = cfg.preprocess.crop
    if mode == "random":
        rng = np.random.default_rng() if rng is None else rng
        top, left = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
        positions = [(left, top)]
    else:
        positions = crop_positions(w, h, c, mode)
    return torch.stack([arr[:, t : t + c, l : l + c] for l, t in positions]).permute(0, 2, 3, 1)


def crop_pil_semantics(img: torch.Tensor, rect: tuple[int, int, int, int]) -> torch.Tensor:
    """``PIL.Image.crop`` of (3, H, W): integer rect, outside the image is black (zero), not clamped."""
    x1, y1, x2, y2 = rect
    h, w = img.shape[-2:]
    out = img.new_zeros((img.shape[0], y2 - y1, x2 - x1))
    ix1, iy1, ix2, iy2 = max(x1, 0), max(y1, 0), min(x2, w), min(y2, h)
    if ix1 < ix2 and iy1 < iy2:
        out[:, iy1 - y1 : iy2 - y1, ix1 - x1 : ix2 - x1] = img[:, iy1:iy2, ix1:ix2]
    return out


def detector_input_tensor(img: torch.Tensor, long_side: int) -> tuple[torch.Tensor, float]:
    """``faces.detector_input`` on the device: long side -> ``long_side`` (down or up), and the scale."""
    h, w = img.shape[-2:]
    if max(w, h) == long_side:
        return img, 1.0
    scale = long_side / max(w, h)
    small = resize_tensor(img, max(1, round(h * scale)), max(1, round(w * scale)), reducing_gap=3.0)
    return small, scale


def detect_on_device(detector: FaceDetector, inputs: Sequence[tuple[torch.Tensor, float]],
                     sizes: Sequence[tuple[int, int]]) -> list[FaceResult]:
    """``FaceDetector.detect_each`` for uint8 (3, h, w) device tensors: the same canvases, then ``detect_batch``."""
    dev = detector.mean.device

    def detect(canvas: tuple[int, int], idx: list[int]) -> list[FaceResult]:
        batch = torch.zeros((len(idx), *canvas, 3), dtype=torch.uint8, device=dev)
        for j, i in enumerate(idx):
            t = inputs[i][0]
            batch[j, : t.shape[1], : t.shape[2]] = t.permute(1, 2, 0).to(dev)
        valid = [tuple(inputs[i][0].shape[1:]) for i in idx]
        return detector.detect_batch(batch, valid, [inputs[i][1] for i in idx], [sizes[i] for i in idx])

    return per_canvas([tuple(t.shape[1:]) for t, _ in inputs], detect)


def prepare_batch_on_device(
    items: Sequence[ImageInput],
    cfg: PIQAConfig,
    detector: FaceDetector | None,
    device: torch.device | str,
    crop_mode: str | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray | torch.Tensor]:
    """``stages.prepare_batch`` with ``whole``, ``face``, ``patches`` as uint8 tensors on ``device``.

    Metadata columns are the same numpy arrays with the same row semantics and error codes. Bytes
    that pass :func:`nvjpeg_candidate` are decoded on ``device``; any other input goes through ``load_image``.
    """
    device = torch.device(device)
    mode = crop_mode or cfg.preprocess.crop_mode
    cols: dict = empty_columns(cfg, len(items), mode)
    for name in ("whole", "face", "patches"):
        if name in cols:
            cols[name] = torch.zeros(cols[name].shape, dtype=torch.uint8, device=device)

    def fail(i: int, e: Exception) -> None:
        record_error(cols, i, e)

    jpeg: dict[int, bytes] = {}
    pil: list[int] = []
    for i, item in enumerate(items):
        if isinstance(item, ImageError):
            fail(i, item)
        elif isinstance(item, (bytes, bytearray, memoryview)) and nvjpeg_candidate(bytes(item), cfg):
            jpeg[i] = bytes(item)
        else:
            pil.append(i)

    images: dict[int, torch.Tensor] = {}
    for i, img in zip(jpeg, _decode(list(jpeg.values()), device)):
        if img is None:  # nvJPEG refused it: the PIL path decides (truncated, or decodes it)
            pil.append(i)
        else:
            images[i] = img
    for i in sorted(pil):
        try:
            arr = np.array(load_image(items[i], cfg.preprocess))  # writable copy for torch
            images[i] = torch.from_numpy(arr).permute(2, 0, 1).to(device)
        except Exception as e:
            fail(i, e)
    images = dict(sorted(images.items()))  # row order, so `rng` draws as in prepare_batch
    for i, img in images.items():
        cols["height"][i], cols["width"][i] = img.shape[-2:]

    faces: dict[int, FaceResult] = {}
    if detector is not None and images:
        side = cfg.face.detect_long_side

        def detect(idx: list[int]) -> list[FaceResult]:
            inputs = [detector_input_tensor(images[i], side) for i in idx]
            return detect_on_device(detector, inputs, [(images[i].shape[2], images[i].shape[1]) for i in idx])

        faces = detect_guarded(list(images), detect, fail)  # a CUDA OOM on the batch: row by row
        images = {i: img for i, img in images.items() if i in faces}

    for i, img in images.items():
        try:
            face, face_img = faces.get(i), img
            if face is not None:
                cols["n_faces"][i] = face.n_faces
                if face.found:
                    face_img = crop_pil_semantics(img, face_crop_box(face, cfg.face.margin))
                    cols["face_found"][i], cols["face_box"][i] = True, face.box
                    cols["face_confidence"][i] = face.confidence
            cols["whole"][i] = make_crops_tensor(img, cfg, mode, rng)
            cols["face"][i] = (cols["whole"][i] if face_img is img and mode != "random"  # as prepare_batch
                               else make_crops_tensor(face_img, cfg, mode, rng))
            if cfg.liqe.enabled:
                p, h, w = cfg.liqe.patch, img.shape[1], img.shape[2]
                pos = patch_positions(h, w, p, cfg.liqe.stride, cfg.liqe.num_patches)  # exact slices
                cols["patches"][i] = torch.stack([img[:, t : t + p, l : l + p] for t, l in pos]).permute(0, 2, 3, 1)
            cols["status"][i] = "ok"
        except Exception as e:
            fail(i, e)
    return cols
