"""Ray pipeline efficiency: images/s of `run_score_job` vs the in-process Scorer and vs the model alone.

    python benchmarks/bench_pipeline.py [--images 200] [--size 480x360] [--preset tiny] [--num-cpus 2]
    python benchmarks/bench_pipeline.py --weights DIR --size 4000x3000 --images 16   # dn-piqa, 12 MP

Same photos, preset (random weights), crop mode and batch size for all; efficiency = Ray / in-process
and Ray / model-only, where model-only runs the Scorer's forward passes over columns prepared
beforehand (no decode, faces, crops or IO). Two figures, because a Ray job pays a fixed start-up
(actor processes import torch and load the model) that the in-process loop pays once before its timer:

- end-to-end: Ray = listing + actor start-up + scoring + Parquet write; in-process = model load +
  scoring. Ray's own start-up is excluded: a cluster is up (and has run a job: Ray Data's helper
  actors exist) before a job is submitted, so the benchmark warms it from a separate driver.
- steady state: rows per second between the first and the last scored batch (the rows'
  ``scored_at``), i.e. what a long catalogue job sustains once its actors are up.

The model-only rate is measured before and after the Ray run (a shared VM drifts by several per
cent within minutes), and the CPU seconds of every process during the Ray run are read from /proc:
on a small machine the cores Ray's own processes take (driver, raylet, Ray Data's helper actors)
are what separates the Ray pipeline from the in-process one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.photos import synthetic_jpegs  # noqa: E402
from benchmarks.proc_cpu import Watch  # noqa: E402


def steady_rate(stamps: list, calls: int = 1) -> float:
    """Rows/s once the first batches are out: rows after the ``calls``-th scored batch / the time since it.

    A batch's rows share one ``scored_at``. With ``calls`` batches scored at once they finish in
    groups, so skipping only the first batch would count the work of a group finished just after it
    in no time.
    """
    batches = sorted(Counter(stamps).items())
    if len(batches) <= calls:
        raise ValueError(f"{len(batches)} scored batches: too few for a steady rate with {calls} concurrent calls")
    later = sum(n for _, n in batches[calls:])
    return later / max((batches[-1][0] - batches[calls - 1][0]).total_seconds(), 1e-9)


def model_only_rate(scorer, photos: list[bytes], batch_size: int, cores: int) -> float:
    """Images/s of the Scorer's forward passes alone, over columns prepared before the timer: the
    better of one call on ``cores`` torch threads and ``cores`` concurrent single-threaded calls (the
    way CPU score actors run), each printed."""
    from piqa_core.concurrency import ordered_map
    from piqa_core.stages import prepare_batch

    batches = [prepare_batch(photos[i:i + batch_size], scorer.config, scorer.detector, scorer.crop_mode)
               for i in range(0, len(photos), batch_size)]
    t0 = time.perf_counter()
    for cols in batches:
        scorer.predictor(cols)
    serial = len(photos) / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    list(ordered_map(scorer.predictor, batches, cores))
    concurrent = len(photos) / (time.perf_counter() - t0)
    print(f"  model only: one call on {cores} threads {serial:.3g} img/s, {cores} single-threaded calls "
          f"{concurrent:.3g}", flush=True)
    return max(serial, concurrent)


def warm_cluster(address: str) -> None:
    """Run one tiny dataset from another driver, so Ray Data's cluster-wide helper actors exist."""
    code = ("import ray; ray.init(address=%r, log_to_driver=False); "
            "ray.data.range(4).map_batches(lambda b: b).materialize()" % address)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--size", default="480x360")
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--weights", default=None, help="a model directory instead of random --preset weights")
    ap.add_argument("--num-cpus", type=int, default=os.cpu_count())
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--crop-mode", default="five")
    ap.add_argument("--skip-inprocess", action="store_true",
                    help="compare the Ray job with the model alone only (halves a dn-piqa run)")
    ap.add_argument("--model-only-images", type=int, default=None,
                    help="time the model alone on the first N photos only (its rate does not depend on N)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch

    from piqa_core.scorer import Scorer
    from ray_jobs.actors import model_identity
    from ray_jobs.inprocess import score_objects
    from ray_jobs.options import ModelOptions
    from ray_jobs.resume import read_rows
    from ray_jobs.pools import job_plan, score_calls
    from ray_jobs.score import ScoreJob, run_score_job
    from ray_jobs.inputs import list_inputs
    from ray_jobs.storage import S3Options

    w, h = (int(v) for v in args.size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for i, data in enumerate(synthetic_jpegs(args.images, w, h)):
            (folder / f"{i:05d}.jpg").write_bytes(data)
        objects = list_inputs([str(folder)])

        torch.set_num_threads(args.num_cpus)
        t0 = time.perf_counter()
        source = args.weights or args.preset
        scorer = Scorer.from_pretrained(source, random_weights=not args.weights, device="cpu",
                                        crop_mode=args.crop_mode, batch_size=args.batch_size)
        t1 = time.perf_counter()
        inproc = None
        if not args.skip_inprocess:
            table = score_objects(objects, scorer, batch_size=args.batch_size)
            t2 = time.perf_counter()
            inproc = (args.images / (t2 - t0), args.images / (t2 - t1),
                      steady_rate(table.column("scored_at").to_pylist(), scorer.calls))
            print(f"in-process Scorer ({scorer.calls} call(s)): end-to-end {inproc[0]:.3g} img/s "
                  f"(model load {t1 - t0:.1f} s), scoring {inproc[1]:.3g}, steady {inproc[2]:.3g}", flush=True)
        sample = [p.read_bytes() for p in sorted(folder.iterdir())][:args.model_only_images or None]
        model_only = model_only_rate(scorer, sample, args.batch_size, args.num_cpus)
        print(f"model only ({len(sample)} photos, same batch size, prepared beforehand): {model_only:.3g} img/s"
              + (f"; in-process scoring = {inproc[1] / model_only:.3f} of it" if inproc else ""), flush=True)

        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
                 _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        try:
            warm_cluster(ray.get_runtime_context().gcs_address)
            model = ModelOptions(weights=args.weights, random_weights=not args.weights, preset=args.preset,
                                 crop_mode=args.crop_mode, precision="fp32", device=None, batch_size=args.batch_size)
            out = str(Path(tmp) / "out")
            job = ScoreJob(inputs=[str(folder)], out=out, model=model)
            calls = score_calls(job_plan(job, ray.cluster_resources(), model_identity(model, S3Options())["config"],
                                         args.images))
            watch, t0 = Watch(), time.perf_counter()
            summary = run_score_job(job)
            wall, cpu = time.perf_counter() - t0, watch.used()
            stamps = read_rows(out).column("scored_at").to_pylist()
        finally:
            ray.shutdown()
        model_after = model_only_rate(scorer, sample, args.batch_size, args.num_cpus)
    assert summary["ok"] == args.images, summary
    ray_e2e, ray_steady = args.images / wall, steady_rate(stamps, calls)
    print(f"Ray pipeline ({args.num_cpus} CPUs, {calls} call(s) per score actor): end-to-end {ray_e2e:.3g} img/s "
          f"(wall {wall:.1f} s), steady {ray_steady:.3g}")
    print_cpu_use(cpu, wall, args.num_cpus)
    print(f"model only again, after the Ray run: {model_after:.3g} img/s")
    model_only = (model_only + model_after) / 2
    if inproc:
        print(f"efficiency: end-to-end {ray_e2e / inproc[0]:.3f}, steady state {ray_steady / inproc[2]:.3f}")
    print(f"Ray vs model only (mean of both): end-to-end {ray_e2e / model_only:.3f}, "
          f"steady state {ray_steady / model_only:.3f}")


def print_cpu_use(cpu: list[tuple[float, str]], wall: float, cores: int) -> None:
    """Where the cores went during the Ray run: the actor stages vs everything else (Ray's own
    processes, the driver, read/write task workers, the OS)."""
    if not cpu:
        return
    share = lambda t: f"{t:.1f} s = {t / (wall * cores):.1%} of the cores"  # noqa: E731
    stages = {name: sum(t for t, cmd in cpu if name in cmd) for name in ("ScoreActor", "PrepActor")}
    rest = [(t, cmd) for t, cmd in cpu if not any(name in cmd for name in stages)]
    print("CPU during the Ray run: " + ", ".join(f"{k} {share(v)}" for k, v in stages.items() if v)
          + f"; all other processes {share(sum(t for t, _ in rest))}, most:")
    for t, cmd in rest[:6]:
        print(f"  {t:6.1f} s  {cmd[:90]}")

if __name__ == "__main__":
    main()
