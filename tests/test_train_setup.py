"""The train job's driver-side set-up: checked options and paths, and the recipe a run keeps (no Ray)."""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.storage import write_bytes
from ray_jobs.train import TrainJob, TrainSetupError, best_checkpoint, checked_job, claim_run, has_checkpoint


def test_local_paths_become_absolute_for_the_workers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, s3_server,
                                                     s3_bucket: str) -> None:
    # Ray Train runs each worker in a directory of its own: a relative path there names nothing.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "lsvq.pth").write_bytes(b"x")
    write_bytes(f"s3://{s3_bucket}/LIQE.pt", b"x", s3_server.options)
    job = checked_job(TrainJob(labels="l.csv", run_name="r", storage="runs", init_whole="w/lsvq.pth",
                               cache="cache", liqe=f"s3://{s3_bucket}/LIQE.pt", s3=s3_server.options,
                               random_start=True))  # the face branch has no start weights here
    assert job.init_whole == str(tmp_path / "w" / "lsvq.pth")
    assert (job.storage, job.cache) == (str(tmp_path / "runs"), str(tmp_path / "cache"))
    assert job.liqe == f"s3://{s3_bucket}/LIQE.pt"  # remote sources are fetched by the workers


def test_start_weights_on_s3_are_checked_on_the_driver(s3_server, s3_bucket: str) -> None:
    opts, base = s3_server.options, f"s3://{s3_bucket}"
    write_bytes(f"{base}/w/LIQE.pt", b"x", opts)
    write_bytes(f"{base}/model/config.json", b"{}", opts)
    job = TrainJob(labels="l.csv", run_name="r", storage="runs", s3=opts)
    with pytest.raises(TrainSetupError, match=rf"^--liqe {base}/w/LIQE.pth: no such file or directory$"):
        checked_job(replace(job, liqe=f"{base}/w/LIQE.pth"))  # a typo: .pth for .pt
    with pytest.raises(TrainSetupError, match="--init is a model directory, which already holds LIQE"):
        checked_job(replace(job, init=f"{base}/model", liqe=f"{base}/w/LIQE.pt"))
    assert checked_job(replace(job, init=f"{base}/model")).init == f"{base}/model"
    assert pytest.raises(TrainSetupError, checked_job, replace(job, workers=4)).match("^--batch-pairs 6 does not split")


def test_a_run_with_a_checkpoint_resumes_after_its_start_weights_are_gone(tmp_path: Path, capsys) -> None:
    job = TrainJob(labels="l.csv", run_name="r", storage=str(tmp_path / "runs"), init=str(tmp_path / "gone.pth"))
    with pytest.raises(TrainSetupError, match="gone.pth: no such file or directory"):
        checked_job(job)  # a new run needs them
    (tmp_path / "runs" / "r" / "epoch_0003").mkdir(parents=True)
    assert checked_job(job).init == str(tmp_path / "gone.pth")  # the recipe still names it: resumable
    assert f"--init {tmp_path / 'gone.pth'} is gone; run r resumes from its checkpoint" in capsys.readouterr().err


def test_a_run_resumes_only_with_its_own_recipe(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("uri,score,group\na.png,1,g\n")
    job = TrainJob(labels=str(tmp_path / "l.csv"), run_name="r", storage=str(tmp_path), lr=3e-4, seed=1)
    claim_run(job)  # first start: recorded
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())["lr"] == 3e-4
    (tmp_path / "r" / "epoch_0000").mkdir()  # it trained an epoch under that recipe
    claim_run(replace(job, epochs=20, workers=4, keep=5))  # more epochs, other resources: the same run
    with pytest.raises(TrainSetupError, match=r"--seed 1 -> 2; --lr 0.0003 -> 0.001\): resume it with its own"):
        claim_run(replace(job, lr=1e-3, seed=2))  # the optimiser state would override it; the split would move


def test_a_run_refuses_data_files_edited_in_place(tmp_path: Path) -> None:
    labels, pairs = tmp_path / "labels.csv", tmp_path / "pairs.csv"
    labels.write_text("uri,score,group\na.png,1,g\nb.png,2,g\n")
    pairs.write_text("IMAGE,IMAGE second\na.png,b.png\n")
    job = TrainJob(labels=str(labels), run_name="r", storage=str(tmp_path / "runs"), pairs=str(pairs))
    claim_run(job)
    (tmp_path / "runs" / "r" / "epoch_0000").mkdir()
    claim_run(job)  # the same files: it resumes
    labels.write_text("uri,score,group\na.png,2,g\nb.png,1,g\n")  # the same path, other scores
    edited = rf"run r: --labels {re.escape(str(labels))} \(sha256 \w{{12}}… -> \w{{12}}…\) changed since the run"
    with pytest.raises(TrainSetupError, match=edited + " started.*restore the file, or start a new run"):
        claim_run(job)
    recipe_file = tmp_path / "runs" / "r" / "recipe.json"
    recipe = json.loads(recipe_file.read_text())
    assert sorted(recipe.pop("sha256")) == ["labels", "pairs"]
    recipe_file.write_text(json.dumps(recipe))  # as written before the digests: it resumes on its paths alone
    claim_run(job)


@pytest.mark.parametrize(("option", "now", "before", "said"), [
    ("pairs_per_image", 2, 1, r"--pairs-per-image 1 -> 2\)"),  # now 2 as the official exp.csv; one partner before
    ("holdout_key", "path", "uri", r"--holdout-key 'uri' -> 'path'\)"),  # the hold-out hashed resolved uris before
])
def test_a_run_recorded_before_an_option_resumes_with_what_it_used(tmp_path: Path, option, now, before, said) -> None:
    (tmp_path / "l.csv").write_text("uri,score,group\na.png,1,g\n")
    job = TrainJob(labels=str(tmp_path / "l.csv"), run_name="r", storage=str(tmp_path))
    claim_run(job)
    (tmp_path / "r" / "epoch_0003").mkdir()
    recipe_file = tmp_path / "r" / "recipe.json"
    recipe = json.loads(recipe_file.read_text())
    assert recipe.pop(option) == now
    recipe_file.write_text(json.dumps(recipe))
    with pytest.raises(TrainSetupError, match=said):
        claim_run(job)
    claim_run(replace(job, **{option: before}))


def test_a_run_without_a_checkpoint_takes_corrected_options(tmp_path: Path, capsys, s3_server, s3_bucket) -> None:
    (tmp_path / "l.csv").write_text("uri,score,group\na.png,1,g\n")
    job = TrainJob(labels=str(tmp_path / "l.csv"), run_name="r", storage=str(tmp_path / "runs"), lr=3e-4)
    claim_run(job)  # then the first attempt died before its first checkpoint (a bad weights file, OOM)
    claim_run(replace(job, lr=1e-4, init_whole=str(tmp_path / "fixed.pth")))
    assert "has no checkpoint yet: its recipe is replaced (--init-whole None -> " in capsys.readouterr().err
    assert json.loads((tmp_path / "runs" / "r" / "recipe.json").read_text())["lr"] == 1e-4
    assert not has_checkpoint(job)
    (tmp_path / "runs" / "r" / "epoch_0000").mkdir()
    assert has_checkpoint(job)
    with pytest.raises(TrainSetupError, match=r"--lr 0.0001 -> 0.0003"):
        claim_run(job)
    remote = replace(job, storage=f"s3://{s3_bucket}/runs", s3=s3_server.options)
    assert not has_checkpoint(remote)
    write_bytes(f"s3://{s3_bucket}/runs/r/epoch_0000/config.json", b"{}", s3_server.options)
    assert has_checkpoint(remote)


def test_the_best_checkpoint_ties_go_to_the_latest_epoch() -> None:
    unranked = [("c1", {"epoch": 1, "val_srcc_mean": -1.0}), ("c2", {"epoch": 2, "val_srcc_mean": -1.0})]
    assert best_checkpoint(unranked)[0] == "c2"  # no rankable validation: the last epoch, not the oldest kept
    ranked = [("c1", {"epoch": 1, "val_srcc_mean": 0.8}), ("c2", {"epoch": 2, "val_srcc_mean": 0.7})]
    assert best_checkpoint(ranked)[0] == "c1"


def test_a_failed_local_export_leaves_the_previous_model_whole(tmp_path: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    import pyarrow.fs as pafs

    from piqa_core.checkpoints import CheckpointError, build_bundle, load_checkpoint, save_checkpoint
    from ray_jobs.train import export_model

    job = TrainJob(labels="l.csv", run_name="r", storage=str(tmp_path / "runs"))
    first, second = tmp_path / "epoch_0000", tmp_path / "epoch_0001"
    old_sha = save_checkpoint(build_bundle("tiny", seed=1), first)
    new_sha = save_checkpoint(build_bundle("tiny", seed=2), second)
    model_dir = Path(export_model(SimpleNamespace(path=str(first), filesystem=pafs.LocalFileSystem()), job))
    assert load_checkpoint(model_dir).sha256 == old_sha

    real_copy = pafs.copy_files

    def dies_mid_copy(src: str, dst: str, **kw) -> None:
        Path(dst).write_bytes(b"half a file")  # what a killed copy leaves
        raise OSError("No space left on device")

    monkeypatch.setattr(pafs, "copy_files", dies_mid_copy)
    with pytest.raises(OSError, match="No space left"):
        export_model(SimpleNamespace(path=str(second), filesystem=pafs.LocalFileSystem()), job)
    assert load_checkpoint(model_dir).sha256 == old_sha and sorted(p.name for p in model_dir.iterdir()) == [
        "config.json", "model.safetensors"]

    def dies_on_the_config(src: str, dst: str, **kw) -> None:
        if src.endswith("config.json"):
            raise OSError("No space left on device")
        real_copy(src, dst, **kw)

    monkeypatch.setattr(pafs, "copy_files", dies_on_the_config)  # the weights landed, their config did not
    with pytest.raises(OSError, match="No space left"):
        export_model(SimpleNamespace(path=str(second), filesystem=pafs.LocalFileSystem()), job)
    with pytest.raises(CheckpointError, match=rf"model.safetensors is corrupt or was replaced: sha256 {new_sha} != "
                                              rf"{old_sha}"):
        load_checkpoint(model_dir)  # new weights beside the old config are refused, never used as either
    monkeypatch.setattr(pafs, "copy_files", real_copy)
    export_model(SimpleNamespace(path=str(second), filesystem=pafs.LocalFileSystem()), job)
    assert load_checkpoint(model_dir).sha256 == new_sha


def test_a_pair_lists_jod_columns_are_the_train_targets_unless_told_otherwise(tmp_path: Path, capsys) -> None:
    from ray_jobs.train import prepare_data
    from tests.test_labels import _piq23

    labels = _piq23(tmp_path, {"S0": 3})  # JODs -1.5, -0.5, 0.5
    pairs = pd.DataFrame({"IMAGE": ["0_S0.jpg", "1_S0.jpg"], "JOD": [2.0, -0.5],
                          "IMAGE second": ["1_S0.jpg", "2_S0.jpg"], "JOD second": [-0.5, 0.5]})
    pairs.to_csv(tmp_path / "exp.csv", index=False)
    job = TrainJob(labels=str(labels), run_name="r", storage=str(tmp_path / "runs"), pairs=str(tmp_path / "exp.csv"),
                   val_fraction=0.0, preset="tiny")
    names = ["0_S0.jpg", "1_S0.jpg", "2_S0.jpg"]
    table, data = prepare_data(job)
    assert table.frame["name"].tolist() == names and data["train"][1].tolist() == [2.0, -0.5, 0.5]
    err = capsys.readouterr().err
    assert "the train targets of 3 image(s) are the JOD columns of" in err and "; 1 differ from" in err
    assert "(by up to 3.5)" in err
    _, data = prepare_data(replace(job, pair_scores="labels"))
    assert data["train"][1].tolist() == [-1.5, -0.5, 0.5]


def test_a_pair_list_run_recorded_before_pair_scores_resumes_on_its_labels(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("uri,score,group\na.png,1,g\n")
    (tmp_path / "p.csv").write_text("IMAGE,IMAGE second\na.png,a.png\n")
    (tmp_path / "jod.csv").write_text("IMAGE,JOD,IMAGE second,JOD second\na.png,2,a.png,2\n")
    plain = TrainJob(labels=str(tmp_path / "l.csv"), run_name="plain", storage=str(tmp_path))
    names = replace(plain, run_name="names", pairs=str(tmp_path / "p.csv"))
    scored = replace(plain, run_name="scored", pairs=str(tmp_path / "jod.csv"))
    for job, acts in ((plain, None), (names, "labels"), (scored, "list")):
        claim_run(job)
        (tmp_path / job.run_name / "epoch_0003").mkdir()
        recipe_file = tmp_path / job.run_name / "recipe.json"
        recipe = json.loads(recipe_file.read_text())
        assert recipe.pop("pair_scores") == acts  # as the option acts on the run
        recipe_file.write_text(json.dumps(recipe))
    claim_run(plain)  # without a pair list the option changes nothing
    claim_run(replace(plain, pair_scores="labels"))
    claim_run(names)  # a list without JOD columns trains on the labels either way: the same command resumes
    with pytest.raises(TrainSetupError, match=r"--pair-scores 'labels' -> 'list'\)"):
        claim_run(scored)  # its targets would change mid-run
    claim_run(replace(scored, pair_scores="labels"))


def test_a_run_that_diverged_after_its_latest_checkpoint_is_not_resumed(tmp_path: Path) -> None:
    from ray_jobs.recipe import check_not_diverged

    job = TrainJob(labels="l.csv", run_name="r", storage=str(tmp_path))
    check_not_diverged(job)  # no run yet
    (tmp_path / "r" / "epoch_0001").mkdir(parents=True)
    said = tmp_path / "r" / "diverged.json"
    said.write_text(json.dumps({"attempt": "a", "epoch": 2, "error": "epoch 3, step 4: the training loss is nan"}))
    refused = rf"run r diverged \(epoch 3, step 4: the training loss is nan\); resuming it would diverge again: .*" \
              rf"from --init {re.escape(str(tmp_path / 'r' / 'epoch_0001'))} if you like, or delete "
    with pytest.raises(TrainSetupError, match=refused):
        check_not_diverged(job)
    (tmp_path / "r" / "epoch_0002").mkdir()  # the run went past the epoch it diverged in once
    check_not_diverged(job)
    said.write_text(json.dumps({"attempt": "a", "epoch": 0, "error": "nan"}))
    for folder in ("epoch_0001", "epoch_0002"):
        (tmp_path / "r" / folder).rmdir()
    with pytest.raises(TrainSetupError, match=r"from its start weights if you like"):
        check_not_diverged(job)
    recipe = tmp_path / "r" / "recipe.json"
    recipe.write_text("{}")  # claim_run replaced the recipe since (another --lr on a run without checkpoints)
    os.utime(recipe, ns=(said.stat().st_mtime_ns + 10**9,) * 2)
    check_not_diverged(job)  # another experiment under the same name: its own divergence is yet to come


def test_the_official_architecture_does_not_start_from_random_branches_unasked(tmp_path: Path) -> None:
    for name in ("lsvq.pth", "gfiqa.pth"):
        (tmp_path / name).write_bytes(b"x")
    job = TrainJob(labels="l.csv", run_name="r", storage=str(tmp_path / "runs"))  # dn-piqa, as the CLI's default
    with pytest.raises(TrainSetupError, match=r"without --init-whole and --init-face \(or --init\) the dn-piqa run "
                                              r"would start both branches from random weights; .*--random-start"):
        checked_job(job)
    with pytest.raises(TrainSetupError, match=r"without --init-face \(or --init\) the dn-piqa run would start a "):
        checked_job(replace(job, init_whole=str(tmp_path / "lsvq.pth")))
    checked_job(replace(job, init_whole=str(tmp_path / "lsvq.pth"), init_face=str(tmp_path / "gfiqa.pth")))
    checked_job(replace(job, init=str(tmp_path / "lsvq.pth")))  # the official PIQ_model.pth: both branches
    checked_job(replace(job, random_start=True))
    checked_job(replace(job, preset="tiny"))  # no official pre-training fits its small Swins
    (tmp_path / "runs" / "r" / "epoch_0000").mkdir(parents=True)
    checked_job(job)  # resumed: its checkpoint holds the branches


def test_start_weights_say_which_branches_start_random() -> None:
    from piqa_core.training import init_bundle

    _, warnings = init_bundle("tiny", seed=0)
    assert "the whole-image branch starts from random weights (no --init-whole, no --init)" in warnings
    assert "the face branch starts from random weights (no --init-face, no --init)" in warnings
