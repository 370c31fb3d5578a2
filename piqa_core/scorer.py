"""In-process batched scoring: the API a notebook user calls."""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch
from PIL import Image

from .checkpoints import Bundle, build_bundle, load_checkpoint
from .config import CROP_MODES
from .weight_cache import Fetcher, Reader, resolve_weights
from .concurrency import ordered_map
from .faces import for_inference
from .errors import ImageError
from .stages import ImageInput, Predictor, prepare_batch, rows_from_columns

T = TypeVar("T")
_ONE_IMAGE = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)


def default_device() -> torch.device:
    """CUDA when torch sees a GPU, else CPU: what ``from_pretrained`` picks when no device is given."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Scorer:
    """Scores images with a loaded ``Bundle``; ``.model`` is the ``DualBranchPIQA``.

    Preparation (decode, faces, crops) and the forward pass are the shared stages of
    ``piqa_core.stages``; the Ray pipeline runs the very same code in its actors.

    ``calls``: batches scored at once. Default: on a CPU one per torch thread, each call on one
    thread (see ``piqa_core.concurrency``); on a GPU one.

    The bundle's networks stay as they were (Scorers on two devices can share one bundle), unless
    ``own_bundle``: then fp32/tf32 ones are moved in place, with no copy (``from_pretrained``'s own);
    bf16 casts copies either way.
    """

    def __init__(self, bundle: Bundle, device: str | torch.device,
                 precision: str = "fp32", crop_mode: str | None = None, compile: bool = False,
                 batch_size: int = 8, calls: int | None = None, own_bundle: bool = False) -> None:
        self.bundle = bundle
        self.config = bundle.config
        self.device = torch.device(device)
        self.crop_mode = crop_mode or self.config.preprocess.crop_mode
        if self.crop_mode not in CROP_MODES:  # "random" is training's: scores would change every call
            raise ValueError(f"crop_mode must be one of {CROP_MODES}, got {self.crop_mode!r}")
        self.batch_size = batch_size
        self.calls = calls or (torch.get_num_threads() if self.device.type == "cpu" else 1)
        self.detector = for_inference(bundle.detector, self.device)
        self.predictor = Predictor(self.config, bundle.model, bundle.liqe, self.device, precision,
                                   compile=compile, batch_size=batch_size, own=own_bundle)

    @property
    def model(self) -> torch.nn.Module:
        return self.predictor.model

    @property
    def model_id(self) -> str:
        return self.bundle.model_id

    @property
    def sha256(self) -> str:
        return self.bundle.sha256

    @classmethod
    def from_pretrained(cls, source: str | os.PathLike, *, random_weights: bool = False,
                        device: str | torch.device | None = None, precision: str = "fp32",
                        crop_mode: str | None = None, fetch: Fetcher | None = None, read: Reader | None = None,
                        seed: int = 0, compile: bool = False, batch_size: int = 8,
                        calls: int | None = None) -> "Scorer":
        """A model directory (local or remote URI), or with ``random_weights=True`` a preset name.

        ``fetch``/``read``: how a remote directory is copied / one of its files read (fsspec by default).
        """
        if random_weights:
            bundle = build_bundle(str(source), seed=seed)
        else:
            bundle = load_checkpoint(resolve_weights(source, fetch=fetch, read=read))
        return cls(bundle, device=device if device is not None else default_device(), precision=precision,
                   crop_mode=crop_mode, compile=compile, batch_size=batch_size, calls=calls, own_bundle=True)

    def score_columns(self, items: Sequence[ImageInput]) -> dict[str, np.ndarray]:
        """Prepared + scored columns for one batch (pixel columns included)."""
        cols = prepare_batch(items, self.config, self.detector, self.crop_mode)
        return self.predictor(cols)

    def score(self, images: Iterable[ImageInput], batch_size: int | None = None,
              progress: Callable[[int], Any] | None = None) -> list[dict[str, Any]]:
        """One result dict per input, in order; bad inputs give ``status='error'`` rows.

        ``batch_size``: images prepared and scored together, by default the one the Scorer was made with
        (on CPU each pass then holds at most about two crops' worth of pixels: see ``CPU_PIXELS_PER_PASS``).
        """
        if isinstance(images, _ONE_IMAGE):  # iterating one would score its characters, bytes or rows
            raise TypeError(f"score() takes a list of images, got one {type(images).__name__}: "
                            "pass [image] to score one")
        items = list(images)
        bad = next((i for i, item in enumerate(items) if not isinstance(item, (*_ONE_IMAGE, ImageError))), None)
        if bad is not None:  # a programming error, not a bad photo: refused before any work
            raise TypeError(f"score() item {bad} is a {type(items[bad]).__name__}: pass paths, encoded bytes, "
                            "PIL images or uint8/uint16 arrays")
        results: list[dict[str, Any]] = []
        for chunk, cols in self.score_chunks(items, batch_size or self.batch_size):
            results.extend(rows_from_columns(cols))
            if progress is not None:
                progress(len(chunk))
        return results

    def score_chunks(self, items: Sequence[T], batch_size: int,
                     load: Callable[[Sequence[T]], Sequence[ImageInput]] = list,
                     ) -> Iterator[tuple[Sequence[T], dict[str, np.ndarray]]]:
        """(chunk, scored columns) per chunk of ``items``, in order; ``load`` turns a chunk into images
        on the call's thread (reads overlap scoring).

        With several calls the chunks shrink so that every call gets one (scores do not depend on
        the batch); with fewer items than calls, one call runs on all threads, in full batches.
        """
        calls = self.calls if len(items) >= self.calls else 1
        size = max(1, min(batch_size, math.ceil(len(items) / calls)))
        chunks = [items[start:start + size] for start in range(0, len(items), size)]
        yield from ordered_map(lambda chunk: (chunk, self.score_columns(load(chunk))), chunks, calls)
