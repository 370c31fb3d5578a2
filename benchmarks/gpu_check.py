"""GPU check: verifies the GPU path and prints per-stage and end-to-end throughput (no Ray needed).

    python benchmarks/gpu_check.py                 # dn-piqa, random weights, synthetic 12 MP photos
    python benchmarks/gpu_check.py --compile       # also the torch.compile'd bf16 model
    python benchmarks/gpu_check.py --dry-run       # tiny preset, small photos, CPU: exercises every step
    python benchmarks/gpu_check.py --weights DIR   # real weights: the fp32-agreement target is judged

Per stage it times the shared prepare/score code; end to end it drives the Ray stage classes
(``PrepActor``, ``ScoreActor``) directly, as Ray would: prep work in a thread pool feeding a score
actor, and score actors that prepare on the GPU (nvJPEG), serially and with two concurrent calls.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_check_tools import (attempt, ieee_fp32, keeping_torch_threads, one_torch_thread,  # noqa: E402
                                        read_stage_batch, replicate, row, timed)
from benchmarks.photos import graded_jpegs, synthetic_jpegs  # noqa: E402
from piqa_core.checkpoints import build_bundle, load_checkpoint  # noqa: E402
from piqa_core.weight_cache import resolve_weights  # noqa: E402
from piqa_core.faces import detector_input, for_inference  # noqa: E402
from piqa_core.liqe import extract_patches  # noqa: E402
from piqa_core.preprocess import load_image, make_crops  # noqa: E402
from piqa_core.stages import Predictor, prepare_batch  # noqa: E402


def end_to_end(args, base, photos: list[bytes], dev: torch.device, batch: int, detector) -> float:
    """The Ray stage classes driven directly (no Ray on the GPU machines): prep actors' work in a
    thread pool feeding one score actor, then score actors preparing on their device, serial and with
    two concurrent calls (what Ray Data runs on a GPU). Returns the best end-to-end images/s."""
    import tempfile

    from piqa_core.checkpoints import save_checkpoint
    from piqa_core.gpu_prep import prepare_batch_on_device
    from ray_jobs.actors import PrepActor, ScoreActor, model_identity
    from ray_jobs.options import ModelOptions
    from ray_jobs.storage import S3Options

    gpu, n, s3, best = dev.type == "cuda", len(photos), S3Options(), 0.0
    cfg = base.config
    reads = [read_stage_batch(photos[i:i + batch], i) for i in range(0, n, batch)]
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(base, tmp)
        model = ModelOptions(weights=tmp, random_weights=False, preset=cfg.preset, crop_mode="five",
                             precision="bf16", device=None, batch_size=batch, compile=args.compile)
        identity = model_identity(model, s3)
        threads, t0 = torch.get_num_threads(), time.perf_counter()
        actors: dict = {}  # what loaded: a failed actor costs the rows that need it, not the rest

        def load_prep() -> None:
            actors["prep"] = keeping_torch_threads(
                lambda: PrepActor(model, s3, face_device="gpu" if gpu else "cpu", threads=1))

        def load_score() -> None:
            actors["score"] = ScoreActor(model, s3, identity, device=dev.type, prepare_on_device=True,
                                         calls=2 if gpu else 1)

        print("End to end through the Ray stage classes (bf16):", flush=True)
        attempt("prep actor load", load_prep)
        attempt("score actor load", load_score)
        print(f"  actors loaded in {time.perf_counter() - t0:.1f} s", flush=True)

        def actor(name: str):
            if name not in actors:
                raise RuntimeError(f"no {name} actor (its load failed above)")
            return actors[name]

        attempt("score actor warm-up", lambda: actor("score")(reads[0]))  # and compile

        def score(cols: dict):
            """The same actor as a plain score stage (one model load, one compile)."""
            device = actor("score")
            device.prepare_on_device = False
            try:
                return device(cols)
            finally:
                device.prepare_on_device = True

        def sync() -> None:
            if gpu:
                torch.cuda.synchronize()

        def two_stage() -> None:
            nonlocal best
            prep, _ = actor("prep"), actor("score")
            t0, done = time.perf_counter(), 0
            with ThreadPoolExecutor(args.workers, initializer=one_torch_thread) as pool:
                chunks = [pool.submit(prep, read_stage_batch(photos[i:i + 8], i)) for i in range(0, n, 8)]
                pending: list[dict] = []
                for f in chunks:
                    pending.append(f.result())
                    if sum(len(c["uri"]) for c in pending) >= batch or f is chunks[-1]:
                        merged = {k: np.concatenate([c[k] for c in pending]) for k in pending[0]}
                        done += sum(s == "ok" for s in score(merged).column("status").to_pylist())
                        pending = []
            sync()
            rate = n / (time.perf_counter() - t0)
            best = max(best, rate)
            row(f"end-to-end five: {args.workers} prep threads + actor", rate, f"({done}/{n} scored)")

        def two_stage_then_restore() -> None:
            try:
                two_stage()
            finally:  # the pool's threads set one torch thread each; MKL's count is process-wide
                torch.set_num_threads(threads)

        attempt("prep actors + score actor", two_stage_then_restore)

        def on_device(calls: int, scorer=None, mode: str = "five") -> float:
            scorer = scorer or actor("score")
            rounds = 1 if args.dry_run else 3  # a 64-photo pass lasts well under a second on a GPU
            sync()
            t0 = time.perf_counter()
            with ThreadPoolExecutor(calls) as pool:
                tables = pool.map(scorer, reads * rounds)
                done = sum(sum(s == "ok" for s in t.column("status").to_pylist()) for t in tables)
            sync()
            rate = rounds * n / (time.perf_counter() - t0)
            row(f"end-to-end {mode}: {dev.type} prep in actor, {calls} call(s)", rate,
                f"({done}/{rounds * n} scored)")
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
            predictor = actor("score").predictor
            a = predictor(prepare_batch(photos[:batch], cfg, detector, "five"))["score"]
            b = predictor(prepare_batch_on_device(photos[:batch], cfg, detector, dev, "five"))["score"]
            from scipy.stats import spearmanr

            print(f"  device prep vs PIL prep (bf16 model)          SRCC {spearmanr(a, b).statistic:.5f}  "
                  f"max|Δ| {np.abs(a - b).max():.5f}", flush=True)

        attempt("device prep alone", prep_alone)
    return best


SRCC_MIN, MAX_DEVIATION = 0.999, 0.02  # the precision target, on the JOD scale


def agreement(results: dict[str, np.ndarray], judged: bool) -> list[str]:
    """SRCC and max |deviation| of every variant against the first (fp32); a verdict only with real
    weights: random weights score every photo alike, so bf16 noise reorders them."""
    from scipy.stats import spearmanr

    labels = list(results)
    ref = results[labels[0]]
    lines = [f"fp32 score spread (max - min) {np.ptp(ref):.4f}"]
    for label in labels[1:]:
        got = results[label]
        srcc, dmax = spearmanr(ref, got).statistic, float(np.abs(ref - got).max())
        if judged:
            met = srcc >= SRCC_MIN and dmax <= MAX_DEVIATION
            verdict = f"{'meets' if met else 'misses'} the target (SRCC >= {SRCC_MIN}, max|Δ| <= {MAX_DEVIATION})"
        else:
            verdict = f"{dmax / max(np.ptp(ref), 1e-12):.2f} of the spread; random weights: no verdict"
        lines.append(f"{label:<44} SRCC {srcc:.5f}  max|Δ| {dmax:.5f}  {verdict}")
    return lines


def detector_split(detector, inputs: list, dev: torch.device) -> None:
    """The network alone on a device-resident batch (bf16 autocast), with cuDNN autotuning on a GPU:
    what is left of a detection row is host padding, upload and post-processing."""
    x = torch.zeros((len(inputs), 3, *(-(-s // 32) * 32 for s in inputs[0][0].shape[:2])), device=dev)
    x = x.contiguous(memory_format=torch.channels_last)

    def forward() -> None:
        with torch.inference_mode(), torch.autocast(dev.type, dtype=torch.bfloat16):
            detector.net(x)
    gpu = dev.type == "cuda"
    attempt("RetinaFace network alone", lambda: row("RetinaFace network alone, bf16 autocast",
                                                    len(inputs) / timed(forward, 3, gpu)))
    if gpu:
        torch.backends.cudnn.benchmark = True
        try:
            attempt("cudnn.benchmark", lambda: row("  the same with cudnn.benchmark",
                                                   len(inputs) / timed(forward, 3, gpu), "after one autotuning call"))
        finally:
            torch.backends.cudnn.benchmark = False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--images", type=int, default=None)
    ap.add_argument("--size", default=None)
    ap.add_argument("--batch", type=int, default=None, help="images per GPU batch")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--preset", default=None, help="random weights' preset: dn-piqa (tiny with --dry-run)")
    ap.add_argument("--device", default=None, help="default: cuda if present (cpu with --dry-run)")
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--weights", default=None, help="model directory (local or s3://); default random weights")
    ap.add_argument("--agree-images", type=int, default=None,
                    help="graded photos for the agreement check (default 66, 6 with --dry-run)")
    args = ap.parse_args()
    dry = args.dry_run
    dev = torch.device(args.device or ("cpu" if dry or not torch.cuda.is_available() else "cuda"))
    preset = "from --weights" if args.weights else args.preset or ("tiny" if dry else "dn-piqa")
    n = args.images or (6 if dry else 64)
    w, h = (int(v) for v in (args.size or ("640x480" if dry else "4000x3000")).split("x"))
    batch = args.batch or (4 if dry else 32)
    gpu = dev.type == "cuda"
    print(f"torch {torch.__version__}  device {torch.cuda.get_device_name() if gpu else 'cpu'}  "
          f"preset {preset}  photos {n} x {w}x{h}  batch {batch}  cpu workers {args.workers}  "
          f"torch threads {torch.get_num_threads()}", flush=True)

    t0 = time.perf_counter()
    photos = synthetic_jpegs(n, w, h, workers=args.workers)
    m = args.agree_images or (6 if dry else 66)
    agree = graded_jpegs(m, *((320, 240) if dry else (1024, 768)))
    if args.weights:
        base = load_checkpoint(resolve_weights(args.weights))
        source = f"weights {args.weights}, {base.config.preset}, sha256 {base.sha256[:12]}"
    else:
        base, source = build_bundle(preset), f"{preset}, random weights"
    print(f"  made photos in {time.perf_counter() - t0:.1f} s; model: {source}", flush=True)
    cfg = base.config

    print("CPU stages, one core, per image:")
    img = load_image(photos[0], cfg.preprocess)
    row("decode (PIL, full resolution)", 1 / timed(lambda: load_image(photos[0], cfg.preprocess), 3))
    row("detector input (downscale)", 1 / timed(lambda: detector_input(img, cfg.face.detect_long_side), 3))
    row("five crops of one branch", 1 / timed(lambda: make_crops(img, cfg.preprocess, "five"), 3))
    row("LIQE patches (15 crops)", 1 / timed(lambda: extract_patches(img, cfg.liqe), 3))
    row("prepare without faces", 1 / timed(lambda: prepare_batch(photos[:1], cfg, None), 2))

    detector = for_inference(base.detector, dev)
    inputs = [detector_input(load_image(p, cfg.preprocess), cfg.face.detect_long_side) for p in photos[:batch]]
    sizes = [(w, h)] * len(inputs)
    print(f"Face detection on {dev.type}, batch {len(inputs)}:")
    for name, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        def detect(dtype=dtype) -> None:
            fp32 = ieee_fp32() if dtype is None else contextlib.nullcontext()
            with fp32, torch.autocast(dev.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                detector.detect_each(inputs, sizes=sizes)
        attempt(f"RetinaFace {name}", lambda: row(f"RetinaFace {name}", len(inputs) / timed(detect, 3, gpu)))
    detector_split(detector, inputs, dev)

    print("Preparing columns for the model stages …", flush=True)
    prepared: dict[str, dict] = {}  # a failed set costs the rows that need it, not the rest

    def prep(name: str, items: list[bytes], mode: str) -> None:
        prepared[name] = prepare_batch(items, cfg, detector, mode)

    attempt("prepare five-crop columns", lambda: prep("five", photos, "five"))
    attempt("prepare center-crop columns", lambda: prep("center", photos[:batch], "center"))
    attempt("prepare agreement columns", lambda: prep("agree", agree, "five"))

    def columns(name: str) -> dict:
        if name not in prepared:
            raise RuntimeError(f"no {name} columns (their preparation failed above)")
        return prepared[name]

    print(f"Model stages on {dev.type}, {batch} images per batch (five crops = {5 * batch} crops):")
    variants = [("fp32", {})] + ([("tf32", {})] if gpu else []) + [("bf16", {})]
    variants += [("bf16", {"compile": True})] if args.compile else []
    results: dict[str, np.ndarray] = {}
    for precision, extra in variants:
        label = precision + (" + compile" if extra else "") + (" + fused attn" if gpu else "")

        def measure(precision=precision, extra=extra, label=label) -> None:
            b = copy.deepcopy(base)
            t0 = time.perf_counter()
            pred = Predictor(cfg, b.model, b.liqe, dev, precision, batch_size=batch, **extra)

            def five() -> None:
                cols = replicate(columns("five"), batch)
                per = timed(lambda: pred(cols), 1 if dry else 3, gpu)
                warm = time.perf_counter() - t0
                row(f"model five-crop {label}", batch / per, f"(first call incl. warm-up {warm:.0f} s)")

            def center() -> None:
                cols = replicate(columns("center"), batch)
                row(f"model center-crop {label}", batch / timed(lambda: pred(cols), 1 if dry else 3, gpu))

            def agree_scores() -> None:
                results[label] = pred(columns("agree"))["score"]

            attempt(f"model five-crop {label}", five)
            attempt(f"model center-crop {label}", center)
            attempt(f"agreement scores {label}", agree_scores)

        attempt(label, measure)
        if gpu:
            torch.cuda.empty_cache()

    print(f"Agreement with the fp32 reference over {m} graded photos ({source}):")
    has_ref = next(iter(results), "").startswith("fp32")  # a failed fp32 run must not cost the rest
    for line in agreement(results, judged=args.weights is not None) if has_ref else ["fp32 failed: no reference"]:
        print("  " + line, flush=True)

    e2e = end_to_end(args, base, photos, dev, batch, detector)

    from benchmarks.official_style import official_style_score

    def official() -> None:
        ob = copy.deepcopy(base)
        ob.model.to(dev)
        ob.liqe.to(dev)
        k = 2
        with ieee_fp32():
            per = timed(lambda: [official_style_score(ob, p, dev) for p in photos[:k]], 1, gpu) / k
        row("official-style loop (batch 1, fp32)", 1 / per, f"-> end-to-end is {e2e * per:.1f}x faster")

    attempt("official-style loop", official)
    if gpu:
        print(f"GPU memory: max allocated {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    print(f"gpu_check: done (torch threads {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
