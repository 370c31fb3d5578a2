"""CPU stage table: what each stage of scoring costs per image next to the model, on this machine.

    python benchmarks/bench_cpu_stages.py                      # dn-piqa, 4 synthetic 12 MP photos
    python benchmarks/bench_cpu_stages.py --preset tiny --size 640x480 --images 4

Per image, all cores (torch threads = CPUs): read, decode, face detection, crops, LIQE patches, the
model's forward passes and the Parquet write; then everything beyond the model as a share of the
model time, the in-process pipeline (prepare + model) against the model alone, and the speed-up
over the official-style per-image loop. Random weights: speed does not depend on them.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.gpu_check import timed  # noqa: E402
from benchmarks.official_style import official_style_score  # noqa: E402
from benchmarks.photos import synthetic_jpegs  # noqa: E402
from piqa_core.checkpoints import build_bundle  # noqa: E402
from piqa_core.faces import crop_face, detector_input, for_inference  # noqa: E402
from piqa_core.liqe import extract_patches  # noqa: E402
from piqa_core.preprocess import load_image, make_crops  # noqa: E402
from piqa_core.stages import Predictor, prepare_batch, rows_from_columns  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="dn-piqa")
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--batch", type=int, default=2, help="images per batch (2 = five crops in passes of 2 on CPU)")
    ap.add_argument("--size", default="4000x3000")
    ap.add_argument("--crop-mode", default="five")
    ap.add_argument("--skip-official", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    w, h = (int(v) for v in args.size.split("x"))
    photos = synthetic_jpegs(args.images, w, h)
    bundle = build_bundle(args.preset, text_features=args.preset == "tiny")
    cfg, mode = bundle.config, args.crop_mode
    detector = for_inference(bundle.detector, "cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, preset {args.preset} ({mode} crops), "
          f"{args.images} photos {w}x{h} ({len(photos[0]) / 1e6:.1f} MB JPEG)", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "photo.jpg"
        path.write_bytes(photos[0])
        stages = {"read (local file)": timed(path.read_bytes, 3)}
        img = load_image(photos[0], cfg.preprocess)
        stages["decode (PIL, full resolution)"] = timed(lambda: load_image(photos[0], cfg.preprocess), 3)
        det_in = detector_input(img, cfg.face.detect_long_side)
        face = detector.detect_each([det_in], sizes=[img.size])[0]
        stages["face detection (downscale + RetinaFace)"] = timed(lambda: detector.detect_each(
            [detector_input(img, cfg.face.detect_long_side)], sizes=[img.size]), 2)
        face_img = lambda: crop_face(img, face, cfg.face.margin)  # noqa: E731
        stages["crops (face crop, 2 x resize + crops)"] = timed(lambda: (
            make_crops(img, cfg.preprocess, mode), make_crops(face_img(), cfg.preprocess, mode)), 3)
        stages["LIQE patches"] = timed(lambda: extract_patches(img, cfg.liqe), 3)
        predictor = Predictor(cfg, bundle.model, bundle.liqe, torch.device("cpu"))
        cols = prepare_batch(photos[:1], cfg, detector, mode)
        model_s = timed(lambda: predictor(cols), 2)
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = rows_from_columns(predictor(prepare_batch(photos, cfg, detector, mode))) * 64
        table = pa.Table.from_pylist(rows)
        stages["Parquet write (per row)"] = timed(lambda: pq.write_table(table, Path(tmp) / "o.parquet"), 3) / len(rows)

    print(f"{'stage':<42} {'ms/image':>10} {'% of model':>11}")
    for name, sec in stages.items():
        print(f"{name:<42} {sec * 1e3:>10.1f} {sec / model_s:>10.1%}")
    beyond = sum(stages.values())
    print(f"{'model forward (LIQE + two backbones)':<42} {model_s * 1e3:>10.1f} {1:>10.0%}")
    print(f"{'everything beyond the model':<42} {beyond * 1e3:>10.1f} {beyond / model_s:>10.1%}", flush=True)

    # The in-process pipeline against the model alone on the very same batches (same passes).
    batches = [photos[i:i + args.batch] for i in range(0, len(photos), args.batch)]
    prepared = [prepare_batch(b, cfg, detector, mode) for b in batches]
    t0 = time.perf_counter()
    for cols in prepared:
        predictor(cols)
    model_only = args.images / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for b in batches:
        predictor(prepare_batch(b, cfg, detector, mode))
    pipeline = args.images / (time.perf_counter() - t0)
    print(f"batches of {args.batch}: model only {model_only:.4f} img/s; prepare + model {pipeline:.4f} img/s "
          f"= {pipeline / model_only:.2f} of model-only")
    if not args.skip_official:
        official = 1 / timed(lambda: official_style_score(bundle, photos[0], torch.device("cpu")), 1)
        print(f"official-style loop {official:.4f} img/s; ours {pipeline / official:.2f}x faster")


if __name__ == "__main__":
    main()
