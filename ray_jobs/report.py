"""The per-run audit report: ``summary.json`` (every number), PNG plots, worst-photo thumbnails and a
``report.html`` that references those files by relative path: no network, no external CSS or JS.

"Tonight" is the library after the run (live rows of the new state: scored now or carried), "previous"
the live rows of the state the run started from. The error-rate alert looks at the rows scored in this
run (new and changed objects), so an old broken file does not alert every night.
"""

from __future__ import annotations

import html
import io
import json
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.compute as pc  # noqa: E402

from piqa_core.image_formats import open_image  # noqa: E402

from .audit_state import live  # noqa: E402
from .schema import now_utc  # noqa: E402
from .storage import S3Options, join, read_bytes, write_bytes  # noqa: E402
from .summary import random_parts_note  # noqa: E402

RANDOM_NOTE = "scores from random weights are not quality judgements"
QUANTILES = {"p10": 0.1, "p25": 0.25, "p50": 0.5, "p75": 0.75, "p90": 0.9}
COUNT_COLOURS = {"new": "#2ca02c", "changed": "#ff7f0e", "retry": "#9467bd", "unchanged": "#9bbbd4",
                 "restored": "#17becf", "deleted": "#d62728"}
COUNT_KEYS = tuple(COUNT_COLOURS)  # the counts table's and plot's order


@dataclass
class ReportInput:
    run_id: str
    library: str
    out: str
    s3: S3Options
    current: pa.Table
    previous: pa.Table | None
    scored: pa.Table
    counts: dict[str, int]
    model: dict[str, Any]
    previous_run_id: str | None = None
    rescored_all_reason: str | None = None
    top_worst: int = 12
    prefix_depth: int = 1
    alert_if_mean_drops: float | None = None
    alert_if_error_rate: float | None = None
    alert_if_deleted: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def _ok_scores(table: pa.Table) -> np.ndarray:
    ok = table.filter(pc.equal(table["status"], "ok"))
    return np.asarray([s for s in ok["score"].to_pylist() if s is not None], dtype=np.float64)


def _quantiles(scores: np.ndarray) -> dict[str, float | None]:
    return {k: float(np.quantile(scores, q)) if len(scores) else None for k, q in QUANTILES.items()}


def score_stats(table: pa.Table | None) -> dict[str, Any] | None:
    """Counts, error rate, error codes, no-face rate (among ok rows), mean and quantiles of the scores."""
    if table is None:
        return None
    n, scores = table.num_rows, _ok_scores(table)
    status = Counter(table["status"].to_pylist())
    ok_faces = [f for s, f in zip(table["status"].to_pylist(), table["face_found"].to_pylist()) if s == "ok"]
    return {
        "objects": n, "ok": status.get("ok", 0), "error": n - status.get("ok", 0),
        "error_rate": (n - status.get("ok", 0)) / n if n else 0.0,
        "error_codes": dict(sorted(Counter(c for c in table["error_code"].to_pylist() if c).items())),
        "no_face_rate": sum(not f for f in ok_faces) / len(ok_faces) if ok_faces else None,
        "mean": float(scores.mean()) if len(scores) else None,
        "std": float(scores.std()) if len(scores) else None,
        "quantiles": _quantiles(scores),
    }


def prefix_of(uri: str, root: str, depth: int) -> str:
    """The album/folder of ``uri``: its first ``depth`` folders below the library root."""
    rel = uri[len(root):].lstrip("/") if uri.startswith(root) else uri
    return "/".join(rel.split("/")[:-1][:depth]) or "(top level)"


def prefix_summary(table: pa.Table, root: str, depth: int) -> list[dict[str, Any]]:
    groups: dict[str, list[tuple[str, float | None]]] = defaultdict(list)
    for uri, status, score in zip(table["uri"].to_pylist(), table["status"].to_pylist(), table["score"].to_pylist()):
        groups[prefix_of(uri, root, depth)].append((status, score))
    out = []
    for prefix, rows in sorted(groups.items()):
        scores = np.asarray([s for st, s in rows if st == "ok" and s is not None], dtype=np.float64)
        errors = sum(st != "ok" for st, _ in rows)
        out.append({"prefix": prefix, "count": len(rows), "mean": float(scores.mean()) if len(scores) else None,
                    "p10": _quantiles(scores)["p10"], "p50": _quantiles(scores)["p50"],
                    "error_rate": errors / len(rows)})
    return out


def worst(table: pa.Table, n: int) -> list[dict[str, Any]]:
    ok = table.filter(pc.and_(pc.equal(table["status"], "ok"), pc.is_valid(table["score"])))
    ok = ok.sort_by([("score", "ascending"), ("uri", "ascending")]).slice(0, n)
    return [{"rank": i + 1, "uri": u, "score": float(s), "face_found": bool(f)} for i, (u, s, f) in
            enumerate(zip(ok["uri"].to_pylist(), ok["score"].to_pylist(), ok["face_found"].to_pylist()))]


def check_alerts(summary: dict[str, Any], mean_drop: float | None, error_rate: float | None,
                 deleted: float | None = None) -> list[dict]:
    """Threshold breaches: the library mean fell by more than ``mean_drop``; this run's error rate
    is above ``error_rate``; this run marked more than ``deleted`` of the previous live objects deleted."""
    alerts = []
    before = (summary.get("previous") or {}).get("objects", 0)
    gone = summary.get("counts", {}).get("deleted", 0)
    if deleted is not None and before and gone / before > deleted:
        alerts.append({"kind": "deleted", "threshold": deleted, "value": gone / before,
                       "message": f"{gone} of the previous run's {before} objects are gone from the listing "
                                  f"({gone / before:.4f} > {deleted}): is every folder of the library mounted? "
                                  "They are marked deleted; listed again unchanged, they are restored unscored"})
    shift = summary.get("mean_shift")
    before_mean = (summary.get("previous") or {}).get("mean")
    if mean_drop is not None and shift is not None and -shift > mean_drop:
        alerts.append({"kind": "mean_drop", "threshold": mean_drop, "value": -shift,
                       "message": f"mean score dropped by {-shift:.4f} (> {mean_drop}) vs run "
                                  f"{summary.get('previous_run_id')}"})
    elif mean_drop is not None and before_mean is not None and (summary.get("tonight") or {}).get("mean") is None:
        # the worst drop there is (say new weights that score every photo NaN): no mean to compare
        alerts.append({"kind": "mean_drop", "threshold": mean_drop, "value": None,
                       "message": f"no photo of the library has an ok score now (run "
                                  f"{summary.get('previous_run_id')}'s mean was {before_mean:.4f})"})
    rate = summary["scored_this_run"]["error_rate"]
    if error_rate is not None and rate > error_rate:
        alerts.append({"kind": "error_rate", "threshold": error_rate, "value": rate,
                       "message": f"error rate {rate:.4f} (> {error_rate}) over the "
                                  f"{summary['scored_this_run']['objects']} objects scored in this run"})
    return alerts


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def plot_histogram(tonight: np.ndarray, previous: np.ndarray | None) -> bytes:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    both = np.concatenate([tonight, previous if previous is not None else np.zeros(0)])
    bins = np.histogram_bin_edges(both, bins=30) if len(both) else 10
    if previous is not None and len(previous):
        ax.hist(previous, bins=bins, alpha=0.55, color="#8a8a8a", label=f"previous (n={len(previous)})")
        ax.axvline(previous.mean(), color="#555555", ls="--", lw=1.5)
    if len(tonight):
        ax.hist(tonight, bins=bins, alpha=0.6, color="#1f77b4", label=f"tonight (n={len(tonight)})")
        ax.axvline(tonight.mean(), color="#0b3d91", lw=1.5)
    ax.set(xlabel="score", ylabel="photos", title="Score distribution (lines: means)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", framealpha=0.9)
    return _png(fig)


def plot_quantiles(tonight: dict[str, Any], previous: dict[str, Any] | None) -> bytes:
    """Quantile curves tonight vs previous: a shift shows as a gap between the lines."""
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for name, stats, color, style in (("previous", previous, "#8a8a8a", "--"), ("tonight", tonight, "#1f77b4", "-")):
        if stats and stats["mean"] is not None:
            ax.plot(list(QUANTILES), [stats["quantiles"][k] for k in QUANTILES], style, marker="o", color=color,
                    lw=2, label=f"{name} (mean {stats['mean']:.4f})")
            ax.axhline(stats["mean"], color=color, ls=":", lw=1)
    shift = (tonight["mean"] - previous["mean"]) if previous and previous["mean"] is not None and \
        tonight["mean"] is not None else None
    ax.set(xlabel="quantile", ylabel="score",
           title="Quantiles" + (f" (mean shift {shift:+.4f})" if shift is not None else ""))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left")
    return _png(fig)


def plot_counts(counts: dict[str, int], error_codes: dict[str, int]) -> bytes:
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [4, 3]})
    a.bar(list(COUNT_KEYS), [counts.get(k, 0) for k in COUNT_KEYS], color=[COUNT_COLOURS[k] for k in COUNT_KEYS])
    a.set(title="Objects by change", ylabel="objects")
    if error_codes:
        b.barh(list(error_codes), list(error_codes.values()), color="#d62728")
        b.set(xlabel="rows")
    else:
        b.text(0.5, 0.5, "no errors", ha="center", va="center", fontsize=14, transform=b.transAxes)
        b.set(xticks=[], yticks=[])
    b.set(title="Errors by code (scored this run)")
    fig.tight_layout()
    return _png(fig)


def thumbnail(uri: str, s3: S3Options, size: int = 160) -> bytes | None:
    """A small JPEG of the photo, or None when it cannot be read (the table still lists it)."""
    try:
        with open_image(read_bytes(uri, s3)) as img:  # the input formats only: EPS would start Ghostscript
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=85)
            return buf.getvalue()
    except Exception:  # noqa: BLE001 - any unreadable photo only loses its thumbnail
        return None


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4f}"
    return html.escape(str(v))


def _table(headers: list[str], rows: list[list[Any]], cls: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, _Raw) else _fmt(c)}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


class _Raw(str):
    """Markup that ``_table`` must not escape."""


CSS = """body{font-family:DejaVu Sans,Arial,sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}
th{background:#eef2f7}td{text-align:right}td:first-child{text-align:left}
.banner{background:#b00020;color:#fff;padding:12px;font-weight:bold;font-size:16px}
.alert{background:#fff3cd;border:2px solid #d39e00;padding:10px;margin:8px 0}
.warn{background:#ffe0e0;border:2px solid #b00020;padding:10px;margin:8px 0}
.plots img{width:49%;border:1px solid #ddd;margin:2px 0}
.grid{display:flex;flex-wrap:wrap;gap:10px}.card{width:170px;font-size:12px;word-break:break-all}
.card img,.nothumb{display:block;width:160px;height:160px;object-fit:contain;background:#f4f4f4;border:1px solid #ccc}
.nothumb{display:flex;align-items:center;justify-content:center;color:#777}"""


def render_html(s: dict[str, Any]) -> str:
    """The report page; every image is a file next to it (relative path)."""
    t, p, c = s["tonight"], s["previous"], s["counts"]
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>piqa audit {html.escape(s['run_id'])}"
             f"</title><style>{CSS}</style></head><body>"]
    if s["random_weights"]:
        parts.append(f'<div class="banner">RANDOM WEIGHTS: {RANDOM_NOTE}.</div>')
    elif s["model"].get("random_parts"):
        parts.append(f'<div class="warn">{html.escape(random_parts_note(s["model"]["random_parts"]))}</div>')
    parts.append(f"<h1>Photo-library audit — run {html.escape(s['run_id'])}</h1>")
    parts.append(_table(["run", s["run_id"]], [["library", s["library"]], ["previous run", s["previous_run_id"]],
                                   ["model", f"{s['model']['model_id']} (sha256 {s['model']['sha256'][:12]})"],
                                   ["started", s.get("started_at")], ["finished", s["finished_at"]],
                                   ["resumed an interrupted run", s.get("resumed", False)]]))
    if s["model"].get("cached_copy"):
        parts.append(f'<div class="warn">The model source could not be read: scored with the copy cached in '
                     f'{html.escape(s["model"]["cached_copy"])} (the sha256 above).</div>')
    if s["rescored_all_reason"]:
        parts.append(f'<div class="warn">{html.escape(s["rescored_all_reason"])}</div>')
    parts += [f'<div class="alert">ALERT: {html.escape(a["message"])}</div>' for a in s["alerts"]]
    parts.append("<h2>Counts</h2>" + _table(
        ["listed", "new", "changed", "retried", "unchanged", "restored", "deleted", "scored this run",
         "errors this run", "no-face rate"],
        [[c["listed"], c["new"], c["changed"], c.get("retry", 0), c["unchanged"], c.get("restored", 0), c["deleted"],
          c["scored"],
          s["scored_this_run"]["error"], t["no_face_rate"]]]))
    parts.append("<h2>Errors by code</h2>" + _table(
        ["code", "scored this run", "whole library"],
        [[k, s["scored_this_run"]["error_codes"].get(k, 0), t["error_codes"].get(k, 0)]
         for k in sorted({**s["scored_this_run"]["error_codes"], **t["error_codes"]})] or [["(none)", 0, 0]]))
    parts.append("<h2>Scores</h2>" + _table(
        ["", "photos", "mean", *QUANTILES, "error rate"],
        [[name, st["ok"], st["mean"], *st["quantiles"].values(), st["error_rate"]]
         for name, st in (("tonight", t), ("previous", p)) if st]) + f"<p>mean shift: {_fmt(s['mean_shift'])}</p>")
    parts.append('<div class="plots">' + "".join(f'<img src="{f}" alt="{f}">' for f in s["files"]["plots"]) + "</div>")
    parts.append(f"<h2>Worst {len(s['worst'])} photos</h2><div class='grid'>" + "".join(
        "<div class='card'>" + (f"<img src='{w['thumbnail']}' alt='thumbnail {w['rank']}'>" if w["thumbnail"]
                                 else "<div class='nothumb'>no thumbnail</div>")
        + f"<b>{w['rank']}. {w['score']:.4f}</b><br>{html.escape(w['uri'])}</div>" for w in s["worst"])
        + "</div>")
    parts.append(f"<h2>By prefix (depth {s['prefix_depth']})</h2>" + _table(
        ["prefix", "count", "mean", "p10", "p50", "error rate"],
        [[r["prefix"], r["count"], r["mean"], r["p10"], r["p50"], r["error_rate"]] for r in s["prefixes"]]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(inp: ReportInput) -> dict[str, Any]:
    """Write summary.json, plots, thumbnails and report.html under ``inp.out``; returns the summary."""
    tonight_rows = live(inp.current)
    prev_rows = live(inp.previous) if inp.previous is not None else None
    tonight, previous = score_stats(tonight_rows), score_stats(prev_rows)
    random = bool(inp.model.get("random_init"))
    s: dict[str, Any] = {
        "run_id": inp.run_id, "previous_run_id": inp.previous_run_id, "library": inp.library,
        "model": {k: inp.model.get(k) for k in ("model_id", "sha256", "preset", "crop_mode", "random_init",
                                                   "random_parts", "cached_copy")},
        "random_weights": random, "random_weights_note": RANDOM_NOTE if random else None,
        "rescored_all_reason": inp.rescored_all_reason, "counts": dict(inp.counts),
        "tonight": tonight, "previous": previous, "scored_this_run": score_stats(inp.scored),
        "mean_shift": (tonight["mean"] - previous["mean"]) if previous and previous["mean"] is not None
        and tonight["mean"] is not None else None,
        "prefix_depth": inp.prefix_depth, "prefixes": prefix_summary(tonight_rows, inp.library, inp.prefix_depth),
        "worst": worst(tonight_rows, inp.top_worst),
        "thresholds": {"alert_if_mean_drops": inp.alert_if_mean_drops, "alert_if_error_rate": inp.alert_if_error_rate,
                       "alert_if_deleted": inp.alert_if_deleted},
        "finished_at": now_utc().isoformat(), **inp.extra,
    }
    s["error_rate"] = s["scored_this_run"]["error_rate"]
    s["no_face_rate"] = tonight["no_face_rate"]
    s["alerts"] = check_alerts(s, inp.alert_if_mean_drops, inp.alert_if_error_rate, inp.alert_if_deleted)
    plots = {"histogram.png": plot_histogram(_ok_scores(tonight_rows),
                                             _ok_scores(prev_rows) if prev_rows is not None else None),
             "quantiles.png": plot_quantiles(tonight, previous),
             "counts.png": plot_counts(inp.counts, s["scored_this_run"]["error_codes"])}
    for name, data in plots.items():
        write_bytes(join(inp.out, name), data, inp.s3)
    for w in s["worst"]:
        data = thumbnail(w["uri"], inp.s3)
        w["thumbnail"] = f"thumbs/{w['rank']:03d}.jpg" if data else None
        if data:
            write_bytes(join(inp.out, w["thumbnail"]), data, inp.s3)
    s["files"] = {"html": "report.html", "summary": "summary.json", "plots": list(plots),
                  "thumbnails": [w["thumbnail"] for w in s["worst"] if w["thumbnail"]]}
    write_bytes(join(inp.out, "summary.json"), json.dumps(s, indent=2, sort_keys=True, default=str).encode(), inp.s3)
    write_bytes(join(inp.out, "report.html"), render_html(s).encode(), inp.s3)
    return s
