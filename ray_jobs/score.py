"""Catalogue scoring on Ray Data: list → read → prepare (CPU actors) → score (GPU actors) → Parquet.

Run on a cluster with ``ray job submit --runtime-env cluster/runtime-env.yaml -- python -m ray_jobs.score
...`` (docs/operations.md) or through ``piqa score``. Every listed input yields exactly one row;
``--resume`` skips inputs the same model (same sha256) already scored under the output.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import math
import os
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

import ray
from ray.data import ActorPoolStrategy

from piqa_core.config import PIQAConfig
from piqa_core.stages import num_crops

from .actors import PrepActor, ScoreActor, model_identity
from .options import ModelOptions
from .reader import READ_THREADS, read_objects
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


@dataclass
class PoolPlan:
    prep_actors: int
    score_actors: int
    score_gpus: float
    score_cpus: float
    prep_gpus: float = 0.0
    prep_cpus: float = 1.0
    prep_threads: int = 1
    score_threads: int = 1


FACE_CPU_WITH_DEVICE_PREP = ("--face-device cpu does not apply with --prep device on GPUs (the score actors prepare "
                             "on their GPU, faces included): use --prep actors for CPU detection")


class PlanError(ValueError):
    """Options that contradict each other or the cluster (a usage error, not a failure)."""


PREP_PLACES = ("auto", "actors", "device")
# CPU-only clusters prepare inside the score actors when the model's share of the work is at least this.
IN_ACTOR_PREP_SHARE = 0.75

# Logical CPUs kept free for the light read and write tasks, so the actor pools cannot starve them.
IO_TASK_CPUS = 0.1
# Cores per CPU score actor at most: it takes one concurrent call per core (one torch thread each)
# and holds one copy of the weights for all of them.
CPU_SCORE_THREADS = 4


def model_share(cfg: PIQAConfig, crop_mode: str) -> float:
    """Estimated fraction of one image's CPU time spent in the model (the rest: decode, faces, crops).

    A cost model fitted to this project's single-thread CPU measurements: a Swin-B/384 crop 0.7 s,
    LIQE ViT-B/32 over 15 patches 0.35 s, RetinaFace-R50 on a 4:3 photo's 640x480 canvas 0.41 s,
    plus fixed per-image costs. Gives 0.95 for dn-piqa five-crop (measured with 2 threads: 6.5 % of
    the model time beyond it, i.e. 0.94) and 0.33 for the tiny preset.
    """
    kw = cfg.model.backbone_kwargs
    swin = (kw.get("embed_dim", 128) / 128) ** 2 * sum(kw.get("depths", (2, 2, 18, 2))) / 24
    model = 0.02 + 0.7 * swin * 2 * num_crops(crop_mode) * (cfg.preprocess.crop / 384) ** 2
    if cfg.liqe.enabled:
        vis = cfg.liqe.clip_cfg.get("vision_cfg", {})
        model += 0.35 * (vis.get("width", 768) / 768) ** 2 * vis.get("layers", 12) / 12 * cfg.liqe.num_patches / 15
    prep = 0.03 + (0.41 * (cfg.face.detect_long_side / 640) ** 2 if cfg.face.enabled else 0.0)
    return model / (model + prep)


def plan_pools(job: ScoreJob, resources: dict[str, float], cfg: PIQAConfig | None = None) -> PoolPlan:
    """Actor pool sizes (and whether a prep pool exists) from the cluster's resources unless given."""
    cpus, gpus = resources.get("CPU", 1.0), resources.get("GPU", 0.0)
    use_gpu = bool(gpus) if job.gpu is None else job.gpu
    if job.prep not in PREP_PLACES:
        raise PlanError(f"prep must be one of {PREP_PLACES}, got {job.prep!r}")
    face = job.face_device if job.face_device != "auto" else "gpu" if use_gpu else "cpu"
    if face == "gpu" and not use_gpu:
        raise PlanError("--face-device gpu needs GPUs: the cluster has none (pass --gpu to wait for them)")
    share = model_share(cfg, job.model.crop_mode or cfg.preprocess.crop_mode) if cfg is not None else 0.5
    place = job.prep
    if place == "auto":
        # On CPUs a model-dominated job loses more to a second process competing for the cores than
        # it gains from pipelining: dn-piqa on 2 cores, 40 photos, steady 0.109 img/s beside a prep
        # actor, 0.113 with the score actor preparing (end to end 0.100 vs 0.109).
        in_actor = not use_gpu and not job.prep_actors and share >= IN_ACTOR_PREP_SHARE
        place = "device" if in_actor else "actors"
    if place == "device" and job.prep_actors:
        raise PlanError("--prep-actors has no effect with --prep device (the score actors prepare)")
    if use_gpu:
        per = job.gpus_per_score_actor
        score = job.score_actors or max(1, int(max(gpus, per) / per))
        # --gpu before the GPU nodes are up: today's CPUs say nothing of theirs, so one CPU each.
        room = cpus if gpus else math.inf
        if place == "device":
            if job.face_device == "cpu":
                raise PlanError(FACE_CPU_WITH_DEVICE_PREP)
            return PoolPlan(0, score, per, _gpu_job_cpus(room, score))
        prep = job.prep_actors or max(1, int(cpus - score - 1))
        unit = _gpu_job_cpus(room, prep + score)
        if face != "gpu":
            return PoolPlan(prep, score, per, unit, prep_cpus=unit)
        # Detection on the GPU: prep actors take half of each score actor's share, split evenly,
        # so Ray counts (and places) every CUDA context.
        # Rounded down (Ray counts GPUs in 1e-4 steps): rounding up asked for more than the node has.
        return PoolPlan(prep, score, per / 2, unit, prep_gpus=math.floor(per / 2 * score / prep * 1e4) / 1e4,
                        prep_cpus=unit)
    return _cpu_plan(job, cpus, share, prep_pool=place == "actors")


def _cpu_plan(job: ScoreJob, cpus: float, share: float, prep_pool: bool) -> PoolPlan:
    """CPU-only pools: cores split by the model's ``share`` of the work, or all to score actors
    that prepare their own batches (no ``prep_pool``).

    One more process than cores when there are two stages, so the OS keeps every core busy while one
    waits on the other. Prep actors are single-threaded; score cores are grouped into actors of up to
    CPU_SCORE_THREADS cores (``score_threads``), each core one concurrent single-threaded call
    (``score_calls``) sharing the actor's copy of the weights (on 2 cores one 2-core dn-piqa actor
    process ran 0.128 img/s, two 1-core ones 0.118).
    """
    n = max(1, int(cpus))
    score_cores = min(n, max(1, round(n * share))) if prep_pool else n
    score = job.score_actors or max(1, -(-score_cores // CPU_SCORE_THREADS))
    threads = max(1, score_cores // score)
    prep = (job.prep_actors or max(1, n + 1 - score_cores)) if prep_pool else 0
    unit = _cpus_per_slot(cpus, prep + score * threads)
    return PoolPlan(prep, score, 0.0, _floor3(unit * threads), prep_cpus=_floor3(unit), score_threads=threads)


def _cpus_per_slot(cpus: float, slots: int) -> float:
    """Logical CPUs per actor thread such that every actor and the read and write tasks fit."""
    return max(0.05, (cpus - 2 * IO_TASK_CPUS) / slots)


def _gpu_job_cpus(cpus: float, actors: int) -> float:
    """Logical CPUs per actor of a GPU job: one each, less where they would not all fit (2 CPUs and a
    GPU; four score actors sharing one GPU on 4 CPUs)."""
    return _floor3(min(1.0, _cpus_per_slot(cpus, actors)))


def _floor3(x: float) -> float:
    """Logical CPUs rounded down to 3 decimals: rounding up could overbook the cluster."""
    return math.floor(x * 1000) / 1000


def job_plan(job: ScoreJob, resources: dict[str, float], cfg: PIQAConfig | None, n: int) -> PoolPlan:
    """The pools a job of ``n`` inputs runs with on a cluster of ``resources``."""
    return _fit_to_inputs(plan_pools(job, resources, cfg), job, n)


def _fit_to_inputs(plan: PoolPlan, job: ScoreJob, n: int) -> PoolPlan:
    """No more actors than there are blocks/batches for: an idle actor only pays its start-up."""
    prep = job.prep_actors or min(plan.prep_actors, _num_blocks(n, job))  # 0 stays 0 (--prep device)
    score = job.score_actors or min(plan.score_actors, max(1, -(-n // job.model.batch_size)))
    return dataclasses.replace(plan, prep_actors=prep, score_actors=score)


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
            ray.data.from_items([{"uri": o.uri, "etag_or_mtime": o.etag_or_mtime, "bytes": o.size}
                                 for o in objects], override_num_blocks=_num_blocks(len(objects), job))
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


def score_calls(plan: PoolPlan) -> int:
    """Concurrent calls per score actor.

    GPUs (``ScoreActor`` runs one forward pass at a time): two when fed by a prep pool, so one call
    pins and uploads its batch (~6.7 MB of uint8 per image) and converts rows to Arrow while the other
    runs the model; one where the actor prepares on its GPU, since there both calls' work is GPU work
    and overlapping them measured slower on an H200 (five-crop dn-piqa: 88 vs 94 and 83 vs 85 images/s).
    CPUs: one call per core, each on one torch thread. On 2 cores, dn-piqa batches prepared and scored
    by two single-threaded calls ran 0.077 images/s against 0.066-0.073 for one 2-thread call: no
    OpenMP barrier ties the cores together, and one call's single-threaded steps (decode, crops,
    Python between operators) overlap the other's model work.
    """
    if plan.score_gpus:
        return 2 if plan.prep_actors else 1
    return max(1, plan.score_threads)


def read_tasks(plan: PoolPlan) -> int:
    """Concurrent read tasks: two per score actor, each fetching a block's objects up to READ_THREADS
    at a time. A GPU score actor takes ~90 photos/s; 16-32 GETs in flight at ~100 ms each fetch
    160-320/s. Few tasks, since every new task worker pays for importing Ray Data."""
    return 2 * plan.score_actors


def read_batch(job: ScoreJob, plan: PoolPlan) -> int:
    """Objects per read call: up to READ_THREADS GETs in flight, but no more than the next stage takes
    per call. A larger block reaches one actor call whole and runs there batch after batch while the
    actor's other call idles (dn-piqa on 2 CPU cores: 16-row blocks for 2-image batches left a core
    idle a quarter of the job)."""
    consumer = _prep_batch(job) if plan.prep_actors else job.model.batch_size
    return min(max(_prep_batch(job), READ_THREADS), consumer)


def _num_blocks(n: int, job: ScoreJob) -> int:
    """Enough blocks to spread over the pools, few enough that files stay large."""
    return max(1, min(n // _prep_batch(job), 2000)) if n else 1


def _prep_batch(job: ScoreJob) -> int:
    return job.prep_batch_size or min(job.model.batch_size, 8)


def main(argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.score`` = ``piqa score`` (the form ``ray job submit`` runs)."""
    from .cli import run_module

    run_module("score", argv)


if __name__ == "__main__":
    main()
