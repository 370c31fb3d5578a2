import sys

import pytest

from piqa_core.checkpoints import CheckpointError, build_bundle, load_checkpoint, save_checkpoint
from piqa_core.weight_cache import resolve_weights


def _source(tmp_path):
    """A fake remote model directory at ``tmp_path/src``: its fetcher, reader and the fetch log."""
    calls, reads = [], []

    def fetch(uri, dest):
        calls.append(uri)
        for f in (tmp_path / "src").iterdir():
            (dest / f.name).write_bytes(f.read_bytes())

    def read(uri):
        reads.append(uri)
        return (tmp_path / "src" / uri.rsplit("/", 1)[1]).read_bytes()

    return fetch, read, calls, reads


def test_resolve_weights_local_and_remote(tmp_path):
    assert resolve_weights(str(tmp_path)) == tmp_path
    assert resolve_weights(f"file://{tmp_path}") == tmp_path
    spaced = tmp_path / "my model"
    for uri in (f"file:{tmp_path}", f"file://localhost{tmp_path}", spaced.as_uri()):  # as every file: reader
        assert resolve_weights(uri) == (spaced if "%20" in uri else tmp_path), uri
    save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    fetch, read, calls, reads = _source(tmp_path)
    def get(**kw):
        return resolve_weights("s3://bucket/model/", cache_dir=tmp_path / "cache", fetch=fetch, **kw)

    local, again = get(read=read), get(read=read)
    assert local == again and calls == ["s3://bucket/model/"] and reads == ["s3://bucket/model/config.json"] * 2
    assert load_checkpoint(local).sha256 == load_checkpoint(tmp_path / "src").sha256

    # the URI written again (a training run re-exports its model/): the source's config.json refetches
    new_sha = save_checkpoint(build_bundle("tiny", seed=9), tmp_path / "src")
    fresh = get(read=read)
    assert fresh == local and load_checkpoint(fresh).sha256 == new_sha and len(calls) == 2
    # a caller that knows the sha256 reads nothing more
    assert get(sha256=new_sha) == local and len(reads) == 3 and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([local.name, f"{local.name}.lock"])


def test_remote_source_without_a_model_config_is_refused(tmp_path):
    (tmp_path / "src").mkdir()
    fetch, read, calls, _ = _source(tmp_path)
    with pytest.raises(CheckpointError, match="holds no config.json: is it a model directory"):
        resolve_weights("s3://b/m", cache_dir=tmp_path / "cache", fetch=fetch, read=read)
    (tmp_path / "src" / "config.json").write_text('{"architectures": ["BertModel"]}')  # someone else's
    with pytest.raises(CheckpointError, match="unknown format"):
        resolve_weights("s3://b/m", cache_dir=tmp_path / "cache", fetch=fetch, read=read)
    assert calls == []


def test_concurrent_resolves_download_once_and_leave_no_partial_copies(tmp_path):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    sha = save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    calls, lock = [], threading.Lock()

    def fetch(uri, dest):
        with lock:
            calls.append(uri)
        time.sleep(0.3)  # a slow download: the other callers arrive meanwhile
        for f in (tmp_path / "src").iterdir():
            (dest / f.name).write_bytes(f.read_bytes())

    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, sha256=sha),
                            range(4)))
    assert len(set(got)) == 1 and calls == ["s3://b/m"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([got[0].name, f"{got[0].name}.lock"])

    def broken(uri, dest):
        (dest / "half.bin").write_bytes(b"x")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        resolve_weights("s3://b/other", cache_dir=cache, fetch=broken, sha256=sha)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        resolve_weights("s3://b/empty", cache_dir=cache, fetch=lambda uri, dest: None, sha256=sha)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]


def test_copies_left_by_a_killed_download_are_removed_by_the_next_one(tmp_path):
    sha = save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    fetch, _, calls, _ = _source(tmp_path)
    cache = tmp_path / "cache"
    name = resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, sha256=sha).name
    other = resolve_weights("s3://b/other", cache_dir=cache, fetch=fetch, sha256=sha).name
    for left in (f"{name}.partial-k1ll3d", f"{name}.stale-4242", f"{other}.partial-busy"):
        (cache / left).mkdir()
        (cache / left / "model.safetensors").write_bytes(b"x" * 1000)
    new_sha = save_checkpoint(build_bundle("tiny", seed=3), tmp_path / "src")  # the source written again
    resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, sha256=new_sha)
    # only this source's leftovers go: another source's copy is its own download's business
    assert sorted(p.name for p in cache.iterdir()) == sorted(
        [name, f"{name}.lock", other, f"{other}.lock", f"{other}.partial-busy"])
    assert len(calls) == 3


def test_without_a_lock_no_leftover_is_removed(tmp_path, monkeypatch):
    """Where flock is missing, a .partial- folder may be another process's download in progress."""
    sha = save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    fetch, _, _, _ = _source(tmp_path)
    cache = tmp_path / "cache"
    name = resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, sha256=sha).name
    (cache / f"{name}.partial-busy").mkdir()
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl now fails, as off POSIX
    new_sha = save_checkpoint(build_bundle("tiny", seed=3), tmp_path / "src")
    assert load_checkpoint(resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, sha256=new_sha)).sha256 == new_sha
    assert (cache / f"{name}.partial-busy").is_dir()


def test_an_unreachable_source_serves_the_cached_copy_with_a_warning(tmp_path):
    sha = save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    fetch, read, calls, _ = _source(tmp_path)

    def offline(uri):
        raise ConnectionError("endpoint unreachable")

    with pytest.raises(ConnectionError):  # nothing cached yet: the error stands
        resolve_weights("s3://b/m", cache_dir=tmp_path / "cache", fetch=fetch, read=offline)
    local = resolve_weights("s3://b/m", cache_dir=tmp_path / "cache", fetch=fetch, read=read)
    with pytest.warns(UserWarning, match="could not be read .*ConnectionError.*which may be older"):
        assert resolve_weights("s3://b/m", cache_dir=tmp_path / "cache", fetch=fetch, read=offline) == local
    assert load_checkpoint(local).sha256 == sha and len(calls) == 1


def test_weights_that_are_not_the_ones_the_config_names_are_not_cached(tmp_path):
    """A sync uploads config.json before the weights: a job starting in between fetched the new config
    with the old weights, cached that pair, and every later run loaded it and failed."""
    old = tmp_path / "old"
    save_checkpoint(build_bundle("tiny"), old)
    new_sha = save_checkpoint(build_bundle("tiny", seed=5), tmp_path / "src")
    fetch, read, calls, _ = _source(tmp_path)
    (tmp_path / "src" / "model.safetensors").write_bytes((old / "model.safetensors").read_bytes())  # mid-upload
    cache = tmp_path / "cache"
    with pytest.raises(CheckpointError, match=rf"s3://b/m: its model.safetensors \(sha256 [0-9a-f]{{64}}\) is not "
                                               rf"the one its config.json names \({new_sha}\): an upload still"):
        resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, read=read)
    assert [p.name for p in cache.iterdir() if not p.name.endswith(".lock")] == []  # nothing cached, no partial
    save_checkpoint(build_bundle("tiny", seed=5), tmp_path / "src")  # the upload completes: fetched again
    assert load_checkpoint(resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch, read=read)).sha256 == new_sha
    assert len(calls) == 2


def test_a_config_edit_refetches_and_a_newer_piqa_config_is_left_to_the_loader(tmp_path):
    import json

    save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    fetch, read, calls, _ = _source(tmp_path)

    def get():
        return resolve_weights("s3://bucket/m", cache_dir=tmp_path / "cache", fetch=fetch, read=read)

    def edit(section: str, **values) -> None:
        meta = json.loads((tmp_path / "src" / "config.json").read_text())
        meta["config"][section].update(values)
        (tmp_path / "src" / "config.json").write_text(json.dumps(meta))

    get()
    edit("preprocess", crop_mode="center")  # the same weights, another config: fetched again
    assert load_checkpoint(get()).config.preprocess.crop_mode == "center" and len(calls) == 2
    edit("model", new_field=1)  # written by a newer piqa: served, and the loader says what to do
    with pytest.raises(CheckpointError, match="upgrade piqa"):
        load_checkpoint(get())
    assert len(calls) == 3
