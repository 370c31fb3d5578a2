"""How labels name images and groups: absolute paths, ``file:`` URIs, ``~``, duplicates, codes as written.

The validation hold-out hashes each image's uri, so ``piqa train`` and ``piqa eval --split val`` agree on
the split only if every spelling of the labels file resolves to the same uris.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from ray_jobs.labels import LabelError, from_table, load_labels
from tests.test_labels import _piq23


def test_local_image_paths_become_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray Train workers chdir elsewhere, so a relative uri would not be found there."""
    _piq23(tmp_path / "PIQ23", {"S0": 3})
    monkeypatch.chdir(tmp_path)
    want = [str(tmp_path / "PIQ23" / "Overall" / f"{i}_S0.jpg") for i in range(3)]
    for images in ("PIQ23", "./PIQ23/", None):
        assert load_labels("PIQ23/labels.csv", images=images, val_fraction=0).uris == want
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_labels("PIQ23/labels.csv", images="~/PIQ23", val_fraction=0).uris == want
    (tmp_path / "meta").mkdir()
    pd.DataFrame({"uri": ["../PIQ23/Overall/0_S0.jpg", want[1]], "score": [1, 2], "group": "g"}) \
        .to_csv(tmp_path / "meta" / "t.csv", index=False)
    assert load_labels("meta/t.csv", val_fraction=0).uris == want[:2]
    table = load_labels("PIQ23/labels.csv", images="PIQ23", val_fraction=0)
    monkeypatch.chdir(tmp_path / "meta")  # as in a worker: still found
    table.check_images()
    # remote roots are left as they are
    remote = load_labels(str(tmp_path / "PIQ23" / "labels.csv"), images="s3://b/PIQ23/", check_images=False)
    assert remote.uris[0] == "s3://b/PIQ23/Overall/0_S0.jpg"


def test_one_image_under_two_spellings_of_its_path_is_a_duplicate(tmp_path: Path) -> None:
    """``/x/img//p1.jpg`` and ``/x/img/p1.jpg`` are one file: two labels for it would count it twice."""
    img = tmp_path / "img"
    df = pd.DataFrame({"uri": [f"{img}//p1.jpg", f"{img}/p1.jpg", f"{img}/./p2.jpg", f"{img}/../img/p2.jpg",
                               f"{img}/p3.jpg"], "score": [1.0, 2.0, 3.0, 4.0, 5.0], "group": "g"})
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(LabelError) as e:
        from_table(str(tmp_path / "t.csv"))
    assert str(e.value).endswith(f"2 duplicated image uri(s):\n  {img}/p1.jpg (the same file as {img}//p1.jpg)\n"
                                 f"  {img}/../img/p2.jpg (the same file as {img}/./p2.jpg)")
    df.iloc[[0, 2, 4]].to_csv(tmp_path / "t.csv", index=False)  # kept as written: the hold-out hashes them
    assert from_table(str(tmp_path / "t.csv")).uris == [f"{img}//p1.jpg", f"{img}/./p2.jpg", f"{img}/p3.jpg"]
    # a doubled separator inside an image path of a PIQ23 CSV, too
    csv = _piq23(tmp_path, {"S0": 3})
    piq = pd.read_csv(csv, encoding="utf-8-sig")
    piq.loc[1, "IMAGE PATH"] = "Overall\\\\0_S0.jpg"
    piq.to_csv(csv, index=False)
    with pytest.raises(LabelError, match=r"1 duplicated image uri\(s\)"):
        load_labels(str(csv), check_images=False)
    # an S3 key may hold "//": another object, kept as written
    s3 = pd.DataFrame({"uri": ["s3://b/img//p1.jpg", "s3://b/img/p1.jpg"], "score": [1.0, 2.0], "group": "g"})
    s3.to_csv(tmp_path / "s.csv", index=False)
    assert from_table(str(tmp_path / "s.csv")).uris == ["s3://b/img//p1.jpg", "s3://b/img/p1.jpg"]


def test_a_file_uri_and_a_path_of_one_image_are_a_duplicate(tmp_path: Path) -> None:
    """The hold-out hashes the uri as written: two spellings of one file could train and validate it."""
    img = tmp_path / "my img"
    as_uri = (img / "a b.jpg").as_uri()  # file:///…/my%20img/a%20b.jpg
    df = pd.DataFrame({"uri": [str(img / "a b.jpg"), str(img / "c.jpg"), as_uri, f"file://{img}/c.jpg"],
                       "score": [1.0, 2.0, 3.0, 4.0], "group": "g"})
    df.to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(LabelError) as e:
        from_table(str(tmp_path / "t.csv"))
    assert str(e.value).endswith(f"2 duplicated image uri(s):\n  {as_uri} (the same file as {img / 'a b.jpg'})\n"
                                 f"  file://{img}/c.jpg (the same file as {img / 'c.jpg'})")
    df.iloc[[1, 2]].to_csv(tmp_path / "t.csv", index=False)  # kept as written: the hold-out hashes them
    assert from_table(str(tmp_path / "t.csv")).uris == [str(img / "c.jpg"), as_uri]


def test_a_file_uri_to_the_labels_gives_the_same_uris_and_split(tmp_path: Path, monkeypatch) -> None:
    """``piqa train`` takes ``--labels file:///…`` as a path and ``piqa eval`` passed it on as written: the
    uris then kept the scheme, and eval's "val" split was mostly images the model trained on."""
    (tmp_path / "imgs").mkdir()
    for i in range(20):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(b"x")
    pd.DataFrame({"uri": [f"imgs/{i}.jpg" for i in range(20)], "score": range(20), "group": "g"}) \
        .to_csv(tmp_path / "t.csv", index=False)
    csv = _piq23(tmp_path / "piq", {"S0": 20})
    monkeypatch.setenv("HOME", str(tmp_path))
    for path, home in ((tmp_path / "t.csv", "~/t.csv"), (csv, "~/piq/labels.csv")):
        want = load_labels(str(path))
        assert want.uris[0].startswith("/") and (want.frame["split"] == "val").sum() == 4
        for spelling in (path.as_uri(), home):
            table = load_labels(spelling)
            assert table.uris == want.uris and table.frame["split"].tolist() == want.frame["split"].tolist()
    with pytest.raises(LabelError, match="mistyped s3://"):
        load_labels("s3:/b/labels.csv")


def test_group_codes_are_kept_as_written(tmp_path: Path) -> None:
    """Read as numbers, scenes "07" and "7" (or "1.10" and "1.1") were one group, paired across scenes."""
    codes = ["07", "7", "1.10", "1.1"]
    pd.DataFrame({"uri": [f"/d/{c}_{i}.jpg" for c in codes for i in range(3)], "score": 1.0,
                  "group": [c for c in codes for _ in range(3)]}).to_csv(tmp_path / "t.csv", index=False)
    table = load_labels(str(tmp_path / "t.csv"), val_fraction=0, check_images=False)
    assert table.groups == [c for c in codes for _ in range(3)]
    csv = _piq23(tmp_path, {"007": 3, "7": 3})
    assert sorted(set(load_labels(str(csv), val_fraction=0).groups)) == ["007", "7"]
