"""Per-image features that training computes once: the best face and the 495-d LIQE vector.

Both come from frozen networks on the full image, never from the random crop, so ``FeatureCache``
keeps them across epochs and runs; entries are keyed by ``image_key`` (uri, size, ETag/mtime), so a
new upload under a uri misses. ``prepare_items`` runs ``prepare_batch`` (the one implementation of
decode, face crop and crops) per item with its own RNG, faces taken from the cache, LIQE vectors
attached as ``aux``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .checkpoints import Bundle
from .config import PIQAConfig
from .faces import FaceDetector, FaceResult
from .liqe import LIQE
from .stages import ImageInput, prepare_batch


class KnownFaces:
    """Stands in for the detector in ``prepare_batch``: returns faces found earlier, in order."""

    needs_pixels = False  # prepare_batch skips the detector's copy of each photo (~26 ms at 12 MP)

    def __init__(self, faces: Sequence[FaceResult]) -> None:
        self.faces = list(faces)

    def detect_each(self, inputs: Sequence[Any], sizes: Any = None) -> list[FaceResult]:
        if len(inputs) != len(self.faces):
            raise ValueError(f"{len(inputs)} images but {len(self.faces)} known faces")
        return self.faces


def image_key(uri: str, size: int, version: str) -> str:
    """The cache key of one upload of an image: its uri, size in bytes and ETag (or local mtime)."""
    return json.dumps([uri, int(size), version])


def _uri_of(key: str) -> str | None:
    """The uri of an :func:`image_key`; None for anything else (the bare uris of older cache files)."""
    try:
        parts = json.loads(key)
    except ValueError:
        return None
    return parts[0] if isinstance(parts, list) and len(parts) == 3 and isinstance(parts[0], str) else None


class FeatureCache:
    """key -> (FaceResult, LIQE vector or None); ``fingerprint`` names the frozen weights it came from.

    Keys are :func:`image_key` strings (files written before them hold bare uris: those never match).
    """

    def __init__(self, fingerprint: str = "") -> None:
        self.fingerprint = fingerprint
        self.faces: dict[str, FaceResult] = {}
        self.aux: dict[str, np.ndarray | None] = {}

    def __contains__(self, uri: str) -> bool:
        return uri in self.faces

    def __len__(self) -> int:
        return len(self.faces)

    def put(self, uri: str, face: FaceResult, aux: np.ndarray | None) -> None:
        self.faces[uri], self.aux[uri] = face, aux

    def to_columns(self, uris: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        keys = list(self.faces) if uris is None else [u for u in uris if u in self.faces]
        faces = [self.faces[k] for k in keys]
        aux = [self.aux[k] for k in keys]
        width = next((len(a) for a in aux if a is not None), 0)
        return {
            "uri": np.array(keys, dtype=object),
            "face_box": np.array([f.box if f.box else (np.nan,) * 4 for f in faces], np.float64).reshape(-1, 4),
            "face_confidence": np.array([f.confidence for f in faces], np.float32),
            "n_faces": np.array([f.n_faces for f in faces], np.int32),
            "liqe": np.array([np.zeros(width) if a is None else a for a in aux], np.float32).reshape(len(keys), width),
        }

    def to_npz(self) -> bytes:
        buf = io.BytesIO()
        np.savez(buf, fingerprint=np.array(self.fingerprint),
                 **{k: v.astype(str) if k == "uri" else v for k, v in self.to_columns().items()})
        return buf.getvalue()

    @staticmethod
    def read_npz(data: bytes) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files if k != "fingerprint"}

    def drop_stale(self, keys: Iterable[str]) -> int:
        """Drop the entries no run can hit; how many went.

        Those are earlier uploads of the images ``keys`` name (same uri, another size or version) and
        bare-uri keys of older files. Entries of other images stay: runs on other labels share the file.
        """
        current = set(keys)
        dead = {_uri_of(k) for k in current} | {None}  # None: a key that is no image_key
        stale = [k for k in self.faces if k not in current and _uri_of(k) in dead]
        for k in stale:
            del self.faces[k], self.aux[k]
        return len(stale)

    def add_columns(self, cols: dict[str, np.ndarray]) -> None:
        for i, uri in enumerate(cols["uri"]):
            box = cols["face_box"][i]
            face = FaceResult(None if np.isnan(box).any() else tuple(float(v) for v in box),
                              float(cols["face_confidence"][i]), int(cols["n_faces"][i]))
            self.put(str(uri), face, cols["liqe"][i].copy() if cols["liqe"].shape[1] else None)


# How the cached features are computed, part of the fingerprint. 2: IEEE fp32 with TF32 off, as
# `piqa eval` scores (files of 1 may hold features computed under TF32 on GPUs, not what eval sees).
FEATURES_VERSION = 2


def fingerprint(bundle: Bundle) -> str:
    """sha256 over the frozen parts (LIQE, detector), their config and :data:`FEATURES_VERSION`: a cache
    key for their outputs."""
    cfg = bundle.config.to_dict()
    h = hashlib.sha256(json.dumps([cfg["face"], cfg["liqe"], FEATURES_VERSION], sort_keys=True).encode())
    for module in (bundle.liqe, bundle.detector):
        for k, v in sorted(module.state_dict().items()) if module is not None else []:
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def _crop_config(cfg: PIQAConfig) -> PIQAConfig:
    """The config without LIQE: prepare_batch then skips the patches the cache already covers."""
    return cfg.replace(liqe=dataclasses.replace(cfg.liqe, enabled=False),
                       model=dataclasses.replace(cfg.model, aux_dim=0))


@torch.inference_mode()
def fill_cache(items: Sequence[ImageInput], keys: Sequence[str], cfg: PIQAConfig, detector: FaceDetector | None,
               liqe: LIQE | None, cache: FeatureCache, device: torch.device, chunk: int = 16) -> None:
    """Detect faces (one batch) and run LIQE on the 15 patches; failed images stay out of the cache."""
    cols = prepare_batch(items, cfg, detector, "center")
    ok = np.flatnonzero(cols["status"] == "ok")
    aux = None
    if liqe is not None and len(ok):
        patches = torch.from_numpy(cols["patches"][ok])
        aux = torch.cat([liqe(p.to(device)).float().cpu() for p in patches.split(chunk)]).numpy()
    for j, i in enumerate(ok):
        box = tuple(float(v) for v in cols["face_box"][i]) if cols["face_found"][i] else None
        face = FaceResult(box, float(cols["face_confidence"][i]) if box else 0.0, int(cols["n_faces"][i]))
        cache.put(keys[i], face, None if aux is None else aux[j])


def prepare_items(items: Sequence[ImageInput], keys: Sequence[str], cfg: PIQAConfig,
                  detector: FaceDetector | None, liqe: LIQE | None, cache: FeatureCache, crop_mode: str,
                  rngs: Sequence[np.random.Generator | None], device: torch.device) -> dict[str, np.ndarray]:
    """Prepared columns (``whole``, ``face``, ``status``, …) plus ``aux`` (n, aux_dim) for the items.

    Each item gets its own RNG, so its random crop does not depend on its batch-mates or on the cache.
    """
    misses = [i for i, k in enumerate(keys) if k not in cache]
    if misses:
        fill_cache([items[i] for i in misses], [keys[i] for i in misses], cfg, detector, liqe, cache, device)
    crop_cfg = _crop_config(cfg)
    rows = []
    for item, key, rng in zip(items, keys, rngs):
        known = KnownFaces([cache.faces[key]]) if key in cache and detector is not None else detector
        rows.append(prepare_batch([item], crop_cfg, known, crop_mode, rng))
    cols = {k: np.concatenate([r[k] for r in rows]) for k in rows[0]}
    width = cfg.model.aux_dim
    cols["aux"] = np.zeros((len(keys), width), np.float32)
    for i, key in enumerate(keys):
        if width and cache.aux.get(key) is not None:
            cols["aux"][i] = cache.aux[key]
    return cols
