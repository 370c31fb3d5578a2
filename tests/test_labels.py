"""Label loading: PIQ23 CSV + split files, generic tables, validation hold-out, pair lists, errors."""

from __future__ import annotations

import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ray_jobs.labels import LabelError, LabelTable, from_table, load_labels, resolve_relative
from ray_jobs.pairs import load_pairs
from ray_jobs.storage import S3Options, write_bytes

PIQ23_COLUMNS = ["IMAGE PATH", "IMAGE", "JOD", "JOD STD", "CI LOW", "CI HIGH", "CI RANGE", "QUALITY LEVEL",
                 "CLUSTER", "TOTAL COMPARISONS", "SCENE", "ATTRIBUTE", "SCENE IDX", "CONDITION"]


def _piq23(root: Path, scenes: dict[str, int], extra: dict[str, list] | None = None) -> Path:
    """A PIQ23-style CSV (Windows separators in IMAGE PATH, as in the release) and 1-byte 'images'."""
    rows = []
    for s_idx, (scene, n) in enumerate(scenes.items()):
        for i in range(n):
            name = f"{i}_{scene}.jpg"
            (root / "Overall").mkdir(parents=True, exist_ok=True)
            (root / "Overall" / name).write_bytes(b"x")
            rows.append([f"Overall\\{name}", name, float(i) - n / 2, 0.5, -1.0, 1.0, 2.0, i % 4, 0, 30, scene,
                         "Overall", s_idx, "Indoor"])
    df = pd.DataFrame(rows, columns=PIQ23_COLUMNS)
    for k, v in (extra or {}).items():
        df[k] = v
    path = root / "labels.csv"
    df.to_csv(path, index=False, encoding="utf-8-sig")  # the release files carry a BOM
    return path


def test_piq23_csv(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"Indoor_Scene_0": 10, "Outdoor_Scene_3": 6})
    table = load_labels(str(csv), images=str(tmp_path), val_fraction=0.2)
    f = table.frame
    assert len(table) == 16 and set(f["group"]) == {"Indoor_Scene_0", "Outdoor_Scene_3"}
    assert f["uri"].iloc[0] == str(tmp_path / "Overall" / "0_Indoor_Scene_0.jpg")
    assert f["score"].iloc[1] == pytest.approx(1 - 5.0)  # JOD
    assert (f["name"] == f["uri"].map(lambda u: Path(u).name)).all()
    # 20 % of each scene held out for validation: 2 of 10, 1 of 6 (round half up); nothing else.
    counts = f[f["split"] == "val"].groupby("group").size().to_dict()
    assert counts == {"Indoor_Scene_0": 2, "Outdoor_Scene_3": 1}
    assert set(f["split"]) == {"train", "val"}
    # images default to the CSV's folder
    assert load_labels(str(csv)).uris == table.uris


def test_validation_hold_out_is_deterministic_and_order_free(tmp_path: Path) -> None:
    rows = [{"uri": f"/data/{g}/{i}.jpg", "score": i, "group": g, "split": "train", "name": f"{i}.jpg"}
            for g, n in (("a", 20), ("b", 7), ("c", 2)) for i in range(n)]
    table = LabelTable(pd.DataFrame(rows))
    one = table.with_validation(0.3, seed=1).frame.set_index("uri")["split"]
    shuffled = LabelTable(table.frame.sample(frac=1, random_state=0)).with_validation(0.3, seed=1)
    assert shuffled.frame.set_index("uri")["split"].sort_index().equals(one.sort_index())
    val = one[one == "val"].index
    assert sum(u.startswith("/data/a/") for u in val) == 6 and sum(u.startswith("/data/b/") for u in val) == 2
    assert not any(u.startswith("/data/c/") for u in val)  # a 2-image group keeps both for pairs
    other = table.with_validation(0.3, seed=2).frame.set_index("uri")["split"]
    assert not other.equals(one)  # the seed picks the items
    # an explicit val split is kept as given
    explicit = LabelTable(table.frame.assign(split=["val"] + ["train"] * (len(rows) - 1)))
    assert (explicit.with_validation(0.5).frame["split"] == "val").sum() == 1


def test_official_split_lists(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"S0": 6, "S1": 5, "S2": 4})
    df = pd.read_csv(csv, encoding="utf-8-sig")
    # the official files are label CSVs themselves (a subset of the columns); a text list works too
    listed = df[df["SCENE"].isin(["S0", "S1"])]
    listed[["IMAGE PATH", "JOD", "IMAGE", "SCENE"]].to_csv(tmp_path / "train.csv", index=False)
    (tmp_path / "test.txt").write_text("\n".join(df[df["SCENE"] == "S2"]["IMAGE"].tolist()[:3]) + "\n")
    table = load_labels(str(csv), str(tmp_path), train_list=str(tmp_path / "train.csv"),
                        test_list=str(tmp_path / "test.txt"), val_fraction=0.2)
    f = table.frame
    assert len(table) == 14  # one S2 image is in neither list: unused
    assert table.describe() == ("14 labelled images in 3 groups: train 9 (2 groups), val 2 (2 groups), "
                                "test 3 (1 groups); 1 more on neither split list (not used)")
    assert set(f[f["split"] == "test"]["group"]) == {"S2"} and (f["split"] == "test").sum() == 3
    assert set(f[f["split"] != "test"]["group"]) == {"S0", "S1"} and (f["split"] == "val").sum() == 2

    (tmp_path / "bad.txt").write_text("0_S0.jpg\nnot_there.jpg\n")
    with pytest.raises(LabelError, match=r"1 listed image\(s\) not in the labels:\n  not_there.jpg"):
        load_labels(str(csv), str(tmp_path), train_list=str(tmp_path / "bad.txt"))
    (tmp_path / "both.txt").write_text("0_S0.jpg\n")
    with pytest.raises(LabelError, match="both the train and the test split"):
        load_labels(str(csv), str(tmp_path), train_list=str(tmp_path / "both.txt"),
                    test_list=str(tmp_path / "both.txt"))


def test_split_column(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"S0": 4}, extra={"SPLIT": ["Train", "validation", "Test", "train"]})
    table = load_labels(str(csv))
    assert table.frame["split"].tolist() == ["train", "val", "test", "train"]
    csv = _piq23(tmp_path, {"S0": 2}, extra={"split": ["train", "holdout"]})
    with pytest.raises(LabelError, match=r"unknown split value\(s\) \['holdout'\]"):
        load_labels(str(csv))


def test_generic_table_relative_uris(tmp_path: Path) -> None:
    (tmp_path / "imgs").mkdir()
    for n in ("a.png", "b.png", "c.png"):
        (tmp_path / "imgs" / n).write_bytes(b"x")
    elsewhere = tmp_path / "other.png"
    elsewhere.write_bytes(b"x")
    (tmp_path / "meta").mkdir()
    df = pd.DataFrame({"uri": ["../imgs/a.png", "../imgs/b.png", "../imgs/c.png", str(elsewhere)],
                       "score": [1.0, 2.0, 3.0, 4.0], "group": ["g", "g", "g", "h"],
                       "split": ["train", "train", "val", "test"]})
    for path in (tmp_path / "meta" / "t.csv", tmp_path / "meta" / "t.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        table = load_labels(str(path))
        assert table.uris == [str(tmp_path / "imgs" / n) for n in ("a.png", "b.png", "c.png")] + [str(elsewhere)]
        assert table.frame["split"].tolist() == df["split"].tolist()
        assert table.groups == ["g", "g", "g", "h"]
    assert resolve_relative("x/y.jpg", "s3://b/labels/t.csv") == "s3://b/labels/x/y.jpg"
    assert resolve_relative("../y.jpg", "s3://b/labels/t.csv") == "s3://b/y.jpg"
    assert resolve_relative(".", "s3://b/t.csv") == "s3://b"
    assert resolve_relative("./x.jpg", "s3://b/t.csv") == "s3://b/x.jpg"
    with pytest.raises(LabelError, match=r"^s3://b/labels/t.csv: entry '../../shared/y.jpg' climbs above the bucket"):
        resolve_relative("../../shared/y.jpg", "s3://b/labels/t.csv")  # was s3://shared/y.jpg, another bucket
    with pytest.raises(LabelError, match="apply to the PIQ23 format only"):
        load_labels(str(tmp_path / "meta" / "t.csv"), images="/x")


def test_missing_images_and_columns_are_listed(tmp_path: Path) -> None:
    df = pd.DataFrame({"uri": [f"img{i}.png" for i in range(15)], "score": range(15), "group": "g"})
    (tmp_path / "img3.png").write_bytes(b"x")
    df.loc[0, "uri"] = "img0.png "
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(LabelError) as e:
        load_labels(str(tmp_path / "t.csv"))
    msg = str(e.value)
    assert "14 of 15 labelled images not found" in msg and repr(str(tmp_path / "img0.png ")) in msg
    assert "… and 4 more" in msg and "img3.png" not in msg
    assert len(from_table(str(tmp_path / "t.csv"))) == 15  # listing only happens on load_labels
    df.loc[0, "uri"] = "img0.png"

    df.drop(columns=["group"]).rename(columns={"score": "mos"}).to_csv(tmp_path / "u.csv", index=False)
    with pytest.raises(LabelError, match=r"missing column\(s\) \['score', 'group'\] for the table format"):
        from_table(str(tmp_path / "u.csv"))
    csv = _piq23(tmp_path, {"S0": 3})
    pd.read_csv(csv, encoding="utf-8-sig").drop(columns=["SCENE"]).to_csv(tmp_path / "p.csv", index=False)
    with pytest.raises(LabelError, match=r"missing column\(s\) \['SCENE'\] for the PIQ23 format"):
        load_labels(str(tmp_path / "p.csv"), fmt="piq23")
    df.assign(score=[None, "3,5"] + list(range(13))).to_csv(tmp_path / "v.csv", index=False)
    with pytest.raises(LabelError, match=r"2 row\(s\) without a finite score \(missing, inf or -inf\):\n"
                                         rf"  row 0: uri {tmp_path / 'img0.png'}, score <empty>, group g\n"
                                         rf"  row 1: uri {tmp_path / 'img1.png'}, score 3,5, group g$"):
        from_table(str(tmp_path / "v.csv"))


def test_rows_without_finite_score_group_or_uri_are_listed(tmp_path: Path) -> None:
    df = pd.DataFrame({"uri": [f"img{i}.png" for i in range(16)], "score": [float(i) for i in range(16)],
                       "group": ["g"] * 16})
    df.loc[[1, 2], "score"] = [np.inf, -np.inf]
    df.loc[[3, 4], "group"] = [None, "  "]  # an empty cell (NaN) and a blank one
    df.loc[5, "uri"] = None
    df.loc[6:15, "group"] = None  # 12 rows without a group in all: the listing stops at 10
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        with pytest.raises(LabelError) as e:
            from_table(str(path))
        msg = str(e.value)
        assert msg.startswith(f"{path}: 1 row(s) without an image uri:\n  row 5: uri <empty>, score 5.0, group g\n")
        assert (f"2 row(s) without a finite score (missing, inf or -inf):\n  row 1: uri {tmp_path / 'img1.png'}, "
                f"score inf, group g\n  row 2: uri {tmp_path / 'img2.png'}, score -inf, group g\n") in msg
        assert f"12 row(s) without a group (scene):\n  row 3: uri {tmp_path / 'img3.png'}, score 3.0, group " in msg
        assert f"row 4: uri {tmp_path / 'img4.png'}" in msg and "  … and 2 more" in msg
        assert "img14.png" not in msg and "duplicated" not in msg  # missing uris are not duplicates
    # PIQ23: an empty SCENE or IMAGE PATH; the rows are the CSV's even after a split list drops some
    csv = _piq23(tmp_path, {"S0": 4})
    pd.read_csv(csv, encoding="utf-8-sig").assign(SCENE=["S0", "S0", None, "S0"]).to_csv(csv, index=False)
    (tmp_path / "train.txt").write_text("1_S0.jpg\n2_S0.jpg\n")
    with pytest.raises(LabelError, match=r"1 row\(s\) without a group \(scene\):\n  row 2: uri "
                                         rf"{tmp_path / 'Overall' / '2_S0.jpg'}, score 0.0, group <empty>$"):
        load_labels(str(csv), train_list=str(tmp_path / "train.txt"))
    pd.read_csv(csv).assign(SCENE="S0", **{"IMAGE PATH": [None, "Overall\\1_S0.jpg", " ", "Overall\\3_S0.jpg"]}) \
        .to_csv(csv, index=False)
    with pytest.raises(LabelError, match=r"2 row\(s\) without an image uri:\n  row 0: uri <empty>.*\n"
                                         r"  row 2: uri <empty>"):
        load_labels(str(csv))
    paths = [f"Overall\\{i}_S0.jpg" for i in range(4)]
    pd.read_csv(csv).assign(**{"IMAGE PATH": paths, "JOD": ["1", "3,5", "2", "3"]}) \
        .to_csv(csv, index=False)
    with pytest.raises(LabelError,
                       match=r"1 row\(s\) without a finite score .*\n  row 1: uri .*, score 3,5, group S0$"):
        load_labels(str(csv))


def test_scenes_and_names_spelled_like_missing_values_are_kept_as_written(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"NA": 2, "None": 2, "null": 2})  # files 0_NA.jpg, …; only blank cells are missing
    (tmp_path / "train.csv").write_text("IMAGE\n0_NA.jpg\n1_NA.jpg\n0_None.jpg\n1_None.jpg\n\n")
    table = load_labels(str(csv), train_list=str(tmp_path / "train.csv"))
    assert table.frame["group"].tolist() == ["NA", "NA", "None", "None"]
    assert table.unused == {"0_null.jpg", "1_null.jpg"}
    pd.DataFrame({"IMAGE": ["0_NA.jpg", ""], "IMAGE second": ["1_NA.jpg", "0_None.jpg"]}).to_csv(
        tmp_path / "pairs.csv", index=False)
    with pytest.raises(LabelError, match=r"1 image name\(s\) in the pair list are not labelled:\n  <empty>$"):
        load_pairs(str(tmp_path / "pairs.csv"), table)
    pd.read_csv(csv, keep_default_na=False).assign(JOD=["1", "NA", "2", "3", "4", "5"]).to_csv(csv, index=False)
    with pytest.raises(LabelError, match=r"1 row\(s\) without a finite score .*\n  row 1: uri .*, score NA, group NA$"):
        load_labels(str(csv))


def test_scene_cells_with_surrounding_blanks_name_one_scene(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"s1": 2, "s2": 1})
    pd.read_csv(csv).assign(SCENE=["s1 ", " s1", "s2\t"]).to_csv(csv, index=False)
    assert load_labels(str(csv)).groups == ["s1", "s1", "s2"]
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(b"x")
    pd.DataFrame({"uri": ["a.png", "b.png"], "score": [1.0, 2.0], "group": ["g", "g  "]}).to_csv(
        tmp_path / "t.csv", index=False)
    assert load_labels(str(tmp_path / "t.csv")).groups == ["g", "g"]


def test_labels_and_images_on_s3(s3_server, s3_bucket: str) -> None:
    opts = s3_server.options
    for i in range(4):
        write_bytes(f"s3://{s3_bucket}/piq/Overall/{i}_S.jpg", b"x", opts)
    rows = [[f"Overall\\{i}_S.jpg", f"{i}_S.jpg", float(i), "S"] for i in range(5)]  # image 4 is missing
    body = pd.DataFrame(rows, columns=["IMAGE PATH", "IMAGE", "JOD", "SCENE"]).to_csv(index=False).encode()
    write_bytes(f"s3://{s3_bucket}/piq/labels.csv", body, opts)
    with pytest.raises(LabelError, match=rf"1 of 5 labelled images not found:\n  s3://{s3_bucket}/piq/Overall/4_S.jpg"):
        load_labels(f"s3://{s3_bucket}/piq/labels.csv", s3=opts)
    table = load_labels(f"s3://{s3_bucket}/piq/labels.csv", s3=opts, check_images=False)
    assert table.uris[0] == f"s3://{s3_bucket}/piq/Overall/0_S.jpg"
    assert np.allclose(table.scores, [0, 1, 2, 3, 4])


def test_checked_images_carry_what_tells_one_upload_from_the_next(root) -> None:
    base, opts = root
    for name, body in (("a.jpg", b"one"), ("b.jpg", b"two"), ("t.csv", b"uri,score,group\na.jpg,1,g\nb.jpg,2,g\n")):
        write_bytes(f"{base}/{name}", body, opts)
    first = load_labels(f"{base}/t.csv", val_fraction=0, s3=opts).frame
    assert first["size"].tolist() == [3, 3] and first["version"].str.len().gt(0).all()
    time.sleep(0.05)  # local versions are mtimes, which advance in clock ticks
    write_bytes(f"{base}/a.jpg", b"ONE", opts)  # the same uri and size, other content
    again = load_labels(f"{base}/t.csv", val_fraction=0, s3=opts).frame
    assert again["version"][0] != first["version"][0] and again["version"][1] == first["version"][1]
    assert "size" not in load_labels(f"{base}/t.csv", s3=opts, check_images=False).frame


def test_a_blank_split_cell_names_its_rows(tmp_path: Path) -> None:
    df = pd.DataFrame({"uri": [f"/d/{i}.jpg" for i in range(4)], "score": [1.0, 2.0, 3.0, 4.0], "group": "g",
                       "split": ["train", None, "test", " "]})
    for path in (tmp_path / "t.csv", tmp_path / "t.parquet"):
        df.to_csv(path, index=False) if path.suffix == ".csv" else df.to_parquet(path)
        with pytest.raises(LabelError) as e:
            from_table(str(path))
        assert str(e.value) == (f"{path}: blank split value in 2 row(s) (use ['train', 'val', 'test']):\n"
                                "  row 1: uri /d/1.jpg, score 2.0, group g\n  row 3: uri /d/3.jpg, score 4.0, group g")
    csv = _piq23(tmp_path, {"S0": 3}, extra={"split": ["train", "", "test"]})
    with pytest.raises(LabelError, match=r"blank split value in 1 row\(s\) .*\n  row 1: uri .*1_S0\.jpg"):
        load_labels(str(csv))


def test_images_that_cannot_be_checked_are_not_reported_missing(s3_server, s3_bucket: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """An unreachable endpoint or a 403 is a storage problem, not a wrong image path."""
    import s3fs

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")  # botocore's retries would take seconds an image
    opts, uris = s3_server.options, [f"s3://{s3_bucket}/{i}.jpg" for i in range(4)]
    for u in uris[:2]:
        write_bytes(u, b"x", opts)
    pd.DataFrame({"uri": uris, "score": range(4), "group": "g"}).to_csv(tmp_path / "t.csv", index=False)
    unreachable = S3Options("http://127.0.0.1:9", "us-east-1", access_key="testing", secret_key="testing")
    with pytest.raises(LabelError) as e:
        load_labels(str(tmp_path / "t.csv"), s3=unreachable)
    assert re.fullmatch(rf"{tmp_path / 't.csv'}: cannot check the labelled images: \w+Error: .*127\.0\.0\.1:9.*"
                        rf" \(for s3://{s3_bucket}/0\.jpg\)", str(e.value))  # the first one, not after all
    real_info = s3fs.S3FileSystem._info

    async def forbidden(self, path, **kwargs):
        if path.endswith("/3.jpg"):
            raise PermissionError(13, "Access Denied")
        return await real_info(self, path, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_info", forbidden)
    with pytest.raises(LabelError) as e:  # 2.jpg is missing, 3.jpg forbidden: each reported as what it is
        load_labels(str(tmp_path / "t.csv"), s3=opts)
    assert str(e.value) == (f"{tmp_path / 't.csv'}: cannot check 1 of 4 labelled images: PermissionError: "
                            f"[Errno 13] Access Denied (for {uris[3]})\n1 of 4 labelled images not found:\n  {uris[2]}")


def test_the_validation_split_does_not_move_with_the_images(tmp_path: Path) -> None:
    """The hold-out hashed each resolved uri: ``piqa eval --split val`` on a copy of the images under
    another root (a local download of the bucket trained on) scored images the run had trained on."""
    csv = _piq23(tmp_path / "a", {"S0": 20, "S1": 9})
    copy = tmp_path / "b"
    copy.mkdir()
    (tmp_path / "a" / "Overall").rename(copy / "Overall")
    table = (pd.DataFrame({"uri": [f"imgs/{i}.jpg" for i in range(20)], "score": range(20), "group": "g"}))
    for root in ("t1", "t2"):
        (tmp_path / root).mkdir()
        table.to_csv(tmp_path / root / "t.csv", index=False)

    def val(labels: Path, **kw) -> list[str]:
        f = load_labels(str(labels), check_images=False, **kw).frame
        return sorted(f["name"][f["split"] == "val"])

    here, there = val(csv, images=str(copy)), val(csv, images="s3://bucket/piq23")
    assert len(here) == 4 + 2 and here == there
    assert val(tmp_path / "t1" / "t.csv") == val(tmp_path / "t2" / "t.csv")
    # runs recorded before keep their split with --holdout-key uri, which does move with the root
    old = [val(csv, images=root, holdout_key="uri") for root in (str(copy), "s3://bucket/piq23", str(copy))]
    assert old[0] == old[2] and old[0] != old[1]
    with pytest.raises(LabelError, match=r"unknown hold-out key 'name'; use one of \['path', 'uri'\]"):
        load_labels(str(csv), check_images=False, holdout_key="name")


def test_split_lists_are_read_alike_and_refuse_names_they_cannot_place(tmp_path: Path) -> None:
    csv = _piq23(tmp_path, {"S0": 3, "S1": 3})
    (tmp_path / "test.txt").write_text("  # held-out images\nOverall\\0_S1.jpg\n  1_S1.jpg  \n")
    f = load_labels(str(csv), str(tmp_path), test_list=str(tmp_path / "test.txt"), val_fraction=0).frame
    assert sorted(f["name"][f["split"] == "test"]) == ["0_S1.jpg", "1_S1.jpg"]  # as a CSV list would read them
    # two labelled images named a.jpg: a list naming a.jpg cannot say which (both went to test)
    df = pd.read_csv(csv, encoding="utf-8-sig")
    df.loc[:1, "IMAGE"] = "a.jpg"
    df.to_csv(tmp_path / "same.csv", index=False)
    (tmp_path / "a.txt").write_text("a.jpg\n")
    with pytest.raises(LabelError, match=r"1 split-list name\(s\) matching several labelled images:\n  a.jpg \(2 "):
        load_labels(str(tmp_path / "same.csv"), str(tmp_path), test_list=str(tmp_path / "a.txt"))


@pytest.mark.parametrize("which", ["labels", "list"])
def test_a_file_in_another_encoding_is_named(tmp_path: Path, which: str) -> None:
    csv = _piq23(tmp_path, {"S0": 3})
    latin = tmp_path / ("labels.csv" if which == "labels" else "test.txt")
    if which == "labels":
        latin.write_bytes(csv.read_text(encoding="utf-8-sig").replace("0_S0.jpg", "café.jpg").encode("cp1252"))
    else:
        latin.write_bytes("café.jpg\n".encode("utf-16"))
    test_list = str(latin) if which == "list" else None
    said = re.escape(f"{latin}: not UTF-8 text") + (r" \(it is UTF-16" if which == "list" else ": byte")
    with pytest.raises(LabelError, match=said):
        load_labels(str(csv), str(tmp_path), test_list=test_list, check_images=False)
