"""Catalogue scoring on Ray Data: list → read → prepare (CPU actors) → score (GPU actors) → Parquet.

Run on a cluster with ``ray job submit --runtime-env cluster/runtime-env.yaml -- python -m ray_jobs.score
...`` (docs/operations.md) or through ``piqa score``. Every listed input yields exactly one row;
``--resume`` skips inputs the same model (same sha256) already scored under the output.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray.data import ActorPoolStrategy

from .actors import PrepActor, ScoreActor, model_identity
from .options import ModelOptions
from .pools import (IO_TASK_CPUS, PlanError, PoolPlan, _prep_batch, input_blocks, job_plan, read_batch, read_tasks,
                    score_calls)
from .reader import read_objects
from .resume import RunFiles, already_scored, is_done, read_rows, run_file_paths
from .schema import SCORE_SCHEMA, now_utc, schema_metadata
from .inputs import list_inputs
from .storage import ObjectInfo, S3Options, check_writable, join, resolve, write_text
from .summary import RowsMissing, format_summary, missing_uris, summarize, to_json


@dataclass
class ScoreJob:
    inputs: list[str]
    out: str
    model: ModelOptions
    manifest: bool = False
    s3: S3Options = field(default_factory=S3Options)
    max_bytes: int = 256 * 1024 * 1024
    resume: bool = False
    run_date: str = field(default_factory=lambda: now_utc().date().isoformat())  # UTC, as scored_at
    run_id: str | None = None
    # Where prep actors run RetinaFace: "auto" = on the GPU when the score pools are on GPUs (CPU
    # detection, ~0.65 images/s per core at 12 MP, cannot feed a GPU), else the CPU.
    face_device: str = "auto"
    # "actors": a CPU actor pool prepares (decode, faces, crops); "device": the score actors prepare on
    # their own device (nvJPEG + GPU resizes on GPUs, the exact CPU code on CPUs), no prep pool;
    # "auto": actors with GPUs, and on CPU-only clusters device when the model dominates the work.
    prep: str = "auto"
    prep_actors: int | None = None
    score_actors: int | None = None
    # Images per prep call; default: the score batch (at most 8), so a prepared block is exactly
    # one model batch and Ray Data never copies pixel columns to re-batch them.
    prep_batch_size: int | None = None
    gpus_per_score_actor: float = 1.0
    # Rows gathered into one Parquet file (each score batch was a file of its own: a million photos
    # made 125,000 files for --resume and readers to open). Rows waiting for their file are lost with
    # the job and scored again by --resume, so this is also the work a crash can cost.
    rows_per_file: int = 2000
    # None: use GPUs if the cluster has some now; True: request them even if the autoscaler has
    # not started GPU nodes yet; False: CPU only.
    gpu: bool | None = None
    address: str | None = None
    # Chaos testing: "prep" or "score" makes one actor of that stage die once, mid-batch.
    inject_crash: str | None = None
    # Score exactly these objects instead of listing ``inputs`` (the audit passes its planned delta).
    objects: list[ObjectInfo] | None = None
    # With resume: rows holding these error codes are not done (the audit retries transient errors).
    retry_error_codes: frozenset[str] = frozenset()
    # What a run that leaves inputs without a row tells its user to do.
    rerun_hint: str = "run the same command with --resume to score them"


def _run_id(job: ScoreJob, objects: list[ObjectInfo]) -> str:
    digest = hashlib.sha256("\n".join(o.uri for o in objects).encode()).hexdigest()[:8]
    return f"{now_utc().strftime('%Y%m%dT%H%M%S')}-{digest}-{uuid.uuid4().hex[:4]}"


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Connect to Ray (or start a local one) unless connected; shut down only what this started."""
    started = not ray.is_initialized()
    if started:
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    try:
        yield
    finally:
        if started:
            ray.shutdown()


def _starts_local_ray(address: str | None) -> bool:
    """Whether ``ray.init(address)`` starts a new Ray here rather than joining one (a ``ray start``
    head, a cluster-launcher node, RAY_ADDRESS): only such a Ray has no autoscaler to add GPUs."""
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    try:  # Ray's own lookup (running instances on this machine included); private, so guarded
        from ray._private.services import canonicalize_bootstrap_address

        return canonicalize_bootstrap_address(None) is None
    except Exception:  # noqa: BLE001 — unknown: never refuse a job on a guess
        return False


def run_score_job(job: ScoreJob) -> dict[str, Any]:
    """Run the pipeline to completion; returns the summary (also written as JSON next to the output)."""
    t0 = time.perf_counter()
    # Before Ray starts: a wrong input, manifest, model directory or output folder costs no cluster start.
    check_writable(job.out, job.s3)
    objects = (list(job.objects) if job.objects is not None
               else list_inputs(job.inputs, job.s3, manifest=job.manifest))
    identity = model_identity(job.model, job.s3)
    skipped = 0
    if job.resume:
        done = already_scored(job.out, identity["sha256"], identity["crop_mode"], job.s3, job.retry_error_codes)
        before = len(objects)
        objects = [o for o in objects if not is_done(done, o)]
        skipped = before - len(objects)
    if not objects:  # nothing to score (an empty prefix, a resumed run already done): no cluster, no pools
        return _run_pipeline(job, objects, identity, skipped, t0, resources=None)
    local = not ray.is_initialized() and _starts_local_ray(job.address)
    with ray_session(job.address):
        resources = ray.cluster_resources()
        if local and job.gpu and not resources.get("GPU"):
            # A local Ray has no autoscaler: the GPU actors would wait for ever.
            raise PlanError("GPUs requested (--gpu or --device cuda), but the local Ray this job started sees "
                            "none; drop the flag, or pass --address of a cluster whose GPU nodes can start")
        return _run_pipeline(job, objects, identity, skipped, t0, resources)


def _run_pipeline(job: ScoreJob, objects: list[ObjectInfo], identity: dict[str, Any], skipped: int,
                  t0: float, resources: dict[str, float] | None) -> dict[str, Any]:
    """The Ray Data chain over ``objects`` (none: only the summary, ``resources`` None), then the summary."""
    run_id = job.run_id or _run_id(job, objects)
    dest = join(job.out, f"run_date={job.run_date}")
    earlier = run_file_paths(dest, run_id, job.s3) if job.run_id else set()  # the audit reuses its run ids
    if resources is not None:
        plan = job_plan(job, resources, identity["config"], len(objects))
        print(f"piqa: {len(objects)} inputs to score ({skipped} already scored), "
              f"{plan.prep_actors} prep + {plan.score_actors} score actors, run {run_id}", file=sys.stderr)
        prep, score = _stage_args(job, plan, run_id, identity)
        ds = (
            ray.data.from_arrow(input_blocks(objects, job))
            .map_batches(read_objects, fn_kwargs={"s3": job.s3, "max_bytes": job.max_bytes},
                         batch_size=read_batch(job, plan), num_cpus=IO_TASK_CPUS,
                         batch_format="numpy", compute=ray.data.TaskPoolStrategy(size=read_tasks(plan)))
        )
        if prep is not None:
            ds = ds.map_batches(PrepActor, batch_size=_prep_batch(job), batch_format="numpy", **prep)
        ds = ds.map_batches(ScoreActor, batch_size=job.model.batch_size, batch_format="numpy", **score)
        fs, path = resolve(dest, job.s3)
        meta = schema_metadata(identity["model_id"], identity["sha256"], identity["crop_mode"],
                               identity["random_init"], identity["preset"], identity["random_parts"])
        ds.write_parquet(path, filesystem=fs, filename_provider=RunFiles(run_id),
                         schema=SCORE_SCHEMA.with_metadata(meta),
                         min_rows_per_file=job.rows_per_file,
                         ray_remote_args={"num_cpus": IO_TASK_CPUS}, concurrency=1)
    else:
        print(f"piqa: nothing to score ({skipped} already scored), run {run_id}", file=sys.stderr)

    table = read_rows(dest, job.s3, run_id, exclude=earlier)  # an earlier attempt's rows are not this run's
    missing = missing_uris([o.uri for o in objects], table)
    summary = summarize(table, time.perf_counter() - t0, run_id=run_id, skipped_already_scored=skipped,
                        listed=len(objects) + skipped, missing_rows=len(missing), output=dest,
                        random_weights=identity["random_init"], random_parts=identity["random_parts"],
                        model_id=identity["model_id"], model_sha256=identity["sha256"])
    write_text(join(job.out, f"_summary-{run_id}.json"), to_json(summary), job.s3)
    print(format_summary(summary), file=sys.stderr)
    if missing:  # e.g. an output file removed or damaged before it was read back
        raise RowsMissing(f"run {run_id}: {len(missing)} of {len(objects)} inputs have no row in {dest} "
                          f"(first: {missing[0]}); {job.rerun_hint}")
    return summary


def _stage_args(job: ScoreJob, plan: PoolPlan, run_id: str,
                identity: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Any]]:
    """map_batches arguments of the two actor stages (no prep stage with --prep device)."""
    def crash_marker(stage: str) -> str | None:
        if job.inject_crash != stage:
            return None
        return os.path.join(tempfile.gettempdir(), f"piqa-crash-{stage}-{run_id}")

    common = {"model": job.model, "s3": job.s3}
    prep = None if not plan.prep_actors else dict(
        fn_constructor_kwargs={**common, "face_device": "gpu" if plan.prep_gpus else "cpu",
                               "crash_marker": crash_marker("prep"),
                               "threads": plan.prep_threads,
                               "identity": identity},
        compute=ActorPoolStrategy(size=plan.prep_actors), num_cpus=plan.prep_cpus, num_gpus=plan.prep_gpus,
    )
    calls = score_calls(plan)
    score = dict(
        fn_constructor_kwargs={**common, "identity": identity, "device": "cuda" if plan.score_gpus else "cpu",
                               "threads": plan.score_threads // calls if not plan.score_gpus else plan.score_threads,
                               "crash_marker": crash_marker("score"),
                               "prepare_on_device": plan.prep_actors == 0, "calls": calls},
        compute=ActorPoolStrategy(size=plan.score_actors, max_concurrent_calls_per_actor=calls,
                                  enable_true_multi_threading=calls > 1),
        num_cpus=plan.score_cpus, num_gpus=plan.score_gpus,
    )
    return prep, score


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.score`` = ``piqa score`` (the form ``ray job submit`` runs)."""
    from .cli import run_module

    run_module("score", argv)


if __name__ == "__main__":
    main()
