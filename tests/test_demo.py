"""`make demo`: sample photos scored on an embedded local Ray (tiny preset, random weights)."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

from ray_jobs import demo


@pytest.mark.ray
def test_demo_scores_the_samples_on_its_own_local_ray(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # a user's cluster address: the demo must not follow it
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp_dir, seen, real_init = tempfile.mkdtemp(prefix="ray", dir="/tmp"), {}, ray.init

    def init(**kw):
        seen.update(kw)
        return real_init(**kw, _temp_dir=temp_dir)

    monkeypatch.setattr(ray, "init", init)
    try:
        result = CliRunner().invoke(demo.main, ["--out", str(tmp_path / "demo"), "--num-cpus", "2"])
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert result.exit_code == 0, result.output
    assert seen["address"] == "local"
    samples = len(demo.SAMPLES) + 5  # blurred, dark and q5 portraits, two broken files
    assert f"{samples} rows ({samples - 2} ok)" in result.output
    assert "truncated" in result.output and "random weights" in result.output
    assert list((tmp_path / "demo" / "scores").glob("run_date=*/part-*.parquet"))
