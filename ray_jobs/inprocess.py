"""Scoring in this process (no Ray): for a handful of files, notebooks and the benchmark baseline."""

from __future__ import annotations

from typing import Callable

import pyarrow as pa

from piqa_core.scorer import Scorer
from piqa_core.stages import rows_from_columns

from .reader import DEFAULT_MAX_BYTES, fetch_all
from .schema import now_utc, schema_metadata, to_table
from .storage import ObjectInfo, S3Options


def score_objects(objects: list[ObjectInfo], scorer: Scorer, batch_size: int = 8,
                  s3: S3Options | None = None, max_bytes: int = DEFAULT_MAX_BYTES,
                  progress: Callable[[int], object] | None = None) -> pa.Table:
    """One output row per object, in order."""
    def load(chunk: list[ObjectInfo]) -> list[bytes]:
        return fetch_all(chunk, s3, max_bytes)

    rows = []
    for chunk, cols in scorer.score_chunks(objects, batch_size, load):
        results = rows_from_columns(cols)
        stamp = now_utc()
        for info, result in zip(chunk, results):
            rows.append({
                **result,
                "uri": info.uri,
                "etag_or_mtime": info.etag_or_mtime,
                "bytes": info.size,
                "model_id": scorer.model_id,
                "model_sha256": scorer.sha256,
                "random_weights": scorer.bundle.random_init,
                "crop_mode": scorer.crop_mode,
                "scored_at": stamp,
            })
        if progress is not None:
            progress(len(chunk))
    meta = schema_metadata(scorer.model_id, scorer.sha256, scorer.crop_mode,
                           scorer.bundle.random_init, scorer.config.preset, scorer.bundle.random_parts)
    return to_table(rows, meta)
