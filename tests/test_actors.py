"""The Ray stage classes called directly (no Ray): same scores as the in-process Scorer, identity checks."""

import dataclasses

import numpy as np
import pytest
import torch

from piqa_core.checkpoints import CheckpointError, build_bundle, save_checkpoint
from piqa_core.errors import ImageError
from piqa_core.scorer import Scorer
from ray_jobs.actors import PrepActor, ScoreActor, load_bundle, model_identity
from ray_jobs.options import ModelOptions
from ray_jobs.reader import read_columns
from ray_jobs.schema import SCORE_SCHEMA
from ray_jobs.storage import S3Options, write_bytes
from tests.corpus import astronaut_jpeg_bytes

TINY = ModelOptions(weights=None, random_weights=True, preset="tiny", crop_mode=None, precision="fp32",
                    device=None, batch_size=4)


def _read_batch(items):
    """What the read stage emits: bytes, or a read error code for the row."""
    n = len(items)
    ids = {"uri": np.array([f"mem://{i}.jpg" for i in range(n)], dtype=object),
           "etag_or_mtime": np.array(["e"] * n, dtype=object), "bytes": np.arange(n)}
    return read_columns(ids, [x if isinstance(x, bytes) else ImageError(x, "too big") for x in items])


def test_stages_score_like_the_in_process_scorer():
    photos = [astronaut_jpeg_bytes(quality=q, width=320, height=256) for q in (95, 60, 30)]
    identity = model_identity(TINY, S3Options())
    cols = PrepActor(TINY, S3Options(), threads=1)(_read_batch([photos[0], "too_large", photos[1], photos[2]]))
    table = ScoreActor(TINY, S3Options(), identity, threads=1)(cols)
    assert table.schema == SCORE_SCHEMA
    rows = table.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "error", "ok", "ok"]
    assert rows[1]["error_code"] == "too_large" and rows[1]["score"] is None
    want = [r["score"] for r in Scorer.from_pretrained("tiny", random_weights=True, device="cpu").score(photos)]
    got = [rows[i]["score"] for i in (0, 2, 3)]
    assert np.allclose(got, want, atol=1e-5), (got, want)
    assert {r["model_sha256"] for r in rows} == {build_bundle("tiny").sha256}
    assert all(r["random_weights"] for r in rows)


def test_a_node_holding_an_older_copy_of_the_weights_loads_the_ones_the_job_names(s3_server, s3_bucket, tmp_path,
                                                                                   monkeypatch):
    import boto3

    from piqa_core.checkpoints import load_checkpoint

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "node1" / "hub"))  # cache: node1/piqa
    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")

    def publish(seed: int) -> str:
        save_checkpoint(build_bundle("tiny", seed=seed), tmp_path / f"m{seed}")
        for f in (tmp_path / f"m{seed}").iterdir():
            client.put_object(Bucket=s3_bucket, Key=f"models/m/{f.name}", Body=f.read_bytes())
        return load_checkpoint(tmp_path / f"m{seed}").sha256

    model = ModelOptions(weights=f"s3://{s3_bucket}/models/m", random_weights=False, preset="tiny", crop_mode=None,
                         precision="fp32", device=None, batch_size=4)
    old = publish(1)
    assert load_bundle(model, s3_server.options).sha256 == old  # cached on this node
    new = publish(2)  # the same URI written again, days later
    identity = model_identity(model, s3_server.options)
    assert identity["sha256"] == new  # read from the source, not from the node's cache
    actor = ScoreActor(model, s3_server.options, identity)  # used to stop: "changed while the job ran"
    assert actor.predictor is not None and load_bundle(model, s3_server.options, identity=identity).sha256 == new
    publish(4)  # without an identity (local engine, eval, start weights) the source's config.json decides
    assert load_bundle(model, s3_server.options).sha256 == load_checkpoint(tmp_path / "m4").sha256
    publish(3)  # written again while the job runs: refused, not mixed into the run
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "node2" / "hub"))  # a node yet to fetch
    with pytest.raises(CheckpointError, match="other weights than the sha256"):
        PrepActor(model, s3_server.options, threads=1, identity=identity)


def test_a_config_edited_at_the_source_is_fetched_again_and_never_mixed_into_a_run(s3_server, s3_bucket, tmp_path,
                                                                                  monkeypatch):
    import json

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    save_checkpoint(build_bundle("tiny", seed=1), tmp_path / "m")
    uri = f"s3://{s3_bucket}/models/e"

    def publish(**preprocess) -> None:
        meta = json.loads((tmp_path / "m" / "config.json").read_text())
        meta["config"]["preprocess"].update(preprocess)
        (tmp_path / "m" / "config.json").write_text(json.dumps(meta))
        for f in (tmp_path / "m").iterdir():
            write_bytes(f"{uri}/{f.name}", f.read_bytes(), s3_server.options)

    model = ModelOptions(weights=uri, random_weights=False, preset="tiny", crop_mode=None, precision="fp32",
                         device=None, batch_size=4)
    publish()
    assert load_bundle(model, s3_server.options).config.preprocess.crop_mode == "five"  # cached on this node
    publish(crop_mode="center")  # the same weights, the config edited
    identity = model_identity(model, s3_server.options)
    assert identity["crop_mode"] == "center"
    for actor in (PrepActor(model, s3_server.options, threads=1, identity=identity),
                  ScoreActor(model, s3_server.options, identity)):  # the node's copy was the old config
        assert actor.cfg.preprocess.crop_mode == "center"
    assert load_bundle(model, s3_server.options).config.preprocess.crop_mode == "center"
    publish(crop_mode="five")  # edited again while the job runs: refused
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "node2" / "hub"))
    with pytest.raises(CheckpointError, match="holds another model config than the one expected"):
        PrepActor(model, s3_server.options, threads=1, identity=identity)


def test_an_unreachable_source_is_named_by_the_nodes_cached_copy(tmp_path, s3_server, s3_bucket, monkeypatch):
    """As the actors would load it: a job on a node that has the model runs while the store is down."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    save_checkpoint(build_bundle("tiny", seed=5), tmp_path / "m")
    for f in (tmp_path / "m").iterdir():
        write_bytes(f"s3://{s3_bucket}/models/c/{f.name}", f.read_bytes(), s3_server.options)
    model = ModelOptions(weights=f"s3://{s3_bucket}/models/c", random_weights=False, preset="tiny", crop_mode=None,
                         precision="fp32", device=None, batch_size=4)
    down = dataclasses.replace(s3_server.options, endpoint_url="http://127.0.0.1:9")  # nothing listens there
    with pytest.raises(OSError):
        model_identity(model, down)  # nothing cached yet: the store's error
    sha = load_bundle(model, s3_server.options).sha256  # this node caches it
    with pytest.warns(UserWarning, match=r"models/c/config.json could not be read .* naming the model by the copy "
                                         r"cached in .*/piqa/[0-9a-f]{16}, which may be older"):
        identity = model_identity(model, down)
    assert identity["sha256"] == sha and ScoreActor(model, down, identity).predictor is not None
    assert identity["cached_copy"] is not None and model_identity(model, s3_server.options)["cached_copy"] is None


@pytest.mark.parametrize("stage", ["prep", "score"])
def test_actors_refuse_weights_replaced_during_the_job(tmp_path, stage):
    save_checkpoint(build_bundle("tiny", seed=1), tmp_path / "m")
    model = ModelOptions(weights=str(tmp_path / "m"), random_weights=False, preset="tiny", crop_mode=None,
                         precision="fp32", device=None, batch_size=4)
    identity = model_identity(model, S3Options())
    save_checkpoint(build_bundle("tiny", seed=2), tmp_path / "m")  # replaced after the driver looked
    with pytest.raises(CheckpointError, match=r"changed while the job ran: sha256 [0-9a-f]{64} where the job started"):
        if stage == "prep":  # a restarted prep actor must not bring another detector into the run
            PrepActor(model, S3Options(), threads=1, identity=identity)
        else:
            ScoreActor(model, S3Options(), identity)


def test_score_actor_prepares_on_its_device_like_the_prep_stage():
    photos = [astronaut_jpeg_bytes(quality=q, width=320, height=256) for q in (95, 40)]
    batch = _read_batch([photos[0], "not_found", photos[1], b"not an image"])
    identity = model_identity(TINY, S3Options())
    two_stage = ScoreActor(TINY, S3Options(), identity)(PrepActor(TINY, S3Options())(batch)).to_pylist()
    on_device = ScoreActor(TINY, S3Options(), identity, prepare_on_device=True)(batch).to_pylist()
    assert [r["error_code"] for r in on_device] == [None, "not_found", None, "not_an_image"]
    for a, b in zip(two_stage, on_device):  # on a CPU the very same preparation code: the same rows
        assert a.keys() == b.keys()
        for k in a.keys() - {"scored_at"}:
            assert b[k] == (pytest.approx(a[k], abs=1e-3) if isinstance(a[k], (float, list)) else a[k]), k


def test_concurrent_cpu_calls_run_side_by_side_on_one_torch_thread_each(monkeypatch):
    """On CPUs a score actor takes one call per core: forwards overlap, each on a single torch thread,
    and the rows are those of serial calls."""
    import threading
    import time

    from concurrent.futures import ThreadPoolExecutor

    photos = [astronaut_jpeg_bytes(quality=q, width=320, height=256) for q in (95, 70, 50, 30)]
    batches = [_read_batch(photos[:2]), _read_batch(photos[2:])]
    actor = ScoreActor(TINY, S3Options(), model_identity(TINY, S3Options()), prepare_on_device=True, calls=2,
                       threads=1)
    serial = [actor(b).column("score").to_pylist() for b in batches]

    inside, overlaps, threads = [0], [], []
    lock = threading.Lock()
    forward = actor.predictor.forward

    def watched(*args, **kwargs):
        with lock:
            inside[0] += 1
            overlaps.append(inside[0])
            threads.append(torch.get_num_threads())
        time.sleep(0.2)  # both calls are inside a forward at once unless something serialises them
        try:
            return forward(*args, **kwargs)
        finally:
            with lock:
                inside[0] -= 1

    monkeypatch.setattr(actor.predictor, "forward", watched)
    start = threading.Barrier(2)
    with ThreadPoolExecutor(2) as pool:  # fresh threads, as Ray Data's: they start at the process default
        got = list(pool.map(lambda b: (start.wait(), actor(b).column("score").to_pylist())[1], batches))
    assert got == serial
    assert max(overlaps) == 2
    assert threads == [1, 1]


def test_one_call_actor_loads_and_scores_on_one_thread_whoever_calls(monkeypatch):
    """Ray Data builds an actor on one thread and calls it on another: the torch work must not follow."""
    import threading

    from concurrent.futures import ThreadPoolExecutor

    import ray_jobs.actors as actors

    seen = {}
    load = actors.load_bundle
    monkeypatch.setattr(actors, "load_bundle", lambda *a, **k: (seen.setdefault("load", threading.get_ident()),
                                                                  load(*a, **k))[1])
    actor = ScoreActor(TINY, S3Options(), model_identity(TINY, S3Options()), prepare_on_device=True)
    forward = actor.predictor.forward
    monkeypatch.setattr(actor.predictor, "forward", lambda *a, **k: (seen.setdefault("forward", threading.get_ident()),
                                                                      forward(*a, **k))[1])
    with ThreadPoolExecutor(1) as caller:
        table = caller.submit(actor, _read_batch([astronaut_jpeg_bytes(width=320, height=256)])).result()
    assert table.column("status").to_pylist() == ["ok"]
    assert seen["load"] == seen["forward"] != threading.get_ident()


def test_a_gpu_actor_stages_a_batch_outside_its_model_lock(monkeypatch):
    """Pinning and uploads run before the model lock is taken, so they overlap the other call's forward."""
    import threading

    actor = ScoreActor(TINY, S3Options(), model_identity(TINY, S3Options()), prepare_on_device=True, calls=2)
    lock = actor._model_lock = threading.Lock()  # as on a GPU (a CPU actor's calls need none)
    seen = []
    stage, finish = actor.predictor.stage, actor.predictor.finish
    monkeypatch.setattr(actor.predictor, "stage", lambda *a: (seen.append(("stage", lock.locked())), stage(*a))[1])
    monkeypatch.setattr(actor.predictor, "finish", lambda *a: (seen.append(("finish", lock.locked())), finish(*a))[1])
    table = actor(_read_batch([astronaut_jpeg_bytes(width=320, height=256), b"junk"]))
    assert seen == [("stage", False), ("finish", True)]
    assert table.column("status").to_pylist() == ["ok", "error"] and table.column("score")[0].as_py() is not None


def test_a_prep_actor_detecting_on_a_gpu_sets_the_jobs_tf32_flags(monkeypatch):
    """With --precision fp32 the detector's convolutions are IEEE whichever pool runs it."""
    import ray_jobs.actors as actors

    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    threads = torch.get_num_threads()  # a prep actor sets its process's count
    monkeypatch.setattr(actors.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(actors, "for_inference", lambda detector, device: (detector, device))
    try:
        torch.backends.cudnn.allow_tf32 = True  # torch's default in a fresh process
        actor = PrepActor(TINY, S3Options(), face_device="gpu")
        assert actor.detector[1].type == "cuda" and torch.backends.cudnn.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
        torch.set_num_threads(threads)


def test_score_calls_per_actor():
    from ray_jobs.pools import PoolPlan, score_calls

    assert score_calls(PoolPlan(2, 1, 1.0, 1.0)) == 2  # GPU fed by a prep pool: transfers overlap the model
    assert score_calls(PoolPlan(0, 1, 1.0, 1.0)) == 1  # prepares on its GPU: overlap measured slower
    assert score_calls(PoolPlan(1, 1, 0.0, 1.0)) == 1
    assert score_calls(PoolPlan(0, 1, 0.0, 1.8, score_threads=2)) == 2  # CPU: one call per core
    assert score_calls(PoolPlan(0, 4, 0.0, 3.9, score_threads=4)) == 4


@pytest.mark.gpu
def test_concurrent_calls_on_cuda_streams_match_serial():
    """On a GPU each call prepares on its own CUDA stream while the other's forward runs."""
    from concurrent.futures import ThreadPoolExecutor

    photos = [astronaut_jpeg_bytes(quality=q, width=640, height=480) for q in (95, 80, 65, 50, 35, 20)]
    batches = [_read_batch(photos[i:i + 2]) for i in range(0, 6, 2)]
    actor = ScoreActor(TINY, S3Options(), model_identity(TINY, S3Options()), device="cuda", prepare_on_device=True,
                       calls=2)
    serial = [actor(b).column("score").to_pylist() for b in batches]
    inside, overlaps = [0], []
    forward = actor.predictor.forward

    def watched(*args, **kwargs):
        inside[0] += 1
        overlaps.append(inside[0])
        try:
            return forward(*args, **kwargs)
        finally:
            inside[0] -= 1

    actor.predictor.forward = watched
    with ThreadPoolExecutor(2) as pool:
        got = list(pool.map(lambda b: actor(b).column("score").to_pylist(), batches * 2))
    assert np.allclose(got, serial * 2, atol=1e-5)
    assert max(overlaps) == 1  # one forward pass at a time on the GPU
