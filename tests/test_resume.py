"""What `--resume` counts as done, and what it does with output files it cannot read (no Ray needed)."""

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

import ray
from ray_jobs.resume import already_scored, is_done, read_rows
from ray_jobs.schema import SCORE_SCHEMA
from ray_jobs.score import ray_session
from ray_jobs.storage import ObjectInfo


def _rows(uris: list[str], sha: str, crop: str, etag: str = "e1", size: int | None = 10) -> pa.Table:
    n = len(uris)
    cols = {f.name: pa.nulls(n, f.type) for f in SCORE_SCHEMA}
    cols.update(uri=pa.array(uris), model_sha256=pa.array([sha] * n), crop_mode=pa.array([crop] * n),
                status=pa.array(["ok"] * n), etag_or_mtime=pa.array([etag] * n),
                bytes=pa.array([size] * n, pa.int64()))
    return pa.table(cols, schema=SCORE_SCHEMA)


def _write(path: Path, table: pa.Table) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)


def test_a_row_counts_only_for_the_same_object_version_model_and_crop_mode(tmp_path: Path) -> None:
    part = tmp_path / "out" / "run_date=2026-01-02"
    _write(part / "part-r1-u_000000.parquet", _rows(["a", "b"], "sha1", "five"))
    _write(part / "part-r2-u_000000.parquet", _rows(["c"], "sha1", "center"))
    _write(part / "part-r3-u_000000.parquet", _rows(["d"], "sha2", "five"))
    out = str(tmp_path / "out")
    _write(part / "part-r4-u_000000.parquet", _rows(["a"], "sha1", "five", etag="e2"))  # "a" replaced, rescored
    assert already_scored(out, "sha1", "five") == {("a", "e1", 10), ("b", "e1", 10), ("a", "e2", 10)}
    assert already_scored(out, "sha1", "center") == {("c", "e1", 10)}  # the other protocol's scores are not these
    assert already_scored(out, "sha2", "five") == {("d", "e1", 10)}
    assert already_scored(str(tmp_path / "nothing-yet"), "sha1", "five") == set()


def test_a_photo_rewritten_with_its_mtime_kept_is_not_done(tmp_path: Path) -> None:
    """The key ignored the size, which the audit's change check compares: a photo rewritten between two
    attempts with its mtime kept (a copy with -p, an editor that restores it) reused the stale row."""
    part = tmp_path / "out" / "run_date=2026-01-02"
    _write(part / "part-r1-u_000000.parquet", _rows(["a"], "sha1", "five", etag="m1", size=10))
    _write(part / "part-r2-u_000000.parquet", _rows(["gone"], "sha1", "five", etag="", size=-1))  # not stat'ed
    _write(part / "part-r3-u_000000.parquet", _rows(["old"], "sha1", "five", etag="m1", size=None))  # no size kept
    done = already_scored(str(tmp_path / "out"), "sha1", "five")
    assert is_done(done, ObjectInfo("a", 10, "m1")) and not is_done(done, ObjectInfo("a", 12, "m1"))
    assert is_done(done, ObjectInfo("gone", -1, "")) and not is_done(done, ObjectInfo("gone", 0, ""))
    assert is_done(done, ObjectInfo("old", 12, "m1")) and not is_done(done, ObjectInfo("old", 12, "m2"))


def test_rows_with_an_error_code_to_retry_are_not_done(tmp_path: Path) -> None:
    rows = _rows(["a", "b", "c"], "sha1", "five")
    rows = rows.set_column(rows.schema.get_field_index("error_code"), "error_code",
                           pa.array([None, "read_failed", "not_an_image"]))
    _write(tmp_path / "out" / "part-r1-u_000000.parquet", rows)
    out = str(tmp_path / "out")
    assert already_scored(out, "sha1", "five") == {("a", "e1", 10), ("b", "e1", 10),  # `piqa score --resume`
                                                  ("c", "e1", 10)}
    assert already_scored(out, "sha1", "five", retry=frozenset({"read_failed"})) == {("a", "e1", 10),
                                                                                    ("c", "e1", 10)}


def test_a_file_cut_short_is_moved_aside_and_the_folder_reads_again(tmp_path: Path, capsys) -> None:
    part = tmp_path / "out" / "run_date=2026-01-02"
    _write(part / "part-r1-u_000000.parquet", _rows(["a", "b"], "sha1", "five"))
    sink = pa.BufferOutputStream()
    pq.write_table(_rows(["c", "d"], "sha1", "five"), sink)
    whole = sink.getvalue().to_pybytes()
    (part / "part-r2-u_000000.parquet").write_bytes(whole[: len(whole) // 2])  # a crash mid-write
    (part / "foreign.parquet").write_bytes(b"not parquet at all")  # not ours: left where it is
    _write(part / "notes.parquet", pa.table({"x": [1]}))  # readable, but not a score file

    with pytest.raises(pa.ArrowInvalid):
        ds.dataset(str(tmp_path / "out"), partitioning="hive").to_table()
    assert already_scored(str(tmp_path / "out"), "sha1", "five") == {("a", "e1", 10), ("b", "e1", 10)}
    err = capsys.readouterr().err
    assert "moved to" in err and "_unreadable-part-r2-u_000000.parquet" in err and "not a score file" in err

    assert (part / "_unreadable-part-r2-u_000000.parquet").read_bytes() == whole[: len(whole) // 2]
    assert not (part / "part-r2-u_000000.parquet").exists() and (part / "foreign.parquet").exists()
    (part / "foreign.parquet").unlink()
    (part / "notes.parquet").unlink()
    table = ds.dataset(str(tmp_path / "out"), partitioning="hive").to_table()  # "_" files are skipped
    assert sorted(table.column("uri").to_pylist()) == ["a", "b"]
    assert sorted(read_rows(str(tmp_path / "out")).column("uri").to_pylist()) == ["a", "b"]


class _Store:
    """A filesystem whose listing works but whose objects may not be read, as with s3:ListBucket
    granted and s3:GetObject not; ``gone`` objects vanished after the listing."""

    def __init__(self, fs, gone: str = "") -> None:
        self.fs, self.gone = fs, gone

    def __getattr__(self, name: str):
        return getattr(self.fs, name)

    def open_input_file(self, path: str):
        if self.gone and path.endswith(self.gone):
            raise FileNotFoundError(2, "No such file", path)
        raise OSError("When reading information for key 'part-r1.parquet': AWS Error ACCESS_DENIED during "
                      "HeadObject operation: No response body.")


def test_an_output_file_that_may_not_be_read_stops_resume_instead_of_scoring_twice(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    from ray_jobs import resume

    part = tmp_path / "out" / "run_date=2026-01-02"
    _write(part / "part-r1-u_000000.parquet", _rows(["a", "b"], "sha1", "five"))
    out, real = str(tmp_path / "out"), resume.resolve
    monkeypatch.setattr(resume, "resolve", lambda uri, s3=None: (_Store(real(uri, s3)[0]), real(uri, s3)[1]))
    for read in (lambda: already_scored(out, "sha1", "five"), lambda: read_rows(out, run_id="r1")):
        with pytest.raises(resume.OutputUnreadable, match=r"cannot read .*part-r1-u_000000.parquet .*ACCESS_DENIED"
                                                          r".*s3:GetObject on the output prefix"):
            read()
    assert (part / "part-r1-u_000000.parquet").exists()  # nothing moved aside
    monkeypatch.setattr(resume, "resolve", lambda uri, s3=None: (_Store(real(uri, s3)[0], "part-r1-u_000000.parquet"),
                                                                 real(uri, s3)[1]))
    assert already_scored(out, "sha1", "five") == set() and read_rows(out).num_rows == 0  # vanished: not ours to stop


class _BrokenRead(io.RawIOBase):
    """An object that opened, but whose GET fails part-way (a connection reset after the store's retries)."""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return 0

    def readinto(self, b) -> int:
        raise OSError("AWS Error NETWORK_CONNECTION during GetObject operation: connection reset")


class _ResetStore(_Store):
    def open_input_file(self, path: str):
        return pa.PythonFile(_BrokenRead(), mode="r")


def test_an_output_file_whose_read_breaks_stops_resume_but_damaged_content_is_scored_again(tmp_path: Path,
                                                                                          monkeypatch) -> None:
    from ray_jobs import resume

    part = tmp_path / "out" / "run_date=2026-01-02"
    _write(part / "part-r1-u_000000.parquet", _rows(["a", "b"], "sha1", "five"))
    out, real = str(tmp_path / "out"), resume.resolve
    with monkeypatch.context() as m:
        m.setattr(resume, "resolve", lambda uri, s3=None: (_ResetStore(real(uri, s3)[0]), real(uri, s3)[1]))
        for read in (lambda: already_scored(out, "sha1", "five"), lambda: read_rows(out, run_id="r1")):
            with pytest.raises(resume.OutputUnreadable, match="NETWORK_CONNECTION"):
                read()
    assert already_scored(out, "sha1", "five") == {("a", "e1", 10), ("b", "e1", 10)}  # nothing moved aside or dropped
    blob = bytearray((part / "part-r1-u_000000.parquet").read_bytes())
    pq_data = pq.ParquetFile(part / "part-r1-u_000000.parquet").metadata.row_group(0).column(0)
    start = pq_data.data_page_offset
    blob[start + 8:start + 40] = b"\xff" * 32  # the uri column's page, not the footer: content damage
    (part / "part-r1-u_000000.parquet").write_bytes(bytes(blob))
    assert already_scored(out, "sha1", "five") == set() and read_rows(out).num_rows == 0


def _damage_column(path: Path, column: str) -> None:
    """Overwrites the header of ``column``'s first page: the footer and every other column still read."""
    meta = pq.ParquetFile(path).metadata.row_group(0).column(SCORE_SCHEMA.names.index(column))
    start = meta.dictionary_page_offset or meta.data_page_offset
    blob = bytearray(path.read_bytes())
    blob[start + 8:start + 40] = b"\xff" * 32
    path.write_bytes(bytes(blob))


def test_a_file_with_any_damaged_column_is_not_done_and_is_moved_aside(tmp_path: Path, capsys) -> None:
    """Resume read only its own columns: a file whose error_message page was damaged counted as done,
    while read_rows dropped it, so its inputs had no row for ever (the audit failed every night)."""
    part = tmp_path / "out" / "run_date=2026-01-02"
    rows = _rows(["a", "b"], "sha1", "five")
    rows = rows.set_column(rows.schema.get_field_index("error_message"), "error_message",
                           pa.array(["a message long enough to fill a page"] * 2))
    _write(part / "part-r1-u_000000.parquet", rows)
    _write(part / "part-r2-u_000000.parquet", _rows(["c"], "sha1", "five"))
    _damage_column(part / "part-r1-u_000000.parquet", "error_message")
    out = str(tmp_path / "out")
    assert pq.read_table(part / "part-r1-u_000000.parquet", columns=["uri", "etag_or_mtime"]).num_rows == 2
    assert already_scored(out, "sha1", "five") == {("c", "e1", 10)}
    assert "moved to" in capsys.readouterr().err and (part / "_unreadable-part-r1-u_000000.parquet").exists()
    assert read_rows(out).column("uri").to_pylist() == ["c"]


def test_ray_session_shuts_down_only_the_ray_it_started(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    state = {"up": False}
    monkeypatch.setattr(ray, "is_initialized", lambda: state["up"])
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(f"init {kw['address']}") or state.update(up=True))
    monkeypatch.setattr(ray, "shutdown", lambda: calls.append("shutdown") or state.update(up=False))
    with pytest.raises(RuntimeError):
        with ray_session("ray://head:10001"):
            raise RuntimeError("the job failed")
    assert calls == ["init ray://head:10001", "shutdown"]  # also when the job fails

    calls.clear()
    state["up"] = True  # connected by the caller (tests, the audit): left as it was
    with ray_session(None):
        pass
    assert calls == [] and state["up"]
