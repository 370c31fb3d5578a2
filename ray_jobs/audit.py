"""Nightly incremental audit: list the library, diff it against the last committed state, score only
the delta with the Ray Data pipeline, write a new immutable state and a report, then switch a pointer.

State layout under ``STATE_URI`` (local folder or ``s3://`` prefix)::

    CURRENT                          JSON pointer to the last good run (run_id, state, model sha256,
                                     crop mode, …); replaced atomically, only after the state and report exist,
                                     and only while it still names the run this one was planned on
    IN_PROGRESS                      JSON marker of an unfinished run (run_id, model, crop mode, previous
                                     run_id); a re-run finds it and continues that run (on a new listing)
                                     instead of starting anew
                                     (a marker it cannot parse, or whose plan is gone or corrupt, is abandoned)
    runs/<run_id>/plan.parquet       the run's listing: uri, etag_or_mtime, bytes, action, to_score
    runs/<run_id>/scores/…           the scoring pipeline's output for the run (resumable)
    states/<run_id>.parquet          the full table after the run (never rewritten once committed;
                                     a continued run's attempt adds ``-<4 hex>`` here and to its report)
    reports/<run_id>/                report.html, summary.json, PNG plots, thumbs/

A state row is the latest score row of an object plus ``deleted``, ``deleted_at`` and
``audit_run_id`` (the run that scored it). A deleted object stays as a ``deleted=True`` row for at
least the run that notices the deletion, and until ``keep_deleted_days`` have passed since.

"The same model" means the same weights sha256 *and* the same crop mode: a change of either re-scores
every object. An unchanged object whose row holds a transient error (``TRANSIENT_ERROR_CODES``) is
re-scored ("retry") rather than carried. An object listed again as the same version its deleted row
holds, scored by the same model ("restored": a folder unmounted for a night, a photo back from the
trash), gets that row back without a new score.

Exit codes of ``piqa audit``: 0 ok, 3 an alert threshold was crossed (the state is still committed),
anything else a failure (CURRENT unchanged; re-run to finish the run without re-scoring).
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import unquote

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from .audit_state import (IN_PROGRESS, LEGACY_CROP_MODE, PLAN_SCHEMA, STATE_SCHEMA, AuditRefused, check_current,
                          commit, delete, live, load_state, marked_plan, read_marker, write_json, write_parquet)
from .options import ModelOptions, PoolOptions
from .resume import read_rows
from .schema import SCORE_SCHEMA, now_utc
from .listing import list_images
from .storage import ObjectInfo, S3Options, join, local_path
from .summary import RowsMissing

ALERT_EXIT_CODE = 3
ACTIONS = ("new", "changed", "retry", "unchanged", "restored")
# A re-read of the same bytes may succeed: the read itself failed (I/O, permissions, throttling), the
# object was briefly missing, or an unexpected exception. Every other code is a verdict on the bytes
# (corrupt, too small, unsupported mode, over the size limit) and would only recur, so those rows are
# carried until the object changes.
TRANSIENT_ERROR_CODES = frozenset({"read_failed", "not_found", "internal"})


@dataclass
class AuditJob:
    library: str
    state: str
    model: ModelOptions
    s3: S3Options = field(default_factory=S3Options)
    alert_if_mean_drops: float | None = None
    alert_if_error_rate: float | None = None
    alert_if_deleted: float | None = None
    top_worst: int = 12
    prefix_depth: int = 1
    keep_deleted_days: float = 30.0
    max_bytes: int = 256 * 1024 * 1024
    pools: PoolOptions = field(default_factory=PoolOptions)
    address: str | None = None
    gpu: bool | None = None  # None: score on GPUs when the cluster has them


@dataclass
class AuditResult:
    run_id: str
    summary: dict[str, Any]
    alerts: list[str]
    state_uri: str
    report_uri: str
    resumed: bool


@dataclass
class Plan:
    run_id: str
    started_at: datetime
    library: str
    model_sha256: str
    model_id: str
    crop_mode: str
    previous_run_id: str | None
    rescored_all_reason: str | None
    listing: pa.Table  # PLAN_SCHEMA
    resumed: bool = False
    attempt_started_at: datetime | None = None  # a continued run's this attempt; None: started_at

    @property
    def attempt_start(self) -> datetime:
        """When this attempt started: the time deletions are stamped with and counted against."""
        return self.attempt_started_at or self.started_at


def library_root(library: str) -> str:
    """The library URI as listed URIs start (absolute path locally, no trailing slash)."""
    local = local_path(library)  # the listing's own reading of the name (file: URIs unquoted)
    return local if local is not None else library.rstrip("/")


def classify(listing: list[ObjectInfo], previous: pa.Table, rescore_all: bool, model_sha256: str | None = None,
             crop_mode: str | None = None) -> pa.Table:
    """new / changed (etag, mtime or size differ) / retry (same object, but its row holds a transient
    error) / unchanged, against the previous live rows, or restored: the version of a deleted row that
    ``model_sha256`` and ``crop_mode`` scored; all but unchanged and restored are to be scored.
    ``previous`` is a state as ``load_state`` reads it (``normalise``d)."""
    cols = ("uri", "etag_or_mtime", "bytes", "status", "error_code", "deleted", "model_sha256", "crop_mode")
    known = {u: ((e, b), c if s == "error" else None, bool(gone), (sha, crop) == (model_sha256, crop_mode))
             for u, e, b, s, c, gone, sha, crop in zip(*(previous[k].to_pylist() for k in cols))}
    actions = []
    for o in listing:
        version, error, gone, same_model = known.get(o.uri, (None, None, False, False))
        same = version == (o.etag_or_mtime, o.size)
        if gone:  # transient errors, other versions and a re-score of everything come back as new: scored
            back = same and same_model and not rescore_all and error not in TRANSIENT_ERROR_CODES
            actions.append("restored" if back else "new")
        else:
            actions.append("new" if version is None else "changed" if not same
                           else "retry" if error in TRANSIENT_ERROR_CODES else "unchanged")
    return pa.table({"uri": [o.uri for o in listing], "etag_or_mtime": [o.etag_or_mtime for o in listing],
                     "bytes": [o.size for o in listing], "action": actions,
                     "to_score": [rescore_all or a not in ("unchanged", "restored") for a in actions]},
                    schema=PLAN_SCHEMA)


def recorded_crop_mode(pointer: dict[str, Any], previous: pa.Table) -> str:
    """The crop mode of the state ``pointer`` names. For an old pointer, the mode its live rows record
    (several, mixed by older runs, come back joined: that matches no run, so all is re-scored)."""
    if "crop_mode" in pointer:
        return pointer["crop_mode"]
    modes = {m for m in live(previous)["crop_mode"].to_pylist() if m}
    return "+".join(sorted(modes)) if modes else LEGACY_CROP_MODE


def _outside_state(objects: list[ObjectInfo], state: str) -> list[ObjectInfo]:
    """``objects`` minus those under the audit's state: a state kept inside the library must not audit its
    own thumbnails. Local folders compare real paths: the state may be named, or listed, through a symlink."""
    if local_path(state) is None:
        return [o for o in objects if not _contains(state, o.uri)]
    folders = {os.path.dirname(o.uri) for o in objects if "://" not in o.uri}  # one realpath per folder
    inside = {f for f in folders if _contains(state, f)}
    return [o for o in objects if os.path.dirname(o.uri) not in inside]


def _contains(folder: str, uri: str) -> bool:
    """Whether ``uri`` is ``folder`` or lies under it (local paths by real path)."""
    local_folder, local_uri = local_path(folder), local_path(uri)
    if local_folder is None or local_uri is None:
        return local_folder is None and local_uri is None and (uri.rstrip("/") + "/").startswith(
            folder.rstrip("/") + "/")
    return os.path.join(os.path.realpath(local_uri), "").startswith(os.path.join(os.path.realpath(local_folder), ""))


def _new_run_id() -> str:
    return f"{now_utc().strftime('%Y%m%dT%H%M%SZ')}-{uuid.uuid4().hex[:6]}"


def plan_run(job: AuditJob, identity: dict[str, Any], pointer: dict[str, Any] | None,
             previous: pa.Table) -> Plan:
    """Continue the unfinished run recorded in IN_PROGRESS when it still applies, else plan a new one.

    Either way the library is listed now: a run continued a night later reports the library as it is,
    and what its first attempt scored is reused only for objects that have not changed since.
    """
    root, sha, crop = library_root(job.library), identity["sha256"], identity["crop_mode"]
    prev_id = pointer["run_id"] if pointer else None
    # Refusals come first: a refused run leaves the state, its unfinished-run marker included, as it was.
    # unquote: states written before file: URIs were unescaped hold the escaped path (".../lib%20one")
    if pointer and root not in (pointer["library"], unquote(pointer["library"])):
        raise AuditRefused(f"state {job.state} belongs to library {pointer['library']}, not {root}")
    if pointer and pointer["model_sha256"] != sha and identity.get("cached_copy"):
        # The source unreadable: the node's copy may be older or newer; either way not the library's model.
        raise AuditRefused(f"{job.model.weights} could not be read, and this node's cached copy "
                           f"({identity['cached_copy']}, sha256 {sha[:12]}) is not the model the last audit "
                           f"used (sha256 {pointer['model_sha256'][:12]}); run the audit again once the "
                           "source can be read")
    if _contains(job.state, root):
        raise AuditRefused(f"--state {job.state} is the library or a folder above it, so every photo would be "
                           "taken for one of the state's own files and nothing audited: keep the state in a "
                           "folder of its own, inside the library or outside it")
    objects = _outside_state(list_images(job.library, job.s3), job.state)
    if len(objects) == 1 and objects[0].uri.rstrip("/") == root.rstrip("/"):
        raise AuditRefused(f"{job.library} is a file, not a folder or prefix: audit the folder that holds the photos")
    n_live = live(previous).num_rows
    if not objects and n_live:  # an unmounted volume or a wrong prefix, far likelier than a library emptied
        raise AuditRefused(f"{job.library} lists no images, but the previous state holds {n_live} live objects: "
                           "refusing to mark them all deleted (is the library mounted, the prefix right?). "
                           "If the library was emptied on purpose, audit it into a new --state.")
    marker_uri = join(job.state, IN_PROGRESS)
    marker, continuing = read_marker(job.state, job.s3), None
    if marker is not None:
        if marker["run_id"] == prev_id:  # committed, but the marker outlived the pointer switch
            delete(marker_uri, job.s3)
        # A marker without crop_mode (older code) is abandoned, not continued: its scores folder may hold
        # either protocol, and resuming skips what it holds whatever the protocol.
        elif (marker["library"], marker["model_sha256"], marker.get("crop_mode"),
              marker["previous_run_id"]) == (root, sha, crop, prev_id):
            if marked_plan(job.state, job.s3, marker) is not None:  # else its runs/ folder is gone or damaged
                continuing = marker
        else:
            print(f"piqa audit: abandoning unfinished run {marker['run_id']} (library, model, crop mode or "
                  f"previous state differ); its files stay under runs/", file=sys.stderr)
    changes: list[str] = []
    if pointer and pointer["model_sha256"] != sha:
        changes.append(f"model changed: {pointer['model_id']} sha256 {pointer['model_sha256'][:12]} -> "
                       f"{identity['model_id']} sha256 {sha[:12]}")
    if pointer and (old_crop := recorded_crop_mode(pointer, previous)) != crop:
        changes.append(f"crop mode changed: {old_crop} -> {crop}")
    reason = "; ".join(changes) + "; every object is re-scored" if changes else None
    listing = classify(objects, previous, rescore_all=reason is not None, model_sha256=sha, crop_mode=crop)
    if continuing is not None:
        print(f"piqa audit: continuing unfinished run {continuing['run_id']} on a new listing",
              file=sys.stderr)
        plan = Plan(continuing["run_id"], datetime.fromisoformat(continuing["started_at"]), root, sha,
                    identity["model_id"], crop, prev_id, reason, listing, resumed=True, attempt_started_at=now_utc())
    else:
        plan = Plan(_new_run_id(), now_utc(), root, sha, identity["model_id"], crop, prev_id, reason, listing)
    write_parquet(join(job.state, "runs", plan.run_id, "plan.parquet"), listing, job.s3)
    if continuing is None:
        write_json(marker_uri, {"run_id": plan.run_id, "library": root, "model_sha256": sha, "crop_mode": crop,
                                "previous_run_id": prev_id, "started_at": plan.started_at.isoformat(),
                                "rescored_all_reason": reason, "plan": f"runs/{plan.run_id}/plan.parquet"},
                   job.s3)
    return plan


def score_delta(job: AuditJob, plan: Plan) -> tuple[pa.Table, dict[str, int]]:
    """Rows for every planned object (one per URI); the pipeline resumes within the run's scores folder."""
    from .score import ScoreJob, run_score_job

    todo = plan.listing.filter(plan.listing["to_score"])
    objects = [ObjectInfo(u, b, e) for u, e, b in zip(todo["uri"].to_pylist(), todo["etag_or_mtime"].to_pylist(),
                                                      todo["bytes"].to_pylist())]
    out = join(job.state, "runs", plan.run_id, "scores")
    stats = {"to_score": len(objects), "scored_now": 0, "reused_from_unfinished_run": 0}
    if objects:
        res = run_score_job(ScoreJob(inputs=[job.library], out=out, model=job.model, s3=job.s3, objects=objects,
                                     resume=True, run_id=plan.run_id, max_bytes=job.max_bytes,
                                     **job.pools.job_fields(), address=job.address, gpu=job.gpu,
                                     # an unfinished run's transient errors (say of the outage that ended
                                     # it) are retried, as the next night would
                                     retry_error_codes=TRANSIENT_ERROR_CODES,
                                     rerun_hint="run the audit again to score them"))
        skipped = res["skipped_already_scored"]
        stats.update(scored_now=len(objects) - skipped, reused_from_unfinished_run=skipped)
    rows = read_rows(out, job.s3)
    # Not an earlier version's row: another etag or mtime, or the same mtime and another size.
    planned = pc.or_(pc.is_in(_version(rows), value_set=_version(todo)),
                     pc.and_(pc.is_null(rows["bytes"]),
                             pc.is_in(_version(rows, sized=False), value_set=_version(todo, sized=False))))
    rows = rows.filter(pc.and_(pc.and_(pc.equal(rows["model_sha256"], plan.model_sha256),
                                       pc.equal(rows["crop_mode"], plan.crop_mode)), planned))
    # A retried write may leave two rows for one URI: keep the latest.
    rows = rows.sort_by([("uri", "ascending"), ("scored_at", "descending")])
    uris = np.asarray(rows["uri"].to_pylist(), dtype=object)
    rows = rows.filter(pa.array(np.r_[True, uris[1:] != uris[:-1]] if len(uris) else np.zeros(0, bool)))
    if rows.num_rows != len(objects):
        raise RowsMissing(f"run {plan.run_id}: {len(objects) - rows.num_rows} planned objects have no score row; "
                          "run the audit again to score them")
    return rows, stats


def _version(table: pa.Table, sized: bool = True) -> pa.Array:
    """uri + etag_or_mtime + bytes (the key --resume uses), one string per row: which version of an object
    a row is about; null for a row without bytes unless not ``sized``."""
    parts = [table["uri"], pc.fill_null(table["etag_or_mtime"], "")]
    return pc.binary_join_element_wise(*parts, *([pc.cast(table["bytes"], pa.string())] if sized else []), "\n")


def merge_state(plan: Plan, previous: pa.Table, scored: pa.Table, keep_deleted_days: float) -> tuple[pa.Table,
                                                                                                      dict[str, int]]:
    """The new state: scored rows, carried unchanged rows, restored rows, and deleted objects marked (not
    dropped). ``previous`` is a state as ``load_state`` reads it (``normalise``d)."""
    listed, unscored = plan.listing["uri"], plan.listing.filter(pc.invert(plan.listing["to_score"]))
    restored = pc.equal(unscored["action"], "restored")
    n = scored.num_rows
    fresh = pa.table({**{c: scored[c] for c in SCORE_SCHEMA.names}, "deleted": pa.array([False] * n, pa.bool_()),
                      "deleted_at": pa.nulls(n, pa.timestamp("us", tz="UTC")),
                      "audit_run_id": pa.array([plan.run_id] * n, pa.string())}, schema=STATE_SCHEMA)
    alive = live(previous)
    carried = alive.filter(pc.is_in(alive["uri"], value_set=unscored.filter(pc.invert(restored))["uri"]))
    back = previous.filter(pc.and_(pc.fill_null(previous["deleted"], False),
                                   pc.is_in(previous["uri"], value_set=unscored.filter(restored)["uri"])))
    back = back.set_column(back.schema.get_field_index("deleted"), "deleted",
                           pa.array([False] * back.num_rows, pa.bool_()))
    back = back.set_column(back.schema.get_field_index("deleted_at"), "deleted_at",
                           pa.nulls(back.num_rows, pa.timestamp("us", tz="UTC")))
    gone = previous.filter(pc.invert(pc.is_in(previous["uri"], value_set=listed)))
    was_deleted = pc.fill_null(gone["deleted"], False)
    newly = gone.filter(pc.invert(was_deleted))
    newly = newly.set_column(newly.schema.get_field_index("deleted"), "deleted",
                             pa.array([True] * newly.num_rows, pa.bool_()))
    # This attempt's start, not the run's first: after an outage of days, the first would shorten the
    # time the rows are kept by that much.
    newly = newly.set_column(newly.schema.get_field_index("deleted_at"), "deleted_at",
                             pa.array([plan.attempt_start] * newly.num_rows, pa.timestamp("us", tz="UTC")))
    older = gone.filter(was_deleted)
    cutoff = plan.attempt_start - timedelta(days=keep_deleted_days)
    kept = older.filter(pc.greater(older["deleted_at"], pa.scalar(cutoff, pa.timestamp("us", tz="UTC"))))
    state = pa.concat_tables([fresh, carried, back, newly, kept]).sort_by("uri")
    actions = plan.listing["action"].to_pylist()
    counts = {"listed": plan.listing.num_rows, **{a: actions.count(a) for a in ACTIONS},
              "deleted": newly.num_rows, "deleted_kept": kept.num_rows,
              "deleted_dropped": older.num_rows - kept.num_rows, "carried": carried.num_rows + back.num_rows,
              "scored": scored.num_rows}
    return state, counts


def run_audit(job: AuditJob) -> AuditResult:
    """One nightly audit (or the completion of an interrupted one)."""
    from .actors import model_identity
    from .report import ReportInput, write_report

    identity = model_identity(job.model, job.s3)
    pointer, previous = load_state(job.state, job.s3)
    plan = plan_run(job, identity, pointer, previous)
    if plan.rescored_all_reason:
        print(f"piqa audit: WARNING {plan.rescored_all_reason}", file=sys.stderr)
    if retries := plan.listing["action"].to_pylist().count("retry"):
        print(f"piqa audit: retrying {retries} unchanged objects whose last row holds a transient error",
              file=sys.stderr)
    scored, score_stats = score_delta(job, plan)
    state, counts = merge_state(plan, previous, scored, job.keep_deleted_days)
    # A continuation writes under names of its own: a twin continuing the same run may commit its files meanwhile.
    name = f"{plan.run_id}-{uuid.uuid4().hex[:4]}" if plan.resumed else plan.run_id
    state_rel, report_rel = f"states/{name}.parquet", f"reports/{name}"
    check_current(job.state, job.s3, plan.run_id, plan.previous_run_id)  # a committed state is never rewritten
    write_parquet(join(job.state, state_rel), state.replace_schema_metadata(
        {"run_id": plan.run_id, "model_sha256": plan.model_sha256, "crop_mode": plan.crop_mode}), job.s3)
    summary = write_report(ReportInput(
        run_id=plan.run_id, library=plan.library, out=join(job.state, report_rel), s3=job.s3, current=state,
        previous=previous if pointer else None, scored=scored, counts={**counts, **score_stats},
        model=identity, previous_run_id=plan.previous_run_id, rescored_all_reason=plan.rescored_all_reason,
        top_worst=job.top_worst, prefix_depth=job.prefix_depth, alert_if_mean_drops=job.alert_if_mean_drops,
        alert_if_error_rate=job.alert_if_error_rate, alert_if_deleted=job.alert_if_deleted,
        extra={"resumed": plan.resumed, "started_at": plan.started_at.isoformat(), "state": state_rel}))
    commit(job.state, job.s3, {"run_id": plan.run_id, "state": state_rel, "report": report_rel,
                               "library": plan.library, "model_sha256": plan.model_sha256,
                               "model_id": plan.model_id, "crop_mode": plan.crop_mode,
                               "previous_run_id": plan.previous_run_id, "finished_at": now_utc().isoformat(),
                               "rows": state.num_rows}, plan.previous_run_id)
    alerts = [a["message"] for a in summary["alerts"]]
    return AuditResult(plan.run_id, summary, alerts, join(job.state, state_rel),
                       join(job.state, report_rel, "report.html"), plan.resumed)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.audit`` = ``piqa audit`` (the form ``ray job submit`` runs)."""
    from .cli import run_module

    run_module("audit", argv)


if __name__ == "__main__":
    main()
