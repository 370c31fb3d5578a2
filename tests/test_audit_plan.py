"""Audit planning without Ray: which objects are re-scored (transient errors, crop mode), how the state
merges, and when an unfinished run is continued."""

from __future__ import annotations

import dataclasses
import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from piqa_core.errors import ERROR_CODES
from ray_jobs import audit, audit_state
from ray_jobs.audit import PLAN_SCHEMA, STATE_SCHEMA, AuditJob
from ray_jobs.schema import SCORE_SCHEMA
from ray_jobs.listing import list_images
from ray_jobs.storage import ObjectInfo, S3Options, join, resolve, write_bytes
from tests.test_audit import TINY, read_json

T0 = datetime(2024, 5, 1, 2, 0, tzinfo=timezone.utc)
SHA = "a" * 64


def state_table(rows: list[dict]) -> pa.Table:
    """A state from partial rows: live, scored five-crop, other columns null unless given."""
    return pa.Table.from_pylist([{"deleted": False, "crop_mode": "five", **r} for r in rows], schema=STATE_SCHEMA)


def row(uri: str, tag: str = "e1", **kw: Any) -> dict:
    return {"uri": uri, "etag_or_mtime": tag, "bytes": 10, "status": "error" if "error_code" in kw else "ok", **kw}


def test_classify_retries_only_transient_errors() -> None:
    prev = state_table([row("ok"), *(row(c, error_code=c) for c in ERROR_CODES),
                        row("edited", error_code="read_failed"), row("back", error_code="internal", deleted=True)])
    uris = ("ok", *ERROR_CODES, "edited", "back", "new")
    listing = [ObjectInfo(u, 10, "e2" if u == "edited" else "e1") for u in uris]
    plan = {r["uri"]: (r["action"], r["to_score"]) for r in audit.classify(listing, prev, False).to_pylist()}
    transient = {"read_failed", "not_found", "internal"}  # decode verdicts on unchanged bytes would recur
    assert plan == {"ok": ("unchanged", False), "edited": ("changed", True), "back": ("new", True),
                    "new": ("new", True), **{c: (("retry", True) if c in transient else ("unchanged", False))
                                             for c in ERROR_CODES}}


def test_a_retried_row_is_replaced_and_counted() -> None:
    prev = state_table([row("a", score=1.0, audit_run_id="r1"), row("b", error_code="read_failed", audit_run_id="r1"),
                        row("c", error_code="not_an_image", audit_run_id="r1")])
    listing = audit.classify([ObjectInfo(u, 10, "e1") for u in "abc"], prev, False)
    plan = audit.Plan("r2", T0, "/lib", SHA, "tiny", "five", "r1", None, listing)
    scored = pa.Table.from_pylist([{**row("b", score=0.5), "crop_mode": "five"}], schema=SCORE_SCHEMA)
    state, counts = audit.merge_state(plan, prev, scored, 30.0)
    assert ({k: counts[k] for k in ("new", "changed", "retry", "unchanged", "carried", "scored")}
            == {"new": 0, "changed": 0, "retry": 1, "unchanged": 2, "carried": 2, "scored": 1})
    got = {r["uri"]: r for r in state.to_pylist()}
    assert len(state) == 3 and (got["b"]["status"], got["b"]["score"], got["b"]["audit_run_id"]) == ("ok", 0.5, "r2")
    assert (got["c"]["error_code"], got["c"]["audit_run_id"]) == ("not_an_image", "r1")


def test_a_deleted_row_comes_back_only_for_the_same_version_and_model() -> None:
    gone = {"deleted": True, "deleted_at": T0 - timedelta(days=2), "model_sha256": SHA, "audit_run_id": "r1"}
    prev = audit_state.normalise(state_table([row("same", score=2.0, **gone), row("edited", score=2.0, **gone),
                        row("bad", error_code="not_an_image", **gone), row("flaky", error_code="read_failed", **gone),
                        row("other-model", score=2.0, **{**gone, "model_sha256": "b" * 64}),
                        row("other-crop", score=2.0, **{**gone, "crop_mode": "center"}),
                        row("legacy", score=2.0, **{**gone, "crop_mode": None}),  # older code's: five-crop
                        row("live", score=1.0, **{**gone, "deleted": False, "deleted_at": None})]))
    listing = [ObjectInfo(u, 10, "e2" if u == "edited" else "e1")
               for u in ("same", "edited", "bad", "flaky", "other-model", "other-crop", "legacy", "live")]
    plan = audit.classify(listing, prev, False, model_sha256=SHA, crop_mode="five")
    assert {r["uri"]: (r["action"], r["to_score"]) for r in plan.to_pylist()} == {
        "same": ("restored", False), "edited": ("new", True), "bad": ("restored", False), "flaky": ("new", True),
        "other-model": ("new", True), "other-crop": ("new", True), "legacy": ("restored", False),
        "live": ("unchanged", False)}
    everything = audit.classify(listing, prev, True, model_sha256=SHA, crop_mode="five")
    assert all(everything["to_score"].to_pylist()) and "restored" not in everything["action"].to_pylist()
    assert "restored" not in audit.classify(listing, prev, False)["action"].to_pylist()  # no model: nothing back

    scored = pa.Table.from_pylist([{**row(u, score=0.5), "crop_mode": "five"} for u in
                                   ("edited", "flaky", "other-model", "other-crop")], schema=SCORE_SCHEMA)
    state, counts = audit.merge_state(audit.Plan("r2", T0, "/lib", SHA, "tiny", "five", "r1", None, plan),
                                      prev, scored, 30.0)
    got = {r["uri"]: r for r in state.to_pylist()}
    assert len(state) == 8 and not any(r["deleted"] or r["deleted_at"] for r in got.values())
    assert (got["same"]["score"], got["same"]["audit_run_id"], got["bad"]["error_code"]) == (2.0, "r1", "not_an_image")
    assert got["legacy"]["crop_mode"] == "five"
    assert (counts["restored"], counts["carried"], counts["deleted"], counts["scored"]) == (3, 4, 0, 4)


def test_one_row_per_object_prefers_the_last_live_row_then_the_first_deleted_one(tmp_path: Path,
                                                                                 capsys: pytest.CaptureFixture) -> None:
    old = {"deleted": True, "deleted_at": T0 - timedelta(days=1)}
    prev = state_table([row("a", score=9.0, **old), row("a", score=1.0), row("b", score=2.0), row("b", score=3.0),
                        row("c", score=4.0, **old), row("c", score=5.0, **old), row("e", score=7.0, deleted=None),
                        row("e", score=8.0, **old), row("d", score=6.0, crop_mode=None)])
    one_each = prev.slice(7)
    assert audit_state.one_row_per_object(one_each) is one_each and not capsys.readouterr().err
    assert ([(r["uri"], r["score"]) for r in audit_state.one_row_per_object(prev).to_pylist()]
            == [("a", 1.0), ("b", 3.0), ("c", 4.0), ("e", 7.0), ("d", 6.0)])  # e: null is live, as live() says
    assert "the state holds 4 extra row(s)" in capsys.readouterr().err
    state = tmp_path / "state"
    audit_state.write_parquet(str(state / "s.parquet"), prev, S3Options())
    audit_state.write_json(str(state / "CURRENT"), {"run_id": "r1", "library": "/lib", "model_sha256": SHA,
                                                    "model_id": "tiny", "state": "s.parquet"}, S3Options())
    loaded = audit_state.load_state(str(state), S3Options())[1]
    assert loaded.num_rows == 5 and loaded["crop_mode"].to_pylist() == ["five"] * 5  # d: older code's, five-crop


@pytest.mark.parametrize("live_first", [True, False])
def test_an_object_with_a_live_and_a_deleted_row_keeps_one_across_nights(live_first: bool) -> None:
    """Gone one night, back the next: with both rows kept, it came back as two live rows."""
    rows = [row("a", score=1.0, model_sha256=SHA, audit_run_id="r1"),
            row("a", score=9.0, model_sha256=SHA, audit_run_id="r0", deleted=True, deleted_at=T0 - timedelta(days=1))]
    state = audit_state.normalise(state_table(rows if live_first else rows[::-1]))
    for night, listing in enumerate(([], [ObjectInfo("a", 10, "e1")]), start=2):
        plan = audit.classify(listing, state, False, model_sha256=SHA, crop_mode="five")
        state, _ = audit.merge_state(audit.Plan(f"r{night}", T0 + timedelta(days=night), "/lib", SHA, "tiny",
                                                "five", "r1", None, plan), state, SCORE_SCHEMA.empty_table(), 30.0)
        assert state.num_rows == 1
    assert plan["action"].to_pylist() == ["restored"]
    assert [(r["score"], r["deleted"]) for r in state.to_pylist()] == [(1.0, False)]


def planning(tmp_path: Path, modes: tuple[str | None, ...]) -> tuple[AuditJob, pa.Table]:
    """A library of len(modes) files and a previous state that holds them all, scored in those crop modes."""
    lib = tmp_path / "lib"
    for i in range(len(modes)):
        write_bytes(str(lib / f"p{i}.jpg"), b"x" * (i + 1))
    previous = audit_state.normalise(state_table([{**row(o.uri, o.etag_or_mtime, bytes=o.size), "crop_mode": m}
                                                  for o, m in zip(list_images(str(lib)), modes)]))  # as loaded
    return AuditJob(library=str(lib), state=str(tmp_path / "state"), model=TINY), previous


def pointer(job: AuditJob, crop_mode: str | None) -> dict:
    p = {"run_id": "r1", "library": audit.library_root(job.library), "model_sha256": SHA, "model_id": "tiny"}
    return p if crop_mode is None else {**p, "crop_mode": crop_mode}


@pytest.mark.parametrize("recorded, modes, crop, old", [
    ("five", ("five", "five"), "five", None), ("five", ("five", "five"), "center", "five"),
    ("center", ("center", "center"), "five", "center"),
    # Pointers from before crop_mode was recorded: the rows tell, else the old default (five).
    (None, ("five", "five"), "five", None), (None, ("center", "center"), "center", None),
    (None, ("center", "center"), "five", "center"),
    (None, ("five", "center"), "five", "center+five"),  # mixed already: re-score to one protocol
    (None, (None, None), "five", None), (None, (None, None), "center", "five"),
    (None, (None, "center"), "center", "center+five"),  # older code's rows were five-crop
])
def test_a_crop_mode_change_rescores_everything(tmp_path: Path, recorded: str | None, modes: tuple,
                                                crop: str, old: str | None) -> None:
    job, previous = planning(tmp_path, modes)
    plan = audit.plan_run(job, {"sha256": SHA, "model_id": "tiny", "crop_mode": crop}, pointer(job, recorded),
                          previous)
    reason = f"crop mode changed: {old} -> {crop}; every object is re-scored" if old else None
    assert (plan.crop_mode, plan.rescored_all_reason) == (crop, reason)
    assert plan.listing["action"].to_pylist() == ["unchanged"] * 2
    assert plan.listing["to_score"].to_pylist() == [old is not None] * 2
    marker = read_json(join(job.state, "IN_PROGRESS"))
    assert (marker["crop_mode"], marker["rescored_all_reason"]) == (crop, reason)


def test_a_cached_copy_of_another_model_is_refused(tmp_path: Path) -> None:
    """The source unreadable, the node's copy another model: re-scoring the library with it would be a regression."""
    job, previous = planning(tmp_path, ("five", "five"))
    cached = {"sha256": SHA, "model_id": "tiny", "crop_mode": "five", "cached_copy": "/cache/piqa/0123"}
    plan = audit.plan_run(job, cached, pointer(job, "five"), previous)  # the model the last audit used: fine
    assert plan.listing["to_score"].to_pylist() == [False] * 2
    with pytest.raises(audit.AuditRefused, match=r"cached copy \(/cache/piqa/0123, sha256 bbbbbbbbbbbb\) is not the "
                                                 r"model the last audit used \(sha256 aaaaaaaaaaaa\)"):
        audit.plan_run(job, {**cached, "sha256": "b" * 64}, pointer(job, "five"), previous)
    assert audit.plan_run(job, {**cached, "sha256": "b" * 64, "cached_copy": None}, pointer(job, "five"),
                          previous).rescored_all_reason.startswith("model changed")  # read from the source: re-score


@pytest.mark.parametrize("refusal", ["cached copy", "belongs to library", "lists no images"])
def test_a_refused_run_leaves_the_unfinished_run_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        refusal: str) -> None:
    """Refused before IN_PROGRESS is looked at: the unfinished run is neither abandoned nor replaced."""
    job, previous = planning(tmp_path, ("five", "five"))
    five = {"sha256": SHA, "model_id": "tiny", "crop_mode": "five"}
    last = pointer(job, "five")
    unfinished = audit.plan_run(job, five, last, previous)
    other = {**five, "sha256": "b" * 64}  # a marker of another model would be abandoned, were it looked at
    if refusal == "cached copy":
        other["cached_copy"] = "/cache/piqa/0123"
    elif refusal == "belongs to library":
        job = dataclasses.replace(job, library=str(tmp_path / "other"))
    else:
        for p in (tmp_path / "lib").iterdir():
            p.unlink()
    with pytest.raises(audit.AuditRefused, match=refusal):
        audit.plan_run(job, other, last, previous)
    assert read_json(join(job.state, "IN_PROGRESS"))["run_id"] == unfinished.run_id
    assert "abandon" not in capsys.readouterr().err


def test_an_unfinished_run_continues_only_under_the_same_crop_mode(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    job, previous = planning(tmp_path, ("five", "five"))
    five, center = ({"sha256": SHA, "model_id": "tiny", "crop_mode": m} for m in ("five", "center"))
    first = audit.plan_run(job, five, pointer(job, "five"), previous)
    again = audit.plan_run(job, five, pointer(job, "five"), previous)
    assert again.resumed and again.run_id == first.run_id and again.crop_mode == "five"
    other = audit.plan_run(job, center, pointer(job, "five"), previous)
    assert not other.resumed and other.run_id != first.run_id and other.listing["to_score"].to_pylist() == [True] * 2
    assert f"abandoning unfinished run {first.run_id}" in capsys.readouterr().err
    marker_uri = join(job.state, "IN_PROGRESS")
    marker = read_json(marker_uri)
    assert (marker["run_id"], marker["crop_mode"]) == (other.run_id, "center")
    del marker["crop_mode"]  # as older code wrote it: its rows' crop mode is unknown, so it is not continued
    audit_state.write_json(marker_uri, marker, job.s3)
    legacy = audit.plan_run(job, center, pointer(job, "five"), previous)
    assert not legacy.resumed and legacy.run_id != other.run_id


FIVE = {"sha256": SHA, "model_id": "tiny", "crop_mode": "five"}


@pytest.mark.parametrize("damage", ["pruned", "empty", "not parquet", "bad footer", "other columns"])
def test_an_unfinished_run_whose_plan_is_gone_or_corrupt_is_abandoned(tmp_path: Path, damage: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    job, previous = planning(tmp_path, ("five", "five"))
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    plan_uri = join(job.state, "runs", first.run_id, "plan.parquet")
    data = Path(plan_uri).read_bytes()
    footer = int.from_bytes(data[-8:-4], "little")
    if damage == "pruned":  # a failed run's folder cleaned up
        shutil.rmtree(join(job.state, "runs"))
    elif damage == "other columns":
        audit_state.write_parquet(plan_uri, pa.table({"x": [1]}), job.s3)
    else:  # "bad footer": pyarrow reports it as an OSError, like an I/O failure
        write_bytes(plan_uri, {"empty": b"", "not parquet": b"PAR1 not really",
                               "bad footer": data[:-8 - footer] + b"\xff" * footer + data[-8:]}[damage])
    again = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert not again.resumed and again.run_id != first.run_id and again.listing == first.listing
    err = capsys.readouterr().err
    assert f"abandoning unfinished run {first.run_id} (its plan runs/{first.run_id}/plan.parquet" in err
    assert read_json(join(job.state, "IN_PROGRESS"))["run_id"] == again.run_id
    third = audit.plan_run(job, FIVE, pointer(job, "five"), previous)  # the new run continues as usual
    assert third.resumed and third.run_id == again.run_id


@pytest.mark.parametrize("marker", [b"{\"run_id\": \"r2\", \"libr", b"", b"\xff\xfe", b"null", b"[]",
                                    b"{\"run_id\": \"r2\"}", "no plan", "bad date"])
def test_an_unreadable_marker_is_abandoned(tmp_path: Path, marker: bytes | str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    job, previous = planning(tmp_path, ("five", "five"))
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    marker_uri = join(job.state, "IN_PROGRESS")
    if isinstance(marker, str):
        data = read_json(marker_uri)
        data.pop("plan") if marker == "no plan" else data.update(started_at="last night")
        marker = json.dumps(data).encode()
    write_bytes(marker_uri, marker)
    again = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert not again.resumed and again.run_id != first.run_id
    assert f"abandoning the unreadable unfinished-run marker {marker_uri}" in capsys.readouterr().err
    assert read_json(marker_uri)["run_id"] == again.run_id


def test_an_unreadable_state_folder_still_fails_the_audit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job, previous = planning(tmp_path, ("five", "five"))
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    real_read = audit_state.read_bytes
    for name in ("plan.parquet", "IN_PROGRESS"):
        def denied(uri: str, *args: Any, name: str = name) -> bytes:  # as a missing s3:GetObject grant would
            if uri.endswith(name):
                raise PermissionError(13, "Access Denied", uri)
            return real_read(uri, *args)

        monkeypatch.setattr(audit_state, "read_bytes", denied)
        with pytest.raises(PermissionError, match="Access Denied"):
            audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    monkeypatch.setattr(audit_state, "read_bytes", real_read)
    assert read_json(join(job.state, "IN_PROGRESS"))["run_id"] == first.run_id  # not abandoned
    assert audit.plan_run(job, FIVE, pointer(job, "five"), previous).resumed


@pytest.mark.parametrize("layout", ["library named through a link", "state linked into the library"])
def test_the_state_is_kept_out_of_the_listing_whatever_path_names_it(tmp_path: Path, layout: str) -> None:
    real_lib = tmp_path / "real_lib"
    write_bytes(str(real_lib / "p.jpg"), b"x")
    if layout == "library named through a link":
        (tmp_path / "lib").symlink_to(real_lib)
        lib, state = tmp_path / "lib", real_lib / ".audit"
    else:
        lib, state = real_lib, tmp_path / "elsewhere"
        state.mkdir()
        (real_lib / ".audit").symlink_to(state)
    write_bytes(str(state / "reports" / "r0" / "thumbs" / "t.jpg"), b"thumb")
    job = AuditJob(library=str(lib), state=str(state), model=TINY)
    plan = audit.plan_run(job, FIVE, None, STATE_SCHEMA.empty_table())
    assert plan.listing["uri"].to_pylist() == [str(lib / "p.jpg")]


@pytest.mark.parametrize("state", [".", "lib", "lib/.."])
def test_a_state_holding_the_library_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, state: str) -> None:
    """Every photo would pass for the state's own files: the audit planned nothing and exited 0, every night."""
    write_bytes(str(tmp_path / "lib" / "p.jpg"), b"x")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(audit.AuditRefused, match=rf"--state {state} is the library or a folder above it"):
        audit.plan_run(AuditJob(library="lib", state=state, model=TINY), FIVE, None, STATE_SCHEMA.empty_table())
    assert not (tmp_path / "IN_PROGRESS").exists() and not (tmp_path / "lib" / "IN_PROGRESS").exists()
    assert audit._contains("s3://b/a", "s3://b/a/lib") and not audit._contains("s3://b/a", "s3://b/ab")
    assert not audit._contains(str(tmp_path), "s3://b/lib") and not audit._contains("lib/.audit", "lib")


def test_a_pruned_run_on_s3_is_abandoned(tmp_path: Path, s3_server: Any, s3_bucket: str,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    job, previous = planning(tmp_path, ("five",))
    job.state, job.s3 = f"s3://{s3_bucket}/audit", s3_server.options
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert audit.plan_run(job, FIVE, pointer(job, "five"), previous).resumed  # the plan reads back from S3
    fs, path = resolve(join(job.state, "runs"), job.s3)
    fs.delete_dir(path)  # e.g. a lifecycle rule expiring runs/
    again = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert not again.resumed and again.run_id != first.run_id
    assert f"abandoning unfinished run {first.run_id} (its plan runs/{first.run_id}/plan.parquet is missing)" \
        in capsys.readouterr().err


@pytest.mark.parametrize("current", [b"{not json", b"[]", b'{"run_id": "r1", "state": "states/r1.parquet"}'])
def test_a_damaged_pointer_is_refused_naming_it(tmp_path: Path, current: bytes) -> None:
    job = AuditJob(library=str(tmp_path / "lib"), state=str(tmp_path / "state"), model=TINY)
    write_bytes(join(job.state, "CURRENT"), current)
    with pytest.raises(audit.AuditRefused, match=r"state/CURRENT is not an audit pointer \(.*\); restore it"):
        audit_state.load_state(job.state, job.s3)


def test_a_file_uri_names_the_same_library_as_its_path(tmp_path: Path) -> None:
    from urllib.parse import quote

    lib = tmp_path / "lib one"
    write_bytes(str(lib / "album" / "a.jpg"), b"x")
    uri = "file://" + quote(str(lib))
    assert audit.library_root(uri) == audit.library_root(str(lib) + "/") == str(lib)
    assert all(o.uri.startswith(audit.library_root(uri) + "/") for o in list_images(uri))
    job = AuditJob(library=uri, state=str(tmp_path / "state"), model=TINY)
    first = audit.plan_run(job, FIVE, None, STATE_SCHEMA.empty_table())
    job.library = str(lib)  # the same library by its path: the unfinished run is continued, not refused
    assert audit.plan_run(job, FIVE, None, STATE_SCHEMA.empty_table()).run_id == first.run_id
    legacy = {"run_id": "r0", "library": str(tmp_path / "lib%20one"), "model_sha256": SHA, "model_id": "tiny",
              "crop_mode": "five"}  # a pointer from before file: URIs were unescaped
    assert audit.plan_run(job, FIVE, legacy, STATE_SCHEMA.empty_table()).previous_run_id == "r0"


def test_a_continued_run_lists_the_library_again(tmp_path: Path) -> None:
    job, previous = planning(tmp_path, ("five", "five", "five"))
    lib = Path(job.library)
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    (lib / "p0.jpg").unlink()  # between the failed attempt and the next night
    write_bytes(str(lib / "p1.jpg"), b"replaced, longer")
    write_bytes(str(lib / "p9.jpg"), b"new")
    again = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert again.resumed and (again.run_id, again.started_at) == (first.run_id, first.started_at)
    actions = dict(zip(again.listing["uri"].to_pylist(), again.listing["action"].to_pylist()))
    assert actions == {str(lib / "p1.jpg"): "changed", str(lib / "p2.jpg"): "unchanged", str(lib / "p9.jpg"): "new"}
    on_disk = audit_state.read_parquet(join(job.state, "runs", first.run_id, "plan.parquet"), None, PLAN_SCHEMA)
    assert on_disk.equals(again.listing)


def test_a_continued_run_stamps_deletions_with_its_own_start(tmp_path: Path) -> None:
    """A run continued days after its first attempt stamped deleted_at with that attempt's start: its
    deleted rows were dropped days before --keep-deleted-days had passed."""
    job, previous = planning(tmp_path, ("five", "five"))
    first = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    marker = read_json(join(job.state, audit_state.IN_PROGRESS))
    outage = datetime.fromisoformat(marker["started_at"]) - timedelta(days=3)
    audit_state.write_json(join(job.state, audit_state.IN_PROGRESS), {**marker, "started_at": outage.isoformat()}, None)
    (Path(job.library) / "p0.jpg").unlink()
    before = datetime.now(timezone.utc)
    again = audit.plan_run(job, FIVE, pointer(job, "five"), previous)
    assert again.resumed and (again.run_id, again.started_at) == (first.run_id, outage)
    state, counts = audit.merge_state(again, previous, SCORE_SCHEMA.empty_table(), 30.0)
    assert counts["deleted"] == 1 and [r["deleted_at"] >= before for r in state.to_pylist() if r["deleted"]] == [True]


def test_a_library_that_is_a_file_or_leads_nowhere_is_refused(tmp_path: Path) -> None:
    """A library named through a link to an unmounted volume listed as one row, and the audit would
    have taken every photo of the previous state for deleted."""
    write_bytes(str(tmp_path / "lib" / "p.jpg"), b"x")
    (tmp_path / "gone").symlink_to(tmp_path / "unmounted")
    state = str(tmp_path / "state")
    with pytest.raises(audit.AuditRefused, match=r"p.jpg is a file, not a folder or prefix"):
        audit.plan_run(AuditJob(library=str(tmp_path / "lib" / "p.jpg"), state=state, model=TINY), FIVE, None,
                       STATE_SCHEMA.empty_table())
    with pytest.raises(FileNotFoundError):
        audit.plan_run(AuditJob(library=str(tmp_path / "gone"), state=state, model=TINY), FIVE, None,
                       STATE_SCHEMA.empty_table())
