"""End-to-end rows of the GPU check: the Ray stage classes (``PrepActor``, ``ScoreActor``) driven
directly, as Ray Data would drive them (no Ray on the lent GPU machines)."""

from __future__ import annotations

import dataclasses
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import numpy as np
import torch

from benchmarks.gpu_check_tools import attempt, keeping_torch_threads, read_stage_batch, row, timed

PREP_BATCH = 8  # the score job's prep batch on GPU jobs: min(batch size, 8)
_prep = None  # this pool process's PrepActor


def _start_prep(model, s3, face_device: str, warm: dict, ready) -> None:
    """Pool initializer: one prep actor per process, as Ray runs them, warmed up on one batch."""
    global _prep
    try:
        from ray_jobs.actors import PrepActor

        _prep = PrepActor(model, s3, face_device=face_device, threads=1)
        _prep(warm)
    except BaseException as e:  # the parent waits for every process: tell it at once, not at its timeout
        ready.put(f"{type(e).__name__}: {e}")
        raise
    ready.put(None)


def _run_prep(cols: dict) -> dict:
    return _prep(cols)


def wait_ready(ready, workers: int, starts: list, limit_s: float = 300.0) -> None:
    """Until every prep process has reported ready; raises at once when one reports a failure or the
    pool breaks (a process killed before it could report), rather than waiting out ``limit_s``."""
    import queue

    deadline, done = time.monotonic() + limit_s, 0
    while done < workers:
        try:
            failed = ready.get(timeout=1.0)
        except queue.Empty:
            if broken := next((f.exception() for f in starts if f.done() and f.exception()), None):
                raise RuntimeError(f"a prep process died while starting: {type(broken).__name__}: {broken}") from None
            if time.monotonic() > deadline:
                raise RuntimeError(f"{workers - done} of {workers} prep processes not ready after {limit_s:.0f} s")
            continue
        if failed is not None:
            raise RuntimeError(f"a prep process failed to start: {failed}")
        done += 1


def ok_count(table) -> int:
    return sum(s == "ok" for s in table.column("status").to_pylist())


def prep_processes(workers: int, model, s3, face_device: str, photos: list[bytes], batch: int, scorer) -> float:
    """Prep actors as processes (each on one torch thread) streaming batches of 8 photos to the score
    actor, which takes two calls at once; returns images/s. Enough batches that every process stays
    busy past the start; timed after every process has loaded its detector and prepared one batch."""
    chunks = [read_stage_batch(photos[i:i + PREP_BATCH], i) for i in range(0, len(photos), PREP_BATCH)]
    stream = chunks * -(-3 * workers // len(chunks))
    n = sum(len(c["uri"]) for c in stream)
    ctx = multiprocessing.get_context("spawn")  # CUDA cannot run in a forked child
    ready = ctx.Queue()
    t0 = time.perf_counter()
    with (ProcessPoolExecutor(workers, mp_context=ctx, initializer=_start_prep,
                              initargs=(model, s3, face_device, chunks[0], ready)) as pool,
          ThreadPoolExecutor(2) as calls):
        starts = [pool.submit(int) for _ in range(workers)]  # a process per submission: all start now
        wait_ready(ready, workers, starts)
        print(f"  {workers} prep process(es) loaded and warmed up in {time.perf_counter() - t0:.1f} s", flush=True)
        t0, moved, pending, scored = time.perf_counter(), 0, [], []
        prepared = [pool.submit(_run_prep, c) for c in stream]
        for f in prepared:
            cols = f.result()
            moved += sum(v.nbytes for v in cols.values() if isinstance(v, np.ndarray) and v.dtype != object)
            pending.append(cols)
            if sum(len(c["uri"]) for c in pending) >= batch or f is prepared[-1]:
                scored.append(calls.submit(scorer, {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}))
                pending = []
        done = sum(ok_count(f.result()) for f in scored)
        seconds = time.perf_counter() - t0
    rate = n / seconds
    row(f"end-to-end five: {workers} prep process(es) + actor", rate,
        f"({done}/{n} scored; {moved / seconds / 2**20:.0f} MiB/s of prepared columns piped back)")
    return rate


def end_to_end(args, base, photos: list[bytes], dev: torch.device, batch: int, detector, compiled=None) -> float:
    """The best five-crop end-to-end images/s of: prep processes feeding one score actor, and score
    actors that prepare on their device (what Ray Data runs on a GPU), serially and with two
    concurrent calls. ``compiled``: the model stage's compiled bf16 Predictor, which the score actor
    uses instead of compiling the same networks again (device time is budgeted)."""
    from piqa_core.checkpoints import save_checkpoint
    from piqa_core.gpu_prep import prepare_batch_on_device
    from piqa_core.stages import prepare_batch
    from ray_jobs.actors import ScoreActor, model_identity
    from ray_jobs.options import ModelOptions
    from ray_jobs.storage import S3Options

    gpu, n, s3, best = dev.type == "cuda", len(photos), S3Options(), 0.0
    cfg = base.config
    reads = [read_stage_batch(photos[i:i + batch], i) for i in range(0, n, batch)]
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(base, tmp)
        model = ModelOptions(weights=tmp, random_weights=False, preset=cfg.preset, crop_mode="five",
                             precision="bf16", device=None, batch_size=batch, compile=args.compile)
        identity = model_identity(model, s3)
        actors: dict = {}  # what loaded: a failed actor costs the rows that need it, not the rest

        def load_score() -> None:
            opts = dataclasses.replace(model, compile=model.compile and compiled is None)
            actors["score"] = ScoreActor(opts, s3, identity, device=dev.type, prepare_on_device=True,
                                         calls=2 if gpu else 1)
            if compiled is not None:
                actors["score"].predictor = compiled

        def actor():
            if "score" not in actors:
                raise RuntimeError("no score actor (its load failed above)")
            return actors["score"]

        print("End to end through the Ray stage classes (bf16"
              + (", the compiled predictor above" if compiled is not None else "") + "):", flush=True)
        t0 = time.perf_counter()
        attempt("score actor load", lambda: keeping_torch_threads(load_score))
        print(f"  score actor loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        attempt("score actor warm-up", lambda: actor()(reads[0]))  # and compile, unless reused

        def write() -> None:
            import pyarrow.parquet as pq

            table = actor()(reads[0])
            path = f"{tmp}/part.parquet"
            row("Parquet write (one file per score batch)", len(table) / timed(lambda: pq.write_table(table, path), 3))

        attempt("Parquet write", write)

        def two_stage() -> None:
            nonlocal best
            score = actor()
            score.prepare_on_device = False  # the plain score stage behind a prep pool, for this row
            try:
                best = max(best, keeping_torch_threads(lambda: prep_processes(
                    args.workers, model, s3, "gpu" if gpu else "cpu", photos, batch, score)))
            finally:
                score.prepare_on_device = True

        attempt("prep processes + score actor", two_stage)

        def on_device(calls: int, scorer=None, mode: str = "five") -> float:
            scorer = scorer or actor()
            rounds = 1 if args.dry_run else 3  # a 64-photo pass lasts well under a second on a GPU
            sync()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(calls) as pool:
                done = sum(ok_count(t) for t in pool.map(scorer, reads * rounds))
            sync()
            rate = rounds * n / (time.perf_counter() - t0)
            row(f"end-to-end {mode}: {dev.type} prep in actor, {calls} call(s)", rate, f"({done}/{rounds * n} scored)")
            return rate

        def five(calls: int) -> None:
            nonlocal best
            best = max(best, on_device(calls))

        attempt("device prep, serial", lambda: five(1))
        attempt("device prep, overlapped", lambda: five(2))

        def center() -> None:
            """Center-crop mode through its own actor (bf16, not compiled: preparation bounds it)."""
            opts = dataclasses.replace(model, crop_mode="center", compile=False)
            scorer = ScoreActor(opts, s3, model_identity(opts, s3), device=dev.type, prepare_on_device=True,
                                calls=2 if gpu else 1)
            scorer(reads[0])
            # One call is what the pipeline runs (score_calls); two show whether overlap pays here.
            rate = max(on_device(calls, scorer, "center") for calls in ((1, 2) if gpu else (1,)))
            print(f"  center-crop / best five-crop end to end: {rate / max(best, 1e-9):.1f}x", flush=True)

        attempt("center-crop end to end", center)

        def prep_alone() -> None:
            sync()
            t0 = time.perf_counter()
            for i in range(0, n, batch):
                prepare_batch_on_device(photos[i:i + batch], cfg, detector, dev, "five")
            sync()
            row(f"  of which preparation on {dev.type} alone", n / (time.perf_counter() - t0))
            from piqa_core.gpu_prep import _decode, decoder_broken

            decode = lambda: [_decode(photos[i:i + batch], dev) for i in range(0, n, batch)]  # noqa: E731
            per = timed(decode, 1, gpu)
            broken = decoder_broken(dev)
            row(f"  of which JPEG decode on {dev.type} alone", n / per,
                f"(decoder OFF, {broken}: every JPEG went to PIL)" if broken else "")
            predictor = actor().predictor
            a = predictor(prepare_batch(photos[:batch], cfg, detector, "five"))["score"]
            b = predictor(prepare_batch_on_device(photos[:batch], cfg, detector, dev, "five"))["score"]
            from scipy.stats import spearmanr

            print(f"  device prep vs PIL prep (bf16 model)          SRCC {spearmanr(a, b).statistic:.5f}  "
                  f"max|Δ| {np.abs(a - b).max():.5f}", flush=True)

        attempt("device prep alone", prep_alone)
    return best
