"""The benchmark scripts run (dry-run on CPU) and print their tables; figures are not asserted."""

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_script_dry_run_prints_every_stage_and_keeps_its_log(tmp_path):
    from piqa_core.checkpoints import build_bundle, save_checkpoint

    save_checkpoint(build_bundle("tiny", seed=3), tmp_path / "model")  # a model directory, as --weights takes
    (tmp_path / "out").mkdir()
    env = {**os.environ, "OUT": str(tmp_path / "out"), "PIQA_WHEELS": str(tmp_path / "no-wheels"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}  # the script runs python3
    out = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--images", "4", "--weights",
                          str(tmp_path / "model")], cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "== GPU tests" in out.stdout and "== gpu_check.sh exit 0" in out.stdout
    assert (tmp_path / "out" / "gpu_check.log").read_text() == out.stdout + out.stderr  # all of it, in order
    assert f"model: weights {tmp_path / 'model'}, tiny, sha256 {build_bundle('tiny', seed=3).sha256[:12]}" in out.stdout
    assert "Agreement with the fp32 reference over 6 graded photos" in out.stdout
    assert "the target (SRCC >= 0.999" in out.stdout, out.stdout  # real weights get a verdict
    for stage in ("decode (PIL", "RetinaFace fp32", "RetinaFace network alone", "model five-crop fp32",
                  "of which LIQE fp32", "model center-crop bf16", "SRCC", "Parquet write",
                  "1 prep process(es) loaded and warmed up", "five: 1 prep process(es) + actor",
                  "five: cpu prep in actor, 1 call(s)", "center: cpu prep in actor", "center-crop / best five-crop",
                  "JPEG decode on cpu alone", "official-style loop",
                  "gpu_check: done"):
        assert stage in out.stdout, stage
    # Prep processes get 3 batches each past the warm-up: 4 photos make one batch, streamed 3 times.
    assert re.search(r"five: 1 prep process\(es\) \+ actor .*\(12/12 scored", out.stdout), out.stdout
    assert "FAILED" not in out.stdout, out.stdout
    # PrepActor(threads=1) must not leave the script's later CPU timings on one torch thread.
    threads = re.findall(r"torch threads (\d+)", out.stdout)
    assert len(threads) == 2 and threads[0] == threads[1], threads


def test_a_failed_stage_is_printed_counted_and_the_check_goes_on(capsys, monkeypatch):
    from benchmarks import gpu_check_tools as tools

    monkeypatch.setattr(tools, "FAILED", [])
    ran = []
    tools.attempt("broken stage", lambda: 1 / 0)
    tools.attempt("next stage", lambda: ran.append(1))
    assert tools.FAILED == ["broken stage"] and ran == [1]
    assert "broken stage" in capsys.readouterr().out.split("FAILED: ZeroDivisionError")[0]


def test_a_prep_process_that_cannot_start_fails_the_row_at_once(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    from benchmarks.gpu_check_e2e import prep_processes
    from benchmarks.photos import synthetic_jpegs
    from ray_jobs.options import ModelOptions
    from ray_jobs.storage import S3Options

    model = ModelOptions(weights=str(tmp_path / "no-model"), random_weights=False, preset="tiny", crop_mode="five",
                         precision="bf16", device=None, batch_size=4)
    with ThreadPoolExecutor(1) as pool:  # bounded: a check that waits out its timeout burns device time
        row = pool.submit(prep_processes, 1, model, S3Options(), "cpu", synthetic_jpegs(2, 320, 240), 4, None)
        with pytest.raises(RuntimeError, match=r"a prep process failed to start: .*no-model"):
            row.result(timeout=120)


def test_waiting_for_prep_processes_stops_at_once_when_one_died():
    import queue
    from concurrent.futures import Future
    from concurrent.futures.process import BrokenProcessPool

    from benchmarks.gpu_check_e2e import wait_ready

    ready, died = queue.Queue(), Future()
    ready.put(None)  # one process started; the other was killed before it could say anything
    died.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match="a prep process died while starting: BrokenProcessPool"):
        wait_ready(ready, 2, [died], limit_s=60)
    assert time.monotonic() - t0 < 10
    with pytest.raises(RuntimeError, match="1 of 1 prep processes not ready after 0 s"):
        wait_ready(queue.Queue(), 1, [], limit_s=0.1)


def test_synthetic_photos_are_distinct_and_reproducible():
    import io

    import numpy as np
    from PIL import Image

    from benchmarks.photos import synthetic_jpegs

    photos = synthetic_jpegs(21, 320, 240, workers=2)
    assert len(set(photos)) == 21 and all(Image.open(io.BytesIO(p)).size == (320, 240) for p in photos)
    # 0 and 20 share JPEG quality 90: they differ by their seeds (offset, colour), not by quality only.
    a, b = (np.asarray(Image.open(io.BytesIO(photos[i])), dtype=np.int16) for i in (0, 20))
    assert np.abs(a - b).mean() > 1.0
    assert synthetic_jpegs(3, 320, 240) == photos[:3]  # reproducible, whatever the count


def test_agreement_judges_the_target_only_with_real_weights():
    import numpy as np

    from benchmarks.gpu_check import agreement

    ref = np.linspace(1.0, 5.0, 10)
    close = ref + np.where(np.arange(10) % 2, 0.004, -0.004)  # same order, 0.004 off
    swapped = ref.copy()
    swapped[[3, 4]] = swapped[[4, 3]]  # one rank swap: SRCC 0.9879
    lines = agreement({"fp32": ref, "bf16": close, "bf16 + compile": swapped}, judged=True)
    assert lines[0] == "fp32 score spread (max - min) 4.0000"
    assert "SRCC 1.00000" in lines[1] and "max|Δ| 0.00400" in lines[1] and "meets the target" in lines[1]
    assert "SRCC 0.98788" in lines[2] and "misses the target" in lines[2]
    far = agreement({"fp32": ref, "bf16": ref + 0.03}, judged=True)[1]
    assert "SRCC 1.00000" in far and "misses the target" in far  # in order, but 0.03 JOD off
    unjudged = agreement({"fp32": ref, "bf16": close}, judged=False)[1]
    assert "no verdict" in unjudged and "target" not in unjudged and "0.00 of the spread" in unjudged


def test_graded_photos_degrade_their_scenes():
    import io

    import numpy as np
    from PIL import Image

    from benchmarks.photos import LADDER, SCENES, graded_jpegs

    def sharpness(data: bytes) -> float:
        grey = np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32)
        return float(np.abs(np.diff(grey, axis=1)).mean())

    k = len(SCENES)
    photos = graded_jpegs(k * len(LADDER), 320, 240)
    assert len(set(photos)) == len(photos)
    assert all(Image.open(io.BytesIO(p)).size == (320, 240) for p in photos)
    level = {step: i for i, step in enumerate(LADDER)}
    for scene in range(k):
        at = lambda step: photos[level[step] * k + scene]  # noqa: E731
        pristine = at(("pristine", 0))
        assert sharpness(at(("blur", 4))) < sharpness(at(("blur", 1.5))) < sharpness(pristine)
        assert sharpness(at(("noise", 25))) > sharpness(pristine)
        assert len(at(("jpeg", 8))) < len(at(("jpeg", 30))) < len(pristine)
        dark = np.asarray(Image.open(io.BytesIO(at(("dark", 0.2))))).mean()
        assert dark < 0.3 * np.asarray(Image.open(io.BytesIO(pristine))).mean()


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
    out = subprocess.run([sys.executable, "benchmarks/bench_pipeline.py", "--images", "12", "--num-cpus", "2",
                          "--batch-size", "2"],
                         cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "efficiency: end-to-end" in out.stdout and "steady state" in out.stdout, out.stdout
    assert "model only again, after the Ray run" in out.stdout, out.stdout
    if sys.platform.startswith("linux"):
        assert "CPU during the Ray run: ScoreActor" in out.stdout, out.stdout


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")
def test_proc_snapshot_counts_this_process_cpu():
    from benchmarks.proc_cpu import snapshot

    me = os.getpid()
    before = snapshot()[me][1]
    start = time.process_time()
    while time.process_time() - start < 0.3:
        pass
    assert snapshot()[me][1] - before >= 0.25


def test_watch_keeps_every_title_a_process_had(monkeypatch):
    from benchmarks import proc_cpu

    snaps = [
        {1: ("raylet", 5.0), 2: ("ray::IDLE", 1.0)},
        {1: ("raylet", 5.5), 2: ("ray::MapWorker(MapBatches(ScoreActor))", 9.0), 3: ("driver", 0.2)},
        {1: ("raylet", 6.0), 2: ("ray::MapWorker(", 20.0), 3: ("driver", 0.5), 4: ("kworker", 0.0)},
    ]
    monkeypatch.setattr(proc_cpu, "snapshot", lambda: snaps.pop(0) if len(snaps) > 1 else snaps[0])
    watch = proc_cpu.Watch(interval=0.01)
    while len(snaps) > 1:  # the watcher has taken the middle snapshot: the one where pid 2 had its stage name
        time.sleep(0.01)
    assert watch.used() == [(19.0, "ray::IDLE | ray::MapWorker(MapBatches(ScoreActor)) | ray::MapWorker("),
                            (1.0, "raylet"), (0.5, "driver")]


def test_steady_rate_skips_the_first_group_of_concurrent_batches():
    from datetime import datetime, timedelta

    from benchmarks.bench_pipeline import steady_rate

    t = lambda sec: datetime(2026, 1, 1) + timedelta(seconds=sec)  # noqa: E731
    # two calls, batches of 2 rows finishing in pairs every 10 s: 4 rows per 10 s
    stamps = [x for sec in (10, 10.5, 20, 20.5, 30, 30.5) for x in [t(sec)] * 2]
    assert steady_rate(stamps, calls=2) == pytest.approx(8 / 20)
    assert steady_rate(stamps[:4], calls=1) == pytest.approx(2 / 0.5)  # one call: skips one batch only
    with pytest.raises(ValueError, match="too few"):
        steady_rate(stamps[:4], calls=2)


@pytest.mark.slow
@pytest.mark.ray
def test_ray_tax_benchmark_attributes_cpu_to_processes():
    out = subprocess.run([sys.executable, "benchmarks/bench_ray_tax.py", "--seconds", "3", "--batch-seconds", "1",
                          "--prep-share", "0.05"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "all processes:" in out.stdout and "with preparation at 5.0% of the model" in out.stdout, out.stdout
    if sys.platform.startswith("linux"):
        assert "bench_ray_tax.py" in out.stdout, out.stdout  # the driver is among the processes listed
