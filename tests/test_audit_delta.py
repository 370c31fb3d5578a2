"""The audit's delta scoring without Ray: which score rows a run takes, what it retries, what it says
when rows are missing (the pipeline is replaced by rows written the way it writes them)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pyarrow as pa
import pytest

from ray_jobs import audit, audit_state
from ray_jobs.audit import PLAN_SCHEMA, AuditJob
from ray_jobs.options import PoolOptions
from ray_jobs.schema import SCORE_SCHEMA
from ray_jobs.storage import join
from ray_jobs.summary import RowsMissing
from tests.test_audit import TINY
from tests.test_audit_plan import SHA, T0, row, state_table


def test_score_delta_keeps_only_rows_of_the_runs_crop_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import score

    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY)
    listing = pa.Table.from_pylist([{**row("/lib/a.jpg"), "action": "new", "to_score": True}], schema=PLAN_SCHEMA)
    plan = audit.Plan("r1", T0, "/lib", SHA, "tiny", "center", None, None, listing, resumed=True)
    rows = [{**row("/lib/a.jpg", score=s), "model_sha256": SHA, "crop_mode": m, "scored_at": T0 + timedelta(hours=h)}
            for s, m, h in ((1.0, "center", 0), (2.0, "five", 1))]  # the other protocol's row is the later one
    audit_state.write_parquet(join(job.state, "runs", "r1", "scores", "part-r1-x_000000.parquet"),
                         pa.Table.from_pylist(rows, schema=SCORE_SCHEMA), job.s3)
    monkeypatch.setattr(score, "run_score_job", lambda _job: {"skipped_already_scored": 1})
    scored, stats = audit.score_delta(job, plan)
    assert (scored["score"].to_pylist(), scored["crop_mode"].to_pylist()) == ([1.0], ["center"])
    assert stats == {"to_score": 1, "scored_now": 0, "reused_from_unfinished_run": 1}


def test_a_continued_run_retries_its_transient_errors_and_names_the_audit_to_rerun(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import score

    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY)
    listing = pa.Table.from_pylist([{**row("/lib/a.jpg"), "action": "new", "to_score": True}], schema=PLAN_SCHEMA)
    plan = audit.Plan("r1", T0, "/lib", SHA, "tiny", "five", None, None, listing, resumed=True)
    jobs: list = []

    def pipeline(score_job):
        jobs.append(score_job)
        raise score.RowsMissing(f"run r1: 1 of 1 inputs have no row in x (first: /lib/a.jpg); {score_job.rerun_hint}")

    monkeypatch.setattr(score, "run_score_job", pipeline)
    with pytest.raises(score.RowsMissing, match=r"; run the audit again to score them$"):  # no --resume in audit
        audit.score_delta(job, plan)
    assert jobs[0].resume and jobs[0].retry_error_codes == audit.TRANSIENT_ERROR_CODES


def test_the_audits_pool_options_reach_its_score_job(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import score

    pools = PoolOptions(face_device="cpu", prep="actors", prep_actors=13, score_actors=1, prep_batch_size=2,
                        gpus_per_actor=0.5)
    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY, pools=pools,
                   max_bytes=1000)
    listing = pa.Table.from_pylist([{**row("/lib/a.jpg"), "action": "new", "to_score": True}], schema=PLAN_SCHEMA)
    jobs: list = []
    monkeypatch.setattr(score, "run_score_job",
                        lambda score_job: jobs.append(score_job) or {"skipped_already_scored": 0})
    with pytest.raises(RowsMissing):  # nothing written: only the job's arguments are under test
        audit.score_delta(job, audit.Plan("r1", T0, "/lib", SHA, "tiny", "five", None, None, listing))
    [got] = jobs
    assert (got.face_device, got.prep, got.prep_actors, got.score_actors, got.prep_batch_size,
            got.gpus_per_score_actor, got.max_bytes) == ("cpu", "actors", 13, 1, 2, 0.5, 1000)


def test_score_delta_takes_no_row_of_an_earlier_version(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray_jobs import score

    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY)
    listing = pa.Table.from_pylist([{**row("/lib/a.jpg", "e2"), "action": "changed", "to_score": True}],
                                   schema=PLAN_SCHEMA)
    plan = audit.Plan("r1", T0, "/lib", SHA, "tiny", "five", None, None, listing, resumed=True)
    old = {**row("/lib/a.jpg", "e1", score=1.0), "model_sha256": SHA, "crop_mode": "five", "scored_at": T0}
    audit_state.write_parquet(join(job.state, "runs", "r1", "scores", "part-r1-x_000000.parquet"),
                              pa.Table.from_pylist([old], schema=SCORE_SCHEMA), job.s3)
    monkeypatch.setattr(score, "run_score_job", lambda _job: {"skipped_already_scored": 0})  # wrote nothing
    with pytest.raises(RowsMissing, match="1 planned objects have no score row; run the audit again"):
        audit.score_delta(job, plan)


def test_score_delta_takes_no_row_of_the_same_mtime_and_another_size(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A photo rewritten with its mtime kept between two attempts: the first attempt's row is stale."""
    from ray_jobs import score

    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY)
    listing = pa.Table.from_pylist([{**row("/lib/a.jpg", "m1", bytes=12), "action": "changed", "to_score": True}],
                                   schema=PLAN_SCHEMA)
    plan = audit.Plan("r1", T0, "/lib", SHA, "tiny", "five", None, None, listing, resumed=True)
    old = {**row("/lib/a.jpg", "m1", score=1.0), "model_sha256": SHA, "crop_mode": "five", "scored_at": T0}
    audit_state.write_parquet(join(job.state, "runs", "r1", "scores", "part-r1-x_000000.parquet"),
                              pa.Table.from_pylist([old], schema=SCORE_SCHEMA), job.s3)  # bytes 10
    monkeypatch.setattr(score, "run_score_job", lambda _job: {"skipped_already_scored": 0})  # wrote nothing
    with pytest.raises(RowsMissing, match="1 planned objects have no score row"):
        audit.score_delta(job, plan)


def test_a_dangling_link_is_carried_until_its_target_comes_back(tmp_path: Path) -> None:
    from ray_jobs.listing import list_images
    from ray_jobs.reader import fetch

    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "a.jpg").symlink_to(tmp_path / "unmounted" / "a.jpg")
    [info] = list_images(str(tmp_path / "lib"))
    got = fetch(info, None, 100)
    assert got.code == "not_a_file" and str(tmp_path / "unmounted" / "a.jpg") in got.message  # not retried
    prev = state_table([row(info.uri, info.etag_or_mtime, bytes=info.size, error_code=got.code)])
    assert audit.classify(list_images(str(tmp_path / "lib")), prev, False)["action"].to_pylist() == ["unchanged"]
    (tmp_path / "unmounted").mkdir()
    (tmp_path / "unmounted" / "a.jpg").write_bytes(b"photo")  # back: the listing's stat changes
    assert audit.classify(list_images(str(tmp_path / "lib")), prev, False)["action"].to_pylist() == ["changed"]
