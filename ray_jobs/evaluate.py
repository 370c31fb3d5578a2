"""Evaluate a model on labelled images: per-group SRCC / KRCC / PLCC / RMSE / MAE, mean and median.

Scoring is ``piqa_core.scorer.Scorer`` (five crops unless the model's config or ``--crop-mode`` says
otherwise), through ``ray_jobs.inprocess.score_objects``, so an image that cannot be read or decoded
becomes a failed row (counted, left out of the metrics) rather than an error.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from typing import Any, Callable

import pandas as pd
import ray

from piqa_core.metrics import EvalReport, evaluate
from piqa_core.scorer import Scorer

from .actors import weights_dir
from .inprocess import score_objects
from .labels import LabelTable
from .listing import stat_objects
from .storage import S3Options, atomic_write_bytes


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
    report = evaluate(pred.loc[ok, "score"].to_numpy(float), pred.loc[ok, "label"].to_numpy(float),
                      pred.loc[ok, "group"].tolist())
    info = {"model_id": scorer.model_id, "model_sha256": scorer.sha256, "random_weights": scorer.bundle.random_init,
            "random_parts": list(scorer.bundle.random_parts),
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


def predictions_uri(out: str) -> str:
    return (out[:-5] if out.endswith(".json") else out) + ".parquet"


def write_eval(result: EvalResult, out: str, s3: S3Options | None = None) -> str:
    """JSON report at ``out`` and per-image predictions as Parquet next to it; returns the Parquet URI.

    Each file is replaced whole (a killed run leaves the previous one), the report last.
    """
    buf = io.BytesIO()
    result.predictions.to_parquet(buf, index=False)
    dest = predictions_uri(out)
    atomic_write_bytes(dest, buf.getvalue(), s3)
    atomic_write_bytes(out, json.dumps(result.to_dict(), indent=2).encode(), s3)
    return dest


@ray.remote
def evaluate_remote(model_dir: str, frame: pd.DataFrame, s3: S3Options, out: str, batch_size: int = 8,
                    sha256: str | None = None) -> dict:
    """Evaluate a (remote) model directory, ``sha256`` its expected weights, on a label frame; writes ``out``."""
    from piqa_core.checkpoints import load_checkpoint

    scorer = Scorer(load_checkpoint(weights_dir(model_dir, s3, sha256)))
    result = evaluate_table(scorer, LabelTable(frame), "test", s3, batch_size)
    write_eval(result, out, s3)
    return result.to_dict()
