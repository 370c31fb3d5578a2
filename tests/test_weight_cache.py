import pytest

from piqa_core.checkpoints import CheckpointError, build_bundle, load_checkpoint, save_checkpoint
from piqa_core.weight_cache import resolve_weights


def test_resolve_weights_local_and_remote(tmp_path):
    assert resolve_weights(str(tmp_path)) == tmp_path
    assert resolve_weights(f"file://{tmp_path}") == tmp_path
    save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    calls = []

    def fetch(uri, dest):
        calls.append(uri)
        for f in (tmp_path / "src").iterdir():
            (dest / f.name).write_bytes(f.read_bytes())

    local = resolve_weights("s3://bucket/model", cache_dir=tmp_path / "cache", fetch=fetch)
    again = resolve_weights("s3://bucket/model", cache_dir=tmp_path / "cache", fetch=fetch)
    assert local == again and calls == ["s3://bucket/model"]
    assert load_checkpoint(local).sha256 == load_checkpoint(tmp_path / "src").sha256

    # the URI written again (a training run re-exports its model/): the expected sha256 refetches
    new_sha = save_checkpoint(build_bundle("tiny", seed=9), tmp_path / "src")
    assert resolve_weights("s3://bucket/model", cache_dir=tmp_path / "cache", fetch=fetch) == local
    assert load_checkpoint(local).sha256 != new_sha and len(calls) == 1  # without it: the cached copy
    fresh = resolve_weights("s3://bucket/model", cache_dir=tmp_path / "cache", fetch=fetch, sha256=new_sha)
    assert fresh == local and load_checkpoint(fresh).sha256 == new_sha and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == sorted([local.name, f"{local.name}.lock"])


def test_concurrent_resolves_download_once_and_leave_no_partial_copies(tmp_path):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    save_checkpoint(build_bundle("tiny"), tmp_path / "src")
    calls, lock = [], threading.Lock()

    def fetch(uri, dest):
        with lock:
            calls.append(uri)
        time.sleep(0.3)  # a slow download: the other callers arrive meanwhile
        for f in (tmp_path / "src").iterdir():
            (dest / f.name).write_bytes(f.read_bytes())

    cache = tmp_path / "cache"
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda _: resolve_weights("s3://b/m", cache_dir=cache, fetch=fetch), range(4)))
    assert len(set(got)) == 1 and calls == ["s3://b/m"]
    assert sorted(p.name for p in cache.iterdir()) == sorted([got[0].name, f"{got[0].name}.lock"])

    def broken(uri, dest):
        (dest / "half.bin").write_bytes(b"x")
        raise OSError("connection reset")

    with pytest.raises(OSError, match="connection reset"):
        resolve_weights("s3://b/other", cache_dir=cache, fetch=broken)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]
    with pytest.raises(CheckpointError, match="holds no model.safetensors"):
        resolve_weights("s3://b/empty", cache_dir=cache, fetch=lambda uri, dest: None)
    assert not [p for p in cache.iterdir() if ".partial-" in p.name]
