"""The `piqa` command line: model options, local scoring, weights commands."""

import json
import os
import pathlib
import subprocess
import sys

import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from piqa_core.checkpoints import build_bundle, save_checkpoint
from piqa_core.training import init_bundle
from ray_jobs.cli import main
from ray_jobs.options import ModelOptions
from tests.corpus import astronaut_jpeg_bytes
from tests.test_checkpoints import legacy_zip, official_layout, openai_layout


@pytest.fixture
def photos(tmp_path):
    folder = tmp_path / "in"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"p{i}.jpg").write_bytes(astronaut_jpeg_bytes(quality=50 + 10 * i, width=300, height=260))
    (folder / "sub" / "broken.png").write_bytes(b"\x89PNG nope")
    (folder / "notes.txt").write_text("not listed: not an image extension")
    return folder


def test_refuses_without_weights(photos, tmp_path):
    res = CliRunner().invoke(main, ["score", str(photos), "--out", str(tmp_path / "o.parquet"), "--engine", "local"])
    assert res.exit_code == 2 and "--random-weights" in res.output and "not a quality model" in res.output


def test_local_engine_writes_one_row_per_image(photos, tmp_path):
    out = tmp_path / "scores" / "o.parquet"
    res = CliRunner().invoke(main, ["score", str(photos), "--out", str(out), "--engine", "local",
                                    "--random-weights", "--preset", "tiny", "--crop-mode", "center"])
    assert res.exit_code == 0, res.output
    assert "random weights" in res.stderr and res.stdout == f"wrote 4 rows to {out}\n"  # the summary on stderr
    table = pq.read_table(out)
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in table.to_pylist()}
    assert set(rows) == {"p0.jpg", "p1.jpg", "p2.jpg", "broken.png"}
    assert rows["broken.png"]["error_code"] == "not_an_image" and rows["broken.png"]["score"] is None
    assert all(rows[f"p{i}.jpg"]["status"] == "ok" and rows[f"p{i}.jpg"]["random_weights"] for i in range(3))
    meta = table.schema.metadata
    assert meta[b"model_sha256"].decode() == build_bundle("tiny").sha256 and meta[b"crop_mode"] == b"center"


def test_local_engine_refuses_before_any_work(photos, tmp_path):
    runner, tiny = CliRunner(), ["--engine", "local", "--random-weights", "--preset", "tiny"]
    (tmp_path / "dir.parquet").mkdir()
    for out in (tmp_path, tmp_path / "scores", tmp_path / "dir.parquet"):  # Ray-style folders: refused up front
        res = runner.invoke(main, ["score", str(photos), "--out", str(out), *tiny])
        assert res.exit_code == 2 and "must be a *.parquet file" in res.output, res.output
    res = runner.invoke(main, ["score", str(photos), "--out", str(tmp_path / "o.parquet"), "--resume",
                               "--prep-actors", "2", *tiny])
    assert res.exit_code == 2 and "--resume, --prep-actors: Ray engine options" in res.output, res.output
    res = runner.invoke(main, ["score", str(tmp_path / "nope"), "--out", str(tmp_path / "o.parquet"), *tiny])
    assert res.exit_code == 1 and f"not found: {tmp_path / 'nope'}" in res.output
    assert "Traceback" not in res.output and not (tmp_path / "o.parquet").exists()
    res = runner.invoke(main, ["score", str(photos), "--out", str(tmp_path / "o"), "--prep", "device",
                               "--prep-actors", "2", "--random-weights"])
    assert res.exit_code == 2 and "no effect with --prep device" in res.output
    res = runner.invoke(main, ["score", str(photos), "--out", str(tmp_path / "o"), "--face-device", "gpu",
                               "--no-gpu", "--random-weights"])
    assert res.exit_code == 2 and "contradicts --no-gpu" in res.output
    res = runner.invoke(main, ["score", str(photos), "--out", str(tmp_path / "o"), "--face-device", "gpu",
                               "--device", "cpu", "--random-weights"])
    assert res.exit_code == 2 and "contradicts --device cpu" in res.output, res.output
    for bad in ("2026/11/26", "20261126", "2026-13-01"):  # "a/b/c" would nest partitions read as run_date=2026
        res = runner.invoke(main, ["score", str(photos), "--out", str(tmp_path / "o"), "--run-date", bad,
                                   "--random-weights"])
        assert res.exit_code == 2 and f"'{bad}' is not a date as YYYY-MM-DD" in res.output, res.output


def test_local_engine_replaces_its_output_whole(photos, tmp_path, monkeypatch):
    out = tmp_path / "scores" / "o.parquet"
    out.parent.mkdir()
    out.write_bytes(b"the previous run's file")
    import pyarrow.parquet

    def dies_mid_write(table, where, **kwargs):  # writes a first chunk, then the process "dies"
        if isinstance(where, str):
            with open(where, "wb") as f:
                f.write(b"PAR1 half a file")
        else:
            where.write(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pyarrow.parquet, "write_table", dies_mid_write)
    res = CliRunner().invoke(main, ["score", str(photos / "p0.jpg"), "--out", str(out), "--engine", "local",
                                    "--random-weights", "--preset", "tiny"])
    assert res.exit_code == 1 and out.read_bytes() == b"the previous run's file"
    assert [p.name for p in out.parent.iterdir()] == ["o.parquet"]  # no temp file left behind


def test_score_mistakes_are_one_line_errors_before_any_work(photos, tmp_path, monkeypatch):
    import os

    import ray

    from ray_jobs import listing

    runner, out = CliRunner(), str(tmp_path / "o.parquet")
    (tmp_path / "notmodel").mkdir()
    res = runner.invoke(main, ["score", str(photos), "--out", out, "--engine", "local", "--weights",
                               str(tmp_path / "notmodel")])
    assert res.exit_code == 1 and "is not a model directory" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["score", str(photos), "--manifest", "--out", out, "--engine", "local",
                               "--random-weights", "--preset", "tiny"])  # a folder given as the manifest
    assert res.exit_code == 1 and "Traceback" not in res.output and str(photos) in res.output, res.output

    real_scandir = os.scandir
    monkeypatch.setattr(listing.os, "scandir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", os.fspath(p))) if os.fspath(p).endswith("sub") else real_scandir(p))
    for engine, dest in (("local", out), ("ray", str(tmp_path / "scores"))):  # Ray is not even started
        res = runner.invoke(main, ["score", str(photos), "--out", dest, "--engine", engine,
                                   "--random-weights", "--preset", "tiny"])
        assert res.exit_code == 1 and f"cannot list folder {photos / 'sub'}: Permission denied" in res.output
        assert "Traceback" not in res.output and not ray.is_initialized()
    assert not os.path.exists(out) and not (tmp_path / "scores").exists()


def test_weights_random_info_and_scoring_from_dir(photos, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["weights", "random", "--preset", "tiny", "--seed", "3", "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    info = runner.invoke(main, ["weights", "info", str(tmp_path / "m")])
    assert "random_init   True" in info.output and build_bundle("tiny", seed=3).sha256 in info.output
    res = runner.invoke(main, ["score", str(photos / "p0.jpg"), "--out", str(tmp_path / "o.parquet"),
                               "--engine", "local", "--weights", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert pq.read_table(tmp_path / "o.parquet").column("model_sha256")[0].as_py() == build_bundle(
        "tiny", seed=3).sha256


def test_a_model_trained_with_random_frozen_parts_says_so(photos, tmp_path):
    """A trained model (random_init false) whose LIQE/RetinaFace were never loaded is not the paper's."""
    from ray_jobs.actors import model_identity
    from ray_jobs.storage import S3Options

    bundle, warnings = init_bundle("tiny")  # no --liqe/--retinaface: both frozen networks stay random
    bundle.random_init = False  # as training exports it
    save_checkpoint(bundle, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["random_parts"] == ["liqe", "face"]
    runner = CliRunner()
    info = runner.invoke(main, ["weights", "info", str(tmp_path / "m")])
    assert "random_init   False" in info.output and "random_parts  liqe, face" in info.output
    res = runner.invoke(main, ["score", str(photos / "p0.jpg"), "--out", str(tmp_path / "o.parquet"),
                               "--engine", "local", "--weights", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    assert "trained with random LIQE and RetinaFace weights" in res.output and "NOTE: random weights" not in res.output
    assert pq.read_schema(tmp_path / "o.parquet").metadata[b"random_parts"] == b'["liqe", "face"]'  # the file says so
    opts = ModelOptions(str(tmp_path / "m"), False, "tiny", None, "fp32", "cpu", 2)
    assert model_identity(opts, S3Options())["random_parts"] == ["liqe", "face"]


def test_import_official_command(tmp_path):
    src = build_bundle("tiny", seed=5)
    torch.save(official_layout(src.model), tmp_path / "PIQ_model.pth")
    torch.save(openai_layout(src.liqe), tmp_path / "LIQE.pt")
    (tmp_path / "r.zip").write_bytes(legacy_zip(src.detector.net.state_dict()))
    runner = CliRunner()
    # The official file is Swin-B: importing it into the tiny architecture must fail with the keys named.
    res = runner.invoke(main, ["weights", "import-official", str(tmp_path / "PIQ_model.pth"),
                               str(tmp_path / "LIQE.pt"), "--retinaface", str(tmp_path / "r.zip"),
                               "-o", str(tmp_path / "out")])
    assert res.exit_code == 1 and "another Swin variant" in res.output and "--preset" in res.output
    res = runner.invoke(main, ["weights", "import-official", str(tmp_path / "PIQ_model.pth"),
                               str(tmp_path / "LIQE.pt"), "--retinaface", str(tmp_path / "r.zip"),
                               "--preset", "tiny", "-o", str(tmp_path / "out")])
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "out" / "config.json").read_text())
    assert meta["model_id"] == "dn-piqa-official" and meta["random_init"] is False


def test_module_entrypoint_for_ray_job_submit():
    out = subprocess.run([sys.executable, "-m", "ray_jobs.score", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--resume" in out.stdout and "--face-device" in out.stdout
    assert out.stdout.startswith("Usage: ray_jobs.score [OPTIONS] INPUTS...")  # was "ray_jobs.score score"


@pytest.mark.parametrize("command", ["score", "audit", "train"])
def test_a_module_entrypoints_usage_error_names_the_module_as_run(command, capsys):
    module = __import__(f"ray_jobs.{command}", fromlist=["main"])
    with pytest.raises(SystemExit) as exit_:
        module.main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and f"Try 'ray_jobs.{command} --help'" in err, err


def _labels(tmp_path, photos) -> str:
    rows = ["uri,score,group"] + [f"{p},{i},g" for i, p in enumerate(sorted(photos.rglob("*.*"))) if p.suffix != ".txt"]
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    return str(tmp_path / "labels.csv")


def test_a_foreign_model_folder_or_a_blocked_output_is_a_one_line_error_before_any_work(photos, tmp_path,
                                                                                          monkeypatch):
    import piqa_core.scorer

    runner, hf = CliRunner(), tmp_path / "hf-model"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "swin"}')  # a Hugging Face folder, not ours
    (hf / "model.safetensors").write_bytes(b"x")
    for engine, dest in (("local", str(tmp_path / "o.parquet")), ("ray", str(tmp_path / "scores"))):
        res = runner.invoke(main, ["score", str(photos), "--out", dest, "--engine", engine, "--weights", str(hf)])
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert f"{hf / 'config.json'}: unknown format None, expected 'piqa-checkpoint/1'" in res.output

    monkeypatch.setattr(piqa_core.scorer.Scorer, "score_columns", lambda *a: pytest.fail("scored before --out check"))
    blocker = tmp_path / "afile"
    blocker.write_text("")
    random = ["--random-weights", "--preset", "tiny"]
    for cmd in (["eval", "--labels", _labels(tmp_path, photos), *random, "--out", str(blocker / "r.json")],
                ["score", str(photos), *random, "--engine", "local", "--out", str(blocker / "o.parquet")],
                ["score", str(photos), *random, "--engine", "ray", "--out", str(blocker / "scores")]):
        res = runner.invoke(main, cmd)
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert f"Not a directory: {blocker}" in res.output
    from ray_jobs import storage

    locked, real_mkstemp = tmp_path / "locked", storage.tempfile.mkstemp
    locked.mkdir()  # read-only as far as the probe can tell (chmod would not stop root)
    monkeypatch.setattr(storage.tempfile, "mkstemp", lambda dir=None, **kw: (_ for _ in ()).throw(
        PermissionError(13, "Permission denied", f"{dir}/x")) if dir == str(locked) else real_mkstemp(dir=dir, **kw))
    res = runner.invoke(main, ["score", str(photos), *random, "--engine", "local", "--out", str(locked / "o.parquet")])
    assert res.exit_code == 1 and f"Permission denied: {locked}" in res.output, res.output


def test_eval_refuses_a_folder_out_before_scoring_and_fails_when_nothing_scored(photos, tmp_path, monkeypatch):
    import piqa_core.scorer

    args = ["eval", "--labels", _labels(tmp_path, photos), "--random-weights", "--preset", "tiny",
            "--crop-mode", "center", "--compile", "--batch-size", "2"]
    built: list[dict] = []
    monkeypatch.setattr(piqa_core.scorer.Scorer, "score_columns", lambda *a: pytest.fail("scored before --out check"))
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path)])
    assert res.exit_code == 2 and "got a folder" in res.output, res.output
    res = CliRunner().invoke(main, [*args, "--out", "s3:/bucket/r.json"])  # a slash short: not a local folder
    assert res.exit_code == 1 and res.output.startswith("Error: 's3:/bucket/r.json' looks like a mistyped s3://")
    labels = pathlib.Path(args[2])
    kept = labels.read_bytes()
    res = CliRunner().invoke(main, [*args, "--out", str(labels)])  # the report would replace the labels
    assert res.exit_code == 1 and "choose another --out" in res.output and labels.read_bytes() == kept, res.output

    monkeypatch.undo()
    for p in photos.glob("*.jpg"):
        p.write_bytes(b"\xff\xd8 not a jpeg")  # now every labelled image is broken
    real_init = piqa_core.scorer.Scorer.__init__  # records its arguments, compiles nothing (minutes on CPU)
    monkeypatch.setattr(piqa_core.scorer.Scorer, "__init__",
                        lambda self, *a, **kw: built.append(kw) or real_init(self, *a, **{**kw, "compile": False}))
    res = CliRunner().invoke(main, [*args, "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 1 and "every image failed to score" in res.output, res.output
    assert built[-1]["compile"] is True and built[-1]["batch_size"] == 2  # --compile reaches the scorer
    assert json.loads((tmp_path / "r.json").read_text())["failed"] == 4
    predictions = pq.read_table(tmp_path / "r.parquet")
    assert predictions.num_rows == 4 and predictions.column("uri").to_pylist()[0].endswith(".jpg")
    meta = predictions.schema.metadata  # the file names its model, as score outputs do
    assert (meta[b"model_sha256"].decode(), meta[b"random_weights"], meta[b"split"]) == (
        build_bundle("tiny").sha256, b"true", b"all")


def test_device_chooses_the_ray_pools_kind(photos, tmp_path, monkeypatch):
    import ray_jobs.audit
    import ray_jobs.score

    jobs = []
    monkeypatch.setattr(ray_jobs.score, "run_score_job", lambda job: jobs.append(job) or {"rows": 1, "output": "o"})
    def audit(job):
        jobs.append(job)
        raise RuntimeError("stop: only the job's arguments are under test")

    monkeypatch.setattr(ray_jobs.audit, "run_audit", audit)
    score = ["score", str(photos), "--out", str(tmp_path / "o"), "--random-weights", "--preset", "tiny"]
    for extra, gpu in ((["--device", "cpu"], False), (["--device", "cuda", "--gpu"], True), ([], None)):
        assert CliRunner().invoke(main, [*score, *extra]).exit_code == 0
        assert jobs.pop().gpu is gpu, extra  # --device was ignored by Ray jobs: a GPU cluster scored on GPUs
    res = CliRunner().invoke(main, [*score, "--device", "cuda:1"])
    assert res.exit_code == 2 and "a Ray job takes cpu or cuda" in res.output
    res = CliRunner().invoke(main, [*score, "--device", "cpu", "--gpu"])
    assert res.exit_code == 2 and "--device cpu contradicts --gpu" in res.output
    CliRunner().invoke(main, ["audit", str(photos), "--state", str(tmp_path / "s"), "--random-weights",
                              "--preset", "tiny", "--device", "cpu"])
    assert jobs.pop().gpu is False


def test_a_device_that_is_not_one_or_not_here_is_a_usage_error(photos, tmp_path, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # a one-GPU machine
    local = ["score", str(photos), "--engine", "local", "--out", str(tmp_path / "o.parquet"), "--random-weights",
             "--preset", "tiny"]
    evaluate = ["eval", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "r.json"), "--random-weights",
                "--preset", "tiny"]
    for args in (local, evaluate):
        res = CliRunner().invoke(main, [*args, "--device", "gpu"])
        assert res.exit_code == 2 and "--device gpu: use cpu, cuda or cuda:N" in res.output, res.output
        res = CliRunner().invoke(main, [*args, "--device", "cuda:1"])
        assert res.exit_code == 2 and "--device cuda:1: this machine has 1 CUDA device(s)" in res.output, res.output
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    res = CliRunner().invoke(main, [*local, "--device", "cuda"])
    assert res.exit_code == 2 and "--device cuda: this machine has no CUDA device" in res.output, res.output
    assert not (tmp_path / "o.parquet").exists()


def test_an_unreachable_object_store_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take seconds
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    for cmd in (["score", "s3://bucket/photos", "--out", str(tmp_path / "o")],
                ["score", "s3://bucket/photos", "--out", str(tmp_path / "o.parquet"), "--engine", "local"],
                ["audit", "s3://bucket/photos", "--state", str(tmp_path / "state")]):
        res = CliRunner().invoke(main, [*cmd, "--endpoint-url", "http://127.0.0.1:9", "--random-weights",
                                        "--preset", "tiny"])
        assert res.exit_code == 1 and isinstance(res.exception, SystemExit), (cmd, res.output, res.exception)
        assert res.output.startswith("Error: object store: EndpointConnectionError") and res.output.count("\n") == 1


def test_a_full_disk_or_read_only_mount_is_one_line_and_other_os_errors_stay_tracebacks() -> None:
    import errno

    import click

    from ray_jobs.cli import _user_errors

    for code in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        with pytest.raises(click.ClickException, match=rf"^{os.strerror(code)}: /out/part\.parquet$"):
            with _user_errors():
                raise OSError(code, os.strerror(code), "/out/part.parquet")
    with pytest.raises(OSError, match="Input/output error"):  # an unknown failure keeps its traceback
        with _user_errors():
            raise OSError(errno.EIO, "Input/output error", "/out/part.parquet")


def test_inputs_left_without_rows_are_a_one_line_error() -> None:
    import click

    from ray_jobs.cli import _user_errors
    from ray_jobs.summary import RowsMissing

    with pytest.raises(click.ClickException, match=r"^run r1: 1 of 3 inputs have no row"):
        with _user_errors():
            raise RowsMissing("run r1: 1 of 3 inputs have no row")


@pytest.mark.parametrize("args", [
    ["audit", "lib", "--state", "s", "--keep-deleted-days", "inf"],  # failed after a night's scoring, every night
    ["audit", "lib", "--state", "s", "--keep-deleted-days", "1e6"],
    ["audit", "lib", "--state", "s", "--alert-if-error-rate", "nan"],  # passed every range check: no alert, ever
    ["train", "--labels", "l.csv", "--run-name", "r", "--storage", "s", "--lr", "nan"],
])
def test_numbers_out_of_range_or_not_finite_are_usage_errors(args: list[str]) -> None:
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2 and f"Invalid value for '{args[-2]}'" in res.output, res.output
    assert ("is not a finite number" if args[-1] in ("inf", "nan") and args[-2] != "--keep-deleted-days"
            else "is not in the range") in res.output
