"""The benchmark scripts run (dry-run on CPU) and print their tables; figures are not asserted."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_dry_run_prints_every_stage():
    out = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--dry-run", "--images", "4"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("decode (PIL", "RetinaFace fp32", "model five-crop fp32", "model center-crop bf16",
                  "SRCC", "prep threads + score actor", "prep in score actor, 2 call(s)", "official-style loop",
                  "gpu_check: done"):
        assert stage in out.stdout, stage
    assert "FAILED" not in out.stdout, out.stdout


@pytest.mark.slow
def test_cpu_stage_table_runs():
    out = subprocess.run([sys.executable, "benchmarks/bench_cpu_stages.py", "--preset", "tiny", "--size", "640x480",
                          "--images", "2"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    for stage in ("decode (PIL", "face detection", "LIQE patches", "Parquet write", "model forward",
                  "everything beyond the model", "of model-only", "official-style loop"):
        assert stage in out.stdout, stage


@pytest.mark.slow
@pytest.mark.ray
def test_pipeline_benchmark_runs():
    out = subprocess.run([sys.executable, "benchmarks/bench_pipeline.py", "--images", "12", "--num-cpus", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "efficiency: end-to-end" in out.stdout and "steady state" in out.stdout, out.stdout
