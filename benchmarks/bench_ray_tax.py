"""What a running Ray Data job costs by itself: CPU of every process while the job's one actor sleeps.

    python benchmarks/bench_ray_tax.py [--num-cpus 2] [--seconds 60] [--batch-seconds 3]

The actor takes one batch at a time and sleeps through it, so every CPU second measured belongs to
Ray (driver and its streaming executor, raylet, GCS, node agent, Ray Data's helper actors, idle
workers) or to the OS. On a machine whose cores the model fills, that share is taken off the model:
a Ray scoring job runs at most (1 - share) of the model alone, and less again by its preparation.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.proc_cpu import Watch  # noqa: E402


class Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def __call__(self, batch: dict) -> dict:
        time.sleep(self.seconds)
        return batch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-cpus", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=60.0, help="length of the watched window")
    ap.add_argument("--batch-seconds", type=float, default=3.0, help="sleep per batch")
    ap.add_argument("--prep-share", type=float, default=None,
                    help="preparation time as a fraction of the model's (bench_cpu_stages prints it)")
    ap.add_argument("--executor-wait", type=float, default=None,
                    help="seconds the driver's streaming executor waits for tasks per step (Ray: 0.1); "
                         "an experiment on a private Ray Data constant, never set by the jobs")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    if args.executor_wait is not None:
        from ray.data._internal.execution import streaming_executor_state

        streaming_executor_state.WAIT_FOR_TASK_COMPLETION_TIMEOUT_S = args.executor_wait

    ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False,
             _temp_dir=tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    try:
        ray.data.range(4).map_batches(lambda b: b).materialize()  # a cluster that has run a job: helpers up
        skip = 2  # batches before the window: the actor process starts and imports
        n = skip + max(1, round(args.seconds / args.batch_seconds))
        ds = ray.data.range(n, override_num_blocks=n).map_batches(
            Sleeper, fn_constructor_kwargs={"seconds": args.batch_seconds}, batch_size=1,
            compute=ray.data.ActorPoolStrategy(size=1), num_cpus=1)
        watch = t0 = None
        for i, _ in enumerate(ds.iter_batches(batch_size=1)):
            if i + 1 == skip:
                watch, t0 = Watch(), time.perf_counter()
        wall, used = time.perf_counter() - t0, watch.used()
    finally:
        ray.shutdown()
    machine = wall * args.num_cpus
    total = sum(t for t, _ in used)
    print(f"Ray Data job with a sleeping actor, {args.num_cpus} CPUs, watched {wall:.0f} s:")
    print(f"{'CPU-s':>7} {'% of machine':>13}  process")
    for t, cmd in used:
        if t / machine >= 0.001:
            print(f"{t:7.2f} {t / machine:13.2%}  {cmd[:80]}")
    share = total / machine
    print(f"all processes: {total:.1f} CPU-s = {share:.2%} of the machine")
    print(f"ceiling for a Ray job vs the model alone: {1 - share:.3f}"
          + (f"; with preparation at {args.prep_share:.1%} of the model: {(1 - share) / (1 + args.prep_share):.3f}"
             if args.prep_share is not None else ""))


if __name__ == "__main__":
    main()
