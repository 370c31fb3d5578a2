"""Images/s of the in-process Scorer vs the official-style per-image loop, per preset and device.

    python benchmarks/bench_core.py [--presets tiny dn-piqa] [--images 16] [--size 1024x768]

Random weights (speed does not depend on them). Prints one table row per (preset, device, method).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.official_style import official_style_score  # noqa: E402
from benchmarks.photos import synthetic_jpegs  # noqa: E402
from piqa_core.checkpoints import build_bundle  # noqa: E402
from piqa_core.scorer import Scorer  # noqa: E402


def run(preset: str, device: str, images: list[bytes], batch_size: int) -> dict[str, float]:
    bundle = build_bundle(preset)
    scorer = Scorer(bundle, device=device)
    scorer.score(images[:1])  # warm-up: lazy inits, cudnn autotune
    t0 = time.perf_counter()
    ours = scorer.score(images, batch_size=batch_size)
    fast = len(images) / (time.perf_counter() - t0)

    dev = torch.device(device)
    official_style_score(bundle, images[0], dev)
    n_slow = max(1, len(images) // 2)
    t0 = time.perf_counter()
    ref = [official_style_score(bundle, data, dev) for data in images[:n_slow]]
    slow = n_slow / (time.perf_counter() - t0)
    # Both paths must agree, or the speed-up means nothing (RetinaFace padding differs: small tolerance).
    diff = max(abs(a["score"] - b) for a, b in zip(ours, ref))
    return {"scorer": fast, "official": slow, "max_abs_diff": diff}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--presets", nargs="+", default=["tiny", "dn-piqa"])
    ap.add_argument("--images", type=int, default=None, help="default: 16 for tiny, 4 for dn-piqa")
    ap.add_argument("--size", default="1024x768")
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    w, h = (int(v) for v in args.size.split("x"))
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}; photos {w}x{h}")
    print(f"{'preset':<8} {'device':<6} {'scorer img/s':>13} {'official img/s':>15} {'ratio':>7} {'max|Δscore|':>12}")
    for preset in args.presets:
        n = args.images or (16 if preset == "tiny" else 4)
        photos = synthetic_jpegs(n, w, h)
        for device in devices:
            r = run(preset, device, photos, args.batch_size)
            print(f"{preset:<8} {device:<6} {r['scorer']:>13.3f} {r['official']:>15.3f} "
                  f"{r['scorer'] / r['official']:>7.2f} {r['max_abs_diff']:>12.2e}", flush=True)


if __name__ == "__main__":
    main()
