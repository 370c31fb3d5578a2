"""What defines a training run (:data:`RECIPE`): recorded in ``<run_dir>/recipe.json`` when the run starts, so
that resuming it with other settings, or with its label, split or pair files edited, is refused."""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
from typing import TYPE_CHECKING, Any

import pyarrow.fs as pafs

from .storage import S3Options, atomic_write_bytes, exists, join, read_bytes, resolve

if TYPE_CHECKING:
    from .train import TrainJob

WEIGHT_SOURCES = ("init", "init_whole", "init_face", "liqe", "retinaface")


class TrainSetupError(ValueError):
    """A wrong option or a missing file, found on the driver before any worker starts (nothing to retry)."""


# What defines a run: resuming it with other values would mix two experiments in one set of checkpoints
# (a new split moves trained images into validation; the optimiser state would override a new --lr).
RECIPE = ("labels", "images", "format", "train_list", "test_list", "pairs", "val_fraction", "seed", "holdout_key",
          "preset", *WEIGHT_SOURCES, "batch_pairs", "pairs_per_image", "pair_scores", "lr", "weight_decay", "lr_step",
          "lr_gamma")
# Recipe values of runs recorded before the option existed: what those runs used.
RECIPE_BEFORE = {"pairs_per_image": 1, "holdout_key": "uri"}
RECIPE_FILE = "recipe.json"
# The recipe's data files: the same path with other content is another experiment too.
RECIPE_FILES = ("labels", "train_list", "test_list", "pairs")


def recipe_digests(job: TrainJob) -> dict[str, str]:
    """sha256 of each data file the recipe names (labels, split lists, pair list)."""
    return {k: hashlib.sha256(read_bytes(getattr(job, k), job.s3)).hexdigest() for k in RECIPE_FILES if getattr(job, k)}


def read_recipe(run_dir: str, s3: S3Options | None) -> dict[str, Any]:
    """A run's recorded recipe, options recorded before they existed filled in as those runs used them."""
    saved = json.loads(read_bytes(join(run_dir, RECIPE_FILE), s3))
    # Before --pair-scores, a pair list's runs trained on the label file's scores.
    return {**RECIPE_BEFORE, "pair_scores": "labels" if saved.get("pairs") else None, **saved}


def job_recipe(job: TrainJob) -> dict[str, Any]:
    """The job's recipe values; ``pair_scores`` as it acts: None without a pair list, ``labels`` for a list
    without scores of its own (what a run recorded before the option trained on)."""
    from .pairs import carries_scores

    acts = None if not job.pairs else job.pair_scores if carries_scores(job.pairs, job.s3) else "labels"
    return {k: getattr(job, k) for k in RECIPE} | {"pair_scores": acts}


def claim_run(job: TrainJob) -> None:
    """Record the run's recipe when it starts; refuse to resume it with another one.

    ``sha256`` holds the data files' digests; a recipe.json written before them resumes on its paths alone.
    """
    uri = join(job.run_dir, RECIPE_FILE)
    recipe = job_recipe(job)
    digests = recipe_digests(job)
    if not exists(uri, job.s3):
        atomic_write_bytes(uri, json.dumps({**recipe, "sha256": digests}, indent=2).encode(), job.s3)
        return
    saved = read_recipe(job.run_dir, job.s3)
    changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} -> {v!r}" for k, v in recipe.items() if saved.get(k) != v]
    edited = [f"--{k.replace('_', '-')} {getattr(job, k)} (sha256 {old[:12]}… -> {digests[k][:12]}…)"
              for k, old in saved.get("sha256", {}).items() if k in digests and digests[k] != old]
    if (changed or edited) and not has_checkpoint(job):  # nothing trained under the old recipe: a fresh start
        print(f"piqa train: run {job.run_name} has no checkpoint yet: its recipe is replaced "
              f"({'; '.join(changed + edited)})", file=sys.stderr)
        atomic_write_bytes(uri, json.dumps({**recipe, "sha256": digests}, indent=2).encode(), job.s3)
        return
    if changed:
        raise TrainSetupError(f"run {job.run_name} was started with other settings ({'; '.join(changed)}): "
                              "resume it with its own options, or start a new run with another --run-name")
    if edited:
        raise TrainSetupError(f"run {job.run_name}: {'; '.join(edited)} changed since the run started, so its "
                              "checkpoints were trained on other data: restore the file, or start a new run "
                              "with another --run-name (or --storage)")


def has_checkpoint(job: TrainJob) -> bool:
    """Whether the run has written a checkpoint (``epoch_NNNN``): until then no recipe has trained anything."""
    return latest_epoch(job) is not None


def latest_epoch(job: TrainJob) -> int | None:
    """The epoch (0-based) of the run's latest ``epoch_NNNN`` checkpoint folder; None without one."""
    fs, path = resolve(job.run_dir, job.s3)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return None
    epochs = [int(i.base_name[6:]) for i in infos if re.fullmatch(r"epoch_\d+", i.base_name)]
    return max(epochs, default=None)


# Written by rank 0 when the loss went nan/inf: {"attempt": the driver's attempt id, "epoch", "error"}.
DIVERGED_FILE = "diverged.json"


def check_not_diverged(job: TrainJob) -> None:
    """Refuse to resume a run that diverged after its latest checkpoint: the recipe is fixed, so it would
    train to the same step and diverge again (a RayJob's retry, or the same command run again)."""
    uri = join(job.run_dir, DIVERGED_FILE)
    fs, run = resolve(job.run_dir, job.s3)
    diverged, recipe = fs.get_file_info([f"{run}/{DIVERGED_FILE}", f"{run}/{RECIPE_FILE}"])
    if diverged.type == pafs.FileType.NotFound:
        return
    if recipe.mtime is not None and diverged.mtime is not None and recipe.mtime > diverged.mtime:
        return  # the recipe was replaced since (corrected options on a run without a checkpoint): another run
    said = json.loads(read_bytes(uri, job.s3))
    latest = latest_epoch(job)
    if said.get("epoch", math.inf) <= (latest if latest is not None else -1):
        return  # a checkpoint after the divergence: the run went past it
    start = f"--init {join(job.run_dir, f'epoch_{latest:04d}')}" if latest is not None else "its start weights"
    raise TrainSetupError(f"run {job.run_name} diverged ({said.get('error')}); resuming it would diverge again: "
                          f"start a new run (another --run-name) with a lower --lr, from {start} if you like, "
                          f"or delete {uri} to resume it anyway")
