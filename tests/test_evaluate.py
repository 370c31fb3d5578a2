"""``piqa eval`` plumbing: outputs that would overwrite the inputs, groups whose every image failed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pytest

import ray_jobs.evaluate as ev
from ray_jobs.evaluate import check_eval_outputs, evaluate_table, predictions_uri
from ray_jobs.labels import LabelTable


def test_predictions_next_to_the_labels_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    labels = tmp_path / "labels.parquet"
    labels.write_bytes(b"PAR1")
    monkeypatch.chdir(tmp_path)
    # --out labels.json: predictions_uri makes it labels.parquet, the labels themselves
    assert predictions_uri("labels.json") == "labels.parquet"
    for out in ("labels.json", str(tmp_path / "labels.json"), "./sub/../labels.json", "labels.parquet",
                f"file://{tmp_path}/labels.json"):
        with pytest.raises(ValueError, match=r"^--out .* which is the input .*labels\.parquet; choose another --out$"):
            check_eval_outputs(out, [str(labels), None, None])
    # the report itself on the labels (a CSV given as --out), and a split list hit as well
    (tmp_path / "l.csv").write_text("uri,score,group\n")
    with pytest.raises(ValueError, match=r"its report to l\.csv, which is the input"):
        check_eval_outputs("l.csv", ["l.csv"])
    with pytest.raises(ValueError, match=r"its predictions to .*test\.parquet, which is the input test\.parquet"):
        check_eval_outputs(str(tmp_path / "test.json"), [str(labels), None, "test.parquet"])
    check_eval_outputs("report.json", [str(labels), "train.txt", "test.txt"])  # other names: fine
    check_eval_outputs("labels.json", ["s3://b/labels.parquet"])  # local vs remote: never one file


def test_links_to_the_labels_are_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    labels = data / "labels.parquet"
    labels.write_bytes(b"PAR1")
    os.symlink(data, tmp_path / "alias")
    os.link(labels, tmp_path / "hard.parquet")
    with pytest.raises(ValueError, match="which is the input"):
        check_eval_outputs(str(tmp_path / "alias" / "labels.json"), [str(labels)])
    with pytest.raises(ValueError, match="which is the input"):
        check_eval_outputs(str(tmp_path / "hard.json"), [str(labels)])


def test_remote_outputs_compare_by_uri() -> None:
    with pytest.raises(ValueError, match=r"its predictions to s3://b/x/labels\.parquet"):
        check_eval_outputs("s3://b/x/labels.json", ["s3://b/x/labels.parquet"])
    with pytest.raises(ValueError, match="which is the input S3A://b/x/labels.parquet"):
        check_eval_outputs("s3://b/x/labels.json", ["S3A://b/x/labels.parquet"])
    # "//" in an S3 key names another object: not collapsed
    check_eval_outputs("s3://b/x//labels.json", ["s3://b/x/labels.parquet"])
    check_eval_outputs("s3://other/x/labels.json", ["s3://b/x/labels.parquet"])


def test_a_group_whose_every_image_failed_is_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    rows = [{"uri": f"/d/{g}{i}.jpg", "score": float(i), "group": g, "split": "test", "name": f"{g}{i}.jpg"}
            for g, n in (("a", 4), ("b", 3)) for i in range(n)]
    table = LabelTable(pd.DataFrame(rows))
    status = ["ok"] * 4 + ["decode_error"] * 3  # every image of group b failed
    scored = pd.DataFrame({"score": [0.1, 0.4, 0.2, 0.9] + [None] * 3, "status": status,
                           "error_code": [None] * 4 + ["decode_error"] * 3, "error_message": None,
                           "face_found": False, "n_faces": 0, "width": 8, "height": 8})
    monkeypatch.setattr(ev, "stat_objects", lambda uris, s3: uris)
    monkeypatch.setattr(ev, "score_objects", lambda objects, *a, **kw: pa.Table.from_pandas(scored))
    scorer = SimpleNamespace(model_id="m", sha256="0" * 64, crop_mode="five", config=SimpleNamespace(preset="tiny"),
                             bundle=SimpleNamespace(random_init=False, random_parts=()))
    result = evaluate_table(scorer, table, "test")
    rep = result.report
    assert [(r["group"], r["n"], r["fit"]) for r in rep.per_group] == [("a", 4, "logistic"), ("b", 0, "none")]
    assert rep.mean["groups"] == 2 and rep.mean["valid_groups"] == 1 and rep.pooled["n"] == 4
    d = json.loads(json.dumps(result.to_dict(), allow_nan=False))
    assert d["per_group"][1] == {"group": "b", "n": 0, "srcc": None, "krcc": None, "plcc": None, "rmse": None,
                                 "mae": None, "fit": "none"}
    lines = result.format().splitlines()
    assert any(line.split()[:3] == ["b", "0", "nan"] for line in lines)
    assert any(line.split()[:2] == ["mean", "1/2g"] for line in lines)


def test_the_test_split_is_scored_with_the_exported_weights_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    """A node's cached copy of an earlier export was checked against the weights' sha256 only: an export
    with the same weights and another config (crop mode, preset fields) would have been evaluated stale."""
    import ray_jobs.train as train

    asked: list[tuple] = []

    class Stop(Exception):
        pass

    def weights_dir(*args):
        asked.append(args)
        raise Stop

    run_here = ev.evaluate_remote._function

    class Task:  # evaluate_remote without Ray
        def options(self, **kwargs):
            return SimpleNamespace(remote=run_here)

    monkeypatch.setattr(ev, "weights_dir", weights_dir)
    monkeypatch.setattr(ev, "evaluate_remote", Task())
    job = train.TrainJob(labels="l.csv", run_name="r", storage="/runs")
    exported = {"sha256": "a" * 64, "config": {"crop_mode": "center"}}
    test = LabelTable(pd.DataFrame([{"uri": "/d/a.jpg", "score": 1.0, "group": "g", "split": "test", "name": "a.jpg"}]))
    with pytest.raises(Stop):
        train._evaluate_test(job, "s3://models/r/model", exported, test)
    assert asked == [("s3://models/r/model", job.s3, "a" * 64, {"crop_mode": "center"})]


def test_the_validation_split_of_a_training_runs_export_takes_the_runs_hold_out(tmp_path: Path, capsys) -> None:
    """Runs recorded before --holdout-key held out by uri: evaluating their export with the new default
    would score images they trained on as validation."""
    from ray_jobs.train import TrainJob, claim_run

    (tmp_path / "l.csv").write_text("uri,score,group\na.png,1,g\n")
    claim_run(TrainJob(labels=str(tmp_path / "l.csv"), run_name="r", storage=str(tmp_path), seed=3))
    recipe = json.loads((tmp_path / "r" / "recipe.json").read_text())
    del recipe["holdout_key"]  # as written before the option
    (tmp_path / "r" / "recipe.json").write_text(json.dumps(recipe))
    model = str(tmp_path / "r" / "model")
    with pytest.raises(ValueError, match=r"export of training run .*/r, whose validation split was held out with "
                                         r"--seed 3 --holdout-key uri: pass the same"):
        ev.check_run_holdout(model, 0.2, 0, "path", None)
    ev.check_run_holdout(model + "/", 0.2, 3, "uri", None)
    ev.check_run_holdout(str(tmp_path / "elsewhere" / "model"), 0.5, 0, "path", None)  # not a run's export
    (tmp_path / "d" / "recipe.json").parent.mkdir()
    (tmp_path / "d" / "recipe.json").write_text("{not json")  # unreadable: said, and the eval goes on
    ev.check_run_holdout(str(tmp_path / "d" / "model"), 0.2, 0, "path", None)
    assert "cannot read" in capsys.readouterr().err
    from click.testing import CliRunner

    from piqa_core.checkpoints import build_bundle, save_checkpoint
    from ray_jobs.cli import main

    save_checkpoint(build_bundle("tiny"), model)
    (tmp_path / "l.csv").write_text("uri,score,group\n" + "".join(f"{i}.png,{i},g\n" for i in range(10)))
    args = ["eval", "--labels", str(tmp_path / "l.csv"), "--split", "val", "--weights", model, "--out",
            str(tmp_path / "e.json")]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 1 and "--seed 3 --holdout-key uri: pass the same" in res.output, res.output
