"""The two stages every scoring path shares: CPU preparation and device scoring.

``prepare_batch`` turns raw inputs into fixed-shape uint8 columns (decode → face → crops → LIQE
patches); ``Predictor`` turns those columns into scores. The in-process ``Scorer``, the Ray actors and
training all call these, so there is exactly one implementation of every transform and crop.
"""

from __future__ import annotations

import copy
import math
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence, Union

import numpy as np
import torch
from PIL import Image

from .config import PRECISIONS, PIQAConfig
from .faces import FaceDetector, FaceResult, crop_face, detector_input
from .liqe import LIQE, extract_patches, top_scene
from .model import DualBranchPIQA
from .preprocess import ImageError, load_image, make_crops, normalize

# An ImageError stands for an input whose read already failed upstream: it becomes that error row.
ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray, ImageError]


def num_crops(crop_mode: str) -> int:
    return {"five": 5, "center": 1, "random": 1}[crop_mode]


def empty_columns(cfg: PIQAConfig, n: int, crop_mode: str) -> dict[str, np.ndarray]:
    """Zero-filled prepared columns for ``n`` rows."""
    k, s = num_crops(crop_mode), cfg.preprocess.crop
    cols: dict[str, np.ndarray] = {
        "status": np.full(n, "error", dtype=object),
        "error_code": np.full(n, "", dtype=object),
        "error_message": np.full(n, "", dtype=object),
        "width": np.zeros(n, np.int32),
        "height": np.zeros(n, np.int32),
        "face_found": np.zeros(n, bool),
        "face_box": np.full((n, 4), np.nan, np.float64),  # float64: the crop is cut from this box (training caches it)
        "face_confidence": np.full(n, np.nan, np.float32),
        "n_faces": np.zeros(n, np.int32),
        "whole": np.zeros((n, k, s, s, 3), np.uint8),
        "face": np.zeros((n, k, s, s, 3), np.uint8),
    }
    if cfg.liqe.enabled:
        p = cfg.liqe.patch
        cols["patches"] = np.zeros((n, cfg.liqe.num_patches, p, p, 3), np.uint8)
    return cols


def prepare_batch(
    items: Sequence[ImageInput],
    cfg: PIQAConfig,
    detector: FaceDetector | None,
    crop_mode: str | None = None,
    rng: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Decode, detect faces (batched: one forward per canvas size), crop; a bad input becomes an error row,
    never an exception."""
    mode = crop_mode or cfg.preprocess.crop_mode
    cols = empty_columns(cfg, len(items), mode)
    images: dict[int, Image.Image] = {}
    for i, item in enumerate(items):
        try:
            if isinstance(item, ImageError):
                raise item
            img = load_image(item, cfg.preprocess)
        except Exception as e:  # an ImageError's code; a decoder bug must not take the batch down either
            record_error(cols, i, e)
            continue
        images[i] = img
        cols["width"][i], cols["height"][i] = img.size

    faces: dict[int, FaceResult] = {}
    if detector is not None and images:
        def detect(idx: list[int]) -> list[FaceResult]:
            inputs = ([detector_input(images[i], cfg.face.detect_long_side) for i in idx]
                      if getattr(detector, "needs_pixels", True) else [None] * len(idx))
            return detector.detect_each(inputs, sizes=[images[i].size for i in idx])

        faces = detect_guarded(list(images), detect, lambda i, e: record_error(cols, i, e))
        images = {i: img for i, img in images.items() if i in faces}

    for i, img in images.items():
        try:
            face = faces.get(i)
            face_img = img
            if face is not None:
                face_img = crop_face(img, face, cfg.face.margin)
                cols["n_faces"][i] = face.n_faces
                if face.found:
                    cols["face_found"][i] = True
                    cols["face_box"][i] = face.box
                    cols["face_confidence"][i] = face.confidence
            cols["whole"][i] = make_crops(img, cfg.preprocess, mode, rng)
            # No face: the face input is the whole image, whose fixed crops are made already (random crops
            # are drawn anew for each branch, as in the official training).
            cols["face"][i] = (cols["whole"][i] if face_img is img and mode != "random"
                               else make_crops(face_img, cfg.preprocess, mode, rng))
            if cfg.liqe.enabled:
                cols["patches"][i] = extract_patches(img, cfg.liqe)
            cols["status"][i] = "ok"
        except Exception as e:  # noqa: BLE001 - one row's error, as above
            record_error(cols, i, e)
    return cols


def detect_guarded(idx: list[int], detect: Callable[[list[int]], list[FaceResult]],
                   fail: Callable[[int, Exception], None]) -> dict[int, FaceResult]:
    """``detect`` over the rows ``idx`` as one batch; if that raises (one odd image, a batch too large for
    device memory), row by row, which gives the same results (detection is batch-independent), and a row
    that still raises goes to ``fail`` alone: one image never takes the batch's rows down. When every row
    of a batch of several fails alone too, the batch's error is raised: the detector or device is broken
    (a sticky CUDA error), and error rows for every image would hide it."""
    try:
        return dict(zip(idx, detect(idx), strict=True))
    except Exception as batch_error:  # noqa: BLE001 - retried row by row below
        found: dict[int, FaceResult] = {}
        failed: list[tuple[int, Exception]] = []
        for i in idx:
            try:
                found[i] = detect([i])[0]
            except Exception as e:  # noqa: BLE001
                failed.append((i, e))
        if len(idx) > 1 and not found:
            raise batch_error
        for i, e in failed:
            fail(i, e)
        return found


def record_error(cols: dict[str, Any], i: int, e: Exception) -> None:
    """Row ``i`` of prepared columns as an error row: an ImageError's code, else ``internal``."""
    code, msg = (e.code, e.message) if isinstance(e, ImageError) else ("internal", _describe(e))
    cols["error_code"][i], cols["error_message"][i] = code, msg


def _describe(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1] if e.__traceback__ else None
    loc = f" at {Path(where.filename).name}:{where.lineno}" if where else ""
    return f"{type(e).__name__}: {e}{loc}"


CPU_PIXELS_PER_PASS = 2 * 384 * 384


class Predictor:
    """Device-side scoring of prepared columns: normalise, LIQE, dual-branch model, crop mean.

    Precision: ``fp32`` (the reference), ``tf32`` (fp32 weights, TF32 matmuls on CUDA) or ``bf16``
    (backbones and CLIP towers cast to bfloat16; the head, LIQE's logit scale and prompt embeddings
    stay fp32; scores returned as float32); on CUDA it sets torch's process-global TF32 flags
    (:func:`use_tf32`). ``compile`` wraps the networks in ``torch.compile`` and pads every batch to
    ``batch_size`` rows so shapes stay static. ``fused_attn`` switches timm's Swin window attention
    to ``scaled_dot_product_attention`` (default: on for CUDA).

    The networks given are left as they are (device, dtype, training mode, attention): a network the
    Predictor must change is copied first, so two Predictors can share one bundle. ``own=True``
    hands fp32 and tf32 networks over instead, moved in place (no copy: for a caller that keeps no
    other use); bf16 casts copies either way.
    """

    def __init__(self, cfg: PIQAConfig, model: DualBranchPIQA, liqe: LIQE | None, device: torch.device,
                 precision: str = "fp32", compile: bool = False, fused_attn: bool | None = None,
                 batch_size: int | None = None, own: bool = False) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        if compile and not batch_size:
            raise ValueError("compile=True needs a fixed batch_size (static shapes)")
        self.cfg, self.device, self.precision = cfg, torch.device(device), precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.batch_size = batch_size if compile else None
        if self.device.type == "cuda":
            use_tf32(precision)
        fused = fused_attn if fused_attn is not None else self.device.type == "cuda"
        # The caller's networks (and their sha256) stay as they were; bf16 always casts copies, so
        # whatever is handed over stays an fp32 model that saves and hashes as loaded.
        fp32 = self.dtype == torch.float32
        if not (fp32 and (own or _as_wanted(model, self.device, fused))):
            model = copy.deepcopy(model)
        if not (fp32 and (own or _as_wanted(liqe, self.device))):
            liqe = copy.deepcopy(liqe)
        # Only the backbones are cast. The head stays fp32 (a few thousand FLOPs; bf16 would round LIQE
        # features of 16-32 to 0.125), never rounded through bf16 on the way.
        self.model = model.to(self.device).eval()
        for branch in (self.model.backbone, self.model.backbone_face):
            branch.to(self.dtype)
        self.liqe = liqe.to_compute(self.device, self.dtype).eval() if liqe is not None else None
        if fused:
            for m in self.model.modules():
                if hasattr(m, "fused_attn"):
                    m.fused_attn = True
        self._model_fn, self._liqe_fn = self.model.score_crops, self.liqe
        # CPUs: a Swin-B/384 pass over 10 crops (2 images) costs 44 % more per image than over 5;
        # passes of ~2 crops at 384² are fastest (measured, 2-core EPYC). GPUs want whole batches.
        crop = cfg.preprocess.crop
        self.crops_per_pass = None if self.device.type == "cuda" else max(1, CPU_PIXELS_PER_PASS // (crop * crop))
        if compile:
            self._model_fn = torch.compile(self.model.score_crops, dynamic=False)
            self._liqe_fn = torch.compile(self.liqe, dynamic=False) if self.liqe is not None else None

    def __call__(self, cols: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Adds ``score`` (nan on error rows) and ``liqe_scene_top`` to the columns."""
        return self.finish(cols, self.stage(cols))

    @torch.inference_mode()
    def stage(self, cols: dict[str, np.ndarray]) -> list[tuple[np.ndarray, dict[str, torch.Tensor]]]:
        """The ok rows' pixel columns on the device, per forward pass: ``(rows, tensors)``.

        Copies are pinned and non-blocking on the current stream: a GPU actor stages one call's batch
        outside its model lock while another call's forward runs.
        """
        ok = np.flatnonzero(cols["status"] == "ok")
        step = self.batch_size or max(len(ok), 1)
        chunks = (ok[start:start + step] for start in range(0, len(ok), step))
        return [(rows, self.upload(cols, rows)) for rows in chunks]

    @torch.inference_mode()
    def finish(self, cols: dict[str, np.ndarray],
               staged: list[tuple[np.ndarray, dict[str, torch.Tensor]]]) -> dict[str, np.ndarray]:
        """Runs the forward passes over staged rows; the columns plus ``score`` and ``liqe_scene_top``."""
        n = len(cols["status"])
        scores = np.full(n, np.nan, np.float32)
        scenes = np.full(n, "", dtype=object)
        for rows, tensors in staged:
            s, sc = self.forward(tensors)
            scores[rows], scenes[rows] = s[:len(rows)], sc[:len(rows)]
        bad = np.flatnonzero((cols["status"] == "ok") & ~np.isfinite(scores))
        if len(bad):  # diverged or damaged weights: an error row, never an "ok" NaN in a catalogue
            cols = {**cols, **{k: cols[k].copy() for k in ("status", "error_code", "error_message")}}
            for i in bad:
                cols["status"][i], cols["error_code"][i] = "error", "non_finite_score"
                cols["error_message"][i] = f"the model returned {scores[i]} (diverged or damaged weights?)"
            scores[bad] = np.nan
        return {**cols, "score": scores, "liqe_scene_top": scenes}

    def upload(self, cols: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, torch.Tensor]:
        """``rows`` of the pixel columns on the device (padded to ``batch_size`` when compiled)."""
        if self.batch_size and len(rows) < self.batch_size:  # static shapes for the compiled graphs
            rows = np.concatenate([rows, np.full(self.batch_size - len(rows), rows[0])])
        dev, pin = self.device, self.device.type == "cuda"

        def take(name: str) -> torch.Tensor:
            col = cols[name]
            if isinstance(col, torch.Tensor):  # prepared on the device (gpu_prep): no host round trip
                return col[torch.from_numpy(rows).to(col.device, non_blocking=True)].to(dev, non_blocking=True)
            t = torch.from_numpy(np.ascontiguousarray(col[rows]))
            return (t.pin_memory() if pin else t).to(dev, non_blocking=True)

        names = ("whole", "face", "patches") if self._liqe_fn is not None else ("whole", "face")
        return {name: take(name) for name in names}

    def forward(self, x: dict[str, torch.Tensor]) -> tuple[np.ndarray, list[str]]:
        """Scores (and LIQE's top scene) of one staged pass; the only host sync is the scores' return."""
        if self.device.type == "cuda":
            use_tf32(self.precision)  # a no-op unless another precision's Predictor ran in between
        pp = self.cfg.preprocess
        aux = self._liqe_fn(x["patches"]).float() if self._liqe_fn is not None else None
        whole = normalize(x["whole"], pp.mean, pp.std).to(self.dtype)
        face = normalize(x["face"], pp.mean, pp.std).to(self.dtype)
        scores = self._model_fn(whole, face, aux, chunk=self.crops_per_pass)
        scenes = top_scene(aux) if aux is not None else [""] * len(whole)  # after the model: .tolist() syncs
        return scores.float().cpu().numpy(), scenes


def _as_wanted(net: torch.nn.Module | None, device: torch.device, fused: bool = False) -> bool:
    """Whether ``net`` is already in eval mode, fp32, on ``device`` (with fused attention if ``fused``):
    only then is it used without a copy, since it is left as it is."""
    if net is None:
        return True
    if device.type == "cuda" and device.index is None:  # "cuda" is the current device, not any GPU
        device = torch.device("cuda", torch.cuda.current_device())
    on = lambda t: t.device == device and (t.dtype == torch.float32 or not t.is_floating_point())  # noqa: E731
    return (not any(m.training for m in net.modules())
            and all(on(t) for t in (*net.parameters(), *net.buffers()))
            and not (fused and any(getattr(m, "fused_attn", True) is False for m in net.modules())))


def use_tf32(precision: str) -> None:
    """Sets torch's process-global TF32 flags for ``precision``: ``fp32`` none (IEEE matmuls and
    convolutions, the face detector's too), ``tf32`` both, ``bf16`` convolutions (torch's default).

    Set, never toggled around a forward: on an H200 a forward that switched them off and back raced
    with face detection on another thread (concurrent calls), which then ran its convolutions under
    the other setting and moved a face box. One precision per process; a Predictor of another
    precision used afterwards sets its own.
    """
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    torch.backends.cudnn.allow_tf32 = precision != "fp32"


def rows_from_columns(cols: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per-image result dicts (no pixel columns) from scored columns."""
    out = []
    for i in range(len(cols["status"])):
        box = cols["face_box"][i]
        score = float(cols["score"][i])
        out.append({
            "status": str(cols["status"][i]),
            "score": None if math.isnan(score) else score,
            "error_code": str(cols["error_code"][i]) or None,
            "error_message": str(cols["error_message"][i]) or None,
            "width": int(cols["width"][i]),
            "height": int(cols["height"][i]),
            "face_found": bool(cols["face_found"][i]),
            "face_box": None if np.isnan(box).any() else [float(v) for v in box],
            "face_confidence": None if math.isnan(conf := float(cols["face_confidence"][i])) else conf,
            "n_faces": int(cols["n_faces"][i]),
            "liqe_scene_top": str(cols["liqe_scene_top"][i]) or None,
        })
    return out
