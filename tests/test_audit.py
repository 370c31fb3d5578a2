"""The nightly audit end to end on the Ray pipeline (tiny random model), a local folder: first run, delta
run, report in a browser, model change, crop mode change, a transient error retried. S3 (moto): CLI
alerts (exit 3), a run killed before the pointer switch and its completion without re-scoring.
Planning without Ray is in test_audit_plan.py."""

from __future__ import annotations

import io
import json
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable

import boto3
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image
from skimage import data as skdata

from ray_jobs import audit
from ray_jobs.audit import AuditJob, run_audit
from ray_jobs.cli import main as cli
from ray_jobs.options import ModelOptions
from ray_jobs.resume import read_rows
from ray_jobs.storage import S3Options, join, read_bytes, resolve, write_bytes
from tests.test_report import assert_rendered, chromium, screenshot  # noqa: F401 (chromium: a fixture)

TINY = ModelOptions(None, True, "tiny", None, "fp32", "cpu", 8)


def e2e(test: Callable[..., Any]) -> Callable[..., Any]:
    """Marks a test that runs the audit on a local Ray instance."""
    return pytest.mark.ray(pytest.mark.slow(test))
_PICTURES = (skdata.astronaut, skdata.coffee, skdata.chelsea, skdata.rocket)


def photo(i: int) -> bytes:
    """A distinct small JPEG per ``i`` (four pictures, growing widths), so scores differ."""
    img = Image.fromarray(_PICTURES[i % 4]()).resize((288 + 24 * (i // 4), 256))
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def delete(uri: str, s3: S3Options | None = None) -> None:
    fs, path = resolve(uri, s3)
    fs.delete_file(path)


def state_of(state: str, run_id: str, s3: S3Options | None = None) -> dict[str, dict]:
    """The state run ``run_id`` committed: CURRENT's file when it names that run (a continued run's files
    carry an attempt suffix), else the first attempt's ``states/<run_id>.parquet``."""
    pointer = read_json(join(state, "CURRENT"), s3)
    rel = pointer["state"] if pointer["run_id"] == run_id else f"states/{run_id}.parquet"
    fs, path = resolve(join(state, rel), s3)
    return {r["uri"]: r for r in pq.read_table(path, filesystem=fs).to_pylist()}


def read_json(uri: str, s3: S3Options | None = None) -> dict:
    return json.loads(read_bytes(uri, s3))


def copy_state(local_runs: dict, tmp_path: Path) -> str:
    state = str(tmp_path / "state")
    shutil.copytree(local_runs["state"], state)  # the pointer holds relative paths: a copy is a state
    return state


# ------------------------------------------------------------------------------ local folder
@pytest.fixture(scope="module")
def local_runs(ray_local, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Run 1 on 6 files; then +2 new, 1 changed, 1 deleted; run 2."""
    lib, state = tmp_path_factory.mktemp("library"), str(tmp_path_factory.mktemp("audit") / "state")
    for i, name in enumerate(("albumA/a0.jpg", "albumA/a1.jpg", "albumA/a2.jpg", "albumB/b0.jpg", "albumB/b1.jpg")):
        write_bytes(str(lib / name), photo(i))
    (lib / "bad.jpg").write_bytes(b"not an image at all")
    job = AuditJob(library=str(lib), state=state, model=TINY)
    r1 = run_audit(job)
    state1 = state_of(state, r1.run_id)
    write_bytes(str(lib / "albumB/n0.jpg"), photo(5))
    write_bytes(str(lib / "albumC/n1.jpg"), photo(6))
    write_bytes(str(lib / "albumA/a1.jpg"), photo(7))
    (lib / "albumB/b1.jpg").unlink()
    r2 = run_audit(job)
    return {"lib": lib, "state": state, "r1": r1, "r2": r2, "state1": state1, "state2": state_of(state, r2.run_id)}


@e2e
def test_first_run_scores_everything(local_runs: dict) -> None:
    r1, state1 = local_runs["r1"], local_runs["state1"]
    c = r1.summary["counts"]
    assert (c["listed"], c["new"], c["changed"], c["unchanged"], c["deleted"], c["scored"]) == (6, 6, 0, 0, 0, 6)
    assert len(state1) == 6 and all(r["audit_run_id"] == r1.run_id and not r["deleted"] for r in state1.values())
    assert state1[str(local_runs["lib"] / "bad.jpg")]["error_code"] == "not_an_image"
    assert r1.summary["previous"] is None and r1.summary["mean_shift"] is None and r1.alerts == []


@e2e
def test_second_run_scores_exactly_the_delta(local_runs: dict) -> None:
    lib, r1, r2 = local_runs["lib"], local_runs["r1"], local_runs["r2"]
    state1, state2 = local_runs["state1"], local_runs["state2"]
    c = r2.summary["counts"]
    assert (c["listed"], c["new"], c["changed"], c["unchanged"], c["deleted"], c["scored"]) == (7, 2, 1, 4, 1, 3)
    delta = {str(lib / n) for n in ("albumB/n0.jpg", "albumC/n1.jpg", "albumA/a1.jpg")}
    unchanged = {str(lib / n) for n in ("albumA/a0.jpg", "albumA/a2.jpg", "albumB/b0.jpg", "bad.jpg")}
    # The pipeline saw only the delta ...
    scored_rows = read_rows(join(local_runs["state"], "runs", r2.run_id, "scores"))
    assert set(scored_rows["uri"].to_pylist()) == delta and scored_rows.num_rows == 3
    # ... unchanged rows were carried as they were, the delta re-scored by run 2.
    for u in unchanged:
        assert state2[u]["scored_at"] == state1[u]["scored_at"] and state2[u]["audit_run_id"] == r1.run_id
    for u in delta:
        assert state2[u]["audit_run_id"] == r2.run_id and state2[u]["status"] == "ok"
    assert state2[str(lib / "albumA/a1.jpg")]["scored_at"] > state1[str(lib / "albumA/a1.jpg")]["scored_at"]
    gone = state2[str(lib / "albumB/b1.jpg")]
    assert gone["deleted"] and gone["deleted_at"] is not None and gone["score"] == state1[gone["uri"]]["score"]
    pointer = read_json(join(local_runs["state"], "CURRENT"))
    assert pointer["run_id"] == r2.run_id and pointer["previous_run_id"] == r1.run_id
    assert pointer["crop_mode"] == "five" and r2.summary["counts"]["retry"] == 0
    assert not Path(local_runs["state"], "IN_PROGRESS").exists()


@e2e
def test_an_empty_listing_is_refused_not_taken_as_everything_deleted(local_runs: dict) -> None:
    lib, state = local_runs["lib"], local_runs["state"]
    before = read_json(join(state, "CURRENT"))
    lib.rename(lib.with_name("away"))  # the volume is not mounted tonight
    lib.mkdir()
    try:
        res = CliRunner().invoke(cli, ["audit", str(lib), "--state", state, "--random-weights", "--preset", "tiny",
                                       "--device", "cpu"])
    finally:
        lib.rmdir()
        lib.with_name("away").rename(lib)
    assert res.exit_code == 1 and "lists no images, but the previous state holds 7 live objects" in res.output
    assert read_json(join(state, "CURRENT")) == before and not Path(state, "IN_PROGRESS").exists()


@e2e
def test_an_album_back_from_an_unmount_is_restored_unscored(local_runs: dict, tmp_path: Path) -> None:
    lib, state2 = local_runs["lib"], local_runs["state2"]
    state = copy_state(local_runs, tmp_path)
    album = [str(lib / "albumA" / n) for n in ("a0.jpg", "a1.jpg", "a2.jpg")]
    (lib / "albumA").rename(tmp_path / "away")  # unmounted tonight: a rename keeps the files' mtimes
    try:
        night = CliRunner().invoke(cli, ["audit", str(lib), "--state", state, "--random-weights", "--preset", "tiny",
                                         "--device", "cpu", "--alert-if-deleted", "0.25"])
    finally:
        (tmp_path / "away").rename(lib / "albumA")
    assert night.exit_code == 3, night.output
    assert "ALERT: 3 of the previous run's 7 objects are gone from the listing (0.4286 > 0.25)" in night.output
    assert "0 new, 0 changed, 0 retried, 4 unchanged, 0 restored, 3 deleted; scored 0" in night.output
    back = run_audit(AuditJob(library=str(lib), state=state, model=TINY, alert_if_deleted=0.25))
    c = back.summary["counts"]
    assert (c["restored"], c["new"], c["scored"], c["deleted"], c["carried"], back.alerts) == (3, 0, 0, 0, 7, [])
    rows = state_of(state, back.run_id)
    for u in album:  # the row of run 2, live again
        assert {k: rows[u][k] for k in ("deleted", "deleted_at")} == {"deleted": False, "deleted_at": None}
        assert {k: rows[u][k] for k in ("score", "scored_at", "audit_run_id")} == \
            {k: state2[u][k] for k in ("score", "scored_at", "audit_run_id")}
    assert rows[str(lib / "albumB/b1.jpg")]["deleted"]  # deleted in run 2 and still gone


@e2e
def test_report_of_a_real_run(local_runs: dict, chromium: str) -> None:  # noqa: F811
    r2, state2, lib = local_runs["r2"], local_runs["state2"], local_runs["lib"]
    folder = Path(r2.report_uri).parent
    s = json.loads((folder / "summary.json").read_text())
    live = [r for r in state2.values() if not r["deleted"]]
    ok = np.array([r["score"] for r in live if r["status"] == "ok"])
    assert s["counts"]["scored"] == 3 and s["counts"]["deleted"] == 1
    assert (s["tonight"]["objects"], s["tonight"]["ok"], s["tonight"]["error"]) == (7, 6, 1)
    assert s["tonight"]["error_codes"] == {"not_an_image": 1} and s["scored_this_run"]["error"] == 0
    assert s["tonight"]["mean"] == pytest.approx(ok.mean())
    assert s["random_weights"] is True and "not quality judgements" in s["random_weights_note"]
    assert {p["prefix"]: p["count"] for p in s["prefixes"]} == {"albumA": 3, "albumB": 2, "albumC": 1,
                                                               "(top level)": 1}
    assert [w["uri"] for w in s["worst"]] == [r["uri"] for r in sorted(
        (r for r in live if r["status"] == "ok"), key=lambda r: (r["score"], r["uri"]))]
    for name in s["files"]["plots"] + s["files"]["thumbnails"]:
        with Image.open(folder / name) as img:
            assert np.asarray(img.convert("RGB")).std() > 10, name
    assert len(s["files"]["thumbnails"]) == 6 and str(lib) in (folder / "report.html").read_text()
    assert_rendered(screenshot(chromium, folder / "report.html", folder / "screenshot.png"))


@e2e
def test_model_change_rescores_everything(local_runs: dict, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "seed1"
    res = CliRunner().invoke(cli, ["weights", "random", "--preset", "tiny", "--seed", "1", "-o", str(weights)])
    assert res.exit_code == 0, res.output
    state = copy_state(local_runs, tmp_path)
    model = ModelOptions(str(weights), False, "tiny", None, "fp32", "cpu", 8)
    r3 = run_audit(AuditJob(library=str(local_runs["lib"]), state=state, model=model))
    c = r3.summary["counts"]
    assert (c["listed"], c["unchanged"], c["to_score"], c["scored"], c["deleted_kept"]) == (7, 7, 7, 7, 1)
    assert "model changed" in r3.summary["rescored_all_reason"]
    assert "model changed" in capsys.readouterr().err
    state3 = state_of(state, r3.run_id)
    old_sha = read_json(join(local_runs["state"], "CURRENT"))["model_sha256"]
    new_sha = read_json(join(state, "CURRENT"))["model_sha256"]
    assert new_sha != old_sha
    assert all(r["model_sha256"] == new_sha and r["audit_run_id"] == r3.run_id for r in state3.values()
               if not r["deleted"])


@e2e
def test_crop_mode_change_rescores_everything(local_runs: dict, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    state = copy_state(local_runs, tmp_path)
    center = ModelOptions(None, True, "tiny", "center", "fp32", "cpu", 8)
    r3 = run_audit(AuditJob(library=str(local_runs["lib"]), state=state, model=center))
    c = r3.summary["counts"]
    assert (c["listed"], c["unchanged"], c["to_score"], c["scored"]) == (7, 7, 7, 7)
    assert r3.summary["rescored_all_reason"] == "crop mode changed: five -> center; every object is re-scored"
    assert "crop mode changed: five -> center" in capsys.readouterr().err
    live = [r for r in state_of(state, r3.run_id).values() if not r["deleted"]]
    assert len(live) == 7 and all(r["crop_mode"] == "center" and r["audit_run_id"] == r3.run_id for r in live)
    before, after = read_json(join(local_runs["state"], "CURRENT")), read_json(join(state, "CURRENT"))
    assert (after["crop_mode"], after["model_sha256"]) == ("center", before["model_sha256"])


@e2e
def test_a_transient_error_is_retried_on_the_next_run(local_runs: dict, tmp_path: Path) -> None:
    lib, state = local_runs["lib"], copy_state(local_runs, tmp_path)
    path = Path(state, read_json(join(state, "CURRENT"))["state"])
    table, flaky = pq.read_table(path), str(lib / "albumA/a0.jpg")  # a night of S3 throttling, say
    rows = [{**r, "status": "error", "error_code": "read_failed", "error_message": "SlowDown", "score": None}
            if r["uri"] == flaky else r for r in table.to_pylist()]
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path)
    r3 = run_audit(AuditJob(library=str(lib), state=state, model=TINY))
    c = r3.summary["counts"]
    assert (c["listed"], c["new"], c["changed"], c["retry"], c["unchanged"], c["scored"]) == (7, 0, 0, 1, 6, 1)
    assert read_json(join(state, "reports", r3.run_id, "summary.json"))["counts"]["retry"] == 1
    state3 = state_of(state, r3.run_id)
    assert (state3[flaky]["status"], state3[flaky]["audit_run_id"]) == ("ok", r3.run_id)
    assert state3[flaky]["score"] == pytest.approx(local_runs["state2"][flaky]["score"], abs=1e-4)
    bad = state3[str(lib / "bad.jpg")]  # a verdict on unchanged bytes: carried, not retried
    assert (bad["error_code"], bad["audit_run_id"]) == ("not_an_image", local_runs["r1"].run_id)


# ------------------------------------------------------------------------------ S3: alerts, crash, resume
@pytest.fixture(scope="module")
def s3_nights(ray_local, s3_server) -> dict:
    """Three nights on S3. 1: ``piqa audit`` sees a broken file (error-rate alert). 2: the better photo
    was deleted (mean-drop alert, nothing to score). 3: +1 new, 1 changed; killed before the pointer
    switch, then re-run."""
    s3, runner = s3_server.options, CliRunner()
    bucket = f"audit-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3.endpoint_url, region_name=s3.region, aws_access_key_id=s3.access_key,
                 aws_secret_access_key=s3.secret_key).create_bucket(Bucket=bucket)
    lib, state = f"s3://{bucket}/photos/", f"s3://{bucket}/audit/state"
    for i, name in enumerate(("a.jpg", "sub/b.jpg", "sub/c.jpg")):
        write_bytes(lib + name, photo(i), s3)
    write_bytes(lib + "bad.jpg", b"\x00garbage", s3)
    base = ["audit", lib, "--state", state, "--endpoint-url", s3.endpoint_url, "--random-weights", "--preset", "tiny"]
    out: dict = {"lib": lib, "state": state, "s3": s3}
    out["night1"] = runner.invoke(cli, [*base, "--alert-if-error-rate", "0.01"])
    out["run1"] = read_json(join(state, "CURRENT"), s3)["run_id"]
    out["state1"] = state_of(state, out["run1"], s3)

    # Delete the best photo: tonight's mean is the others', known before the run.
    ok = {u: r["score"] for u, r in out["state1"].items() if r["status"] == "ok"}
    best = max(ok, key=ok.get)
    out["drop"] = float(np.mean(list(ok.values())) - np.mean([v for u, v in ok.items() if u != best]))
    delete(best, s3)
    out["night2"] = runner.invoke(cli, [*base, "--alert-if-mean-drops", repr(out["drop"] / 2),
                                        "--alert-if-error-rate", "0.01"])
    out["run2"] = read_json(join(state, "CURRENT"), s3)["run_id"]
    out["state2"] = state_of(state, out["run2"], s3)

    changed = next(u for u in ok if u != best)
    write_bytes(lib + "sub/new.jpg", photo(4), s3)
    write_bytes(changed, photo(5), s3)  # new content, new ETag
    out["delta"] = {lib + "sub/new.jpg", changed}
    job = AuditJob(library=lib, state=state, model=TINY, s3=s3)

    def killed(*_: object) -> None:
        raise RuntimeError("killed before the pointer switch")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "commit", killed)
        with pytest.raises(RuntimeError, match="killed"):
            run_audit(job)
    out["pointer_after_kill"] = read_json(join(state, "CURRENT"), s3)
    out["unfinished"] = read_json(join(state, "IN_PROGRESS"), s3)["run_id"]
    out["scores"] = join(state, "runs", out["unfinished"], "scores")
    out["first_try"] = {r["uri"]: r["scored_at"] for r in read_rows(out["scores"], s3).to_pylist()}
    out["night3"] = run_audit(job)
    out["state3"] = state_of(state, out["night3"].run_id, s3)
    return out


@e2e
def test_cli_alerts_exit_3_and_still_commit(s3_nights: dict) -> None:
    n1, n2, s3, state = s3_nights["night1"], s3_nights["night2"], s3_nights["s3"], s3_nights["state"]
    assert n1.exit_code == 3, n1.output
    assert "ALERT: error rate 0.2500 (> 0.01)" in n1.output
    s1 = read_json(join(state, "reports", s3_nights["run1"], "summary.json"), s3)
    assert [a["kind"] for a in s1["alerts"]] == ["error_rate"] and s1["counts"]["scored"] == 4
    assert n2.exit_code == 3, n2.output
    assert "ALERT: mean score dropped by" in n2.output and "error rate" not in n2.output
    s2 = read_json(join(state, "reports", s3_nights["run2"], "summary.json"), s3)
    (alert,) = s2["alerts"]  # the alert run was committed: it is the previous run of night 3
    assert alert["kind"] == "mean_drop" and alert["value"] == pytest.approx(s3_nights["drop"])
    assert (s2["counts"]["deleted"], s2["counts"]["scored"]) == (1, 0)
    assert s3_nights["pointer_after_kill"]["previous_run_id"] == s3_nights["run1"]


@e2e
def test_crash_before_pointer_switch_then_resume(s3_nights: dict) -> None:
    s3, state, lib, n3 = s3_nights["s3"], s3_nights["state"], s3_nights["lib"], s3_nights["night3"]
    assert s3_nights["pointer_after_kill"]["run_id"] == s3_nights["run2"]  # the kill left the old state current
    assert set(s3_nights["first_try"]) == s3_nights["delta"]  # the killed attempt had scored the delta
    c = n3.summary["counts"]
    assert n3.run_id == s3_nights["unfinished"] and n3.resumed
    assert (c["new"], c["changed"], c["unchanged"], c["scored"]) == (1, 1, 2, 2)
    assert (c["scored_now"], c["reused_from_unfinished_run"]) == (0, 2)
    assert read_rows(s3_nights["scores"], s3).num_rows == 2  # nothing scored twice
    state2, state3 = s3_nights["state2"], s3_nights["state3"]
    for u, stamp in s3_nights["first_try"].items():
        assert state3[u]["scored_at"] == stamp and state3[u]["audit_run_id"] == n3.run_id
    unchanged = {u for u, r in state2.items() if not r["deleted"]} - s3_nights["delta"]
    assert unchanged and all(state3[u]["scored_at"] == state2[u]["scored_at"] for u in unchanged)
    assert sum(r["deleted"] for r in state3.values()) == 1
    assert read_json(join(state, "CURRENT"), s3)["run_id"] == n3.run_id
    with pytest.raises(FileNotFoundError):
        read_bytes(join(state, "IN_PROGRESS"), s3)
    report = read_json(join(state, "CURRENT"), s3)["report"]
    assert report.startswith(f"reports/{n3.run_id}-")  # a continuation's files are its own
    assert read_json(join(state, report, "summary.json"), s3)["resumed"] is True
    assert lib + "bad.jpg" in unchanged
