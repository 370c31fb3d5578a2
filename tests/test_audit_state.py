"""The audit's commit: CURRENT never goes back when two audits share a --state, and a run removes only
its own IN_PROGRESS marker (no Ray: scoring is replaced by rows written the way the pipeline writes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pytest

from ray_jobs import audit, audit_state, score
from ray_jobs.audit import AuditJob, run_audit
from ray_jobs.audit_state import AuditRefused, commit, read_json
from ray_jobs.schema import SCORE_SCHEMA, now_utc
from ray_jobs.storage import join, write_bytes
from tests.test_audit import TINY


def _pointer(run_id: str) -> dict[str, Any]:
    return {"run_id": run_id, "state": f"states/{run_id}.parquet", "library": "/lib", "model_sha256": "a" * 64,
            "model_id": "tiny"}


def test_commit_refuses_when_current_moved_and_keeps_other_runs_markers(tmp_path: Path) -> None:
    state, s3 = str(tmp_path / "state"), None
    commit(state, s3, _pointer("r1"), None)
    audit_state.write_json(join(state, "IN_PROGRESS"), {"run_id": "r3"}, s3)  # a later run's marker
    commit(state, s3, _pointer("r2"), "r1")
    assert read_json(join(state, "CURRENT"), s3)["run_id"] == "r2"
    assert read_json(join(state, "IN_PROGRESS"), s3) == {"run_id": "r3"}  # not this run's: left alone
    with pytest.raises(AuditRefused, match=r"committed run r2 while run r4 was running \(planned on r1\)"):
        commit(state, s3, _pointer("r4"), "r1")
    with pytest.raises(AuditRefused, match="another audit continued this run and committed it"):
        commit(state, s3, _pointer("r2"), "r1")
    with pytest.raises(AuditRefused, match=r"planned on an empty state"):
        commit(state, s3, _pointer("r5"), None)
    assert read_json(join(state, "CURRENT"), s3)["run_id"] == "r2"
    audit_state.write_json(join(state, "IN_PROGRESS"), {"run_id": "r6"}, s3)
    commit(state, s3, _pointer("r6"), "r2")
    assert read_json(join(state, "IN_PROGRESS"), s3) is None


def test_a_commit_whose_marker_cannot_be_removed_stands_with_a_warning(tmp_path: Path, capsys,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    state, s3 = str(tmp_path / "state"), None
    audit_state.write_json(join(state, "IN_PROGRESS"), {"run_id": "r1"}, s3)

    def throttled(uri: str, s3: Any) -> None:
        raise OSError("AWS Error NETWORK_CONNECTION during DeleteObject")

    monkeypatch.setattr(audit_state, "delete", throttled)
    commit(state, s3, _pointer("r1"), None)  # committed: no failure reported (it would hide the run's alerts)
    assert read_json(join(state, "CURRENT"), s3)["run_id"] == "r1"
    err = capsys.readouterr().err
    assert "WARNING run r1 is committed, but" in err and "NETWORK_CONNECTION" in err
    assert "the next run removes it" in err


def test_a_missing_state_file_is_refused_with_what_to_do(tmp_path: Path) -> None:
    state, s3 = str(tmp_path / "state"), None
    commit(state, s3, _pointer("r1"), None)  # CURRENT names states/r1.parquet, which was never written
    with pytest.raises(AuditRefused, match=r"states/r1.parquet, the state .*CURRENT names \(run r1\), is missing: "
                                           r"restore it .* or audit into a new --state"):
        audit_state.load_state(state, s3)


def _fake_pipeline(sha: str, during_first: Callable[[], None]) -> Callable[[Any], dict[str, Any]]:
    """Writes an ok row per planned object into the run's scores folder; the first call runs
    ``during_first`` before it returns, as a second audit started meanwhile would."""
    calls = []

    def run_score_job(job: Any) -> dict[str, Any]:
        calls.append(job.run_id)
        n = len(job.objects)
        cols = {f.name: pa.nulls(n, f.type) for f in SCORE_SCHEMA}
        cols.update(uri=pa.array([o.uri for o in job.objects]), etag_or_mtime=pa.array([o.etag_or_mtime for o in
                                                                                          job.objects]),
                    status=pa.array(["ok"] * n), score=pa.array([1.0] * n), model_sha256=pa.array([sha] * n),
                    crop_mode=pa.array(["five"] * n), scored_at=pa.array([now_utc()] * n, pa.timestamp("us", "UTC")))
        audit_state.write_parquet(join(job.out, f"part-{job.run_id}-{len(calls)}_000000.parquet"),
                                  pa.table(cols, schema=SCORE_SCHEMA), None)
        if len(calls) == 1:
            during_first()
        return {"skipped_already_scored": 0}

    return run_score_job


IDENTITY = {"sha256": "a" * 64, "model_id": "tiny", "crop_mode": "five", "random_init": True, "random_parts": [],
            "preset": "tiny"}


@pytest.fixture
def two_photos(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, AuditJob]:
    """A library of a.jpg and b.jpg, its audit job, and a model identity that costs no hashing."""
    lib = tmp_path / "lib"
    for name in ("a.jpg", "b.jpg"):
        write_bytes(str(lib / name), b"x")
    monkeypatch.setattr("ray_jobs.actors.model_identity", lambda model, s3: IDENTITY)
    return lib, AuditJob(library=str(lib), state=str(tmp_path / "state"), model=TINY)


def test_two_audits_on_one_state_never_take_current_back(two_photos, monkeypatch: pytest.MonkeyPatch) -> None:
    lib, job = two_photos
    commits: list[str] = []

    def meanwhile() -> None:
        commits.append(run_audit(job).run_id)  # B continues A's run (the same IN_PROGRESS) and commits it
        write_bytes(str(lib / "c.jpg"), b"new")
        commits.append(run_audit(job).run_id)  # C: a new run on B's state, with the new photo

    monkeypatch.setattr(score, "run_score_job", _fake_pipeline(IDENTITY["sha256"], meanwhile))
    with pytest.raises(AuditRefused, match="another audit committed run"):
        run_audit(job)  # A
    current = read_json(join(job.state, "CURRENT"), None)
    assert current["run_id"] == commits[1] != commits[0]  # C's commit stands
    state = audit_state.read_parquet(join(job.state, current["state"]), None, audit.STATE_SCHEMA)
    assert sorted(state["uri"].to_pylist()) == [str(lib / n) for n in ("a.jpg", "b.jpg", "c.jpg")]
    assert read_json(join(job.state, "IN_PROGRESS"), None) is None


def test_a_refused_twin_leaves_the_files_of_the_committed_attempt_alone(two_photos,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import report

    lib, job = two_photos
    monkeypatch.setattr(score, "run_score_job", _fake_pipeline(IDENTITY["sha256"], lambda: None))
    real_report, twins = report.write_report, []

    def report_after_a_twin_committed(inp: Any) -> dict[str, Any]:
        if not twins:  # A is writing its report: B continues the same run, with a new photo, and commits
            twins.append(None)
            write_bytes(str(lib / "c.jpg"), b"new")
            twins[0] = run_audit(job)
        return real_report(inp)

    monkeypatch.setattr(report, "write_report", report_after_a_twin_committed)
    with pytest.raises(AuditRefused, match="another audit continued this run and committed it"):
        run_audit(job)  # A
    current = read_json(join(job.state, "CURRENT"), None)
    assert current["run_id"] == twins[0].run_id and current["rows"] == 3
    summary = read_json(join(job.state, current["report"], "summary.json"), None)
    assert summary["counts"]["listed"] == 3  # B's report, not A's written over it
    state = audit_state.read_parquet(join(job.state, current["state"]), None, audit.STATE_SCHEMA)
    assert state.num_rows == 3
