"""Catalogue scoring on Ray Data: list → read → prepare (CPU actors) → score (GPU actors) → Parquet.

Run on a cluster with ``ray job submit --working-dir . -- python -m ray_jobs.score ...`` or through
``piqa score``. Every listed input yields exactly one row; ``--resume`` skips inputs the same model
(same sha256) already scored under the output.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import ray
from ray.data import ActorPoolStrategy
from ray.data.datasource import FilenameProvider

from .actors import PrepActor, ScoreActor, model_identity, read_objects
from .options import ModelOptions
from .resume import already_scored, run_files
from .schema import SCORE_SCHEMA, schema_metadata
from .storage import ObjectInfo, S3Options, join, list_inputs, resolve, write_text
from .summary import format_summary, summarize, to_json


@dataclass
class ScoreJob:
    inputs: list[str]
    out: str
    model: ModelOptions
    manifest: bool = False
    s3: S3Options = field(default_factory=S3Options)
    max_bytes: int = 256 * 1024 * 1024
    resume: bool = False
    run_date: str = field(default_factory=lambda: date.today().isoformat())
    run_id: str | None = None
    face_device: str = "cpu"
    prep_actors: int | None = None
    score_actors: int | None = None
    prep_batch_size: int = 4
    gpus_per_score_actor: float = 1.0
    # None: use GPUs if the cluster has some now; True: request them even if the autoscaler has
    # not started GPU nodes yet; False: CPU only.
    gpu: bool | None = None
    address: str | None = None
    # Chaos testing: "prep" or "score" makes one actor of that stage die once, mid-batch.
    inject_crash: str | None = None
    # Score exactly these objects instead of listing ``inputs`` (the audit passes its planned delta).
    objects: list[ObjectInfo] | None = None


@dataclass
class PoolPlan:
    prep_actors: int
    score_actors: int
    score_gpus: float
    score_cpus: float
    prep_gpus: float = 0.0


# Logical CPUs kept free for the light read and write tasks, so the actor pools cannot starve them.
IO_TASK_CPUS = 0.1


def plan_pools(job: ScoreJob, resources: dict[str, float]) -> PoolPlan:
    """Actor pool sizes from the cluster's resources unless given explicitly."""
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    use_gpu = bool(gpus) if job.gpu is None else job.gpu
    if use_gpu:
        per = job.gpus_per_score_actor
        score = job.score_actors or max(1, int(max(gpus, per) / per))
        prep = job.prep_actors or max(1, int(cpus - score - 1))
        if job.face_device != "gpu":
            return PoolPlan(prep, score, per, 1.0)
        # Detection on the GPU: prep actors take half of each score actor's share, split evenly,
        # so Ray counts (and places) every CUDA context.
        return PoolPlan(prep, score, per / 2, 1.0, prep_gpus=round(per / 2 * score / prep, 4))
    if job.face_device == "gpu":
        raise ValueError("--face-device gpu needs GPUs: the cluster has none (pass --gpu to wait for them)")
    score = job.score_actors or max(1, int(cpus // 2))
    prep = job.prep_actors or max(1, int(cpus - score))
    # On a CPU-only cluster both pools share the cores; leave room for read + write tasks.
    score_cpus = max(0.25, min(1.0, (cpus - prep - 2 * IO_TASK_CPUS) / score))
    return PoolPlan(prep, score, 0.0, score_cpus)


class _RunFiles(FilenameProvider):
    """``part-<run_id>-<write uuid>-<task>.parquet``: grouped by run, never colliding across runs.

    Ray requires its write UUID in the name (a retried write task then replaces its own file).
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.run_id}-{write_uuid}_{task_index:06d}.parquet"


def _run_id(job: ScoreJob, objects: list[ObjectInfo]) -> str:
    digest = hashlib.sha256("\n".join(o.uri for o in objects).encode()).hexdigest()[:8]
    return f"{time.strftime('%Y%m%dT%H%M%S')}-{digest}-{uuid.uuid4().hex[:4]}"


def run_score_job(job: ScoreJob) -> dict[str, Any]:
    """Run the pipeline to completion; returns the summary (also written as JSON next to the output)."""
    t0 = time.perf_counter()
    if not ray.is_initialized():
        ray.init(address=job.address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    objects = (list(job.objects) if job.objects is not None
               else list_inputs(job.inputs, job.s3, manifest=job.manifest))
    plan = plan_pools(job, ray.cluster_resources())
    identity = model_identity(job.model, job.s3)
    skipped = 0
    if job.resume:
        done = already_scored(job.out, identity["sha256"], job.s3)
        before = len(objects)
        objects = [o for o in objects if o.uri not in done]
        skipped = before - len(objects)
    run_id = job.run_id or _run_id(job, objects)
    dest = join(job.out, f"run_date={job.run_date}")
    print(f"piqa: {len(objects)} inputs to score ({skipped} already scored), "
          f"{plan.prep_actors} prep + {plan.score_actors} score actors, run {run_id}", file=sys.stderr)

    if objects:
        prep, score = _stage_args(job, plan, run_id)
        ds = (
            ray.data.from_items([{"uri": o.uri, "etag_or_mtime": o.etag_or_mtime, "bytes": o.size}
                                 for o in objects], override_num_blocks=_num_blocks(len(objects), job))
            .map_batches(read_objects, fn_kwargs={"s3": job.s3, "max_bytes": job.max_bytes},
                         batch_size=job.prep_batch_size, num_cpus=IO_TASK_CPUS, batch_format="numpy")
            .map_batches(PrepActor, batch_size=job.prep_batch_size, batch_format="numpy", **prep)
            .map_batches(ScoreActor, batch_size=job.model.batch_size, batch_format="numpy", **score)
        )
        fs, path = resolve(dest, job.s3)
        meta = schema_metadata(identity["model_id"], identity["sha256"], identity["crop_mode"],
                               identity["random_init"], identity["preset"])
        ds.write_parquet(path, filesystem=fs, filename_provider=_RunFiles(run_id),
                         schema=SCORE_SCHEMA.with_metadata(meta),
                         ray_remote_args={"num_cpus": IO_TASK_CPUS})

    table = run_files(dest, run_id, job.s3)
    summary = summarize(table, time.perf_counter() - t0, run_id=run_id, skipped_already_scored=skipped,
                        listed=len(objects) + skipped, output=dest, random_weights=identity["random_init"],
                        model_id=identity["model_id"], model_sha256=identity["sha256"])
    write_text(join(job.out, f"_summary-{run_id}.json"), to_json(summary), job.s3)
    print(format_summary(summary), file=sys.stderr)
    return summary


def _stage_args(job: ScoreJob, plan: PoolPlan, run_id: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """map_batches arguments of the two actor stages: pools, resources, constructor kwargs."""
    def crash_marker(stage: str) -> str | None:
        if job.inject_crash != stage:
            return None
        return os.path.join(tempfile.gettempdir(), f"piqa-crash-{stage}-{run_id}")

    common = {"model": job.model, "s3": job.s3}
    prep = dict(
        fn_constructor_kwargs={**common, "face_device": job.face_device, "crash_marker": crash_marker("prep")},
        compute=ActorPoolStrategy(size=plan.prep_actors), num_cpus=1, num_gpus=plan.prep_gpus,
    )
    score = dict(
        fn_constructor_kwargs={**common, "device": "cuda" if plan.score_gpus else "cpu",
                               "threads": max(1, round(plan.score_cpus)), "crash_marker": crash_marker("score")},
        compute=ActorPoolStrategy(size=plan.score_actors), num_cpus=plan.score_cpus, num_gpus=plan.score_gpus,
    )
    return prep, score


def _num_blocks(n: int, job: ScoreJob) -> int:
    """Enough blocks to spread over the pools, few enough that files stay large."""
    return max(1, min(n // max(1, job.prep_batch_size), 2000)) if n else 1


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.score`` = ``piqa score`` (the form ``ray job submit`` runs)."""
    from .cli import main as cli

    cli.main(args=["score", *(argv if argv is not None else sys.argv[1:])], prog_name="ray_jobs.score")


if __name__ == "__main__":
    main()
