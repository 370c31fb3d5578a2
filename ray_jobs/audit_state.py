"""The audit's state folder: the CURRENT pointer, the IN_PROGRESS marker, plans and state tables.

Every file is written atomically; the commit (:func:`commit`) is the one switch of CURRENT, refused
when another audit on the same state committed since this run was planned.
"""

from __future__ import annotations

import json
import sys
from datetime import datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .schema import SCORE_SCHEMA
from .storage import S3Options, atomic_write_bytes, join, read_bytes, resolve

STATE_SCHEMA = SCORE_SCHEMA.append(pa.field("deleted", pa.bool_())).append(
    pa.field("deleted_at", pa.timestamp("us", tz="UTC"))).append(pa.field("audit_run_id", pa.string()))
PLAN_SCHEMA = pa.schema([("uri", pa.string()), ("etag_or_mtime", pa.string()), ("bytes", pa.int64()),
                         ("action", pa.string()), ("to_score", pa.bool_())])
CURRENT, IN_PROGRESS = "CURRENT", "IN_PROGRESS"
# What every IN_PROGRESS marker holds besides crop_mode (absent from older ones) and the two nullable keys.
_MARKER_STRINGS = ("run_id", "library", "model_sha256", "started_at", "plan")
_POINTER_STRINGS = ("run_id", "state", "library", "model_sha256", "model_id")


class AuditRefused(ValueError):
    """The audit will not run (or commit) against this library and state; CURRENT is unchanged."""


def read_json(uri: str, s3: S3Options) -> Any:
    """The parsed file, None when there is none."""
    try:
        return json.loads(read_bytes(uri, s3))
    except FileNotFoundError:
        return None


def write_json(uri: str, data: dict[str, Any], s3: S3Options) -> None:
    atomic_write_bytes(uri, json.dumps(data, indent=2, sort_keys=True, default=str).encode(), s3)


def write_parquet(uri: str, table: pa.Table, s3: S3Options) -> None:
    buf = pa.BufferOutputStream()
    pq.write_table(table, buf)
    atomic_write_bytes(uri, buf.getvalue().to_pybytes(), s3)


def read_parquet(uri: str, s3: S3Options, schema: pa.Schema) -> pa.Table:
    fs, path = resolve(uri, s3)
    return pq.read_table(path, filesystem=fs).select(schema.names).cast(schema)


def delete(uri: str, s3: S3Options) -> None:
    fs, path = resolve(uri, s3)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def live(table: pa.Table) -> pa.Table:
    """The rows of objects not marked deleted (all rows of a table without ``deleted``: score rows)."""
    if "deleted" not in table.column_names:
        return table
    return table.filter(pc.invert(pc.fill_null(table["deleted"], False)))


def read_pointer(state: str, s3: S3Options) -> dict[str, Any] | None:
    """The CURRENT pointer, None before the first run; refused when it is not one an audit wrote."""
    uri = join(state, CURRENT)
    try:
        data = read_bytes(uri, s3)
    except FileNotFoundError:
        return None
    try:
        pointer = json.loads(data)
        if not (isinstance(pointer, dict) and all(isinstance(pointer.get(k), str) for k in _POINTER_STRINGS)):
            raise ValueError(f"it lacks one of {', '.join(_POINTER_STRINGS)}")
    except ValueError as e:  # never written so by an audit (an atomic write): edited or damaged by hand
        raise AuditRefused(f"{uri} is not an audit pointer ({e}); restore it or use a new --state") from None
    return pointer


# A pointer written before the crop mode was recorded lacks it. Its rows say theirs; with none to ask,
# assume "five", the default then (of --crop-mode and of every preset's config). Rows that older code
# wrote without one were scored so too.
LEGACY_CROP_MODE = "five"


def one_row_per_object(state: pa.Table) -> pa.Table:
    """Each object's row: its last live row, else its first deleted one. A state merged by hand or
    written by older code may hold several for one URI; every later step assumes one."""
    if pc.count_distinct(state["uri"]).as_py() == state.num_rows:
        return state
    chosen: dict[str, int] = {}
    for i, (uri, gone) in enumerate(zip(state["uri"].to_pylist(), state["deleted"].to_pylist())):
        if uri not in chosen or not gone:
            chosen[uri] = i
    print(f"piqa audit: the state holds {state.num_rows - len(chosen)} extra row(s) for URIs it already holds; "
          "each object keeps one (its last live row, else its first deleted one)", file=sys.stderr)
    return state.take(sorted(chosen.values()))


def normalise(state: pa.Table) -> pa.Table:
    """A state as the audit's planning and merging take it: one row per object, each with its crop mode."""
    state = one_row_per_object(state)
    return state.set_column(state.schema.get_field_index("crop_mode"), "crop_mode",
                            pc.fill_null(state["crop_mode"], LEGACY_CROP_MODE))


def load_state(state: str, s3: S3Options) -> tuple[dict[str, Any] | None, pa.Table]:
    """The CURRENT pointer (None before the first run) and the state table it points to, normalised."""
    pointer = read_pointer(state, s3)
    if pointer is None:
        return None, STATE_SCHEMA.empty_table()
    uri = join(state, pointer["state"])
    try:
        table = read_parquet(uri, s3, STATE_SCHEMA)
    except FileNotFoundError:
        raise AuditRefused(f"{uri}, the state {join(state, CURRENT)} names (run {pointer['run_id']}), is missing: "
                           "restore it (a bucket's versioning or backup), or audit into a new --state, which "
                           "scores the whole library again") from None
    return pointer, normalise(table)


def read_marker(state: str, s3: S3Options) -> dict[str, Any] | None:
    """The IN_PROGRESS marker, None without one. A marker that cannot be parsed names no run to continue:
    it is abandoned with a warning, or every later audit would fail on it. Read errors still raise."""
    uri = join(state, IN_PROGRESS)
    try:
        data = read_bytes(uri, s3)
    except FileNotFoundError:
        return None
    try:
        marker = json.loads(data)
        if not (isinstance(marker, dict) and all(isinstance(marker.get(k), str) for k in _MARKER_STRINGS)
                and {"previous_run_id", "rescored_all_reason"} <= marker.keys()):
            raise ValueError(f"not an audit run marker: {data[:80]!r}")
        datetime.fromisoformat(marker["started_at"])
    except ValueError as e:  # also invalid JSON or UTF-8
        print(f"piqa audit: abandoning the unreadable unfinished-run marker {uri} ({e}); planning a new run",
              file=sys.stderr)
        return None
    return marker


def marked_plan(state: str, s3: S3Options, marker: dict[str, Any]) -> pa.Table | None:
    """The listing of the unfinished run ``marker`` names; None (with a warning) when its plan is gone, e.g.
    its runs/<id>/ folder was pruned after it failed, or corrupt. Other read errors (permissions,
    network) raise: they are not about that run, and a new run would meet them too."""
    try:
        data = read_bytes(join(state, marker["plan"]), s3)
    except FileNotFoundError:
        why = "is missing"
    else:
        try:  # parsed from memory: pyarrow reports corrupt Parquet as OSError, which here is no I/O error
            return pq.read_table(pa.BufferReader(data)).select(PLAN_SCHEMA.names).cast(PLAN_SCHEMA)
        except (OSError, ValueError, KeyError, TypeError, NotImplementedError) as e:
            why = f"cannot be read: {e}"
    print(f"piqa audit: abandoning unfinished run {marker['run_id']} (its plan {marker['plan']} {why}); "
          "planning a new run", file=sys.stderr)
    return None


def check_current(state: str, s3: S3Options, run_id: str, previous_run_id: str | None) -> None:
    """Refuses when CURRENT no longer names the run this one was planned on: another audit on the same
    state (one started by hand beside the nightly one, or a twin that continued this very run) committed
    since. Switching now would take CURRENT back and lose that run's work."""
    pointer = read_pointer(state, s3)
    now = pointer["run_id"] if pointer else None
    if now == previous_run_id:
        return
    who = ("another audit continued this run and committed it" if now == run_id
           else f"another audit committed run {now}")
    raise AuditRefused(f"{join(state, CURRENT)}: {who} while run {run_id} was running (planned on "
                       f"{previous_run_id or 'an empty state'}); this run was not committed. Run the audit again "
                       "to audit against the new state, and run one audit per --state at a time.")


def commit(state: str, s3: S3Options, pointer: dict[str, Any], previous_run_id: str | None) -> None:
    """The commit point: CURRENT names this run (before it readers see the previous one, after it this one),
    then the IN_PROGRESS marker goes if it is this run's (a later run may have written its own)."""
    run_id = pointer["run_id"]
    check_current(state, s3, run_id, previous_run_id)  # S3 has no compare-and-swap here: the window is this gap
    write_json(join(state, CURRENT), pointer, s3)
    # Committed: a failure from here on must not report the run as failed (its alerts unsaid). The next
    # run deletes a marker naming the run CURRENT names.
    try:
        marker = read_json(join(state, IN_PROGRESS), s3)
        if isinstance(marker, dict) and marker.get("run_id") == run_id:
            delete(join(state, IN_PROGRESS), s3)
    except ValueError:  # not parseable: not this run's, and the next run abandons it
        pass
    except OSError as e:
        print(f"piqa audit: WARNING run {run_id} is committed, but {join(state, IN_PROGRESS)} could not be removed "
              f"({type(e).__name__}: {e}); the next run removes it", file=sys.stderr)
