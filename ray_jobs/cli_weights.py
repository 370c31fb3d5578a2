"""``piqa weights``: create, import and inspect model directories (registered on ``piqa`` by cli.py)."""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import click

from piqa_core.config import list_presets

from .cli_errors import _user_errors
from .options import s3_options

if TYPE_CHECKING:
    from .storage import S3Options

# scheme://…: pathlib would take it for a relative local path ("s3:/bucket/…")
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _is_model_dir(path: Path) -> bool:
    """Only our two files, and a config.json of some piqa checkpoint format: what --force may replace."""
    from piqa_core.checkpoints import CONFIG_FILE, WEIGHTS_FILE, is_piqa_format

    if {p.name for p in path.iterdir()} - {CONFIG_FILE, WEIGHTS_FILE} or not (path / CONFIG_FILE).is_file():
        return False
    try:
        fmt = json.loads((path / CONFIG_FILE).read_text()).get("format")
    except (ValueError, AttributeError, OSError):
        return False
    return is_piqa_format(fmt)


def _check_out(out: str, force: bool) -> Path:
    """The local folder ``-o`` names; refused before any work when writing it would lose or mix files."""
    if _SCHEME.match(out):
        raise click.ClickException(f"-o {out}: model directories are written to a local folder; write it "
                                   f"locally, then upload it (e.g. aws s3 sync DIR {out})")
    path = Path(out)
    if path.is_symlink():  # the rename into place would replace the link, not the folder it names
        raise click.ClickException(f"-o {out} is a symbolic link: name the folder it points to")
    if path.is_dir() and any(path.iterdir()):
        if not force:
            raise click.ClickException(f"-o {out} exists and is not empty: name a new folder or remove it "
                                       "(--force replaces a piqa model directory)")
        if not _is_model_dir(path):
            raise click.ClickException(f"-o {out}: --force replaces only a piqa model directory (config.json + "
                                       "model.safetensors) and this folder holds other files; name a new folder")
    return path


def _write_dir(out: Path, force: bool, write: Callable[[Path], str]) -> str:
    """``write`` fills a temporary sibling folder, renamed into place after: a crash never leaves half a directory.

    With ``force`` the previous model directory is moved aside first (a crash between the two renames
    leaves both whole, as hidden siblings) and removed after.
    """
    target = Path(os.path.abspath(out))
    target.parent.mkdir(parents=True, exist_ok=True)
    # Named, not removed: with no lock, another piqa weights may be writing one of them right now.
    mine = re.compile(rf"\.{re.escape(target.name)}\.[0-9a-f]{{8}}\.(tmp|old)")
    if left := sorted(p.name for p in target.parent.iterdir() if mine.fullmatch(p.name)):
        click.echo(f"piqa weights: {len(left)} folder(s) beside {out} left by an interrupted run: {', '.join(left)}; "
                   "remove them once no other piqa weights writes there", err=True)
    tmp = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()  # not mkdtemp: the folder gets the umask's permissions, not 0700
    old: Path | None = None
    try:
        digest = write(tmp)
        if force and target.is_dir() and any(target.iterdir()):
            if not _is_model_dir(target):  # checked at the start; files may have appeared since
                raise click.ClickException(f"-o {out}: files appeared in it while it was being written, and "
                                           "--force replaces only a piqa model directory; name a new folder")
            old = tmp.with_name(f".{target.name}.{secrets.token_hex(4)}.old")
            os.rename(target, old)
        try:
            os.rename(tmp, target)  # onto nothing or an empty folder: atomic
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            raise click.ClickException(f"-o {out}: files appeared in it while it was being written; "
                                       "name a new folder or remove it") from None
    except BaseException:
        if old is not None and not target.exists():
            os.rename(old, target)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return digest


@click.group()
def weights() -> None:
    """Create, import and inspect model directories."""


_out = click.option("-o", "--out", required=True, type=click.Path(file_okay=False),
                    help="A new (or empty) local folder; upload it after to serve it from S3.")
_force = click.option("--force", is_flag=True, help="Replace -o if it is an existing piqa model directory.")


@weights.command("import-official")
@click.argument("piq_model", type=click.Path(exists=True, dir_okay=False))
@click.argument("liqe", type=click.Path(exists=True, dir_okay=False))
@click.option("--retinaface", type=click.Path(exists=True, dir_okay=False), default=None,
              help="retinaface_resnet50_2020-07-20 release file (default: the torch-hub cache).")
@_out
@_force
@click.option("--model-id", default="dn-piqa-official", show_default=True)
@click.option("--preset", default="dn-piqa", show_default=True,
              help=f"Architecture the files are for ({', '.join(list_presets())}).")
def import_official_cmd(piq_model: str, liqe: str, retinaface: str | None, out: str, force: bool, model_id: str,
                        preset: str) -> None:
    """Convert the official PIQ_model.pth + LIQE.pt (+ RetinaFace) into a model directory."""
    from piqa_core.checkpoints import save_checkpoint
    from piqa_core.official import import_official

    with _user_errors():
        path = _check_out(out, force)
        bundle = import_official(piq_model, liqe, retinaface, config=preset, model_id=model_id)
        extra = {"source": {"piq_model": piq_model, "liqe": liqe}}
        digest = _write_dir(path, force, lambda d: save_checkpoint(bundle, d, extra=extra))
    click.echo(f"wrote {out} (model_id={model_id}, sha256={digest})")


@weights.command("random")
@click.option("--preset", default="tiny", show_default=True, help=f"Architecture ({', '.join(list_presets())}).")
@click.option("--seed", type=int, default=0, show_default=True)
@_out
@_force
def random_cmd(preset: str, seed: int, out: str, force: bool) -> None:
    """Write a randomly initialised model directory (marked random: for tests and smoke runs)."""
    from piqa_core.checkpoints import build_bundle, save_checkpoint

    with _user_errors():
        path = _check_out(out, force)
        bundle = build_bundle(preset, seed=seed)
        digest = _write_dir(path, force, lambda d: save_checkpoint(bundle, d))
    click.echo(f"wrote {out} (random {preset}, sha256={digest})")


@weights.command("info")
@click.argument("model_dir")
@s3_options
def info_cmd(model_dir: str, s3: S3Options) -> None:
    """Print the id, preset, sha256 and parameter counts of MODEL_DIR (a local folder or s3://… prefix)."""
    from piqa_core.checkpoints import load_checkpoint

    from .actors import weights_dir

    if not _SCHEME.match(model_dir) and not Path(model_dir).is_dir():
        raise click.BadParameter(f"{model_dir!r} is not a folder", param_hint="MODEL_DIR")
    with _user_errors():
        bundle = load_checkpoint(weights_dir(model_dir, s3))  # a remote one through this node's weight cache
    count = lambda m: sum(p.numel() for p in m.parameters()) if m is not None else 0  # noqa: E731
    click.echo(f"model_id      {bundle.model_id}")
    click.echo(f"preset        {bundle.config.preset}")
    click.echo(f"sha256        {bundle.sha256}")
    click.echo(f"random_init   {bundle.random_init}")
    if bundle.random_parts:
        click.echo(f"random_parts  {', '.join(bundle.random_parts)} (trained without their weights)")
    click.echo(f"params        model {count(bundle.model):,}  liqe {count(bundle.liqe):,}  "
               f"face {count(bundle.detector):,}")
