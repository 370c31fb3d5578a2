"""The Ray Data scoring pipeline end to end: local folders, S3, bad files, resume, crashing actors."""

import dataclasses
import json
import os
import re
import tempfile
from pathlib import Path

import boto3
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

import ray_jobs.score as score_mod
from piqa_core.checkpoints import build_bundle, save_checkpoint
from piqa_core.config import get_preset
from piqa_core.scorer import Scorer
from ray_jobs.options import ModelOptions
from ray_jobs.resume import read_rows
from ray_jobs.reader import READ_THREADS
from ray_jobs.pools import MAX_BLOCKS, PlanError, block_rows, input_blocks, model_share, plan_pools, read_batch
from ray_jobs.score import ScoreJob, run_score_job
from ray_jobs.listing import IMAGE_EXTENSIONS
from ray_jobs.storage import ObjectInfo, S3Options
from ray_jobs.summary import RowsMissing
from tests.corpus import astronaut_jpeg_bytes, build_corpus

pytestmark = [pytest.mark.ray, pytest.mark.slow]

TINY = ModelOptions(weights=None, random_weights=True, preset="tiny", crop_mode=None, precision="fp32",
                    device=None, batch_size=4)


def _photos(folder: Path, n: int, start: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(start, start + n):
        p = folder / f"photo_{i:03d}.jpg"
        p.write_bytes(astronaut_jpeg_bytes(quality=40 + 5 * (i % 10), width=320 + 8 * i, height=288))
        paths.append(p)
    return paths


def _job(inputs, out, **kw) -> ScoreJob:
    return ScoreJob(inputs=[str(i) for i in inputs], out=str(out), model=kw.pop("model", TINY),
                    run_date="2026-01-02", prep_batch_size=kw.pop("prep_batch_size", 4), **kw)


def _by_uri(table) -> dict[str, dict]:
    rows = table.to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(uris) == len(set(uris)), "duplicate rows"
    return {r["uri"]: r for r in rows}


@pytest.mark.parametrize("prep", ["actors", "device"])
def test_bad_file_corpus_gives_exactly_one_row_each(ray_local, tmp_path, monkeypatch, prep):
    lib = tmp_path / "lib"
    expected = {str(lib / name): code for name, code in build_corpus(lib).items()
                if name.lower().endswith(IMAGE_EXTENSIONS)}  # the listing's default filter
    for p in _photos(lib / "album", 2):
        expected[str(p)] = None
    vanished = _photos(lib / "album", 1, start=50)[0]
    expected[str(vanished)] = "not_found"

    real_list = score_mod.list_inputs

    def list_then_delete(*args, **kwargs):
        listed = real_list(*args, **kwargs)
        vanished.unlink()  # deleted between listing and reading
        return listed

    monkeypatch.setattr(score_mod, "list_inputs", list_then_delete)
    summary = run_score_job(_job([lib], tmp_path / "out", prep=prep))

    rows = _by_uri(read_rows(str(tmp_path / "out")))
    assert set(rows) == set(expected)
    for uri, code in expected.items():
        row = rows[uri]
        assert row["error_code"] == code, (uri, row["error_code"], row["error_message"])
        assert (row["status"] == "ok") == (code is None)
        assert (row["score"] is not None) == (code is None)
    assert summary["rows"] == len(expected) and summary["ok"] == sum(c is None for c in expected.values())
    assert (tmp_path / "out" / f"_summary-{summary['run_id']}.json").is_file()
    # Rows are gathered into files of rows_per_file (2000), not one file per score batch of 4.
    assert len(expected) > 2 * TINY.batch_size and len(list((tmp_path / "out").glob("run_date=*/*.parquet"))) == 1
    # The scores of the in-process Scorer, whichever stage prepared them (with "device" on 2 CPUs the
    # score actor takes two concurrent single-threaded calls).
    ok = sorted(uri for uri, code in expected.items() if code is None)
    want = Scorer.from_pretrained("tiny", random_weights=True, device="cpu").score([Path(u).read_bytes() for u in ok])
    assert [rows[u]["score"] for u in ok] == pytest.approx([r["score"] for r in want], abs=1e-5)


def test_output_layout_schema_metadata_and_model_identity(ray_local, tmp_path):
    _photos(tmp_path / "in", 3)
    summary = run_score_job(_job([tmp_path / "in"], tmp_path / "out"))
    files = sorted((tmp_path / "out" / "run_date=2026-01-02").glob("part-*.parquet"))
    assert files and all(re.fullmatch(rf"part-{summary['run_id']}-[0-9a-f]+_\d{{6}}-\d+\.parquet", f.name)
                         for f in files), files  # the documented name
    meta = pq.read_schema(files[0]).metadata
    sha = build_bundle("tiny").sha256
    assert meta[b"model_sha256"].decode() == sha and meta[b"random_weights"] == b"true"
    assert meta[b"random_parts"] == b"[]"
    rows = read_rows(str(tmp_path / "out")).to_pylist()
    assert {r["model_sha256"] for r in rows} == {sha} and all(r["random_weights"] for r in rows)
    assert all(r["crop_mode"] == "five" and r["width"] > 0 for r in rows)


def test_inputs_without_a_row_after_the_run_fail_it_with_the_count(ray_local, tmp_path, monkeypatch):
    photos = _photos(tmp_path / "in", 3)

    def one_file_lost(*args, **kwargs):  # e.g. removed by a lifecycle rule before it was read back
        table = read_rows(*args, **kwargs)
        return table.filter(pc.not_equal(table["uri"], str(photos[1])))

    monkeypatch.setattr(score_mod, "read_rows", one_file_lost)
    with pytest.raises(RowsMissing, match=re.escape(f"1 of 3 inputs have no row in {tmp_path / 'out'}")) as err:
        run_score_job(_job([tmp_path / "in"], tmp_path / "out"))
    assert f"(first: {photos[1]}); run the same command with --resume" in str(err.value)
    [summary] = [json.loads(p.read_text()) for p in (tmp_path / "out").glob("_summary-*.json")]
    assert (summary["rows"], summary["listed"], summary["missing_rows"]) == (2, 3, 1)


def test_resume_scores_only_the_rest(ray_local, tmp_path):
    photos = _photos(tmp_path / "in", 7)
    manifest = tmp_path / "first.txt"
    manifest.write_text("\n".join(str(p) for p in photos[:4]))
    first = run_score_job(_job([manifest], tmp_path / "out", manifest=True, run_id="r-same"))
    assert first["rows"] == 4

    # The same run id again (as the audit continues a run): the summary counts this attempt's rows only.
    second = run_score_job(_job([tmp_path / "in"], tmp_path / "out", resume=True, run_id="r-same"))
    assert second["skipped_already_scored"] == 4 and second["rows"] == 3
    rows = _by_uri(read_rows(str(tmp_path / "out")))  # asserts no duplicates
    assert set(rows) == {str(p) for p in photos}

    third = run_score_job(_job([tmp_path / "in"], tmp_path / "out", resume=True))
    assert third["rows"] == 0 and third["skipped_already_scored"] == 7

    photos[0].write_bytes(photos[1].read_bytes())  # replaced under the same name: not done
    os.utime(photos[0], ns=(10**18, 10**18))
    again = run_score_job(_job([tmp_path / "in"], tmp_path / "out", resume=True))
    assert again["rows"] == 1 and again["skipped_already_scored"] == 6

    center = dataclasses.replace(TINY, crop_mode="center")  # the other protocol: nothing is done yet
    fourth = run_score_job(_job([tmp_path / "in"], tmp_path / "out", resume=True, model=center))
    assert fourth["rows"] == 7 and fourth["skipped_already_scored"] == 0


@pytest.mark.parametrize("stage", ["prep", "score"])
def test_actor_crash_mid_run_still_exactly_once(ray_local, tmp_path, stage, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the crash marker lands here, not in /tmp
    photos = _photos(tmp_path / "in", 6)
    summary = run_score_job(_job([tmp_path / "in"], tmp_path / "out", inject_crash=stage, prep_batch_size=2))
    rows = _by_uri(read_rows(str(tmp_path / "out")))
    assert set(rows) == {str(p) for p in photos}
    assert all(r["status"] == "ok" for r in rows.values())
    assert summary["rows"] == 6
    assert (tmp_path / f"piqa-crash-{stage}-{summary['run_id']}").exists(), "the crash was never injected"


def test_s3_round_trip_with_weights_from_s3(ray_local, s3_server, s3_bucket, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="testing", aws_secret_access_key="testing")
    for i, p in enumerate(_photos(tmp_path / "src", 3)):
        s3.put_object(Bucket=s3_bucket, Key=f"lib/a/{p.name}", Body=p.read_bytes())
    s3.put_object(Bucket=s3_bucket, Key="lib/b/broken.jpg", Body=b"\xff\xd8 nope")
    save_checkpoint(build_bundle("tiny", seed=7), tmp_path / "model")
    for f in (tmp_path / "model").iterdir():
        s3.put_object(Bucket=s3_bucket, Key=f"models/tiny7/{f.name}", Body=f.read_bytes())

    model = ModelOptions(weights=f"s3://{s3_bucket}/models/tiny7", random_weights=False, preset="tiny",
                         crop_mode="center", precision="fp32", device=None, batch_size=4)
    opts = S3Options(endpoint_url=s3_server.endpoint_url, region="us-east-1",
                     access_key="testing", secret_key="testing")
    summary = run_score_job(_job([f"s3://{s3_bucket}/lib"], f"s3://{s3_bucket}/scores", model=model, s3=opts))
    assert summary["rows"] == 4 and summary["ok"] == 3 and summary["error_codes"] == {"not_an_image": 1}

    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=s3_bucket, Prefix="scores/")["Contents"]]
    assert any(k.startswith("scores/run_date=2026-01-02/part-") for k in keys)
    assert f"scores/_summary-{summary['run_id']}.json" in keys
    rows = _by_uri(read_rows(f"s3://{s3_bucket}/scores", opts))
    assert set(rows) == {f"s3://{s3_bucket}/lib/a/photo_00{i}.jpg" for i in range(3)} | {
        f"s3://{s3_bucket}/lib/b/broken.jpg"}
    assert {r["model_sha256"] for r in rows.values()} == {build_bundle("tiny", seed=7).sha256}
    # the directory holds random weights, and the rows must keep saying so
    assert all(r["crop_mode"] == "center" and r["random_weights"] for r in rows.values())


def test_model_share_matches_the_measured_split():
    # measured CPU shares of the model: dn-piqa 0.94 (8.3 s of 8.85 s per 12 MP photo), tiny 0.32
    assert model_share(get_preset("dn-piqa"), "five") == pytest.approx(0.94, abs=0.02)
    assert model_share(get_preset("tiny"), "five") == pytest.approx(0.32, abs=0.05)
    assert model_share(get_preset("dn-piqa"), "center") < model_share(get_preset("dn-piqa"), "five")


def test_read_blocks_are_no_larger_than_what_the_next_stage_takes_per_call():
    dn = get_preset("dn-piqa")
    cpu = _job([], "x", model=dataclasses.replace(TINY, batch_size=2), prep_batch_size=None)
    # dn-piqa on 2 cores: the score actor prepares its own 2-image batches in two calls; a 16-row read
    # block went to one call whole and left the other idle (0.67 of the model alone instead of ~0.8)
    assert read_batch(cpu, plan_pools(cpu, {"CPU": 2.0}, dn)) == 2
    gpu = _job([], "x", model=dataclasses.replace(TINY, batch_size=32), prep_batch_size=None, prep="device")
    assert read_batch(gpu, plan_pools(gpu, {"CPU": 16.0, "GPU": 1.0}, dn)) == READ_THREADS  # GETs in flight
    pool = _job([], "x", model=dataclasses.replace(TINY, batch_size=32), prep_batch_size=None)
    assert read_batch(pool, plan_pools(pool, {"CPU": 16.0, "GPU": 1.0}, dn)) == 8  # a prep actor's batch


def test_input_blocks_hold_whole_prep_batches():
    job = _job([], "x", model=dataclasses.replace(TINY, batch_size=8), prep_batch_size=None)
    objects = [ObjectInfo(f"/p/{i}.jpg", i, f"m{i}") for i in range(18_000)]
    blocks = input_blocks(objects, job)
    # an even split into 2,000 blocks was 9 rows each: every other call a 1-image batch
    assert len(blocks) == 1125 and {b.num_rows for b in blocks} == {16}
    assert blocks[3].to_pylist()[0] == {"uri": "/p/48.jpg", "etag_or_mtime": "m48", "bytes": 48}
    assert [b.num_rows for b in input_blocks(objects[:43], job)] == [8, 8, 8, 8, 8, 3]
    many = [ObjectInfo(f"/p/{i}", 1, "") for i in range(40_001)]
    assert len(input_blocks(many, job)) <= MAX_BLOCKS and block_rows(40_001, job) == 24


def test_pool_plans():
    # CPU-only with a prep pool: cores split by the model's share of the work, one process more than
    # cores; score cores grouped into actors of up to 4 threads
    tiny = plan_pools(_job([], "x"), {"CPU": 2.0}, get_preset("tiny"))
    assert (tiny.prep_actors, tiny.score_actors, tiny.score_gpus, tiny.score_threads) == (2, 1, 0.0, 1)
    dn = plan_pools(_job([], "x", prep="actors"), {"CPU": 2.0}, get_preset("dn-piqa"))
    assert (dn.prep_actors, dn.score_actors, dn.prep_threads, dn.score_threads) == (1, 1, 1, 2)
    assert dn.score_cpus == pytest.approx(2 * dn.prep_cpus, abs=1e-3)  # logical CPUs follow the threads
    big = plan_pools(_job([], "x", prep="actors"), {"CPU": 16.0}, get_preset("dn-piqa"))
    assert (big.prep_actors, big.score_actors, big.score_threads) == (2, 4, 3)
    # auto on CPUs: a model-dominated preset prepares inside its score actors, no prep pool
    auto = plan_pools(_job([], "x"), {"CPU": 2.0}, get_preset("dn-piqa"))
    assert (auto.prep_actors, auto.score_actors, auto.score_threads) == (0, 1, 2)
    auto16 = plan_pools(_job([], "x"), {"CPU": 16.0}, get_preset("dn-piqa"))
    assert (auto16.prep_actors, auto16.score_actors, auto16.score_threads) == (0, 4, 4)
    assert plan_pools(_job([], "x", prep_actors=2), {"CPU": 2.0}, get_preset("dn-piqa")).prep_actors == 2
    for plan, cpus in ((tiny, 2.0), (dn, 2.0), (big, 16.0), (auto, 2.0), (auto16, 16.0)):  # all fit, with IO room
        assert plan.prep_actors * plan.prep_cpus + plan.score_actors * plan.score_cpus + 0.2 <= cpus + 1e-6
    assert plan_pools(_job([], "x", prep_actors=3, score_actors=1), {"CPU": 2.0}).prep_actors == 3
    # --gpu with explicit pools before any GPU node is up (the head alone): one CPU per actor, as on
    # the GPU nodes the autoscaler will start, not the head's CPUs shared out (0.05 each)
    for head in ({}, {"CPU": 2.0}):
        early = plan_pools(_job([], "x", gpu=True, score_actors=4, prep_actors=40, face_device="cpu"), head)
        assert (early.prep_actors, early.prep_cpus, early.score_actors, early.score_cpus) == (40, 1.0, 4, 1.0)
    # --prep device: no prep pool; the score actors prepare on their GPU (or here, CPU)
    dev_gpu = plan_pools(_job([], "x", prep="device"), {"CPU": 16.0, "GPU": 2.0}, get_preset("dn-piqa"))
    assert (dev_gpu.prep_actors, dev_gpu.score_actors, dev_gpu.score_gpus) == (0, 2, 1.0)
    assert plan_pools(_job([], "x", prep="device", score_actors=2), {"CPU": 2.0}).score_threads == 1
    with pytest.raises(ValueError, match="no effect"):
        plan_pools(_job([], "x", prep="device", prep_actors=2), {"CPU": 2.0})
    with pytest.raises(ValueError, match="--face-device cpu does not apply with --prep device on GPUs"):
        plan_pools(_job([], "x", prep="device", face_device="cpu"), {"CPU": 16.0, "GPU": 1.0})
    assert plan_pools(_job([], "x", prep="device", face_device="cpu"), {"CPU": 2.0}).prep_actors == 0  # CPUs: so it is
    # auto with GPUs keeps the CPU prep pool, which detects faces on the GPU unless told otherwise
    assert plan_pools(_job([], "x"), {"CPU": 16.0, "GPU": 1.0}, get_preset("dn-piqa")).prep_actors == 14
    gpu = plan_pools(_job([], "x"), {"CPU": 16.0, "GPU": 1.0})
    assert (gpu.score_actors, gpu.score_gpus, gpu.prep_actors, gpu.prep_gpus) == (1, 0.5, 14, 0.0357)
    cpu_faces = plan_pools(_job([], "x", face_device="cpu"), {"CPU": 16.0, "GPU": 1.0})
    assert (cpu_faces.score_gpus, cpu_faces.prep_gpus) == (1.0, 0.0)
    for plan, where in ((gpu, "gpu"), (cpu_faces, "cpu"), (tiny, "cpu")):  # what the prep actors are told
        prep, _ = score_mod._stage_args(_job([], "x"), plan, "r", {"sha256": "s"})
        assert prep["fn_constructor_kwargs"]["face_device"] == where
    for cpus, gpus in ((16.0, 2.0), (5.0, 1.0), (15.0, 1.0), (60.0, 4.0)):  # never more GPU than the cluster has
        face = plan_pools(_job([], "x", face_device="gpu"), {"CPU": cpus, "GPU": gpus})
        assert face.prep_gpus > 0 and face.score_gpus * face.score_actors + face.prep_gpus * face.prep_actors <= gpus
    # GPU jobs: one logical CPU per actor unless the actors and the IO tasks would not all fit
    assert (gpu.prep_cpus, gpu.score_cpus, cpu_faces.prep_cpus) == (1.0, 1.0, 1.0)
    small = plan_pools(_job([], "x"), {"CPU": 2.0, "GPU": 1.0})
    shared = plan_pools(_job([], "x", gpus_per_score_actor=0.25, face_device="cpu"), {"CPU": 4.0, "GPU": 1.0})
    device = plan_pools(_job([], "x", prep="device", score_actors=2), {"CPU": 2.0, "GPU": 1.0})
    assert (small.prep_actors, small.score_actors, shared.prep_actors, shared.score_actors) == (1, 1, 1, 4)
    assert (small.prep_cpus, shared.score_cpus, device.score_cpus) == (0.9, 0.76, 0.9)
    for plan, cpus in ((gpu, 16.0), (cpu_faces, 16.0), (small, 2.0), (shared, 4.0), (device, 2.0)):
        assert plan.prep_actors * plan.prep_cpus + plan.score_actors * plan.score_cpus + 0.2 <= cpus + 1e-6
    wait = plan_pools(_job([], "x", gpu=True, score_actors=4, face_device="cpu"), {"CPU": 8.0})
    assert wait.score_gpus == 1.0 and wait.score_actors == 4
    wait = plan_pools(_job([], "x", gpu=True, score_actors=4), {"CPU": 8.0})  # the autoscaler is asked for 4 GPUs
    assert wait.score_gpus == 0.5
    assert wait.score_gpus * 4 + wait.prep_gpus * wait.prep_actors == pytest.approx(4, abs=1e-3)
    with pytest.raises(ValueError, match="needs GPUs"):
        plan_pools(_job([], "x", face_device="gpu"), {"CPU": 8.0})


def test_gpus_requested_from_a_local_ray_without_any_are_refused_not_waited_for(tmp_path, monkeypatch):
    import contextlib

    import ray

    from ray._private import services

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: None)  # no `ray start` here
    monkeypatch.setattr(score_mod, "ray_session", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0})  # what a GPU-less laptop's Ray sees
    monkeypatch.setattr(score_mod, "_run_pipeline", lambda *a: pytest.fail("the pools would wait for ever"))
    job = _job(_photos(tmp_path / "in", 1), tmp_path / "out", gpu=True)
    with pytest.raises(PlanError, match="the local Ray this job started sees none"):
        run_score_job(job)
    monkeypatch.setattr(score_mod, "_run_pipeline", lambda *a: {"ran": True})
    assert run_score_job(dataclasses.replace(job, address="ray://head:10001")) == {"ran": True}  # may autoscale
    # a `ray start` head on this machine (a cluster-launcher node) is joined, not started: it may autoscale
    monkeypatch.setattr(services, "find_bootstrap_address", lambda temp_dir=None: "10.0.0.1:6379")
    assert run_score_job(job) == {"ran": True}


def test_a_run_with_nothing_to_score_starts_no_cluster(tmp_path, monkeypatch):
    """An empty prefix, or a resumed run with every input done, started Ray and planned pools: on a
    cluster whose GPU workers had scaled away, such a run failed where it had nothing to do."""
    (tmp_path / "empty").mkdir()
    monkeypatch.setattr(score_mod, "ray_session", lambda address: pytest.fail("Ray was started"))
    summary = run_score_job(_job([tmp_path / "empty"], tmp_path / "out", gpu=True, face_device="gpu"))
    assert (summary["rows"], summary["listed"], summary["skipped_already_scored"]) == (0, 0, 0)
    assert list((tmp_path / "out").glob("_summary-*.json"))  # Ray: the patched ray_session would have failed
    from click.testing import CliRunner

    from ray_jobs.cli import main

    res = CliRunner().invoke(main, ["score", str(tmp_path / "empty"), "--out", str(tmp_path / "out"), "--gpu",
                                    "--random-weights", "--preset", "tiny"])
    assert res.exit_code == 0 and "nothing to score: 0 inputs listed, 0 already scored" in res.output, res.output


def test_run_dates_and_ids_are_utc_whatever_the_local_zone(monkeypatch) -> None:
    import time

    seen = set()
    try:
        for zone in ("Etc/GMT-14", "Etc/GMT+12"):  # UTC+14 and UTC-12: never the same local date
            monkeypatch.setenv("TZ", zone)
            time.tzset()
            job = _job([], "x")
            seen.add((job.run_date, score_mod._run_id(job, [])[:8]))
    finally:
        monkeypatch.undo()
        time.tzset()
    assert len(seen) == 1, seen  # the partition and the run id agree with scored_at, which is UTC
