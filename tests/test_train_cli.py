"""``piqa train`` on the command line: setup mistakes, exit codes and messages (the trainer stubbed, no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

import ray_jobs.train
from piqa_core.checkpoints import build_bundle, save_checkpoint
from ray_jobs.cli import main
from tests.test_train import make_ladder


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One scene of ten images: the labels a setup check reads before any training."""
    return make_ladder(tmp_path_factory.mktemp("cli"), photos=("astronaut",), framings=2)


def _train(small: Path, tmp_path: Path, *extra: str):
    argv = ["train", "--labels", str(small), "--run-name", "r", "--storage", str(tmp_path / "runs"),
            "--preset", "tiny", "--val-fraction", "0.35", *extra]
    return CliRunner().invoke(main, argv)


def test_setup_mistakes_are_one_line_errors_and_start_no_ray(small: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    import ray

    started = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda *a, **k: started.append(1))
    missing = _train(tmp_path / "nope.csv", tmp_path)
    assert missing.exit_code == 1 and "nope.csv" in missing.output and "Traceback" not in missing.output
    no_init = _train(small, tmp_path, "--init-face", "GFIQA_Swin.pth")
    assert no_init.exit_code == 1, no_init.output
    assert "--init-face GFIQA_Swin.pth: no such file or directory" in no_init.output
    save_checkpoint(build_bundle("tiny", seed=1), tmp_path / "ours")
    (tmp_path / "LIQE.pt").write_bytes(b"x")
    both = _train(small, tmp_path, "--init", str(tmp_path / "ours"), "--liqe", str(tmp_path / "LIQE.pt"))
    assert both.exit_code == 1 and "already holds LIQE" in both.output, both.output
    for bad in (["--epochs", "0"], ["--lr", "0"], ["--lr-gamma", "-1"]):
        assert _train(small, tmp_path, *bad).exit_code == 2, bad
    assert not started


def test_a_diverged_run_is_not_told_to_rerun(small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ray.train import WorkerGroupError

    def diverged(job):
        raise WorkerGroupError("rank 0: FloatingPointError", {0: FloatingPointError("the training loss is nan")})

    monkeypatch.setattr(ray_jobs.train, "run_train_job", diverged)
    res = _train(small, tmp_path)
    assert res.exit_code == 1 and "start a new run (another --run-name) with a lower --lr" in res.output
    assert "Re-run the same command" not in res.output

    def stopped(job):
        raise FloatingPointError("epoch 2, step 5: the training loss is nan, the model diverged (a rerun repeats it)")

    monkeypatch.setattr(ray_jobs.train, "run_train_job", stopped)
    res = _train(small, tmp_path)
    assert res.exit_code == 1 and "Error: training failed: epoch 2, step 5: the training loss is nan" in res.output
    assert "Traceback" not in res.output and "Re-run the same command" not in res.output


def test_a_run_whose_every_test_image_failed_exits_1(small: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    summary = {"run_name": "r", "run_dir": "/runs/r", "model_dir": "/runs/r/model", "epochs_completed": 1,
               "best_epoch": 0, "best": {"val_srcc_mean": 0.5, "val_srcc_median": 0.5, "val_valid_groups": 1},
               "test": {"items": 4, "failed": 4, "mean": {"srcc": None}, "median": {"srcc": float("nan")}}}
    monkeypatch.setattr(ray_jobs.train, "run_train_job", lambda job: summary)
    res = _train(small, tmp_path)
    assert res.exit_code == 1 and "model: /runs/r/model (best epoch 1 of 1, val SRCC mean 0.5000" in res.output
    assert "Error: every test image failed to score, so the test metrics are undefined: see " \
           "/runs/r/test_report.parquet" in res.output
    ray_jobs.train._print_summary(summary)
    assert "test (4 images, 4 failed): SRCC mean n/a median n/a" in capsys.readouterr().err
    summary["test"]["failed"] = 3  # one image scored: the run did test its model
    assert _train(small, tmp_path).exit_code == 0


def test_train_precision_reaches_the_job(small: Path, tmp_path: Path, monkeypatch) -> None:
    jobs = []
    monkeypatch.setattr(ray_jobs.train, "run_train_job", lambda job: jobs.append(job) or {
        "model_dir": "m", "run_dir": "r", "best_epoch": 0, "epochs_completed": 1, "test": None,
        "best": {"val_valid_groups": 0}})
    assert _train(small, tmp_path).exit_code == 0 and _train(small, tmp_path, "--precision", "fp32").exit_code == 0
    assert [j.precision for j in jobs] == ["bf16", "fp32"]
    assert _train(small, tmp_path, "--precision", "fp16").exit_code == 2
