"""The Ray Train worker loop of ``piqa train``: data on the fly, DDP steps, per-epoch reports.

Runs inside each training worker; ``ray_jobs.train`` builds the ``TorchTrainer`` around it.
"""

from __future__ import annotations

import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np
import ray
import torch

from piqa_core.checkpoints import load_checkpoint, save_checkpoint
from piqa_core.faces import for_inference
from piqa_core.features import FeatureCache, fingerprint, prepare_items
from piqa_core.stages import use_tf32
from piqa_core.training import (all_gather, batch_failures, check_loss, crop_rngs, epoch_pairs, format_val_srcc,
                                init_bundle, make_optimizer, object_group, pair_loss, predict, prefetch, rank_batch,
                                seed_torch, shard, train_metrics, val_metrics)

from .actors import weights_dir
from .reader import DEFAULT_MAX_BYTES, fetch_all
from .recipe import DIVERGED_FILE
from .storage import ObjectInfo, S3Options, atomic_write_bytes, exists, join, read_bytes

if TYPE_CHECKING:
    from .train import TrainJob

STATE_FILE, HISTORY_FILE = "train_state.pt", "history.json"
# Rank 0's progress lines within a pass come at most this often (see ``_Progress``).
PROGRESS_EVERY_S = 30.0


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """One DDP worker: restore or initialise, then per epoch train, validate, report a checkpoint."""
    import ray.train.torch

    job, data = config["job"], config["data"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    bf16 = _train_bf16(device, job.precision)
    # Features (face boxes, LIQE) and validation as the scorer computes them at its default fp32, so
    # best.val_* are what `piqa eval --split val` reports for the saved model (but val_srcc_mean, which
    # ranks: see val_metrics).
    use_tf32("fp32")
    torch.set_num_threads(max(1, int(job.cpus)))

    log = _logger(job.run_name, rank)
    checkpoint, state, record = ray.train.get_checkpoint(), None, {"before": None, "epochs": []}
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            bundle = load_checkpoint(d)
            state = torch.load(os.path.join(d, STATE_FILE), map_location="cpu", weights_only=True)
            record = json.loads(Path(d, HISTORY_FILE).read_text())
        init = bundle.meta.get("train", {}).get("init", {})
        log(f"resuming after epoch {state['epoch'] + 1} ({checkpoint.path})")
    else:
        init = {k: getattr(job, k) for k in ("preset", "init", "init_whole", "init_face", "liqe", "retinaface")}
        bundle, warnings = start_bundle(job)
        for w in warnings:
            log(f"warning: {w}")
    cfg = bundle.config
    liqe = bundle.liqe.to(device).eval() if bundle.liqe is not None else None
    detector = for_inference(bundle.detector, device)
    model = ray.train.torch.prepare_model(bundle.model)  # DDP when world > 1; bundle.model stays the module
    opt, sched = make_optimizer(bundle.model, job.lr, job.weight_decay, job.lr_step, job.lr_gamma)
    start = 0
    if state is not None:
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start = int(state["epoch"]) + 1

    cache, loaded, dropped = FeatureCache(fingerprint(bundle)), 0, 0
    cache_uri = join(job.cache, f"features-{cache.fingerprint}.npz") if job.cache else None
    keys = [*data["keys"]["train"], *data["keys"]["val"]]
    if cache_uri and exists(cache_uri, job.s3):
        cache.add_columns(FeatureCache.read_npz(read_bytes(cache_uri, job.s3)))
        dropped = cache.drop_stale(keys)
        loaded = len(cache)
        log(f"feature cache: {len(cache)} images from {cache_uri}"
            + (f" ({dropped} stale entries dropped: earlier uploads of this run's images)" if dropped else ""))
    group = object_group(world)
    env = dict(job=job, cfg=cfg, detector=detector, liqe=liqe, cache=cache, device=device, marker=config["marker"],
               log=log)
    # rank 0: the file differs from the cache (a write failed, or stale entries went): write it next time
    unsaved = dropped > 0
    if checkpoint is None and job.eval_before and start < job.epochs:
        before = set(cache.faces)
        val = _predict_val(bundle.model, data["val"], data["keys"]["val"], rank, world, group,
                           stage="before training: validation", **env)
        if _gather_cache(cache, before, world, group):
            unsaved = not _save_cache(cache, cache_uri, keys, job.s3, rank, log)
        if rank == 0:
            record["before"] = val_metrics(val[0], *data["val"][1:], val[1])
            log(f"before training: val SRCC {format_val_srcc(record['before'])}")
            _warn_nonfinite(record["before"], log)

    for epoch in range(start, job.epochs):
        seed_torch(job.seed, epoch, rank)
        t0, lr, before = time.perf_counter(), opt.param_groups[0]["lr"], set(cache.faces)
        try:
            mine = _train_epoch(model, opt, data, epoch, rank, world, bf16, **env)
        except FloatingPointError as e:  # every rank, at the same step (the loss is all-reduced)
            # Said to the driver in a file, not raised: Ray would replay the same divergence --max-failures times.
            if rank == 0:
                said = {"attempt": config["attempt"], "epoch": epoch, "error": str(e)}
                try:
                    atomic_write_bytes(join(job.run_dir, DIVERGED_FILE), json.dumps(said).encode(), job.s3)
                except Exception as failed:  # noqa: BLE001 - Ray replays it then, but the cause still says diverged
                    raise e from failed
            return
        sched.step()
        train_s = time.perf_counter() - t0
        val = _predict_val(bundle.model, data["val"], data["keys"]["val"], rank, world, group,
                           stage=f"epoch {epoch + 1}/{job.epochs} validation", **env)
        grew = _gather_cache(cache, before, world, group)  # a collective: every rank, same place
        train, failed = train_metrics(all_gather(mine, world, group), train_s)
        metrics = {"epoch": epoch, **train, "lr": lr, "session_start_epoch": start,
                   "features_loaded": loaded, "epoch_time_s": time.perf_counter() - t0}
        if failed:
            log(f"warning: epoch {epoch + 1}: {len(failed)} train image(s) failed to load, so "
                f"{metrics['train_dropped_pairs']} pair(s) were left out: " + "; ".join(failed[:3])
                + (f"; … and {len(failed) - 3} more" if len(failed) > 3 else ""))
        if rank == 0:
            metrics.update(val_metrics(val[0], *data["val"][1:], val[1]))
            # -1.0 stands in for undefined metrics (checkpoint ranking): print n/a, never the placeholder.
            plcc = f"  PLCC mean {metrics['val_plcc_mean']:.4f}" if metrics.get("val_valid_groups") else ""
            log(f"epoch {epoch + 1}/{job.epochs}  loss {metrics['train_loss']:.4f}  "
                f"{metrics['pairs_per_s']:.1f} pairs/s  val SRCC {format_val_srcc(metrics)}{plcc}  "
                f"lr {lr:.2e}  ({metrics['epoch_time_s']:.0f}s)")
            _warn_nonfinite(metrics, log)
        _report(metrics, record, bundle, opt, sched, job, init, rank)
        # Rank 0 alone, after the report (a barrier every rank enters), so a failed write costs no checkpoint;
        # the other ranks wait for it in the next epoch's first all-reduce, as they did in the gather before.
        if grew or unsaved:
            unsaved = not _save_cache(cache, cache_uri, keys, job.s3, rank, log)


def _logger(run_name: str, rank: int) -> Callable[[str], None]:
    """The worker's log: rank 0 writes ``[piqa train RUN] msg`` lines; the other ranks stay silent."""
    def log(msg: str) -> None:  # sys.stdout.write: Train V2's print patch would log every line twice
        if rank == 0:
            sys.stdout.write(f"[piqa train {run_name}] {msg}\n")
            sys.stdout.flush()

    return log


class _Progress:
    """Rank 0's progress through one pass (train steps, validation batches), with the features it computes.

    Lines are bounded by time, at most one per ``PROGRESS_EVERY_S``, not by a step count: a count would flood
    the log on a fast GPU yet stay silent for many minutes while the first epoch computes every image's face
    and LIQE features (a CPU step then takes seconds).
    """

    def __init__(self, env: dict[str, Any], rank: int, stage: str, keys: Iterable[str]) -> None:
        self.on, self.stage, self.cache = rank == 0, stage, env["cache"]
        self.log = env.get("log") or _logger(env["job"].run_name, rank)
        # The features this pass computes: its images' that are not cached yet (failed images never are).
        self.need = {k for k in keys if k not in self.cache} if self.on else set()
        self.t0 = self.last = time.monotonic()

    def due(self) -> bool:
        """Whether a line is due now (the caller computes the line's numbers only then)."""
        now = time.monotonic()
        if not self.on or now - self.last < PROGRESS_EVERY_S:
            return False
        self.last = now
        return True

    def elapsed(self) -> float:
        return max(time.monotonic() - self.t0, 1e-9)

    def __call__(self, msg: str) -> None:
        done = sum(k in self.cache for k in self.need)  # host-side dict lookups, only when a line is due
        self.log(f"{self.stage} {msg}" + (f"  features {done}/{len(self.need)}" if self.need else ""))


def start_bundle(job: TrainJob) -> tuple[Any, list[str]]:
    """The networks a run without a checkpoint starts from, and warnings about parts left random."""
    sources = [_source(getattr(job, k), job.s3) for k in ("init", "init_whole", "init_face", "liqe", "retinaface")]
    return init_bundle(job.preset, job.seed, *sources)


def _source(uri: str | None, s3: S3Options) -> str | bytes | None:
    """A local path for a model directory or weights file; remote files come back as bytes."""
    if uri is None or "://" not in uri or uri.startswith("file:"):
        return uri.removeprefix("file://") if uri else None
    if uri.rstrip("/").lower().endswith((".pth", ".pt", ".zip", ".bin", ".pkl")):
        return read_bytes(uri, s3)
    return str(weights_dir(uri, s3))


def _maybe_fail(job: TrainJob, epoch: int, rank: int, marker: str) -> None:
    """Chaos hook: rank 0 dies abruptly once, after the epoch's first step (the marker survives restarts).

    It waits first: Ray Train V2 collects reports by polling workers (every 2 s), and a worker that
    dies before the poll takes its last report with it (that epoch is then trained again).
    """
    if job.fail_at_epoch == epoch and rank == 0 and not os.path.exists(marker):
        Path(marker).touch()
        time.sleep(5)
        sys.stdout.write(f"[piqa train {job.run_name}] injected failure in epoch {epoch + 1}\n")
        sys.stdout.flush()
        os._exit(1)


def _warn_nonfinite(metrics: dict[str, Any], log: Callable[[str], None]) -> None:
    if metrics["val_nonfinite"]:
        log(f"warning: the model scored {metrics['val_nonfinite']} loaded validation image(s) nan or inf "
            "(left out of the validation metrics; the epoch ranks last): it may be diverging")


def _prepare(env: dict[str, Any], uris: list[str], keys: list[str], idx: np.ndarray, crop_mode: str,
             rngs: list) -> dict:
    """Prepared columns of the images ``idx``; ``keys`` (:func:`image_key`, from the driver's stat) key the cache."""
    items = fetch_all([ObjectInfo(uris[i], 0, "") for i in idx], env["job"].s3, DEFAULT_MAX_BYTES)
    return prepare_items(items, [keys[i] for i in idx], env["cfg"], env["detector"], env["liqe"], env["cache"],
                         crop_mode, rngs, env["device"])


def _train_epoch(model: torch.nn.Module, opt: torch.optim.Optimizer, data: dict[str, Any], epoch: int, rank: int,
                 world: int, bf16: bool, **env: Any) -> dict[str, Any]:
    """One epoch on this rank's pairs: ``loss_sum, pairs, dropped_pairs, failed`` (see ``train_metrics``)."""
    job = env["job"]
    uris, labels, groups = data["train"]
    keys = data["keys"]["train"]
    ids, mine = shard(epoch_pairs(groups, epoch, job.seed, data["pairs"], job.pairs_per_image), rank, world)
    b = rank_batch(job.batch_pairs, world)

    def prep(step: int) -> tuple[dict, np.ndarray]:
        sl = slice(step * b, (step + 1) * b)
        idx = np.concatenate([mine[sl, 0], mine[sl, 1]])
        return _prepare(env, uris, keys, idx, "random", crop_rngs(job.seed, epoch, ids[sl])), idx

    model.train()
    out: dict[str, Any] = {"loss_sum": 0.0, "pairs": 0, "dropped_pairs": 0, "failed": {}}
    steps = math.ceil(len(mine) / b)
    progress = _Progress(env, rank, f"epoch {epoch + 1}/{job.epochs}", (keys[i] for i in np.unique(mine)))
    for step, (cols, idx) in enumerate(prefetch(prep, steps, max(1, int(job.cpus)))):
        failed, dropped = batch_failures(cols, idx, uris)
        out["failed"].update(failed)
        out["dropped_pairs"] += dropped
        loss, total, n, n_all = pair_loss(model, cols, labels[idx], env["cfg"], env["device"], bf16, world)
        check_loss(total, epoch, step)  # before the step: nan would reach every weight
        opt.zero_grad(set_to_none=True)
        loss.backward()  # on every rank, whatever it lost: DDP's gradient all-reduce runs here
        if n_all:  # every rank agrees: n_all is all-reduced
            opt.step()
        out["loss_sum"], out["pairs"] = out["loss_sum"] + total, out["pairs"] + n
        if progress.due():
            # Floats pair_loss already brought to the host: rank 0's running loss; every rank takes b pairs a step.
            taken = min((step + 1) * b, len(mine)) * world
            progress(f"step {step + 1}/{steps}  running loss {out['loss_sum'] / max(out['pairs'], 1):.4f}  "
                     f"{taken / progress.elapsed():.1f} pairs/s")
        _maybe_fail(job, epoch, rank, env["marker"])
    return out


def _train_bf16(device: torch.device, precision: str) -> bool:
    """Training steps run under bf16 autocast on GPUs with ``--precision bf16`` (validation never does)."""
    return device.type == "cuda" and precision == "bf16"


def _predict_val(module: torch.nn.Module, val: tuple, keys: list[str], rank: int, world: int, group: Any,
                 stage: str = "validation", **env: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """Five-crop fp32 scores of the validation split and which images loaded, sharded by rank; the whole
    arrays on rank 0 (a loaded image the model scored nan is not a failed one)."""
    uris, b = val[0], env["job"].eval_batch
    mine = np.arange(rank, len(uris), world)
    module.eval()
    chunks = [mine[i:i + b] for i in range(0, len(mine), b)]
    prep = lambda k: _prepare(env, uris, keys, chunks[k], "five", [None] * len(chunks[k]))  # noqa: E731
    preds, oks = [], []
    progress = _Progress(env, rank, stage, (keys[i] for i in mine))
    for k, cols in enumerate(prefetch(prep, len(chunks), max(1, int(env["job"].cpus)))):
        preds.append(predict(module, cols, env["cfg"], env["device"]))
        oks.append(cols["status"] == "ok")
        if progress.due():
            progress(f"{sum(map(len, chunks[:k + 1]))}/{len(mine)} images")
    cat = lambda xs, dtype: np.concatenate(xs) if xs else np.zeros(0, dtype)  # noqa: E731
    parts = all_gather((mine, cat(preds, np.float64), cat(oks, bool)), world, group)
    if rank != 0:
        return None
    out, loaded = np.full(len(uris), np.nan), np.zeros(len(uris), bool)
    for idx, p, ok in parts:
        out[idx], loaded[idx] = p, ok
    return out, loaded


def _gather_cache(cache: FeatureCache, before: set[str], world: int, group: Any) -> bool:
    """Give every rank the features the others computed (a collective); whether any rank computed some.

    An image two ranks computed (in pairs on both) keeps the lowest rank's features on every rank: batch
    composition moves them by float rounding, and the ranks must not train on different boxes for it."""
    parts = all_gather(cache.to_columns([u for u in cache.faces if u not in before]), world, group)
    for p in reversed(parts):  # the lowest rank's last, so its values stand
        cache.add_columns(p)
    return bool(sum(len(p["uri"]) for p in parts))


def _save_cache(cache: FeatureCache, uri: str | None, keys: Iterable[str], s3: S3Options, rank: int,
                log: Callable[[str], None]) -> bool:
    """Rank 0 writes the cache file; False (and a warning) when that failed: the file only saves work later.

    ``keys`` are the run's images: earlier uploads of them are dropped, so the file does not grow with
    every upload of a photo.
    """
    if not uri or rank != 0:
        return True
    try:
        if exists(uri, s3):  # another run sharing this cache may have added images since we read it: keep them
            theirs = FeatureCache.read_npz(read_bytes(uri, s3))
            new = np.array([u not in cache for u in theirs["uri"]], bool)
            cache.add_columns({k: v[new] for k, v in theirs.items()})
        cache.drop_stale(keys)
        atomic_write_bytes(uri, cache.to_npz(), s3)  # a crash mid-write must not leave a cache later runs load
    except Exception as e:  # noqa: BLE001 - disk full, PUT denied, a damaged file: the features are recomputed
        log(f"warning: feature cache {uri} not written ({type(e).__name__}: {e}); training goes on, and the "
            "next epoch tries again")
        return False
    return True


def _report(metrics: dict[str, Any], record: dict[str, Any], bundle: Any, opt: Any, sched: Any, job: TrainJob,
            init: dict[str, Any], rank: int) -> None:
    """Rank 0 writes a model directory + optimiser state + history and reports it; others report only."""
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics, checkpoint=None)
        return
    record["epochs"].append(metrics)
    bundle.model_id, bundle.random_init, bundle.meta = job.run_name, False, {}
    with tempfile.TemporaryDirectory() as tmp:
        val = {k: v for k, v in metrics.items() if k.startswith("val_")}
        save_checkpoint(bundle, tmp, extra={"train": {"init": init, "epochs_completed": metrics["epoch"] + 1,
                                                      "labels": job.labels, "val": val}})
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "epoch": metrics["epoch"]},
                   os.path.join(tmp, STATE_FILE))
        Path(tmp, HISTORY_FILE).write_text(json.dumps(record))
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"epoch_{metrics['epoch']:04d}")
