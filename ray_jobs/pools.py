"""How a scoring run is spread over Ray: the actor pools a cluster's resources allow (:func:`plan_pools`),
fitted to the inputs (:func:`job_plan`), and the batch and block sizes that keep the pools fed."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import pyarrow as pa

from piqa_core.config import PIQAConfig
from piqa_core.stages import num_crops

from .reader import READ_THREADS
from .storage import ObjectInfo

if TYPE_CHECKING:
    from .score import ScoreJob


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
    return replace(plan, prep_actors=prep, score_actors=score)


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


MAX_BLOCKS = 2000


def block_rows(n: int, job: ScoreJob) -> int:
    """Objects per input block: a multiple of the prep batch, so every call but a last one gets a full
    batch (an even split of 18,000 objects into 2,000 blocks of 9 made every other call a 1-image one);
    enough blocks to spread over the pools, at most :data:`MAX_BLOCKS`."""
    pb = _prep_batch(job)
    return pb * max(1, math.ceil(n / (pb * MAX_BLOCKS)))


def input_blocks(objects: list[ObjectInfo], job: ScoreJob) -> list[pa.Table]:
    """The listed objects as input blocks of :func:`block_rows` rows (each built on its own: a slice of one
    table would carry the whole table's buffers to every block)."""
    rows = block_rows(len(objects), job)
    parts = [objects[i : i + rows] for i in range(0, len(objects), rows)]
    return [pa.table({"uri": pa.array([o.uri for o in p], pa.string()),
                      "etag_or_mtime": pa.array([o.etag_or_mtime for o in p], pa.string()),
                      "bytes": pa.array([o.size for o in p], pa.int64())}) for p in parts]


def _num_blocks(n: int, job: ScoreJob) -> int:
    return max(1, math.ceil(n / block_rows(n, job)))


def _prep_batch(job: ScoreJob) -> int:
    return job.prep_batch_size or min(job.model.batch_size, 8)
