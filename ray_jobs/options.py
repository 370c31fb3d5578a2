"""Option groups shared by commands: the model (score, audit, eval), the Ray pipeline's pools and input
size limit (score, audit) and S3 storage (every command that reads)."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import click
from click.core import ParameterSource

from piqa_core.config import CROP_MODES, PRECISIONS, list_presets

if TYPE_CHECKING:
    from .storage import S3Options


class Number(click.FloatRange):
    """``click.FloatRange`` that also refuses nan, which passes every range check, and infinities."""

    name = "number"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


@dataclass
class ModelOptions:
    weights: str | None
    random_weights: bool
    preset: str
    crop_mode: str | None
    precision: str
    device: str | None
    batch_size: int
    compile: bool = False

    def check(self) -> None:
        if self.weights and self.random_weights:
            raise click.UsageError("--weights and --random-weights exclude each other")
        if not self.weights and not self.random_weights:
            raise click.UsageError(
                "no model weights given. Pass --weights MODEL_DIR (a directory from "
                "`piqa weights import-official` or `piqa train`, local or s3://), or for a smoke run "
                "--random-weights --preset tiny|dn-piqa (random weights are not a quality model)."
            )
        if self.device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", self.device):
            raise click.UsageError(f"--device {self.device}: use cpu, cuda or cuda:N")

    def check_here(self) -> None:
        """For the in-process engine: a CUDA --device must name a GPU this machine has."""
        if self.device is None or self.device == "cpu":
            return
        import torch

        count = torch.cuda.device_count()
        index = int(self.device.partition(":")[2] or 0)
        if index >= count:
            raise click.UsageError(f"--device {self.device}: this machine has "
                                   f"{f'{count} CUDA device(s)' if count else 'no CUDA device'}")

    @property
    def source(self) -> str:
        return self.preset if self.random_weights else str(self.weights)


def model_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the model flags and passes them as one ``model: ModelOptions`` argument."""
    opts = [
        click.option("--weights", help="Model directory (local path or s3://…)."),
        click.option("--random-weights", is_flag=True, help="Random init (smoke tests only; rows say so)."),
        click.option("--preset", type=click.Choice(list_presets()), default="dn-piqa", show_default=True,
                     help="Architecture for --random-weights."),
        click.option("--crop-mode", type=click.Choice(CROP_MODES), default=None,
                     help="five = official test protocol (default; 10 backbone passes per image), center = one "
                          "crop per branch (2 passes; decode, face detection and LIQE cost the same)."),
        click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True),
        click.option("--device", default=None,
                     help="cpu, cuda or cuda:N in this process (eval, --engine local; default: cuda if available); "
                          "a Ray job takes cpu or cuda (default: GPUs when the cluster has them)."),
        click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True),
        click.option("--compile", "compile_", is_flag=True,
                     help="torch.compile the networks (static batch shapes; minutes of warm-up, then faster)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, weights: str | None, random_weights: bool, preset: str, crop_mode: str | None,
                precision: str, device: str | None, batch_size: int, compile_: bool, **kwargs: Any) -> Any:
        model = ModelOptions(weights, random_weights, preset, crop_mode, precision, device, batch_size, compile_)
        model.check()
        if weights and click.get_current_context().get_parameter_source("preset") == ParameterSource.COMMANDLINE:
            raise click.UsageError("--preset applies to --random-weights only: the model directory given by "
                                   "--weights carries its own architecture")
        return fn(*args, model=model, **kwargs)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


@dataclass
class PoolOptions:
    """Where the Ray pipeline prepares and scores images, and with how many actors."""

    face_device: str = "auto"
    prep: str = "auto"
    prep_actors: int | None = None
    score_actors: int | None = None
    prep_batch_size: int | None = None
    gpus_per_actor: float = 1.0

    def job_fields(self) -> dict[str, Any]:
        """The options as ``ScoreJob`` fields."""
        return {"face_device": self.face_device, "prep": self.prep, "prep_actors": self.prep_actors,
                "score_actors": self.score_actors, "prep_batch_size": self.prep_batch_size,
                "gpus_per_score_actor": self.gpus_per_actor}


def pool_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds the pool flags and passes them as one ``pools: PoolOptions`` argument."""
    opts = [
        click.option("--face-device", type=click.Choice(["auto", "cpu", "gpu"]), default="auto", show_default=True,
                     help="Where prep actors run RetinaFace; auto = gpu when scoring on GPUs (CPU detection cannot "
                          "keep up with a GPU), else cpu."),
        click.option("--prep", type=click.Choice(["auto", "actors", "device"]), default="auto", show_default=True,
                     help="actors = a CPU actor pool decodes, detects and crops; device = the score actors do it on "
                          "their device (GPU: nvJPEG decode, GPU resizes, for GPU nodes short of CPU cores; CPU: the "
                          "same code as the actors); auto = actors on GPU clusters, device on CPU-only clusters when "
                          "the model dominates the work (dn-piqa)."),
        click.option("--prep-actors", type=click.IntRange(1), default=None, help="CPU actor pool size."),
        click.option("--score-actors", type=click.IntRange(1), default=None, help="Model actor pool size."),
        click.option("--prep-batch-size", type=click.IntRange(1), default=None,
                     help="Images per prep call (default: the score batch size, at most 8)."),
        click.option("--gpus-per-actor", type=Number(0.01, 1), default=1.0, show_default=True,
                     help="GPU share of each score actor (0.5: two per GPU)."),
    ]

    @functools.wraps(fn)
    def wrapper(*args: Any, face_device: str, prep: str, prep_actors: int | None, score_actors: int | None,
                prep_batch_size: int | None, gpus_per_actor: float, **kwargs: Any) -> Any:
        pools = PoolOptions(face_device, prep, prep_actors, score_actors, prep_batch_size, gpus_per_actor)
        return fn(*args, pools=pools, **kwargs)

    for opt in reversed(opts):
        wrapper = opt(wrapper)
    return wrapper


def max_bytes_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --max-bytes, the size above which an object is an error row, not read."""
    return click.option("--max-bytes", type=click.IntRange(1), default=256 * 1024 * 1024, show_default=True,
                        help="Objects larger than this become error rows.")(fn)


def s3_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Adds --endpoint-url/--region and passes them, over the environment's, as one ``s3: S3Options``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, endpoint_url: str | None, region: str | None, **kwargs: Any) -> Any:
        return fn(*args, s3=_s3(endpoint_url, region), **kwargs)

    wrapper = click.option("--region", default=None)(wrapper)
    return click.option("--endpoint-url", envvar="PIQA_S3_ENDPOINT",
                        help="S3-compatible endpoint (MinIO, Ceph, …).")(wrapper)


def _s3(endpoint_url: str | None, region: str | None) -> S3Options:
    from .storage import S3Options

    s3 = S3Options.from_env()
    s3.endpoint_url = endpoint_url or s3.endpoint_url
    s3.region = region or s3.region
    return s3
