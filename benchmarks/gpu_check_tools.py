"""Helpers of the GPU check: timing, printing a row, running a stage without losing the rest, and
setting up torch the way a Ray actor or a given precision would."""

from __future__ import annotations

import contextlib
import time

import numpy as np
import torch

from piqa_core.stages import use_tf32


def timed(fn, repeat: int = 1, sync: bool = False) -> float:
    """Seconds per call (after one warm-up call)."""
    fn()
    if sync:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeat):
        fn()
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / repeat


START = time.perf_counter()


FAILED: list[str] = []  # the stages that failed, for the exit status
PEAK = [0]  # bytes: the largest per-row peak, what the whole check needed at most


def row(stage: str, per_s: float, note: str = "") -> None:
    """One figure, stamped with the seconds since the check began (device time is budgeted); on a GPU
    with the peak memory allocated since the previous row, so each stage shows its own."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        peak = torch.cuda.max_memory_allocated()
        PEAK[0] = max(PEAK[0], peak)
        note += f"  peak {peak / 2**30:.1f} GiB"
        torch.cuda.reset_peak_memory_stats()
    print(f"  {stage:<44} {per_s:>10.1f} /s  {note}  [t+{time.perf_counter() - START:.0f} s]", flush=True)


def attempt(stage: str, fn) -> None:
    """Run one measurement; a failure is printed and counted, and the check goes on (device time is
    scarce)."""
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        FAILED.append(stage)
        print(f"  {stage:<44} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200]}", flush=True)


@contextlib.contextmanager
def ieee_fp32():
    """fp32 rows as ``--precision fp32`` runs them (IEEE matmuls and convolutions: torch's default and
    an earlier bf16 Predictor leave cuDNN's TF32 on), the flags restored afterwards."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    use_tf32("fp32")
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


def keeping_torch_threads(make):
    """``make()``, then this thread's torch thread count as it was: ``PrepActor(threads=1)`` sets one
    (right for a Ray actor's own process, wrong for the later CPU timings of this script)."""
    threads = torch.get_num_threads()
    try:
        return make()
    finally:
        torch.set_num_threads(threads)


def replicate(cols: dict, n: int) -> dict:
    idx = np.arange(n) % len(cols["status"])
    return {k: v[idx] for k, v in cols.items()}


def read_stage_batch(photos: list[bytes], start: int = 0) -> dict[str, np.ndarray]:
    """The columns Ray Data's read stage hands the actors, for in-memory photos."""
    from ray_jobs.reader import read_columns

    ids = {"uri": np.array([f"mem://{start + i}.jpg" for i in range(len(photos))], dtype=object),
           "etag_or_mtime": np.full(len(photos), "", dtype=object), "bytes": np.array([len(p) for p in photos])}
    return read_columns(ids, photos)
