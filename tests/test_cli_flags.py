"""The score, audit, train and eval commands' flag checks: what they refuse before any listing or Ray start."""

import pytest
from click.testing import CliRunner

from piqa_core.checkpoints import build_bundle, save_checkpoint
from ray_jobs.cli import main
from tests.test_cli import photos  # noqa: F401  (the fixture)


@pytest.fixture
def jobs(monkeypatch) -> list:
    """The score jobs the CLI would run (none is: a refusal missed fails fast instead of starting Ray)."""
    import ray_jobs.score

    started: list = []
    monkeypatch.setattr(ray_jobs.score, "run_score_job", lambda job: started.append(job) or {"rows": 1, "output": "o"})
    return started


@pytest.fixture
def audits(monkeypatch) -> list:
    """The audit jobs the CLI would run (none is: a refusal missed fails fast instead of starting Ray)."""
    import ray_jobs.audit

    counts = dict.fromkeys(("new", "changed", "retry", "unchanged", "restored", "deleted", "scored"), 0)
    started: list = []
    monkeypatch.setattr(ray_jobs.audit, "run_audit", lambda job: started.append(job) or ray_jobs.audit.AuditResult(
        "r1", {"counts": counts}, [], "state", "report", False))
    return started


POOL_FLAGS = ("max_bytes", "face_device", "prep", "prep_actors", "score_actors", "prep_batch_size", "gpus_per_actor")


def test_the_audit_takes_the_score_commands_pool_flags(photos, tmp_path, audits):
    """The audit had no way to size its pools: 13 prep actors beside one score actor on a 24 GB GPU."""
    def described(command: str) -> dict:
        return {p.name: (p.opts, repr(p.type), p.default, (p.help or "").replace(" [Ray engine only]", ""))
                for p in main.commands[command].params if p.name in POOL_FLAGS}

    assert described("audit") == described("score") and len(described("audit")) == len(POOL_FLAGS)
    audit = ["audit", str(photos), "--state", str(tmp_path / "s"), "--random-weights", "--preset", "tiny"]
    res = CliRunner().invoke(main, [*audit, "--face-device", "cpu", "--prep", "actors", "--prep-actors", "3",
                                    "--score-actors", "2", "--prep-batch-size", "4", "--gpus-per-actor", "0.5",
                                    "--max-bytes", "1000"])
    assert res.exit_code == 0, res.output
    [job] = audits
    assert (job.max_bytes, job.pools.job_fields()) == (1000, {
        "face_device": "cpu", "prep": "actors", "prep_actors": 3, "score_actors": 2, "prep_batch_size": 4,
        "gpus_per_score_actor": 0.5})


def test_the_audit_refuses_what_the_score_command_refuses(photos, tmp_path, audits):
    audit = ["audit", str(photos), "--state", str(tmp_path / "s"), "--random-weights", "--preset", "tiny"]
    refused = {
        ("--face-device", "gpu", "--device", "cpu"): "--face-device gpu needs GPUs; it contradicts --device cpu",
        ("--prep", "device", "--face-device", "cpu", "--device", "cuda"): "--face-device cpu does not apply with "
                                                                         "--prep device",
        ("--gpus-per-actor", "0.5", "--device", "cpu"): "--gpus-per-actor has no effect with --device cpu",
        ("--prep", "device", "--prep-actors", "2"): "--prep-actors has no effect with --prep device",
        ("--gpus-per-actor", "0.001"): "0.001 is not in the range",
    }
    for extra, said in refused.items():
        res = CliRunner().invoke(main, [*audit, *extra])
        assert res.exit_code == 2 and said in res.output, (extra, res.output)
    assert audits == [] and not (tmp_path / "s").exists()


def test_train_and_eval_offer_every_hold_out_key_and_default_to_the_path() -> None:
    from ray_jobs.labels import HOLDOUT_KEYS

    for command in ("train", "eval"):
        [opt] = [p for p in main.commands[command].params if p.name == "holdout_key"]
        assert tuple(opt.type.choices) == HOLDOUT_KEYS and opt.default == "path"


def test_flags_that_cannot_run_together_are_refused_before_the_listing(photos, tmp_path, jobs):
    score = ["score", str(photos), "--out", str(tmp_path / "o"), "--random-weights", "--preset", "tiny"]
    refused = {
        ("--face-device", "gpu", "--no-gpu"): "--face-device gpu needs GPUs; it contradicts --no-gpu",
        ("--face-device", "gpu", "--device", "cpu"): "--face-device gpu needs GPUs; it contradicts --device cpu",
        ("--prep", "device", "--face-device", "cpu", "--gpu"): "--face-device cpu does not apply with --prep device",
        ("--gpus-per-actor", "0.5", "--no-gpu"): "--gpus-per-actor has no effect with --no-gpu",
        # the floor is ours: a hundred actors per GPU is a typo, and half of a smaller share (GPU face
        # detection) would drop below Ray's 1e-4 step
        ("--gpus-per-actor", "0.001", "--gpu"): "0.001 is not in the range",
    }
    for extra, said in refused.items():
        res = CliRunner().invoke(main, [*score, *extra])
        assert res.exit_code == 2 and said in res.output, (extra, res.output)
    assert jobs == []
    for extra in (["--gpus-per-actor", "0.5", "--gpu"], ["--prep", "device", "--face-device", "cpu", "--no-gpu"]):
        assert CliRunner().invoke(main, [*score, *extra]).exit_code == 0
    assert [j.gpus_per_score_actor for j in jobs] == [0.5, 1.0]


def test_a_preset_beside_a_model_directory_is_refused_not_ignored(tmp_path, jobs):
    save_checkpoint(build_bundle("tiny"), tmp_path / "m")
    for command in (["score", str(tmp_path), "--out", str(tmp_path / "o")],
                    ["eval", "--labels", str(tmp_path / "l.csv"), "--out", str(tmp_path / "r.json")]):
        res = CliRunner().invoke(main, [*command, "--weights", str(tmp_path / "m"), "--preset", "tiny"])
        assert res.exit_code == 2 and "--preset applies to --random-weights only" in res.output, res.output
    assert jobs == []


def test_a_ray_job_refuses_a_parquet_file_name_for_its_output_folder(photos, tmp_path, jobs):
    score = ["score", str(photos), "--random-weights", "--preset", "tiny", "--out"]
    for out in ("scores.parquet", "scores.parquet/"):
        res = CliRunner().invoke(main, [*score, str(tmp_path / out)])
        assert res.exit_code == 2 and "a Ray job writes a folder of run_date=… partitions" in res.output, res.output
    assert not (tmp_path / "scores.parquet").exists() and jobs == []
    (tmp_path / "kept.parquet").mkdir()  # a folder of that name from earlier runs: resumed into as before
    assert CliRunner().invoke(main, [*score, str(tmp_path / "kept.parquet")]).exit_code == 0 and len(jobs) == 1


def test_the_ray_only_options_say_so_in_the_help() -> None:
    from ray_jobs.cli import RAY_ONLY

    marked = {p.name for p in main.commands["score"].params if (p.help or "").endswith("[Ray engine only]")}
    assert marked == set(RAY_ONLY)  # --engine local refuses each of them


def test_pools_the_cluster_cannot_hold_are_a_usage_error_for_the_audit_too(photos, tmp_path, monkeypatch):
    import ray_jobs.audit
    from ray_jobs.pools import PlanError

    def no_gpus(job):
        raise PlanError("--face-device gpu needs GPUs: the cluster has none (pass --gpu to wait for them)")

    monkeypatch.setattr(ray_jobs.audit, "run_audit", no_gpus)
    res = CliRunner().invoke(main, ["audit", str(photos), "--state", str(tmp_path / "s"), "--random-weights",
                                    "--face-device", "gpu"])
    assert res.exit_code == 2 and "Error: --face-device gpu needs GPUs: the cluster has none" in res.output
