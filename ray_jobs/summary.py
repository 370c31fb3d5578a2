"""Run summaries: counts by status and error code, throughput, wall time."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa


class RowsMissing(RuntimeError):
    """Listed inputs without an output row once the run is over: its output is incomplete."""


def missing_uris(listed: list[str], rows: pa.Table) -> list[str]:
    """The ``listed`` URIs that have no row in ``rows``, in listing order."""
    import pyarrow.compute as pc

    uris = pa.array(listed, pa.string())
    return uris.filter(pc.invert(pc.is_in(uris, value_set=rows.column("uri")))).to_pylist()


def summarize(table: pa.Table, wall_s: float, **extra: Any) -> dict[str, Any]:
    status = Counter(table.column("status").to_pylist())
    codes = Counter(c for c in table.column("error_code").to_pylist() if c)
    scores = [s for s in table.column("score").to_pylist() if s is not None]
    n = table.num_rows
    return {
        "rows": n,
        "ok": status.get("ok", 0),
        "error": status.get("error", 0),
        "error_codes": dict(sorted(codes.items())),
        "face_found": sum(bool(f) for f in table.column("face_found").to_pylist()),
        "score_mean": sum(scores) / len(scores) if scores else None,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(n / wall_s, 3) if wall_s > 0 else None,
        **extra,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """A short human table for the terminal."""
    lines = [
        f"rows {summary['rows']}   ok {summary['ok']}   error {summary['error']}   "
        f"faces {summary['face_found']}",
        f"wall {summary['wall_s']:.1f} s   {summary['images_per_s'] or 0:.2f} images/s",
    ]
    if summary.get("score_mean") is not None:
        lines.append(f"mean score {summary['score_mean']:.4f}")
    for code, count in summary["error_codes"].items():
        lines.append(f"  {code:<20} {count}")
    if summary.get("random_weights"):
        lines.append("NOTE: random weights — these scores are not quality judgements.")
    elif summary.get("random_parts"):
        lines.append(random_parts_note(summary["random_parts"]))
    return "\n".join(lines)


def random_parts_note(parts: list[str]) -> str:
    """A trained model whose frozen LIQE/RetinaFace were never loaded: not the paper's features."""
    names = " and ".join({"liqe": "LIQE", "face": "RetinaFace"}.get(p, p) for p in parts)
    return f"NOTE: this model was trained with random {names} weights (frozen); its features are not the paper's."


def to_json(summary: dict[str, Any]) -> str:
    return json.dumps(summary, indent=2, sort_keys=True, default=str)
