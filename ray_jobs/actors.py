"""The Ray Data stages: a read function and the two actor classes (models loaded once per actor)."""

from __future__ import annotations

import contextlib
import os
import posixpath
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from piqa_core.checkpoints import (CONFIG_FILE, PARTS, Bundle, CheckpointError, build_bundle, load_checkpoint,
                                   parse_meta)
from piqa_core.concurrency import use_torch_threads
from piqa_core.faces import for_inference
from piqa_core.gpu_prep import prepare_batch_on_device
from piqa_core.preprocess import ImageError
from piqa_core.stages import Predictor, prepare_batch, use_tf32
from piqa_core.weight_cache import cached_copy, resolve_weights

from .options import ModelOptions
from .schema import SCORE_SCHEMA, now_utc
from .listing import list_images
from .storage import S3Options, join, local_path, read_bytes

PIXEL_COLUMNS = ("whole", "face", "patches")


def _fetcher(s3: S3Options):
    """Copies a remote model directory with our storage layer (honours custom S3 endpoints)."""

    def copy(uri: str, dest: Path) -> None:
        root = uri.rstrip("/")
        for info in list_images(root, s3, extensions=None):
            rel = info.uri[len(root):].lstrip("/")
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(read_bytes(info.uri, s3))

    return copy


def weights_dir(uri: str, s3: S3Options, sha256: str | None = None, config: dict | None = None) -> Path:
    """A local copy of a model directory, a remote one read with our storage layer (custom endpoints)."""
    return resolve_weights(uri, fetch=_fetcher(s3), sha256=sha256, read=lambda where: read_bytes(where, s3),
                           config=config)


def load_bundle(model: ModelOptions, s3: S3Options, parts: tuple[str, ...] = PARTS,
                identity: dict[str, Any] | None = None) -> Bundle:
    """The model's networks (``parts``). ``identity``: the job's ``model_identity``; a node's cached
    copy of another model is fetched again, and a model directory that no longer holds that model
    (written again or edited while the job ran) is refused, so one run never mixes two models."""
    if model.random_weights:
        return build_bundle(model.preset, parts=parts)
    if identity is None:
        return load_checkpoint(weights_dir(model.weights, s3), parts=parts)
    config = identity["config"].to_dict()
    bundle = load_checkpoint(weights_dir(model.weights, s3, identity["sha256"], config), parts=parts)
    if bundle.sha256 != identity["sha256"] or bundle.config != identity["config"]:
        what = f"sha256 {bundle.sha256}" if bundle.sha256 != identity["sha256"] else "another model config"
        raise CheckpointError(f"{model.weights} changed while the job ran: {what} where the job started with "
                              f"sha256 {identity['sha256']}; re-run the job")
    return bundle


def model_identity(model: ModelOptions, s3: S3Options) -> dict[str, Any]:
    """model_id, sha256, preset, crop mode, config, which weights are random, and the cached copy it
    was read from (None: from the source).

    A model directory is identified by its config.json alone, read from the source itself rather than
    from this node's weight cache, which may hold an earlier copy (used, with a warning, only when the
    source cannot be read); random weights are built once here to hash them.
    """
    cached: Path | None = None
    if model.random_weights:
        bundle = build_bundle(model.preset)
        cfg, model_id, sha, random_init, random_parts = bundle.config, bundle.model_id, bundle.sha256, True, []
    else:
        source = local_path(str(model.weights)) or str(model.weights)
        where = join(str(model.weights), CONFIG_FILE)
        try:
            text = read_bytes(join(source, CONFIG_FILE), s3)
        except FileNotFoundError:
            raise CheckpointError(f"{model.weights} is not a model directory (no {CONFIG_FILE})") from None
        except OSError as e:  # offline, or the store failed: as the actors would, take this node's copy
            if (cached := cached_copy(source)) is None:
                raise
            warnings.warn(f"{where} could not be read ({type(e).__name__}: {e}); naming the model by the copy "
                          f"cached in {cached}, which may be older", stacklevel=2)
            text, where = (cached / CONFIG_FILE).read_bytes(), str(cached / CONFIG_FILE)
        meta = parse_meta(text, where)
        from piqa_core.config import PIQAConfig

        cfg = PIQAConfig.from_dict(meta["config"])
        model_id = meta.get("model_id", posixpath.basename(source.rstrip("/")))
        sha, random_init, random_parts = meta["sha256"], bool(meta.get("random_init")), meta.get("random_parts", [])
    return {"model_id": model_id, "sha256": sha, "preset": cfg.preset, "random_init": random_init,
            "random_parts": list(random_parts), "cached_copy": str(cached) if cached else None,
            "crop_mode": model.crop_mode or cfg.preprocess.crop_mode, "config": cfg}


def _maybe_crash(marker: str | None) -> None:
    """Chaos hook: die abruptly once (the marker file makes it once across actor restarts)."""
    if marker and not os.path.exists(marker):
        Path(marker).touch()
        os._exit(1)


class TorchThread:
    """Runs an actor's torch work, loading included, on one long-lived thread.

    Ray Data constructs an actor on its main thread and calls it on another. libgomp (torch's CPU
    thread pool) counts every thread that ever led a parallel region, so a model loaded on one
    thread and run on another looks oversubscribed to it on a small machine, and its workers then
    sleep at every barrier instead of spinning (a 2-thread Swin-B forward kept 1.85 of 2 cores busy
    instead of 1.99; a dn-piqa score actor in a 2-core Ray job 84 % of the cores, 92 % on one
    thread). ``enabled=False`` runs on the caller's thread.
    """

    def __init__(self, enabled: bool = True) -> None:
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="torch") if enabled else None

    def run(self, fn, *args, **kwargs):
        if self._pool is None:
            return fn(*args, **kwargs)
        return self._pool.submit(fn, *args, **kwargs).result()


class PrepActor:
    """CPU stage: decode, batched face detection, crops, LIQE patches (pixel columns are uint8)."""

    def __init__(self, model: ModelOptions, s3: S3Options, face_device: str = "cpu",
                 crash_marker: str | None = None, threads: int | None = None,
                 identity: dict[str, Any] | None = None) -> None:
        # Planned with one torch thread, so libgomp's count (see TorchThread) cannot mislead it.
        torch.set_num_threads(threads or max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
        bundle = load_bundle(model, s3, parts=("face",), identity=identity)
        self.cfg, self.crop_mode = bundle.config, model.crop_mode
        device = torch.device("cuda" if face_device == "gpu" and torch.cuda.is_available() else "cpu")
        if device.type == "cuda":  # as the score actors' Predictor does: fp32 means IEEE convolutions here too
            use_tf32(model.precision)
        self.detector = for_inference(bundle.detector, device)
        self.crash_marker = crash_marker

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        _maybe_crash(self.crash_marker)
        return {**_identity_columns(batch), **prepare_batch(_items(batch), self.cfg, self.detector, self.crop_mode)}


def _items(batch: dict[str, np.ndarray]) -> list[bytes | ImageError]:
    """The read stage's rows as prepare inputs: the bytes, or the read error the row will carry."""
    return [ImageError(str(code), str(msg)) if code else data
            for data, code, msg in zip(batch["data"], batch["read_error_code"], batch["read_error_message"])]


def _identity_columns(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: batch[k] for k in ("uri", "etag_or_mtime", "bytes")}


class ScoreActor:
    """Model stage: one model per actor on its GPU (or CPU); emits rows in the output schema.

    ``identity`` is the driver's ``model_identity``: rows carry it, and a checkpoint whose sha256
    differs (replaced while the job ran) stops the actor instead of mixing two models in one run.
    With ``prepare_on_device`` the actor takes the read stage's bytes and prepares them itself, so no
    prep pool is needed: on a GPU with ``gpu_prep`` (nvJPEG decode, detection, resizes and crops on
    the device), on a CPU with the prep actors' own code (``stages.prepare_batch``, PIL-exact).

    ``calls``: how many calls Ray Data makes at once (``max_concurrent_calls_per_actor``). With one,
    all torch work runs on one :class:`TorchThread`; with more, each call runs on its caller's thread.
    On a GPU each call has its own CUDA stream and forward passes go one at a time, so one batch's
    preparation, transfers and Arrow conversion overlap another batch's model passes. On a CPU each
    call is one core's work: it runs with ``threads`` torch threads (1 as planned) and the calls'
    forward passes run side by side, with no OpenMP barrier between the cores.
    """

    def __init__(self, model: ModelOptions, s3: S3Options, identity: dict[str, Any], device: str = "cpu",
                 crash_marker: str | None = None, threads: int | None = None,
                 prepare_on_device: bool = False, calls: int = 1) -> None:
        self._torch = TorchThread(enabled=calls == 1)
        self._threads, self._local = threads, threading.local()
        self._torch.run(self._setup, model, s3, identity, device, crash_marker, threads, prepare_on_device)

    def _setup(self, model: ModelOptions, s3: S3Options, identity: dict[str, Any], device: str,
               crash_marker: str | None, threads: int | None, prepare_on_device: bool) -> None:
        if threads:
            torch.set_num_threads(threads)
        bundle = load_bundle(model, s3, parts=PARTS if prepare_on_device else ("model", "liqe"), identity=identity)
        self.device = torch.device(device)
        self.identity, self.crop_mode, self.cfg = identity, identity["crop_mode"], bundle.config
        self.predictor = Predictor(bundle.config, bundle.model, bundle.liqe, self.device, model.precision,
                                   compile=model.compile, batch_size=model.batch_size, own=True)
        self.detector = for_inference(bundle.detector, self.device) if prepare_on_device else None
        self.prepare_on_device = prepare_on_device
        self.crash_marker = crash_marker
        on_gpu = self.device.type == "cuda"
        self._model_lock = threading.Lock() if on_gpu else contextlib.nullcontext()

    def _stream(self) -> contextlib.AbstractContextManager:
        """This thread's CUDA stream (created on first use); no-op on CPU."""
        if self.device.type != "cuda":
            return contextlib.nullcontext()
        if not hasattr(self._local, "stream"):
            self._local.stream = torch.cuda.Stream(self.device)
        return torch.cuda.stream(self._local.stream)

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        return self._torch.run(self._score, batch)

    def _score(self, batch: dict[str, np.ndarray]) -> pa.Table:
        _maybe_crash(self.crash_marker)
        if self._threads:
            use_torch_threads(self._threads)
        with self._stream():
            if self.prepare_on_device:
                if self.device.type == "cpu":  # the prep actors' exact code
                    prepared = prepare_batch(_items(batch), self.cfg, self.detector, self.crop_mode)
                else:
                    prepared = prepare_batch_on_device(_items(batch), self.cfg, self.detector, self.device,
                                                       self.crop_mode)
                batch = {**_identity_columns(batch), **prepared}
            staged = self.predictor.stage(batch)  # pinned copies + uploads overlap the other call's forward
            with self._model_lock:
                cols = self.predictor.finish(batch, staged)  # scores come back to the host: this stream is synced
        n = len(cols["uri"])
        ok = cols["status"] == "ok"
        box = cols["face_box"]
        boxes = pa.array([None if np.isnan(b).any() else b for b in box.tolist()], pa.list_(pa.float32(), 4))
        nullable = lambda a: pa.array([str(v) if v else None for v in a], pa.string())  # noqa: E731
        conf = cols["face_confidence"]
        data = {
            "uri": pa.array(cols["uri"].astype(str)),
            "etag_or_mtime": pa.array(cols["etag_or_mtime"].astype(str)),
            "bytes": pa.array(cols["bytes"].astype(np.int64)),
            "width": pa.array(cols["width"], pa.int32()),
            "height": pa.array(cols["height"], pa.int32()),
            "score": pa.array(cols["score"], pa.float32(), mask=~ok),
            "face_found": pa.array(cols["face_found"]),
            "face_box": boxes,
            "face_confidence": pa.array(conf, pa.float32(), mask=np.isnan(conf)),
            "n_faces": pa.array(cols["n_faces"], pa.int32()),
            "liqe_scene_top": nullable(cols["liqe_scene_top"]),
            "model_id": pa.array([self.identity["model_id"]] * n),
            "model_sha256": pa.array([self.identity["sha256"]] * n),
            "random_weights": pa.array([self.identity["random_init"]] * n),
            "crop_mode": pa.array([self.crop_mode] * n),
            "status": pa.array(cols["status"].astype(str)),
            "error_code": nullable(cols["error_code"]),
            "error_message": nullable(cols["error_message"]),
            "scored_at": pa.array([now_utc()] * n, pa.timestamp("us", tz="UTC")),
        }
        return pa.table(data, schema=SCORE_SCHEMA)
