"""The benchmark scripts run (dry-run on CPU) and print their tables; figures are not asserted."""

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
                  "SRCC", "end-to-end five-crop", "official-style loop", "gpu_check: done"):
        assert stage in out.stdout, stage
    assert "FAILED" not in out.stdout, out.stdout
