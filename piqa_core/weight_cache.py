"""Weight sources: a local model directory for a path or a remote URI, copied once per node into a
cache keyed by the URI and checked against the expected sha256."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import unquote, urlparse

import torch

from .checkpoints import CONFIG_FILE, WEIGHTS_FILE, CheckpointError, _file_sha256, parse_meta
from .config import PIQAConfig

Fetcher = Callable[[str, Path], None]
Reader = Callable[[str], bytes]


def _fsspec_fetch(uri: str, dest: Path) -> None:
    import fsspec  # local import: only remote sources need it

    fs, path = fsspec.core.url_to_fs(uri)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)


def _fsspec_read(uri: str) -> bytes:
    import fsspec

    with fsspec.open(uri, "rb") as f:
        return f.read()


def resolve_weights(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                    fetch: Fetcher | None = None, sha256: str | None = None, read: Reader | None = None,
                    config: dict | None = None) -> Path:
    """A local model directory for a path or remote URI (copied once into a cache keyed by the URI).

    ``sha256`` (and ``config``, the model config expected with it): the model expected there; without
    them the source's config.json is read (``read``, fsspec by default: pass ``read`` with a ``fetch``
    of your own) for both. A cached copy of other weights or another config (the URI was written again,
    as a training run's ``model/`` is, or its config.json edited) is fetched anew instead of served;
    when the source cannot be reached, a cached copy is served with a warning.
    """
    text = os.fspath(uri)
    if not _is_remote(text):
        # file:/x, file:///x, file://localhost/x; %-escapes decoded, as every other reader of a file: URI does
        return Path(unquote(urlparse(text).path) if text.startswith("file:") else text).expanduser()
    dest = _cache_path(text, cache_dir)
    cache = dest.parent
    if sha256 is None:
        try:
            sha256, config = source_model(text, read or _fsspec_read)
        except OSError as e:  # offline, or the store failed: what this node has is better than nothing
            if not _cached(dest):
                raise
            warnings.warn(f"{text}: {CONFIG_FILE} could not be read ({type(e).__name__}: {e}); using the copy "
                          f"cached in {dest}, which may be older", stacklevel=2)
            return dest
    if _cached(dest, sha256, config):
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    # The actors starting on one node at once share one download: the others wait for it.
    with _exclusive(cache / f"{dest.name}.lock") as locked:
        if _cached(dest, sha256, config):
            return dest
        # Left by a process killed mid-download (a preempted node): under the lock no live one owns them;
        # without one, a live download may.
        for left in [*cache.glob(f"{dest.name}.partial-*"), *cache.glob(f"{dest.name}.stale-*")] if locked else []:
            shutil.rmtree(left, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{dest.name}.partial-", dir=cache))
        try:
            (fetch or _fsspec_fetch)(text, tmp)
            if not (tmp / WEIGHTS_FILE).is_file():
                raise CheckpointError(f"{text} holds no {WEIGHTS_FILE}: is it a model directory?")
            if not _cached(tmp, sha256):
                raise CheckpointError(f"{text} holds other weights than the sha256 {sha256} expected: "
                                      "was it written again during the job? Re-run it")
            if not _cached(tmp, sha256, config):
                raise CheckpointError(f"{text}: its {CONFIG_FILE} holds another model config than the one "
                                      "expected: was it edited during the job? Re-run it")
            # Checked once here, not only when loading: a cached copy is served as it is from then on.
            if (got := _file_sha256(tmp / WEIGHTS_FILE)) != sha256:
                raise CheckpointError(f"{text}: its {WEIGHTS_FILE} (sha256 {got}) is not the one its {CONFIG_FILE} "
                                      f"names ({sha256}): an upload still in progress, or a damaged copy? Re-run "
                                      "once the model directory is complete")
            if dest.exists():  # other weights: moved aside first, os.replace cannot overwrite a folder
                stale = tmp.with_name(f"{dest.name}.stale-{os.getpid()}")
                os.replace(dest, stale)
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, dest)
            except OSError:  # a process without the lock (another cache user) won the race
                pass
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed or surplus copy is not left behind
    return dest


def cached_copy(uri: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path | None:
    """This node's cached copy of a remote model directory (whatever weights it holds), else ``None``."""
    text = os.fspath(uri)
    dest = _cache_path(text, cache_dir) if _is_remote(text) else None
    return dest if dest is not None and _cached(dest) else None


def _is_remote(uri: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", uri)) and not uri.startswith("file://")


def _cache_path(uri: str, cache_dir: str | os.PathLike | None) -> Path:
    cache = Path(cache_dir or Path(torch.hub.get_dir()).parent / "piqa").expanduser()
    return cache / hashlib.sha256(uri.encode()).hexdigest()[:16]


def source_model(uri: str, read: Reader) -> tuple[str, dict]:
    """The weights' sha256 and the model config a remote model directory's config.json names now."""
    where = f"{uri.rstrip('/')}/{CONFIG_FILE}"
    try:
        text = read(where)
    except FileNotFoundError:
        raise CheckpointError(f"{uri} holds no {CONFIG_FILE}: is it a model directory?") from None
    meta = parse_meta(text, where)
    return meta["sha256"], meta["config"]


def _cached(dest: Path, sha256: str | None = None, config: dict | None = None) -> bool:
    """Whether ``dest`` holds a model (with these weights and config, where given)."""
    if not (dest / WEIGHTS_FILE).is_file():
        return False
    if sha256 is None:
        return True
    try:
        meta = json.loads((dest / CONFIG_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == sha256 and (config is None or _same_config(meta.get("config"), config))


def _same_config(a: object, b: dict) -> bool:
    """Whether two config.json ``config`` sections name the same config (omitted fields: defaults)."""
    try:
        return PIQAConfig.from_dict(a) == PIQAConfig.from_dict(b)  # type: ignore[arg-type]
    except (TypeError, ValueError, AttributeError):  # e.g. a newer piqa's config: loading it says so
        return a == b


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[bool]:
    """An advisory lock between processes (and threads) of this node; yields whether it holds one
    (not where flock is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: concurrent downloads stay correct, only duplicated
        yield False
        return
    with open(lock_file, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
