import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from piqa_core.errors import ImageError
from ray_jobs import reader
from ray_jobs.reader import read_objects
from ray_jobs.inputs import list_inputs
from ray_jobs.listing import NAME_NOT_UTF8, ListingError
from ray_jobs.storage import ObjectInfo, write_bytes


def _batch(objects):
    return {"uri": np.array([o.uri for o in objects], dtype=object),
            "bytes": np.array([o.size for o in objects]),
            "etag_or_mtime": np.array([o.etag_or_mtime for o in objects], dtype=object)}


def test_read_errors_become_codes_not_exceptions(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"x" * 10)
    (tmp_path / "big.jpg").write_bytes(b"x" * 100)
    (tmp_path / "gone.jpg").write_bytes(b"x")
    objects = list_inputs([str(tmp_path)])
    (tmp_path / "gone.jpg").unlink()  # deleted between listing and reading
    out = read_objects(_batch(objects), s3=None, max_bytes=50)
    got = {u.rsplit("/", 1)[-1]: (c, d) for u, c, d in zip(out["uri"], out["read_error_code"], out["data"])}
    assert got["a.jpg"] == ("", b"x" * 10)
    assert got["big.jpg"][0] == "too_large" and got["big.jpg"][1] == b""
    assert got["gone.jpg"][0] == "not_found"
    assert "50" in out["read_error_message"][[u.endswith("big.jpg") for u in out["uri"]].index(True)]


def test_read_and_write_stage_modules_do_not_import_torch():
    # Ray runs them in short-lived task workers: importing torch there costs seconds of CPU each.
    code = "import sys, ray_jobs.reader, ray_jobs.resume, ray_jobs.options; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_reads_run_side_by_side_and_keep_their_order(tmp_path, monkeypatch):
    for i in range(12):
        (tmp_path / f"{i:02d}.jpg").write_bytes(bytes([i]) * (i + 1))
    (tmp_path / "12.jpg").write_bytes(b"x" * 100)  # too large: its row gets the code, the others their bytes
    objects = list_inputs([str(tmp_path)])
    real_fetch, lock, state = reader.fetch, threading.Lock(), {"now": 0, "most": 0}

    def slow_fetch(info, s3, max_bytes):  # an object store's latency
        with lock:
            state["now"] += 1
            state["most"] = max(state["most"], state["now"])
        time.sleep(0.2)
        with lock:
            state["now"] -= 1
        return real_fetch(info, s3, max_bytes)

    monkeypatch.setattr(reader, "fetch", slow_fetch)
    t0 = time.perf_counter()
    out = read_objects(_batch(objects), s3=None, max_bytes=50)
    assert time.perf_counter() - t0 < 1.0  # 13 reads of 0.2 s each, one after another, take 2.6 s
    assert state["most"] == 13
    assert [bytes(d) for d in out["data"][:12]] == [bytes([i]) * (i + 1) for i in range(12)]
    assert list(out["read_error_code"]) == [""] * 12 + ["too_large"] and out["data"][12] == b""
    state["most"] = 0
    assert reader.fetch_all(objects[:3], None, 50, threads=1)[2] == bytes([2]) * 3 and state["most"] == 1


def test_a_non_utf8_file_name_becomes_an_error_row_not_another_file(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    fd = os.open(os.path.join(os.fsencode(str(tmp_path)), b"bad\xff.jpg"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, b"bad")
    os.close(fd)
    out = read_objects(_batch(list_inputs([str(tmp_path)])), s3=None, max_bytes=50)
    assert [u.rsplit("/", 1)[-1] for u in out["uri"]] == ["bad\\xff.jpg", "ok.jpg"]
    assert list(out["read_error_code"]) == ["invalid_name", ""] and list(out["data"]) == [b"", b"ok"]
    assert "not valid UTF-8" in out["read_error_message"][0]
    (tmp_path / "bad\\xff.jpg").write_bytes(b"wrong file")  # the printable name is not its path
    got = reader.fetch(ObjectInfo(str(tmp_path / "bad\\xff.jpg"), -1, NAME_NOT_UTF8), None, 50)
    assert isinstance(got, ImageError) and got.code == "invalid_name"


def test_fetch_turns_filesystem_value_errors_into_read_errors(tmp_path):
    for uri in ("htps://example.com/x.jpg", str(tmp_path / "x\udcff.jpg")):
        got = reader.fetch(ObjectInfo(uri, 10, "1"), None, 50)
        assert isinstance(got, ImageError) and got.code == "read_failed", uri
    assert "htps" in reader.fetch(ObjectInfo("htps://example.com/x.jpg", -1, ""), None, 50).message


def test_not_found_messages_tell_listing_from_reading(tmp_path):
    gone = str(tmp_path / "gone.jpg")
    at_listing, after = (reader.fetch(ObjectInfo(gone, size, ""), None, 50) for size in (-1, 5))
    assert (at_listing.code, after.code) == ("not_found", "not_found")
    assert at_listing.message == f"{gone} was not found when listed"
    assert "deleted after listing" in after.message


def test_a_read_that_may_pass_is_tried_again_before_its_row_says_read_failed(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"abc")
    info = list_inputs([str(tmp_path / "a.jpg")])[0]
    pauses: list[float] = []
    monkeypatch.setattr(reader.time, "sleep", pauses.append)
    calls = {"n": 0}
    real = reader.read_bytes

    def flaky(fails: int, error: OSError):
        def read(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] <= fails:
                raise error
            return real(*args, **kwargs)
        return read

    reset = ConnectionResetError(104, "Connection reset by peer")
    monkeypatch.setattr(reader, "read_bytes", flaky(2, reset))  # fails twice, then reads
    assert reader.fetch(info, None, 100) == b"abc" and calls["n"] == 3 and pauses == list(reader.RETRY_PAUSES_S)

    calls["n"], pauses[:] = 0, []
    monkeypatch.setattr(reader, "read_bytes", flaky(99, OSError("AWS Error SLOW_DOWN during GetObject")))
    got = reader.fetch(info, None, 100)
    assert isinstance(got, ImageError) and got.code == "read_failed" and "SLOW_DOWN" in got.message
    assert "(3 attempts)" in got.message and calls["n"] == 3

    for final in (PermissionError(13, "AccessDenied"), FileNotFoundError(2, "gone")):  # a retry changes nothing
        calls["n"], pauses[:] = 0, []
        monkeypatch.setattr(reader, "read_bytes", flaky(99, final))
        got = reader.fetch(info, None, 100)
        assert got.code in ("read_failed", "not_found") and calls["n"] == 1 and pauses == []


def test_a_manifest_entry_that_is_a_directory_fails_at_once(tmp_path, monkeypatch):
    (tmp_path / "album.jpg").mkdir()
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    (tmp_path / "list.txt").write_text("album.jpg\nok.jpg\n")
    objects = list_inputs([str(tmp_path / "list.txt")], manifest=True)
    pauses: list[float] = []
    monkeypatch.setattr(reader.time, "sleep", pauses.append)
    t0 = time.perf_counter()
    out = read_objects(_batch(objects), s3=None, max_bytes=50)
    assert time.perf_counter() - t0 < 0.5 and pauses == []
    assert list(out["read_error_code"]) == ["not_a_file", ""] and list(out["data"]) == [b"", b"ok"]
    assert out["read_error_message"][0] == f"{tmp_path / 'album.jpg'} is a directory, not a file"


def test_a_failed_directory_check_keeps_the_retries(tmp_path, monkeypatch):
    info = ObjectInfo(str(tmp_path / "a.jpg"), 3, "1")
    pauses: list[float] = []
    monkeypatch.setattr(reader.time, "sleep", pauses.append)

    def fails(message: str):
        def call(*args, **kwargs):
            raise OSError(message)
        return call

    monkeypatch.setattr(reader, "read_bytes", fails("Connection reset"))
    monkeypatch.setattr(reader, "is_dir", fails("AWS Error SLOW_DOWN"))
    got = reader.fetch(info, None, 100)
    assert got.code == "read_failed" and "(3 attempts)" in got.message and pauses == list(reader.RETRY_PAUSES_S)


def test_a_named_pipe_among_the_photos_is_an_error_row_not_a_job_that_never_ends(tmp_path):
    (tmp_path / "ok.jpg").write_bytes(b"ok")
    os.mkfifo(tmp_path / "pipe.jpg")  # opening it would wait for a writer for ever
    objects = list_inputs([str(tmp_path)])
    out: dict = {}
    t = threading.Thread(target=lambda: out.update(read_objects(_batch(objects), s3=None, max_bytes=50)),
                         daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "the read blocked on the FIFO"
    assert list(out["read_error_code"]) == ["", "not_a_file"] and list(out["data"]) == [b"ok", b""]
    assert out["read_error_message"][1] == f"{tmp_path / 'pipe.jpg'} is a named pipe (FIFO), not a regular file: " \
                                           "it is not read"


def test_fifos_are_rows_and_named_dangling_links_and_loops_stop_the_run(tmp_path, monkeypatch):
    """Named on the command line, a FIFO stopped the run as "not found"; in a folder, a link loop was
    read_failed after its retries, which the audit retries every night."""
    os.mkfifo(tmp_path / "pipe.jpg")
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.jpg")
    pauses: list[float] = []
    monkeypatch.setattr(reader.time, "sleep", pauses.append)
    out = read_objects(_batch(list_inputs([str(tmp_path)])), s3=None, max_bytes=50)
    # A dangling link was not_found, which the audit retries every night: alone on a quiet night, an
    # error rate of 1.0 and an alert, every night.
    assert list(out["read_error_code"]) == ["not_a_file", "not_a_file", "not_a_file"] and pauses == []
    assert out["read_error_message"][0] == f"{tmp_path / 'dangling.jpg'} is a symbolic link to a missing file " \
                                           f"({tmp_path / 'gone.jpg'}): it is not read"
    assert out["read_error_message"][1] == f"{tmp_path / 'loop.jpg'} is a symbolic link loop, not a regular " \
                                           "file: it is not read"
    named = read_objects(_batch(list_inputs([str(tmp_path / "pipe.jpg")])), s3=None, max_bytes=50)
    assert list(named["read_error_code"]) == ["not_a_file"]
    # A named path that leads nowhere stops the run: a typo, or a link to a volume not mounted (an audit
    # would otherwise take every photo of the library for deleted).
    with pytest.raises(FileNotFoundError):
        list_inputs([str(tmp_path / "nope.jpg")])
    with pytest.raises(FileNotFoundError):
        list_inputs([str(tmp_path / "dangling.jpg")])
    with pytest.raises(ListingError, match="leads back to itself"):
        list_inputs([str(tmp_path / "loop.jpg")])


def test_a_failing_http_store_is_a_read_failure_not_a_missing_file(monkeypatch):
    """fsspec stores other than S3 (gs://, az://, https://): pyarrow's wrapper of them reported any
    failure as a missing file, final and never retried."""
    import http.server

    class Store(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_HEAD(self):
            self.do_GET(body=False)

        def do_GET(self, body=True):
            code = 200 if "ok" in self.path else 404 if "gone" in self.path else 503
            self.send_response(code)
            self.send_header("Content-Length", "3" if code == 200 else "0")
            self.end_headers()
            if body and code == 200:
                self.wfile.write(b"abc")

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Store)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(reader, "RETRY_PAUSES_S", (0.0, 0.0))
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        got = {name: reader.fetch(ObjectInfo(f"{base}/{name}", 3, "e"), None, 100) for name in ("ok.jpg", "gone.jpg",
                                                                                                 "busy.jpg")}
        too_big = reader.fetch(ObjectInfo(f"{base}/ok.jpg", 3, "e"), None, 2)
    finally:
        server.shutdown()
    assert got["ok.jpg"] == b"abc" and got["gone.jpg"].code == "not_found"
    assert got["busy.jpg"].code == "read_failed" and "503" in got["busy.jpg"].message
    assert "(3 attempts)" in got["busy.jpg"].message and too_big.code == "too_large"


def test_a_manifest_entry_naming_an_s3_prefix_is_not_a_file(s3_server, s3_bucket):
    s3 = s3_server.options
    write_bytes(f"s3://{s3_bucket}/album/a.jpg", b"x", s3)
    got = {name: reader.fetch(ObjectInfo(f"s3://{s3_bucket}/{name}", -1, ""), s3, 50) for name in ("album", "gone")}
    assert (got["album"].code, got["gone"].code) == ("not_a_file", "not_found")  # album was not_found
    assert got["album"].message == f"s3://{s3_bucket}/album is a prefix (folder) with objects under it, not an object"


def test_a_manifest_entry_with_a_nul_byte_is_an_invalid_name_row(tmp_path):
    (tmp_path / "m.txt").write_bytes(b"a\x00b.jpg\n")  # no file system has such a name: never a retry
    out = read_objects(_batch(list_inputs([str(tmp_path / "m.txt")], manifest=True)), s3=None, max_bytes=50)
    assert list(out["read_error_code"]) == ["invalid_name"]
    assert out["read_error_message"][0] == f"{str(tmp_path / 'a') + chr(0) + 'b.jpg'!r} holds a NUL byte, which no " \
                                           "file name can"
