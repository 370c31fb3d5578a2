import subprocess
import sys

import numpy as np

from ray_jobs.reader import read_objects
from ray_jobs.storage import list_inputs


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
