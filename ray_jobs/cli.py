"""The ``piqa`` command line."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING

import click
from click.core import ParameterSource

from piqa_core.config import list_presets

from .cli_errors import _user_errors
from .cli_weights import weights
from .options import ModelOptions, Number, PoolOptions, max_bytes_option, model_options, pool_options, s3_options

if TYPE_CHECKING:
    from .storage import S3Options


@click.group()
@click.version_option(package_name="piqa")
def main() -> None:
    """Portrait image-quality scoring (DN-PIQA) at catalogue scale."""


main.add_command(weights)  # `piqa weights …`, in cli_weights.py


def run_module(command: str, argv: list[str] | None = None) -> None:
    """``python -m ray_jobs.<command>`` (the form ``ray job submit`` runs) = ``piqa <command>``, its usage
    and errors naming the module as it was run, not ``ray_jobs.<command> <command>``."""
    main.commands[command].main(args=argv if argv is not None else sys.argv[1:], prog_name=f"ray_jobs.{command}")


def _iso_date(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """A calendar date as YYYY-MM-DD: "2026/11/26" would write nested folders that read as run_date=2026."""
    if value is None:
        return None
    from datetime import date

    try:
        written = date.fromisoformat(value).isoformat() == value  # 3.11 also reads 20261126
    except ValueError:
        written = False
    if not written:
        raise click.BadParameter(f"{value!r} is not a date as YYYY-MM-DD", param_hint="--run-date")
    return value


@main.command()
@click.argument("inputs", nargs=-1, required=True)
@click.option("--out", required=True, help="Output: a .parquet file (local engine) or a folder/prefix (ray).")
@click.option("--engine", type=click.Choice(["ray", "local"]), default="ray", show_default=True,
              help="ray = the Ray Data pipeline; local = this process, no Ray.")
@click.option("--manifest", is_flag=True, help="INPUTS are manifest files (txt/csv/parquet of URIs).")
@s3_options
@max_bytes_option
@click.option("--resume", is_flag=True,
              help="Skip inputs this model (same sha256) already scored in this crop mode under --out.")
@click.option("--run-date", default=None, callback=_iso_date,
              help="Partition value run_date=YYYY-MM-DD (default: today, UTC).")
@pool_options
@click.option("--gpu/--no-gpu", default=None,
              help="Score on GPUs (default: if the cluster has GPUs now; --gpu waits for autoscaled GPU nodes).")
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster (default: start a local one).")
@click.option("--inject-crash", type=click.Choice(["prep", "score"]), default=None, hidden=True)
@model_options
def score(inputs: tuple[str, ...], out: str, engine: str, manifest: bool, s3: S3Options, max_bytes: int,
          resume: bool, run_date: str | None, pools: PoolOptions, gpu: bool | None, address: str | None,
          inject_crash: str | None, model: ModelOptions) -> None:
    """Score images under INPUTS (files, folders, s3:// prefixes); one output row per input."""
    if engine == "local":
        ctx = click.get_current_context()
        given = [f"--{name.replace('_', '-')}" for name in RAY_ONLY
                 if ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE]
        if given:
            raise click.UsageError(f"{', '.join(given)}: Ray engine options; --engine local takes none of them")
        with _user_errors():
            _score_local(inputs, out, manifest, s3, max_bytes, model)
    else:
        from .pools import PlanError
        from .score import ScoreJob, run_score_job

        use_gpu = _ray_gpu(model.device, gpu)
        _check_ray_places(use_gpu, gpu, pools)
        _check_ray_out(out, s3)
        job = ScoreJob(inputs=list(inputs), out=out, manifest=manifest, s3=s3, max_bytes=max_bytes,
                       model=model, resume=resume, **pools.job_fields(), gpu=use_gpu, address=address,
                       inject_crash=inject_crash)
        if run_date:
            job.run_date = run_date
        with _user_errors():
            try:
                summary = run_score_job(job)
            except PlanError as e:
                raise click.UsageError(str(e)) from None
        click.echo(f"wrote {summary['rows']} rows to {summary['output']}" if summary["rows"] else
                   f"nothing to score: {summary['listed']} inputs listed, {summary['skipped_already_scored']} "
                   "already scored")


def _ray_gpu(device: str | None, gpu: bool | None) -> bool | None:
    """``--device`` for a Ray job: cpu or cuda chooses the score pools' kind (Ray gives each actor its GPU)."""
    if device is None:
        return gpu
    if device not in ("cpu", "cuda"):
        raise click.UsageError(f"--device {device}: a Ray job takes cpu or cuda (each actor is given its own GPU)")
    want = device == "cuda"
    if gpu is not None and gpu != want:
        raise click.UsageError(f"--device {device} contradicts --{'' if gpu else 'no-'}gpu")
    return want


def _check_ray_places(use_gpu: bool | None, gpu: bool | None, pools: PoolOptions) -> None:
    """Refuses, before the listing (which may take minutes), what the flags alone show cannot run."""
    from .pools import FACE_CPU_WITH_DEVICE_PREP

    if pools.prep == "device" and pools.prep_actors:
        raise click.UsageError("--prep-actors has no effect with --prep device (the score actors prepare)")
    cpu_flag = "--no-gpu" if gpu is False else "--device cpu"
    if pools.face_device == "gpu" and use_gpu is False:
        raise click.UsageError(f"--face-device gpu needs GPUs; it contradicts {cpu_flag}")
    if use_gpu and pools.prep == "device" and pools.face_device == "cpu":
        raise click.UsageError(FACE_CPU_WITH_DEVICE_PREP)
    if use_gpu is False and click.get_current_context().get_parameter_source("gpus_per_actor") \
            == ParameterSource.COMMANDLINE:
        raise click.UsageError(f"--gpus-per-actor has no effect with {cpu_flag}")


def _parquet_file(out: str, s3: S3Options) -> bool:
    """Whether ``--out`` names a Parquet file (``*.parquet``, not an existing folder of that name)."""
    from .storage import is_dir

    if not out.lower().endswith(".parquet"):
        return False
    with _user_errors():
        return not is_dir(out, s3)


def _check_ray_out(out: str, s3: S3Options) -> None:
    """A new ``--out x.parquet`` (``x.parquet/`` too) for a Ray job would be a folder of that name, which
    readers take for a file."""
    if _parquet_file(out.rstrip("/"), s3):
        raise click.UsageError(f"--out {out}: a Ray job writes a folder of run_date=… partitions; name a folder "
                               "(or use --engine local for one Parquet file)")


# Options that shape the Ray pipeline; the in-process engine refuses them rather than ignore them.
RAY_ONLY = ("resume", "run_date", "face_device", "prep", "prep_actors", "score_actors", "prep_batch_size",
            "gpus_per_actor", "gpu", "address")
for _param in score.params:
    if _param.name in RAY_ONLY:
        _param.help = f"{_param.help or ''} [Ray engine only]".lstrip()


def _score_local(inputs, out, manifest, s3, max_bytes, model: ModelOptions) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from tqdm import tqdm

    from piqa_core.scorer import Scorer

    from .actors import weights_dir
    from .inprocess import score_objects
    from .inputs import list_inputs
    from .storage import atomic_write_bytes, check_writable, parent_uri
    from .summary import format_summary, summarize

    model.check_here()
    if not _parquet_file(out, s3):
        raise click.UsageError(f"--engine local writes one Parquet file: --out must be a *.parquet file, got {out}")
    check_writable(parent_uri(out), s3)
    objects = list_inputs(inputs, s3, manifest=manifest)
    scorer = Scorer.from_pretrained(model.source if model.random_weights else weights_dir(model.source, s3),
                                    random_weights=model.random_weights, device=model.device, precision=model.precision,
                                    crop_mode=model.crop_mode, compile=model.compile, batch_size=model.batch_size)
    t0 = time.perf_counter()
    with tqdm(total=len(objects), unit="img", file=sys.stderr) as bar:
        table = score_objects(objects, scorer, model.batch_size, s3, max_bytes, progress=bar.update)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    atomic_write_bytes(out, sink.getvalue().to_pybytes(), s3)  # a killed run never leaves half a file
    summary = summarize(table, time.perf_counter() - t0, random_weights=scorer.bundle.random_init,
                        random_parts=list(scorer.bundle.random_parts))
    click.echo(format_summary(summary), err=True)  # as the Ray engine prints it: stdout keeps the one result line
    click.echo(f"wrote {table.num_rows} rows to {out}")


@main.command()
@click.argument("library")
@click.option("--state", "state_uri", required=True,
              help="Audit state folder/prefix (CURRENT pointer, states/, runs/, reports/).")
@click.option("--alert-if-mean-drops", type=Number(0), default=None,
              help="Exit 3 when the library's mean score fell by more than this vs the previous run, "
                   "or no photo has an ok score any more.")
@click.option("--alert-if-error-rate", type=Number(0, 1), default=None,
              help="Exit 3 when more than this fraction of the objects scored in this run are errors.")
@click.option("--alert-if-deleted", type=Number(0, 1), default=None,
              help="Exit 3 when more than this fraction of the previous run's objects are gone from the listing "
                   "(an unmounted folder or a wrong prefix looks like a mass deletion).")
@click.option("--top-worst", type=click.IntRange(0), default=12, show_default=True,
              help="Worst photos shown (with thumbnails) in the report.")
@click.option("--prefix-depth", type=click.IntRange(1), default=1, show_default=True,
              help="Folder levels below the library root that make an album in the per-prefix table.")
@click.option("--keep-deleted-days", type=Number(0, 36500), default=30.0, show_default=True,
              help="Deleted objects stay in the state (deleted=True) at least one run and this long (at most "
                   "36500, a century); listed again unchanged meanwhile, they are restored without a new score.")
@s3_options
@max_bytes_option
@pool_options
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster (default: start a local one).")
@model_options
def audit(library: str, state_uri: str, alert_if_mean_drops: float | None, alert_if_error_rate: float | None,
          alert_if_deleted: float | None, top_worst: int, prefix_depth: int, keep_deleted_days: float, s3: S3Options,
          max_bytes: int, pools: PoolOptions, address: str | None, model: ModelOptions) -> None:
    """Nightly incremental audit of LIBRARY: score new and changed photos, keep the state, write a report.

    Exit status: 0 ok; 3 an --alert-if-* threshold was crossed (state and report are still committed);
    other non-zero: the run failed and the previous state stays current; a re-run continues it (the
    scores it kept are reused), or, after another audit committed first, audits against that state.
    """
    from .audit import ALERT_EXIT_CODE, AuditJob, run_audit
    from .pools import PlanError

    use_gpu = _ray_gpu(model.device, None)
    _check_ray_places(use_gpu, None, pools)
    job = AuditJob(library=library, state=state_uri, model=model, s3=s3, alert_if_mean_drops=alert_if_mean_drops,
                   alert_if_error_rate=alert_if_error_rate, alert_if_deleted=alert_if_deleted, top_worst=top_worst,
                   prefix_depth=prefix_depth, keep_deleted_days=keep_deleted_days, max_bytes=max_bytes, pools=pools,
                   address=address, gpu=use_gpu)
    with _user_errors():
        try:
            result = run_audit(job)
        except PlanError as e:  # pools the cluster cannot hold: a usage error, as for piqa score
            raise click.UsageError(str(e)) from None
    c = result.summary["counts"]
    click.echo(f"run {result.run_id}: {c['new']} new, {c['changed']} changed, {c.get('retry', 0)} retried, "
               f"{c['unchanged']} unchanged, {c['restored']} restored, {c['deleted']} deleted; scored {c['scored']}")
    click.echo(f"state  {result.state_uri}\nreport {result.report_uri}")
    if result.alerts:
        for message in result.alerts:
            click.echo(f"ALERT: {message}", err=True)
        sys.exit(ALERT_EXIT_CODE)


# ----------------------------------------------------------------------------- train and eval


def _label_options(fn):
    """Where the labels are and how they split (shared by train and eval)."""
    opts = [
        click.option("--labels", required=True, help="PIQ23 CSV or a uri,score,group[,split] CSV/Parquet."),
        click.option("--images", default=None, help="PIQ23 image root (IMAGE PATH is relative to it)."),
        click.option("--format", "fmt", type=click.Choice(["auto", "piq23", "table"]), default="auto",
                     show_default=True),
        click.option("--train-list", default=None, help="Official train split file (CSV with IMAGE, or names)."),
        click.option("--test-list", default=None, help="Official test split file."),
        click.option("--val-fraction", type=Number(0, 1, max_open=True), default=0.2, show_default=True,
                     help="Share of each group's train images held out for validation when no val split exists."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--holdout-key", type=click.Choice(["path", "uri"]), default="path", show_default=True,
                     help="What the validation hold-out hashes: path = each label's image path as written "
                          "(the same split wherever the images are stored); uri = the resolved uri, as runs "
                          "started before this option did."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


@main.command()
@_label_options
@s3_options
@click.option("--pairs", default=None, help="Fixed pair list (IMAGE, IMAGE second), e.g. the official exp.csv.")
@click.option("--pair-scores", type=click.Choice(["list", "labels"]), default="list", show_default=True,
              help="With --pairs: train on the pair list's JOD / JOD second columns where it has them (as the "
                   "official script) or on --labels' scores.")
@click.option("--pairs-per-image", type=click.IntRange(1), default=2, show_default=True,
              help="Without --pairs: partners drawn within its group for each train image, every epoch "
                   "(the official exp.csv pairs each image twice).")
@click.option("--run-name", required=True, help="Names the run; the same name again resumes it.")
@click.option("--storage", required=True, help="Folder or s3:// prefix for checkpoints and the exported model.")
@click.option("--workers", type=click.IntRange(1), default=1, show_default=True)
@click.option("--gpu", is_flag=True, help="One GPU per worker.")
@click.option("--random-start", is_flag=True,
              help="Let a branch without start weights (--init-whole, --init-face, --init) start from random init.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="GPU training steps: bf16 autocast, or fp32 as the official script (CPU workers: fp32).")
@click.option("--cpus-per-worker", type=Number(0.1), default=None, help="Default 1 (CPU) / 4 (GPU).")
@click.option("--epochs", type=click.IntRange(1), default=10, show_default=True,
              help="Epochs in all: a resumed run trains the ones still missing.")
@click.option("--batch-pairs", type=click.IntRange(1), default=6, show_default=True,
              help="Pairs per optimiser step over all workers (a multiple of --workers).")
@click.option("--lr", type=Number(0, min_open=True), default=1e-5, show_default=True)
@click.option("--weight-decay", type=Number(0), default=1e-7, show_default=True)
@click.option("--lr-step", type=click.IntRange(1), default=2, show_default=True, help="StepLR step (epochs).")
@click.option("--lr-gamma", type=Number(0, min_open=True), default=0.9, show_default=True)
@click.option("--preset", type=click.Choice(list_presets()), default="dn-piqa", show_default=True,
              help="Architecture when not starting from a model directory.")
@click.option("--init", default=None, help="Model directory (ours) or the official PIQ_model.pth.")
@click.option("--init-whole", default=None, help="Official LSVQ Swin file for the whole-image branch.")
@click.option("--init-face", default=None, help="Official GFIQA Swin file for the face branch.")
@click.option("--liqe", default=None, help="Official LIQE.pt (frozen) when not starting from a model directory.")
@click.option("--retinaface", default=None, help="RetinaFace release file (frozen), likewise.")
@click.option("--cache", default=None, help="Folder/prefix for the per-image face + LIQE feature cache.")
@click.option("--max-failures", type=click.IntRange(-1), default=2, show_default=True,
              help="Worker failures survived (each restarts from the last checkpoint).")
@click.option("--keep", type=click.IntRange(1), default=2, show_default=True,
              help="Checkpoints kept, the best by validation SRCC (and the latest, which Ray always keeps "
                   "for resuming).")
@click.option("--address", envvar="RAY_ADDRESS", default=None, help="Ray cluster (default: start a local one).")
@click.option("--fail-at-epoch", type=int, default=None, hidden=True)
def train(labels, images, fmt, train_list, test_list, val_fraction, seed, holdout_key, s3, **kw) -> None:
    """Train DN-PIQA on labelled images (fidelity loss on pairs within a group) with Ray Train."""
    import ray.train as ray_train

    from piqa_core.training import format_val_srcc

    from .train import TrainJob, run_train_job

    job = TrainJob(labels=labels, images=images, format=fmt, train_list=train_list, test_list=test_list,
                   val_fraction=val_fraction, seed=seed, holdout_key=holdout_key, s3=s3, **kw)
    try:
        with _user_errors():
            summary = run_train_job(job)
    except FloatingPointError as e:  # the workers stopped at a nan/inf loss; the message says what to do
        raise click.ClickException(f"training failed: {e}") from None
    except ray_train.TrainingFailedError as e:
        causes = [getattr(f, "cause", f) for f in getattr(e, "worker_failures", {}).values()]
        advice = ("The model diverged, and would again from its last checkpoint: start a new run (another "
                  "--run-name) with a lower --lr." if any(isinstance(c, FloatingPointError) for c in causes)
                  else "Re-run the same command to resume from the last checkpoint.")
        raise click.ClickException(f"training failed: {e}\n{advice}") from None
    click.echo(f"model: {summary['model_dir']} (best epoch {summary['best_epoch'] + 1} of "
               f"{summary['epochs_completed']}, val SRCC {format_val_srcc(summary['best'])})")
    if (test := summary["test"]) and test["failed"] == test["items"]:
        raise click.ClickException(f"every test image failed to score, so the test metrics are undefined: see "
                                   f"{summary['run_dir']}/test_report.parquet")


@main.command("eval")
@_label_options
@s3_options
@click.option("--split", type=click.Choice(["train", "val", "test", "all"]), default=None,
              help="Default: test when the labels have a test split, else all. val is a training run's "
                   "validation split when --val-fraction, --seed and --holdout-key match the run's.")
@click.option("--out", required=True, help="JSON report; per-image predictions go next to it (.parquet).")
@model_options
def eval_cmd(labels, images, fmt, train_list, test_list, val_fraction, seed, holdout_key, s3, split, out,
             model: ModelOptions) -> None:
    """Score labelled images with a model and report per-group SRCC/KRCC/PLCC/RMSE/MAE."""
    from tqdm import tqdm

    from piqa_core.scorer import Scorer, default_device

    from .actors import load_bundle
    from .evaluate import check_eval_outputs, check_run_holdout, evaluate_table, select_split, write_eval
    from .labels import load_labels
    from .storage import check_writable, is_dir, parent_uri

    model.check_here()
    with _user_errors():
        folder = out.endswith("/") or is_dir(out, s3)
    if folder:  # refused now, not after scoring everything
        raise click.UsageError(f"--out names the JSON report file (the predictions go next to it), got a folder: {out}")
    with _user_errors():
        check_eval_outputs(out, [labels, train_list, test_list])
        check_writable(parent_uri(out), s3)
        if split == "val" and model.weights:  # before the labels: other flags may leave no val split at all
            check_run_holdout(model.weights, val_fraction, seed, holdout_key, s3)
        table = load_labels(labels, images, fmt, train_list, test_list, val_fraction, seed, s3, check_images=False,
                            holdout_key=holdout_key)
        table, split = select_split(table, split)
        scorer = Scorer(load_bundle(model, s3), device=model.device or default_device(), precision=model.precision,
                        crop_mode=model.crop_mode, compile=model.compile, batch_size=model.batch_size,
                        own_bundle=True)
    with tqdm(total=len(table), unit="img", file=sys.stderr) as bar:
        result = evaluate_table(scorer, table, split, s3, model.batch_size, progress=bar.update)
    click.echo(result.format())
    with _user_errors():
        parquet = write_eval(result, out, s3)
    click.echo(f"wrote {out} and {parquet}")
    if result.info["failed"] == result.info["items"]:
        codes = result.predictions["error_code"].value_counts().head(3)
        raise click.ClickException(f"every image failed to score ({', '.join(f'{k}: {v}' for k, v in codes.items())});"
                                   f" the metrics are undefined, see {parquet}")


if __name__ == "__main__":
    main()
