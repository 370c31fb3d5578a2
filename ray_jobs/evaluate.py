"""Evaluate a model on labelled images: per-group SRCC / KRCC / PLCC / RMSE / MAE, mean and median.

Scoring is ``piqa_core.scorer.Scorer`` (five crops unless the model's config or ``--crop-mode`` says
otherwise), through ``ray_jobs.inprocess.score_objects``, so an image that cannot be read or decoded
becomes a failed row (counted, left out of the metrics) rather than an error.
"""

from __future__ import annotations

import io
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import ray

from piqa_core.metrics import EvalReport, evaluate
from piqa_core.scorer import Scorer, default_device

from .actors import weights_dir
from .inprocess import score_objects
from .labels import LabelTable
from .listing import stat_objects
from .schema import schema_metadata
from .storage import S3_SCHEMES, S3Options, atomic_write_bytes, local_path, parent_uri


@dataclass
class EvalResult:
    report: EvalReport
    predictions: pd.DataFrame  # uri, group, label, split, score, status, error_code, …
    info: dict[str, Any]  # model identity, split, counts

    def to_dict(self) -> dict[str, Any]:
        return {**self.info, **self.report.to_dict()}

    def format(self) -> str:
        i = self.info
        rnd = (", RANDOM WEIGHTS" if i["random_weights"] else
               f", trained with random {'+'.join(i['random_parts'])}" if i.get("random_parts") else "")
        head = (f"model {i['model_id']} (sha256 {i['model_sha256'][:12]}…{rnd}) on {i['split']}: "
                f"{i['items']} images, {i['failed']} failed, crop {i['crop_mode']}")
        return head + "\n" + self.report.format_table()


def evaluate_table(scorer: Scorer, table: LabelTable, split: str = "all", s3: S3Options | None = None,
                   batch_size: int = 8, progress: Callable[[int], Any] | None = None) -> EvalResult:
    """Score every image of ``table`` and compare with its labels, per group."""
    objects = stat_objects(table.uris, s3)
    scored = score_objects(objects, scorer, batch_size, s3, progress=progress).to_pandas()
    keep = ["score", "status", "error_code", "error_message", "face_found", "n_faces", "width", "height"]
    pred = table.frame[["uri", "group", "score", "split"]].rename(columns={"score": "label"}).reset_index(drop=True)
    pred = pd.concat([pred, scored[keep].reset_index(drop=True)], axis=1)
    ok = pred["status"] == "ok"
    # all_groups: a group whose every image failed still gets a row (n = 0), not silently left out.
    report = evaluate(pred.loc[ok, "score"].to_numpy(float), pred.loc[ok, "label"].to_numpy(float),
                      pred.loc[ok, "group"].tolist(), all_groups=pred["group"].tolist())
    info = {"model_id": scorer.model_id, "model_sha256": scorer.sha256, "random_weights": scorer.bundle.random_init,
            "random_parts": list(scorer.bundle.random_parts), "preset": scorer.config.preset,
            "crop_mode": scorer.crop_mode, "split": split, "items": len(pred), "failed": int((~ok).sum())}
    return EvalResult(report, pred, info)


def select_split(table: LabelTable, split: str | None) -> tuple[LabelTable, str]:
    """``None`` = the test split when the labels have one, else every labelled image."""
    if split is None:
        split = "test" if (table.frame["split"] == "test").any() else "all"
    sub = table if split == "all" else table.subset(split)
    if len(sub) == 0:
        raise ValueError(f"the {split!r} split is empty ({table.describe()})")
    return sub, split


def check_run_holdout(weights: str, val_fraction: float, seed: int, holdout_key: str, s3: S3Options | None) -> None:
    """For ``--split val`` of a training run's export (``<run>/model``): refuse hold-out settings other than
    the run's recipe, which would score images the run trained on as validation."""
    from .recipe import read_recipe

    run = parent_uri(weights)
    try:
        recipe = read_recipe(run, s3)
    except FileNotFoundError:  # not a training run's export: nothing to hold the flags to
        return
    except (OSError, ValueError) as e:  # no read access beside model/, a damaged file: said, not fatal
        print(f"warning: --split val: cannot read {run}'s recipe to check the hold-out flags against it "
              f"({type(e).__name__}: {e}); make sure --val-fraction, --seed and --holdout-key are the run's",
              file=sys.stderr)
        return
    given = {"val_fraction": val_fraction, "seed": seed, "holdout_key": holdout_key}
    if differ := [f"--{k.replace('_', '-')} {recipe[k]}" for k, v in given.items() if k in recipe and recipe[k] != v]:
        raise ValueError(f"--weights {weights} is the export of training run {run}, whose validation split was held "
                         f"out with {' '.join(differ)}: pass the same to score that split")


def predictions_uri(out: str) -> str:
    return (out[:-5] if out.endswith(".json") else out) + ".parquet"


def _same_target(a: str, b: str) -> bool:
    la, lb = local_path(a), local_path(b)
    if la is not None and lb is not None:
        if os.path.realpath(la) == os.path.realpath(lb):
            return True
        try:  # hard links, case-insensitive file systems
            return os.path.samefile(la, lb)
        except OSError:  # either does not exist (yet): then they are not one file
            return False
    if la is not None or lb is not None:
        return False
    return _remote_key(a) == _remote_key(b)


def _remote_key(uri: str) -> str:
    # Scheme only: an S3 key may hold "//", "./" or a trailing "/" of its own, so the path stays as given.
    scheme, rest = uri.split("://", 1)
    scheme = scheme.lower()
    return f"{'s3' if scheme in S3_SCHEMES else scheme}://{rest}"


def check_eval_outputs(out: str, inputs: Sequence[str | None]) -> None:
    """``ValueError`` (one line) when the report ``out`` or its predictions Parquet is one of ``inputs``
    (labels, split lists; ``None`` skipped): writing it would destroy the labels, and a rerun would
    then read its own predictions as labels.

    Local paths compare resolved (symlinks, ``..``, ``~``, ``file:``) and by file identity when both
    exist (hard links); remote URIs compare as written but for the scheme (``S3A://`` = ``s3://``):
    on one store two different keys are never one object, so nothing needs a request.
    """
    targets = (("report", out), ("predictions", predictions_uri(out)))
    for src in inputs:
        if not src:
            continue
        for what, dest in targets:
            if _same_target(dest, src):
                raise ValueError(f"--out {out} would write its {what} to {dest}, which is the input {src}; "
                                 "choose another --out")


def write_eval(result: EvalResult, out: str, s3: S3Options | None = None) -> str:
    """JSON report at ``out`` and per-image predictions as Parquet next to it; returns the Parquet URI.

    Each file is replaced whole (a killed run leaves the previous one), the report last.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    i = result.info
    table = pa.Table.from_pandas(result.predictions, preserve_index=False)
    # Which model made the predictions, in the file itself, as the score outputs record it.
    meta = schema_metadata(i["model_id"], i["model_sha256"], i["crop_mode"], i["random_weights"], i["preset"],
                           i["random_parts"])
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta, b"split": i["split"].encode()})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    dest = predictions_uri(out)
    atomic_write_bytes(dest, buf.getvalue(), s3)
    atomic_write_bytes(out, json.dumps(result.to_dict(), indent=2).encode(), s3)
    return dest


@ray.remote
def evaluate_remote(model_dir: str, frame: pd.DataFrame, s3: S3Options, out: str, batch_size: int = 8,
                    sha256: str | None = None, config: dict | None = None) -> dict:
    """Evaluate a (remote) model directory on a label frame; writes ``out``. ``sha256`` and ``config``: the
    model expected there (a node's cached copy of another is fetched again)."""
    from piqa_core.checkpoints import load_checkpoint

    scorer = Scorer(load_checkpoint(weights_dir(model_dir, s3, sha256, config)), default_device(), own_bundle=True)
    result = evaluate_table(scorer, LabelTable(frame), "test", s3, batch_size)
    write_eval(result, out, s3)
    return result.to_dict()
