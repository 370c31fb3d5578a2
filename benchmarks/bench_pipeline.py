"""Ray pipeline efficiency: end-to-end images/s of `run_score_job` vs the in-process Scorer.

    python benchmarks/bench_pipeline.py [--images 200] [--size 480x360] [--preset tiny] [--num-cpus 2]

Same photos, preset (random weights), crop mode and batch size for both. Efficiency = pipeline / scorer.
The pipeline figure includes listing, actor start-up (model loads) and the Parquet write; Ray's own
start-up is excluded (a cluster is already up when a job is submitted).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.photos import synthetic_jpegs  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="480x360")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop-mode", default="five")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from piqa_core.scorer import Scorer
    from ray_jobs.options import ModelOptions
    from ray_jobs.score import ScoreJob, run_score_job

    w, h = (int(v) for v in args.size.split("x"))
    photos = synthetic_jpegs(args.images, w, h)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i, data in enumerate(photos):
            (folder / f"{i:05d}.jpg").write_bytes(data)

        torch.set_num_threads(args.num_cpus)
        scorer = Scorer.from_pretrained(args.preset, random_weights=True, device="cpu", crop_mode=args.crop_mode)
        scorer.score(photos[:2])
        t0 = time.perf_counter()
        scorer.score([str(p) for p in sorted(folder.iterdir())], batch_size=args.batch_size)
        inproc = args.images / (time.perf_counter() - t0)
        print(f"in-process Scorer: {inproc:.2f} img/s ({torch.get_num_threads()} threads)", flush=True)

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        try:
            model = ModelOptions(weights=None, random_weights=True, preset=args.preset, crop_mode=args.crop_mode,
                                 precision="fp32", device=None, batch_size=args.batch_size)
            t0 = time.perf_counter()
            summary = run_score_job(ScoreJob(inputs=[str(folder)], out=str(Path(tmp) / "out"), model=model))
            pipe = args.images / (time.perf_counter() - t0)
        finally:
            ray.shutdown()
    assert summary["ok"] == args.images, summary
    print(f"Ray pipeline:      {pipe:.2f} img/s ({args.num_cpus} CPUs, incl. actor start-up and write)")
    print(f"efficiency:        {pipe / inproc:.2f}")


if __name__ == "__main__":
    main()
