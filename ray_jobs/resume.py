"""Output files by run: how a run names them, and reading them back for --resume and summaries.

Torch-free on purpose: Ray's write tasks unpickle ``RunFiles`` and so import this module."""

from __future__ import annotations

import sys

import pyarrow as pa
import pyarrow.parquet as pq
from pyarrow import fs as pafs
from ray.data.datasource import FilenameProvider

from .schema import SCORE_SCHEMA
from .storage import ObjectInfo, OutputUnreadable, S3Options, resolve


class RunFiles(FilenameProvider):
    """``part-<run_id>-<write uuid>_<task>-<i>.parquet`` (Ray adds ``-<i>``): grouped by run, never colliding.

    Ray requires its write UUID in the name (a retried write task then replaces its own file).
    """

    def __init__(self, run_id: str) -> None:
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.run_id}-{write_uuid}_{task_index:06d}.parquet"


def _parquet_files(uri: str, s3: S3Options | None) -> tuple[pafs.FileSystem, list[str]]:
    fs, root = resolve(uri, s3)
    if fs.get_file_info(root).type == pafs.FileType.NotFound:
        return fs, []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    files = sorted(i.path for i in infos if i.type == pafs.FileType.File and i.base_name.endswith(".parquet")
                   and not i.base_name.startswith(("_", ".")))
    return fs, files


def _load(fs: pafs.FileSystem, path: str) -> pa.Buffer | None:
    """The file's bytes; None when it vanished since the listing.

    Read whole, then parsed from memory: pyarrow reports a failed read (permissions, a connection reset,
    the store's errors after its retries) and damaged content alike as OSError, and only damage may
    make a file's rows count as missing — an output that cannot be read stops the caller instead.
    """
    try:
        with fs.open_input_file(path) as f:
            return f.read_buffer()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise OutputUnreadable(f"cannot read {path} ({e}); reading outputs back needs read access to "
                               "--out (s3:GetObject on the output prefix) and a reachable store") from None


def _read(fs: pafs.FileSystem, path: str, set_aside: bool = False) -> pa.Table | None:
    """One output file read whole, every column and page, or None when it vanished or its content is
    damaged (cut short by a crash, a corrupt page): a file that does not read whole holds no rows, for
    ``--resume`` as for readers, or a damaged column would leave rows that resume counts as done and
    readers never see. With ``set_aside``, one of our part files that is damaged is moved to
    ``_unreadable-<name>``: its inputs are scored again, and dataset readers, which skip names starting
    with ``_``, can read the folder again."""
    data = _load(fs, path)
    if data is None:
        return None
    try:
        return pq.read_table(pa.BufferReader(data))
    except (OSError, ValueError, pa.ArrowException) as e:  # parsed from memory: an OSError here is damage, not I/O
        name = path.rsplit("/", 1)[-1]
        if not (set_aside and name.startswith("part-")):
            print(f"piqa: ignoring unreadable output file {path}: {e}", file=sys.stderr)
            return None
        aside = f"{path[:-len(name)]}_unreadable-{name}"
        fs.move(path, aside)
        print(f"piqa: {path} is unreadable ({e}); moved to {aside}, its inputs are scored again", file=sys.stderr)
        return None


RESUME_COLUMNS = ("uri", "etag_or_mtime", "bytes", "model_sha256", "crop_mode", "error_code")
Version = tuple[str, str, int | None]  # uri, etag_or_mtime, bytes (None: a row that did not record it)


def already_scored(out: str, sha256: str, crop_mode: str, s3: S3Options | None = None,
                   retry: frozenset[str] = frozenset()) -> set[Version]:
    """(uri, etag_or_mtime, bytes) of every object version with a row under ``out`` written by the model
    with this sha256 in this crop mode: an object replaced under the same name is not done (a photo
    rewritten with its mtime kept is told by its size, as the audit tells it), nor one whose row holds
    an error code in ``retry``. Test a listed object with :func:`is_done`.

    Files are read as :func:`read_rows` reads them; one of our files that does not read whole is moved
    aside (see :func:`_read`).
    """
    fs, files = _parquet_files(out, s3)
    done: set[Version] = set()
    for path in files:
        t = _read(fs, path, set_aside=True)
        if t is None:
            continue
        if not set(RESUME_COLUMNS) <= set(t.column_names):
            print(f"piqa: ignoring {path}: not a score file (no {'/'.join(RESUME_COLUMNS)} columns)",
                  file=sys.stderr)
            continue
        done.update((u, e, b) for u, e, b, s, c, code in zip(*(t.column(k).to_pylist() for k in RESUME_COLUMNS))
                    if s == sha256 and c == crop_mode and code not in retry)
    return done


def is_done(done: set[Version], info: ObjectInfo) -> bool:
    """Whether ``done`` (:func:`already_scored`) holds a row for this version of the object. A row's
    bytes -1 (not stat'ed when listed) matches only a listing that could not stat it either."""
    return (info.uri, info.etag_or_mtime, info.size) in done or (info.uri, info.etag_or_mtime, None) in done


def run_file_paths(uri: str, run_id: str, s3: S3Options | None = None) -> set[str]:
    """The output files one run has written under ``uri`` so far."""
    return set(_of_run(_parquet_files(uri, s3)[1], run_id))


def _of_run(files: list[str], run_id: str | None) -> list[str]:
    return [f for f in files if run_id is None or f.rsplit("/", 1)[-1].startswith(f"part-{run_id}-")]


def read_rows(uri: str, s3: S3Options | None = None, run_id: str | None = None,
              exclude: set[str] = frozenset()) -> pa.Table:
    """All readable output rows under ``uri`` (only one run's files when ``run_id`` is given), but for
    the files ``exclude`` names (:func:`run_file_paths` taken before a write: that write's rows alone)."""
    fs, files = _parquet_files(uri, s3)
    files = [f for f in _of_run(files, run_id) if f not in exclude]
    tables = [t for t in (_read(fs, f) for f in files) if t is not None]
    tables = [t.select(SCORE_SCHEMA.names).cast(SCORE_SCHEMA) for t in tables]
    return pa.concat_tables(tables) if tables else SCORE_SCHEMA.empty_table()
