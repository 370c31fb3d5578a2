"""Training throughput of the DN-PIQA step (pairs/s), in this process, with the training code's own helpers.

Three numbers per preset:
  features    first touch of an image: decode + face detection + LIQE (what the feature cache saves)
  end-to-end  decode + random crops (features cached) prefetched on threads, forward/backward/Adam
  model-only  forward/backward/Adam on one prepared batch (the ceiling the data path can approach)
  validation  five-crop scoring of prepared images
Ray Train adds the DDP all-reduce per step and nothing else per step. Random weights: speed only.

  python benchmarks/bench_train.py                          # tiny on CPU
  python benchmarks/bench_train.py --preset dn-piqa --steps 1 --warmup 1 --batch-pairs 1 --images 4
  python benchmarks/bench_train.py --preset dn-piqa --device cuda --steps 10   # bf16 autocast
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))  # run from a checkout without installing

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from skimage import data as skdata  # noqa: E402

from piqa_core.checkpoints import build_bundle  # noqa: E402
from piqa_core.config import get_preset  # noqa: E402
from piqa_core.features import FeatureCache, fill_cache, prepare_items  # noqa: E402
from piqa_core.training import crop_rngs, make_optimizer, pair_loss, predict, prefetch  # noqa: E402


def images(n: int, long_side: int) -> list[bytes]:
    """JPEG bytes of distinct photos (skimage, cropped and scaled differently)."""
    photos = [skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket()]
    out = []
    for i in range(n):
        img = Image.fromarray(photos[i % len(photos)])
        w, h = img.size
        img = img.crop((i % 7, i % 5, w - i % 3, h - i % 4))
        s = long_side / max(img.size)
        img = img.resize((round(img.size[0] * s), round(img.size[1] * s)), Image.BILINEAR)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench(preset: str, device: torch.device, steps: int, batch_pairs: int, n_images: int, long_side: int,
          threads: int, warmup: int = 2) -> dict[str, float]:
    cfg = get_preset(preset)
    # dn-piqa: skip encoding the 495 prompts (30 s on CPU); random text features change no timing
    bundle = build_bundle(cfg, text_features=preset == "tiny")
    model = bundle.model.to(device).train()
    liqe = bundle.liqe.to(device).eval() if bundle.liqe is not None else None
    detector = bundle.detector.to(device).eval() if bundle.detector is not None else None
    opt, _ = make_optimizer(model, lr=1e-5)
    bf16 = device.type == "cuda"
    data = images(n_images, long_side)
    keys = [f"img{i}" for i in range(n_images)]
    labels = np.random.default_rng(0).normal(size=n_images).astype(np.float32)
    cache = FeatureCache()

    t = time.perf_counter()
    for i in range(0, n_images, 8):
        fill_cache(data[i:i + 8], keys[i:i + 8], cfg, detector, liqe, cache, device)
    sync(device)
    feat_s = (time.perf_counter() - t) / n_images

    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n_images, 2 * batch_pairs) for _ in range(steps + warmup)]

    def prep(k: int) -> dict:
        idx = batches[k]
        return prepare_items([data[i] for i in idx], [keys[i] for i in idx], cfg, detector, liqe, cache, "random",
                             crop_rngs(0, 0, np.arange(k * batch_pairs, (k + 1) * batch_pairs)), device)

    def step(cols: dict, idx: np.ndarray) -> None:
        loss, *_ = pair_loss(model, cols, labels[idx], cfg, device, bf16)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for k, cols in enumerate(prefetch(prep, len(batches), threads)):
        if k == warmup:
            sync(device)
            t = time.perf_counter()
        step(cols, batches[k])
    sync(device)
    e2e = steps * batch_pairs / (time.perf_counter() - t)

    cols = prep(0)
    for _ in range(warmup):
        step(cols, batches[0])
    sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        step(cols, batches[0])
    sync(device)
    model_only = steps * batch_pairs / (time.perf_counter() - t)

    model.eval()  # validation: five crops per image, features cached
    five = prepare_items(data[:8], keys[:8], cfg, detector, liqe, cache, "five", [None] * 8, device)
    predict(model, five, cfg, device, bf16)
    sync(device)
    t = time.perf_counter()
    for _ in range(max(1, steps // 4)):
        predict(model, five, cfg, device, bf16)
    sync(device)
    val = 8 * max(1, steps // 4) / (time.perf_counter() - t)
    return {"features_s_per_image": feat_s, "end_to_end_pairs_per_s": e2e, "model_only_pairs_per_s": model_only,
            "val_images_per_s": val}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-pairs", type=int, default=6)
    p.add_argument("--images", type=int, default=24, help="distinct images (features computed once each)")
    p.add_argument("--long-side", type=int, default=512, help="image size in pixels (PIQ23 photos: ~4000)")
    p.add_argument("--threads", type=int, default=2, help="data-preparation threads (as the training loop)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before each timing")
    a = p.parse_args()
    device = torch.device(a.device)
    t = time.perf_counter()
    r = bench(a.preset, device, a.steps, a.batch_pairs, a.images, a.long_side, a.threads, a.warmup)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU x{torch.get_num_threads()} threads"
    print(f"{a.preset} on {name}, {a.batch_pairs} pairs/step, {a.long_side}px images, {a.steps} timed steps "
          f"({time.perf_counter() - t:.0f}s in all)")
    print(f"  features (first touch)   {r['features_s_per_image'] * 1000:8.1f} ms/image")
    print(f"  end-to-end               {r['end_to_end_pairs_per_s']:8.2f} pairs/s")
    print(f"  model only               {r['model_only_pairs_per_s']:8.2f} pairs/s")
    print(f"  validation (five-crop)   {r['val_images_per_s']:8.2f} images/s (model only)")


if __name__ == "__main__":
    main()
