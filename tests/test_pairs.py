"""Pair lists (``ray_jobs.pairs``): official-style IMAGE / IMAGE second files as index pairs into labels."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.labels import LabelError, LabelTable, from_table, load_labels
from ray_jobs.pairs import load_pairs, pair_list_scores
from tests.test_labels import _piq23


def test_pair_list(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"S0": 4, "S1": 4})
    table = load_labels(str(csv), val_fraction=0.0)
    train = LabelTable(table.frame[table.frame["name"] != "3_S1.jpg"])
    pairs = pd.DataFrame({"IMAGE": ["0_S0.jpg", "1_S0.jpg", "0_S1.jpg", "3_S1.jpg"],
                          "IMAGE second": ["1_S0.jpg", "1_S0.jpg", "2_S1.jpg", "0_S1.jpg"], "JOD": 0.0})
    pairs.to_csv(tmp_path / "exp.csv", index=False)
    got, stats = load_pairs(str(tmp_path / "exp.csv"), train, known=set(table.frame["name"]))
    names = train.frame["name"].tolist()
    assert [(names[a], names[b]) for a, b in got] == [("0_S0.jpg", "1_S0.jpg"), ("1_S0.jpg", "1_S0.jpg"),
                                                      ("0_S1.jpg", "2_S1.jpg")]  # self-pair kept
    assert stats == {"rows": 4, "kept": 3, "dropped": 1, "outside_split": 1, "cross_group": 0}
    pairs.assign(IMAGE=["nope.jpg"] * 4).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(LabelError, match="1 image name\\(s\\) in the pair list are not labelled"):
        load_pairs(str(tmp_path / "bad.csv"), train, known=set(table.frame["name"]))


def test_pair_list_drops_cross_group_pairs_and_unlisted_images(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    csv = _piq23(tmp_path, {"S0": 3, "S1": 3})
    (tmp_path / "train.txt").write_text("0_S0.jpg\n1_S0.jpg\n0_S1.jpg\n1_S1.jpg\n2_S1.jpg\n")  # 2_S0 unused
    table = load_labels(str(csv), train_list=str(tmp_path / "train.txt"), val_fraction=0.0)
    assert table.unused == {"2_S0.jpg"} and table.subset("train").unused == {"2_S0.jpg"}
    pd.DataFrame({"IMAGE": ["0_S0.jpg", "0_S0.jpg", "1_S1.jpg", "2_S0.jpg", "1_S0.jpg"],
                  "IMAGE second": ["1_S0.jpg", "0_S1.jpg", "2_S1.jpg", "0_S0.jpg", "2_S1.jpg"]}) \
        .to_csv(tmp_path / "exp.csv", index=False)
    train = table.subset("train")
    got, stats = load_pairs(str(tmp_path / "exp.csv"), train, known=set(table.frame["name"]))
    names = train.frame["name"].tolist()
    assert [(names[a], names[b]) for a, b in got] == [("0_S0.jpg", "1_S0.jpg"), ("1_S1.jpg", "2_S1.jpg")]
    assert stats == {"rows": 5, "kept": 2, "dropped": 3, "outside_split": 1, "cross_group": 2}
    assert capsys.readouterr().err == (
        f"warning: pair list {tmp_path / 'exp.csv'}: dropped 3 of 5 pair(s): 1 with an image outside this split "
        "(another split, or left out by the split lists), 2 across groups (JOD labels compare only within a scene)\n")
    # nothing dropped: no warning
    pd.DataFrame({"IMAGE": ["0_S0.jpg"], "IMAGE second": ["1_S0.jpg"]}).to_csv(tmp_path / "ok.csv", index=False)
    assert load_pairs(str(tmp_path / "ok.csv"), train)[1]["dropped"] == 0 and capsys.readouterr().err == ""


def test_pair_list_refuses_names_of_several_images(tmp_path: Path) -> None:
    for d in ("s1", "s2"):
        (tmp_path / d).mkdir()
    df = pd.DataFrame({"uri": ["s1/x.jpg", "s1/a.jpg", "s2/x.jpg", "s2/b.jpg"], "score": [1, 2, 3, 4],
                       "group": ["A", "A", "C", "C"], "split": ["train", "train", "train", "test"]})
    df.to_csv(tmp_path / "t.csv", index=False)
    table = from_table(str(tmp_path / "t.csv"))
    pd.DataFrame({"IMAGE": ["x.jpg", "a.jpg"], "IMAGE second": ["a.jpg", "a.jpg"]}) \
        .to_csv(tmp_path / "exp.csv", index=False)
    with pytest.raises(LabelError, match=r"1 image name\(s\) in the pair list match several labelled images "
                                         rf"\(pairs name images by file name\):\n  x.jpg: {tmp_path / 's1' / 'x.jpg'}, "
                                         rf"{tmp_path / 's2' / 'x.jpg'}$"):
        load_pairs(str(tmp_path / "exp.csv"), table)
    # repeated only in the full labels (its other copy in another split): still ambiguous, given the names
    df.assign(split=["train", "train", "test", "test"]).to_csv(tmp_path / "t.csv", index=False)
    full = from_table(str(tmp_path / "t.csv"))
    with pytest.raises(LabelError, match=rf"match several .*\n  x.jpg: {tmp_path / 's1' / 'x.jpg'}$"):
        load_pairs(str(tmp_path / "exp.csv"), full.subset("train"), known=full.frame["name"])
    # a repeated name that no pair uses is fine
    pd.DataFrame({"IMAGE": ["a.jpg"], "IMAGE second": ["a.jpg"]}).to_csv(tmp_path / "ok.csv", index=False)
    assert load_pairs(str(tmp_path / "ok.csv"), table)[0].tolist() == [[1, 1]]


def test_pair_list_scores_are_the_lists_jod_columns(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"S0": 3})
    train = load_labels(str(csv), val_fraction=0.0).subset("train")
    names, before = train.frame["name"].tolist(), train.scores.copy()
    pairs = pd.DataFrame({"IMAGE": [names[0], names[1]], "JOD": [5.5, before[1]],
                          "IMAGE second": [names[1], "other.jpg"], "JOD second": [before[1], -1.0]})
    pairs.to_csv(tmp_path / "exp.csv", index=False)
    scores, stats = pair_list_scores(str(tmp_path / "exp.csv"), train)
    assert scores.tolist() == [5.5, before[1], before[2]]  # names[2] is in no pair: its label stays
    assert stats == {"scored": 2, "differ": 1, "max_diff": pytest.approx(abs(5.5 - before[0]))}
    assert (train.scores == before).all()  # the table itself is left as it was
    pairs.drop(columns="JOD second").to_csv(tmp_path / "names.csv", index=False)
    assert pair_list_scores(str(tmp_path / "names.csv"), train) is None  # nothing to take: the labels train
    pairs.assign(JOD=[5.5, 0.25]).to_csv(tmp_path / "twice.csv", index=False)  # names[1]: 0.25 and its label
    with pytest.raises(LabelError, match=rf"1 image\(s\) the pair list scores more than once .*\n  {names[1]}: \["):
        pair_list_scores(str(tmp_path / "twice.csv"), train)
    pairs.assign(JOD=["x", before[1]]).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(LabelError, match=rf"{names[0]}: \[nan\]"):
        pair_list_scores(str(tmp_path / "text.csv"), train)
