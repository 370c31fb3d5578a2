"""The output row schema shared by every job that writes scores."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Mapping, Sequence

import pyarrow as pa

SCORE_SCHEMA = pa.schema([
    ("uri", pa.string()),
    ("etag_or_mtime", pa.string()),
    ("bytes", pa.int64()),
    ("width", pa.int32()),
    ("height", pa.int32()),
    ("score", pa.float32()),
    ("face_found", pa.bool_()),
    ("face_box", pa.list_(pa.float32(), 4)),
    ("face_confidence", pa.float32()),
    ("n_faces", pa.int32()),
    ("liqe_scene_top", pa.string()),
    ("model_id", pa.string()),
    ("model_sha256", pa.string()),
    ("random_weights", pa.bool_()),
    ("crop_mode", pa.string()),
    ("status", pa.string()),
    ("error_code", pa.string()),
    ("error_message", pa.string()),
    ("scored_at", pa.timestamp("us", tz="UTC")),
])

COLUMNS = tuple(SCORE_SCHEMA.names)


def package_version() -> str:
    try:
        return version("piqa")
    except PackageNotFoundError:
        return "0+unknown"


def schema_metadata(model_id: str, sha256: str, crop_mode: str, random_weights: bool,
                    preset: str, random_parts: Sequence[str] = ()) -> dict[bytes, bytes]:
    """Parquet key/value metadata: which model wrote the scores and how to read them. ``random_parts``:
    the frozen networks (liqe, face) a trained model was trained with at random init, not the paper's."""
    meta = {
        "model_id": model_id,
        "model_sha256": sha256,
        "crop_mode": crop_mode,
        "random_weights": json.dumps(random_weights),
        "random_parts": json.dumps(list(random_parts)),
        "preset": preset,
        "piqa_version": package_version(),
        # Like pyiqa's metric metadata: direction and scale of the score.
        "score": json.dumps({"lower_better": False, "scale": "JOD (PIQ23), per-scene relative"}),
    }
    return {k.encode(): v.encode() for k, v in meta.items()}


def now_utc() -> datetime:
    return datetime.now(timezone.utc)


def to_table(rows: Sequence[Mapping[str, Any]], metadata: Mapping[bytes, bytes] | None = None) -> pa.Table:
    """Rows (dicts with the schema's keys; missing keys are null) → a typed Arrow table."""
    data = {name: [row.get(name) for row in rows] for name in COLUMNS}
    return pa.table(data, schema=SCORE_SCHEMA.with_metadata(metadata or {}))
