"""GPU check: verifies the GPU path and prints per-stage and end-to-end throughput (no Ray needed).

    python benchmarks/gpu_check.py                 # dn-piqa, random weights, synthetic 12 MP photos
    python benchmarks/gpu_check.py --compile       # also the torch.compile'd bf16 model
    python benchmarks/gpu_check.py --dry-run       # tiny preset, small photos, CPU: exercises every step
    python benchmarks/gpu_check.py --weights DIR   # real weights: the fp32-agreement target is judged

Per stage it times the shared prepare/score code; end to end it drives the Ray stage classes
(``PrepActor``, ``ScoreActor``) directly, as Ray would: prep actors in their own processes feeding a
score actor, and score actors that prepare on the GPU (nvJPEG), serially and with two concurrent
calls. It exits 1 if any stage failed (the other stages still run and print).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_check_e2e import end_to_end  # noqa: E402
from benchmarks.gpu_check_tools import FAILED, PEAK, attempt, ieee_fp32, replicate, row, timed  # noqa: E402
from benchmarks.photos import graded_jpegs, synthetic_jpegs  # noqa: E402
from piqa_core.checkpoints import build_bundle, load_checkpoint  # noqa: E402
from piqa_core.weight_cache import resolve_weights  # noqa: E402
from piqa_core.faces import detector_input, for_inference  # noqa: E402
from piqa_core.liqe import extract_patches  # noqa: E402
from piqa_core.preprocess import load_image, make_crops  # noqa: E402
from piqa_core.stages import Predictor, prepare_batch  # noqa: E402


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
    compiled: list[Predictor] = []  # the end-to-end score actor reuses it: one compile fewer
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

            def liqe() -> None:
                """LIQE's share of the five-crop row: its CLIP tower over 15 patches per image."""
                patches = pred.stage(replicate(columns("five"), batch))[0][1]["patches"]
                with torch.inference_mode():
                    per = timed(lambda: pred.liqe(patches), 1 if dry else 3, gpu)
                row(f"  of which LIQE {label}", batch / per, "(15 patches per image)")

            def agree_scores() -> None:
                results[label] = pred(columns("agree"))["score"]

            attempt(f"model five-crop {label}", five)
            if not extra:  # the eager tower: compiling it for this row alone would cost a compile
                attempt(f"LIQE {label}", liqe)
            attempt(f"model center-crop {label}", center)
            attempt(f"agreement scores {label}", agree_scores)
            if extra:
                compiled.append(pred)

        attempt(label, measure)
        if gpu:
            torch.cuda.empty_cache()

    print(f"Agreement with the fp32 reference over {m} graded photos ({source}):")
    has_ref = next(iter(results), "").startswith("fp32")  # a failed fp32 run must not cost the rest
    for line in agreement(results, judged=args.weights is not None) if has_ref else ["fp32 failed: no reference"]:
        print("  " + line, flush=True)

    e2e = end_to_end(args, base, photos, dev, batch, detector, compiled[0] if compiled else None)

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
        print(f"GPU memory: max allocated {max(PEAK[0], torch.cuda.max_memory_allocated()) / 2**30:.1f} GiB")
    print(f"gpu_check: done (torch threads {torch.get_num_threads()})")
    if FAILED:
        print(f"gpu_check: {len(FAILED)} stage(s) FAILED: {', '.join(FAILED)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
