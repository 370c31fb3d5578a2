"""Retraining on Ray Train: ``TorchTrainer`` + DDP workers; checkpoints are our model directories.

Ray 2.60 runs Ray Train **V2** unless ``RAY_TRAIN_V2_ENABLED=0``. V2 removed
``TorchTrainer.restore/can_restore`` (they raise): running again with the same
``RunConfig(name, storage_path)`` resumes by itself, the controller reloading the run's checkpoint
snapshot so that ``ray.train.get_checkpoint()`` returns the latest checkpoint. A dead worker restarts
the worker group from that checkpoint (``FailureConfig(max_failures)``). V1 is refused (see
``_require_v2``).

Under ``<storage>/<run_name>/``: Ray's checkpoint folders ``epoch_NNNN`` (each a model directory:
``config.json`` + ``model.safetensors``, plus ``train_state.pt`` and ``history.json``); ``model/``, the
best checkpoint by validation SRCC (give it to ``piqa score --weights``); ``test_report.json`` and
``test_report.parquet`` when the labels have a test split; ``summary.json``; ``recipe.json``, the
settings that define the run (labels, split, start weights, optimiser) and the sha256 of its label,
split and pair files: resuming with other settings, or with those files edited, is refused;
``diverged.json`` once an attempt's loss went nan or inf.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import tempfile
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import ray

from piqa_core.config import ModelConfig, get_preset
from piqa_core.metrics import MIN_GROUP
from piqa_core.features import image_key
from piqa_core.training import format_val_srcc, rank_batch

from .labels import LabelError, LabelTable, load_labels
from .pairs import load_pairs, pair_list_scores
from .recipe import DIVERGED_FILE, WEIGHT_SOURCES, TrainSetupError, check_not_diverged, claim_run, has_checkpoint
from .score import ray_session
from .storage import S3Options, atomic_write_bytes, exists, is_dir, join, local_path, read_bytes, resolve
from .train_worker import HISTORY_FILE, start_bundle, train_loop_per_worker


@dataclass
class TrainJob:
    """One training run; defaults are the official DN-PIQA recipe."""

    labels: str
    run_name: str
    storage: str
    images: str | None = None
    format: str = "auto"
    train_list: str | None = None
    test_list: str | None = None
    pairs: str | None = None
    # With --pairs: train on the pair list's own JOD columns ("list", as the official script) or --labels'.
    pair_scores: str = "list"
    val_fraction: float = 0.2
    workers: int = 1
    gpu: bool = False
    random_start: bool = False  # branches without start weights may start random (official-size presets)
    precision: str = "bf16"  # GPU training steps: bf16 autocast, or fp32 as the official script
    cpus_per_worker: float | None = None
    epochs: int = 10
    batch_pairs: int = 6
    pairs_per_image: int = 2  # partners drawn per train image and epoch; the official exp.csv has two
    lr: float = 1e-5
    weight_decay: float = 1e-7
    lr_step: int = 2
    lr_gamma: float = 0.9
    preset: str = "dn-piqa"
    init: str | None = None
    init_whole: str | None = None
    init_face: str | None = None
    liqe: str | None = None
    retinaface: str | None = None
    cache: str | None = None
    max_failures: int = 2
    keep: int = 2
    seed: int = 0
    holdout_key: str = "path"
    eval_batch: int = 8
    # Validate the starting weights too (history "before"): the baseline training must beat.
    eval_before: bool = True
    s3: S3Options = field(default_factory=S3Options)
    address: str | None = None
    # Chaos testing: rank 0 exits abruptly once, during this epoch.
    fail_at_epoch: int | None = None

    @property
    def cpus(self) -> float:
        return self.cpus_per_worker or (4.0 if self.gpu else 1.0)

    @property
    def run_dir(self) -> str:
        return join(self.storage, self.run_name)


def _require_v2() -> None:
    from ray.train.v2._internal.constants import V2_ENABLED_ENV_VAR, is_v2_enabled

    if not is_v2_enabled():
        raise TrainSetupError(f"piqa train needs Ray Train V2 (resume-by-run-name); unset {V2_ENABLED_ENV_VAR}=0")


def checked_job(job: TrainJob) -> TrainJob:
    """The job with local paths absolute, its weight files checked to exist.

    Ray Train runs each worker in a directory of its own, where a relative path names nothing; and a
    file that is missing in a worker fails the worker group, which Ray retries ``max_failures`` times.
    """
    try:
        rank_batch(job.batch_pairs, job.workers)
    except ValueError as e:
        raise TrainSetupError(str(e)) from None
    paths, init_is_dir, resumes = {}, False, None
    for name in (*WEIGHT_SOURCES, "cache", "storage", "labels", "images", "train_list", "test_list", "pairs"):
        uri = getattr(job, name)
        if uri is None:
            continue
        path = local_path(uri)
        if path is not None:
            paths[name] = path
        if name in WEIGHT_SOURCES:
            found = os.path.exists(path) if path is not None else _remote_exists(name, uri, job.s3)
            if not found:
                if resumes is None:
                    resumes = has_checkpoint(job)
                if not resumes:
                    raise TrainSetupError(f"--{name.replace('_', '-')} {uri}: no such file or directory")
                # The workers restore the checkpoint and never read it; the recipe still names it.
                print(f"piqa train: --{name.replace('_', '-')} {uri} is gone; run {job.run_name} resumes from "
                      "its checkpoint, which does not need it", file=sys.stderr)
            elif name == "init":
                init_is_dir = os.path.isdir(path) if path is not None else is_dir(uri, job.s3)
    if init_is_dir and (job.liqe or job.retinaface):
        raise TrainSetupError("--init is a model directory, which already holds LIQE and RetinaFace: "
                              "drop --liqe/--retinaface")
    _check_random_branches(job)
    return replace(job, **paths)


def _check_random_branches(job: TrainJob) -> None:
    """Refuse to start the official architecture's branches from random weights unless asked: the official
    recipe starts them from LSVQ / GFIQA pre-training, and a forgotten flag would cost a whole run."""
    missing = [f"--{k.replace('_', '-')}" for k in ("init_whole", "init_face") if not getattr(job, k)]
    model = get_preset(job.preset).model
    official = model.backbone == ModelConfig.backbone and not model.backbone_kwargs
    if job.init or job.random_start or not missing or not official or has_checkpoint(job):
        return
    raise TrainSetupError(f"without {' and '.join(missing)} (or --init) the {job.preset} run would start "
                          f"{'both branches' if len(missing) == 2 else 'a branch'} from random weights; the official "
                          "recipe starts the whole-image branch from LSVQ and the face branch from GFIQA pre-training "
                          "(--init-whole, --init-face). Give them, or --random-start to train from random init")


def _remote_exists(name: str, uri: str, s3: S3Options) -> bool:
    try:
        return exists(uri, s3)
    except Exception as e:  # noqa: BLE001 - access denied, unknown scheme: the workers would fail the same way
        raise TrainSetupError(f"--{name.replace('_', '-')} {uri}: cannot check it ({type(e).__name__}: {e})") from e


def prepare_data(job: TrainJob) -> tuple[LabelTable, dict[str, Any]]:
    """Labels (checked: columns, scores, images exist) and the arrays each worker needs."""
    table = load_labels(job.labels, job.images, job.format, job.train_list, job.test_list,
                        job.val_fraction, job.seed, job.s3, holdout_key=job.holdout_key)
    train, val = table.subset("train"), table.subset("val")
    if len(train) < 2:
        raise LabelError(f"need at least 2 train images; {table.describe()}")
    sizes = train.frame.groupby("group")["uri"].transform("size")
    if not job.pairs and not (sizes >= 2).any():
        raise LabelError(f"no group has 2 train images, so there is no pair to train on; {table.describe()}")
    if not job.pairs and (alone := int((sizes < 2).sum())):
        print(f"piqa train: warning: {alone} train image(s) are alone in their group, so never in a pair: they "
              "do not train (scores compare only within a group)", file=sys.stderr)
    if len(val) == 0 and job.val_fraction > 0:  # asked for a hold-out, got none: groups too small to give one
        raise LabelError(f"no validation images: --val-fraction {job.val_fraction} holds none out of groups this "
                         f"small (a group keeps 2 train images); use larger groups, a val split, or "
                         f"--val-fraction 0 to train without validation; {table.describe()}")
    if len(val) == 0:
        print("piqa train: warning: no validation images (--val-fraction 0 and no val split): checkpoints "
              "cannot be ranked, the last epoch is exported", file=sys.stderr)
    elif not (val.frame.groupby("group").size() >= MIN_GROUP).any():
        print(f"piqa train: warning: no validation group has {MIN_GROUP} images, so validation SRCC is "
              "undefined and checkpoints cannot be ranked; raise --val-fraction or use larger groups",
              file=sys.stderr)
    data: dict[str, Any] = {s: (t.uris, t.scores, t.groups) for s, t in (("train", train), ("val", val))}
    # The feature cache's keys: the stat check_images made, so an image uploaded again is prepared again.
    data["keys"] = {s: [image_key(*r) for r in t.frame[["uri", "size", "version"]].itertuples(index=False)]
                    for s, t in (("train", train), ("val", val))}
    data["pairs"] = None
    if job.pairs:
        # All names, repeats included: a name two images share is refused even outside the train split.
        data["pairs"], stats = load_pairs(job.pairs, train, job.s3, known=list(table.frame["name"]))
        print(f"piqa train: pair list {job.pairs}: {stats}", file=sys.stderr)
        if not len(data["pairs"]):
            raise LabelError(f"{job.pairs}: no pair left with both images in the train split and one group")
        if unpaired := len(train) - len(np.unique(data["pairs"])):
            print(f"piqa train: warning: {unpaired} train image(s) are in no pair of {job.pairs}: they do not "
                  "train", file=sys.stderr)
        if job.pair_scores == "list" and (listed := pair_list_scores(job.pairs, train, job.s3)) is not None:
            scores, stats = listed
            data["train"] = (train.uris, scores, train.groups)
            print(f"piqa train: the train targets of {stats['scored']} image(s) are the JOD columns of {job.pairs}, "
                  f"as in the official script; {stats['differ']} differ from {job.labels} (by up to "
                  f"{stats['max_diff']:.3g}): --pair-scores labels trains on the label file's", file=sys.stderr)
    per_epoch = len(data["pairs"]) if job.pairs else job.pairs_per_image * int((sizes >= 2).sum())
    if per_epoch < job.workers:  # shard() gives every worker the same count: here none at all
        raise LabelError(f"an epoch has {per_epoch} pair(s), fewer than --workers {job.workers}: every worker "
                         "would train on nothing; use fewer workers or more labelled images")
    return table, data


def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Train (or resume) the run, export the best checkpoint, evaluate the test split; returns a summary."""
    _require_v2()
    job = checked_job(job)
    job.s3 = job.s3.filled()
    table, data = prepare_data(job)  # before Ray starts: a typo in the labels costs no cluster start
    claim_run(job)
    check_not_diverged(job)
    with ray_session(job.address):
        return _train(job, table, data)


def _train(job: TrainJob, table: LabelTable, data: dict[str, Any]) -> dict[str, Any]:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    print(f"piqa train {job.run_name}: {table.describe()}", file=sys.stderr)
    if any(getattr(job, k) for k in WEIGHT_SOURCES) and not has_checkpoint(job):
        check_start_weights(job)
    fs, path = resolve(job.storage, job.s3)  # S3: an explicit pyarrow filesystem (custom endpoints)
    resources = {"CPU": job.cpus, **({"GPU": 1} if job.gpu else {})}
    # Per run (not per call): re-running the same command must not fail again.
    run_key = hashlib.sha1(job.run_dir.encode()).hexdigest()[:16]
    marker = os.path.join(tempfile.gettempdir(), f"piqa-train-crash-{run_key}")
    attempt = uuid.uuid4().hex  # tells this attempt's divergence from an earlier one's
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"job": job, "data": data, "marker": marker, "attempt": attempt},
        scaling_config=ScalingConfig(num_workers=job.workers, use_gpu=job.gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=job.run_name, storage_path=path, storage_filesystem=fs if "://" in job.storage else None,
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.keep, checkpoint_score_attribute="val_srcc_mean",
                                               checkpoint_score_order="max")),
    )
    result = trainer.fit()
    diverged = join(job.run_dir, DIVERGED_FILE)
    if exists(diverged, job.s3) and (said := json.loads(read_bytes(diverged, job.s3)))["attempt"] == attempt:
        raise FloatingPointError(said["error"])
    if not result.best_checkpoints:
        raise RuntimeError(f"run {job.run_name} has no checkpoint (0 epochs trained?)")
    record = json.loads(_read_checkpoint_file(result.checkpoint, HISTORY_FILE))
    history = record["epochs"]
    if len(history) < job.epochs:  # the workers stopped early without saying why: nothing to export as done
        raise RuntimeError(f"run {job.run_name} stopped after {len(history)} of {job.epochs} epochs; re-run the "
                           "same command to resume it")
    best, best_metrics = best_checkpoint(result.best_checkpoints)
    model_dir = export_model(best, job)
    exported = json.loads(_read_checkpoint_file(best, "config.json"))
    summary = {
        "run_name": job.run_name, "run_dir": job.run_dir, "model_dir": model_dir,
        "epochs_completed": len(history), "best_epoch": best_metrics["epoch"],
        "best": {k: v for k, v in best_metrics.items() if k.startswith("val_")},
        "history": history, "val_before": record["before"], "labels": table.describe(), "ray_train": "v2",
        "job": {k: v for k, v in asdict(job).items() if k not in ("s3", "address")},
    }
    test = table.subset("test")
    summary_uri = join(job.run_dir, "summary.json")
    if len(test):  # a run that dies while testing leaves a summary of its model/, not of an earlier export's
        atomic_write_bytes(summary_uri, json.dumps({**summary, "test": "pending"}, indent=2, default=str).encode(),
                           job.s3)
    summary["test"] = _evaluate_test(job, model_dir, exported, test) if len(test) else None
    atomic_write_bytes(summary_uri, json.dumps(summary, indent=2, default=str).encode(), job.s3)
    _print_summary(summary)
    return summary


@ray.remote(max_retries=0)
def _load_start_weights(job: TrainJob) -> None:
    start_bundle(job)


def check_start_weights(job: TrainJob) -> None:
    """Build the start networks once, in a task placed like a worker (same memory), before the trainer: a
    wrong or damaged weights file is one error here, not a worker failure Ray retries ``max_failures`` times."""
    task = _load_start_weights.options(num_cpus=job.cpus, num_gpus=0)
    try:
        ray.get(task.remote(job))
    except ray.exceptions.RayTaskError as e:
        cause = e.cause if isinstance(e.cause, Exception) else e
        raise TrainSetupError(f"the start weights cannot be loaded: {cause}") from None


def best_checkpoint(kept: list[tuple[Any, dict[str, Any]]]) -> tuple[Any, dict[str, Any]]:
    """The kept (checkpoint, metrics) with the best validation SRCC; ties (no rankable validation: every
    epoch scores -1) go to the latest epoch, not to the oldest one kept."""
    return max(kept, key=lambda cm: (cm[1].get("val_srcc_mean", -math.inf), cm[1].get("epoch", -1)))


def _read_checkpoint_file(checkpoint: Any, name: str) -> bytes:
    with checkpoint.filesystem.open_input_file(f"{checkpoint.path}/{name}") as f:
        return f.read()


def export_model(checkpoint: Any, job: TrainJob) -> str:
    """Copy the checkpoint's model files (not the optimiser state) to ``<run_dir>/model``."""
    import pyarrow.fs as pafs

    dest = join(job.run_dir, "model")
    fs, path = resolve(dest, job.s3)
    local = isinstance(fs, pafs.LocalFileSystem)
    if local:
        fs.create_dir(path)
    for name in ("model.safetensors", "config.json"):  # config last: it names the weights' sha256
        # A local copy lands under a temporary name first: a crash mid-copy leaves the previous export
        # whole. An S3 object appears only when its upload completes.
        target = f"{path}/.{name}.partial" if local else f"{path}/{name}"
        # copy_files: parallel ranged transfers (a plain stream read of 100+ MB from S3 crawls)
        try:
            pafs.copy_files(f"{checkpoint.path}/{name}", target, source_filesystem=checkpoint.filesystem,
                            destination_filesystem=fs)
            if local:
                os.replace(target, f"{path}/{name}")
        finally:
            if local and os.path.exists(target):
                os.unlink(target)
    return dest


def _evaluate_test(job: TrainJob, model_dir: str, exported: dict[str, Any], test: LabelTable) -> dict[str, Any]:
    """Five-crop evaluation of the exported (best-by-val) model on the test split, in a Ray task.

    ``exported``: the export's config.json, whose weights sha256 and model config a node's cached copy
    of an earlier export of the same ``model/`` must match, or it is fetched again.
    """
    from .evaluate import evaluate_remote

    task = evaluate_remote.options(num_cpus=1, num_gpus=1 if job.gpu else 0)
    report = ray.get(task.remote(model_dir, test.frame, job.s3, join(job.run_dir, "test_report.json"),
                                 job.eval_batch, exported["sha256"], exported["config"]))
    return {"mean": report["mean"], "median": report["median"], "pooled": report["pooled"],
            "items": report["items"], "failed": report["failed"], "model_sha256": report["model_sha256"]}


def _print_summary(s: dict[str, Any]) -> None:
    b, t = s["best"], s["test"]
    srcc = lambda v: f"{v:.4f}" if v is not None and math.isfinite(v) else "n/a"  # noqa: E731
    print(f"piqa train {s['run_name']}: {s['epochs_completed']} epochs; best epoch {s['best_epoch'] + 1}: val SRCC "
          f"{format_val_srcc(b)}; model {s['model_dir']}"
          + (f"\n  test ({t['items']} images, {t['failed']} failed): SRCC mean {srcc(t['mean']['srcc'])} "
             f"median {srcc(t['median']['srcc'])}" if t else ""), file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.train`` = ``piqa train`` (the form ``ray job submit`` runs)."""
    from .cli import run_module

    run_module("train", argv)


if __name__ == "__main__":
    main()
