"""Manifests: .txt, .csv and .parquet lists of inputs, on a local disk and on S3 (moto); relative entries."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ray_jobs import inputs, listing, storage
from tests.test_listing import populate


@pytest.mark.parametrize("kind", ["txt", "csv", "csv-noheader", "parquet"])
def test_manifests(root, kind):
    base, s3 = root
    populate(base, s3)
    a, c = storage.join(base, "a.JPG"), storage.join(base, "sub/c.webp")
    entries = [a, "sub/c.webp", "./missing.jpg", a, "sub/../b.png"]
    name = {"csv-noheader": "m.csv"}.get(kind, f"m.{kind}")
    uri = storage.join(base, name)
    if kind == "txt":
        storage.write_text(uri, "# comment\n\n" + "\n".join(entries) + "\n", s3)
    elif kind == "csv":
        storage.write_text(uri, "id,uri\n" + "".join(f"{i},{e}\n" for i, e in enumerate(entries)), s3)
    elif kind == "csv-noheader":
        storage.write_text(uri, "".join(f"{e},label\n" for e in entries), s3)
    else:
        buf = pa.BufferOutputStream()
        pq.write_table(pa.table({"uri": entries}), buf)
        storage.write_bytes(uri, buf.getvalue().to_pybytes(), s3)

    uris = inputs.read_manifest(uri, s3)
    missing, b = storage.join(base, "missing.jpg"), storage.join(base, "b.png")
    assert uris == [a, c, missing, b]
    infos = listing.stat_objects(uris, s3)
    assert [(i.uri, i.size) for i in infos] == [(a, 3), (c, 4), (missing, -1), (b, 2)]
    assert infos[2].etag_or_mtime == "" and infos[0].etag_or_mtime
    listed = {i.uri: i.etag_or_mtime for i in listing.list_images(base, s3)}
    assert infos[0].etag_or_mtime == listed[a]  # listing and stat agree (resume keys on it)


def test_a_bad_manifest_entry_does_not_fail_the_listing(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"aaa")
    manifest = tmp_path / "m.txt"
    manifest.write_text("a.jpg\nhtps://example.com/x.jpg\nnosuchproto://bucket/y.jpg\nb.jpg\n")
    infos = inputs.list_inputs(str(manifest), manifest=True)
    assert [(i.uri, i.size) for i in infos] == [
        (str(tmp_path / "a.jpg"), 3), ("htps://example.com/x.jpg", -1), ("nosuchproto://bucket/y.jpg", -1),
        (str(tmp_path / "b.jpg"), -1)]


def test_a_csv_manifest_row_is_a_header_only_when_it_names_the_uri_column(tmp_path):
    def entries(text: str) -> list[str]:
        (tmp_path / "m.csv").write_text(text)
        return [os.path.relpath(u, tmp_path) for u in inputs.read_manifest(str(tmp_path / "m.csv"))]

    assert entries("IMG_0001\nt2/ok.jpg\n") == ["IMG_0001", "t2/ok.jpg"]
    assert entries("IMG_0001,good\nIMG_0002,bad\n") == ["IMG_0001", "IMG_0002"]
    assert entries("Path,label\nIMG_0001,good\n") == ["IMG_0001"]
    assert entries("id,image_path\n7,x.jpg\n8,y.jpg\n") == ["x.jpg", "y.jpg"]
    assert entries("path,uri\nx.jpg,y.jpg\n") == ["y.jpg"]
    # a headerless manifest whose second column holds a word that names a URI column elsewhere
    assert entries("shots/a.jpg,image\nshots/b.jpg,image\nc.JPG,video\n") == ["shots/a.jpg", "shots/b.jpg", "c.JPG"]
    assert entries("uri,w/h\nx.jpg,4/3\n") == ["x.jpg"]  # a header may hold a slash


def test_an_unreadable_manifest_is_a_value_error_naming_it(tmp_path):
    cases = {"huge.csv": b'"' + b"x" * 200_000 + b'"\n', "latin1.txt": "caf\xe9.jpg\n".encode("latin-1"),
             "fake.parquet": b"not parquet"}
    reasons = {"huge.csv": "not a readable CSV manifest (field larger than field limit",
               "latin1.txt": "a manifest is UTF-8 text", "fake.parquet": "not a readable Parquet manifest"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ValueError) as err:
            inputs.read_manifest(str(tmp_path / name))
        assert str(err.value).startswith(f"{tmp_path / name}: {reasons[name]}"), err.value


def test_a_manifest_with_uris_a_slash_short_is_refused(tmp_path):
    """Taken as paths relative to the manifest, they would all be not_found rows."""
    (tmp_path / "m.txt").write_text("s3://b/ok.jpg\ns3:/b/x.jpg\nGS:b/y.jpg\nlocal/s3:/z.jpg\n")
    with pytest.raises(ValueError, match=r"m.txt: 2 of 4 entries look like URIs a slash short "
                                         r"\(first: 's3:/b/x.jpg'\); write s3://…$"):
        inputs.read_manifest(str(tmp_path / "m.txt"))
    (tmp_path / "m.txt").write_text("s3://b/ok.jpg\nlocal/s3:/z.jpg\n")  # a folder named 's3:' is a folder
    assert inputs.read_manifest(str(tmp_path / "m.txt")) == ["s3://b/ok.jpg", str(tmp_path / "local/s3:/z.jpg")]


def test_relative_entries_of_a_remote_manifest_keep_the_keys_as_written(monkeypatch):
    """An S3 key may hold "//": normalising the path named another object, and ".." could leave the bucket."""
    entries: list[str] = []
    monkeypatch.setattr(inputs, "is_dir", lambda uri, s3: False)
    monkeypatch.setattr(inputs, "_manifest_entries", lambda uri, s3: entries)
    entries[:] = ["x.jpg", "./y.jpg", "sub//z.jpg", "../w.jpg", "s3://other/v.jpg"]
    assert inputs.read_manifest("s3://b/a//m/list.txt") == [
        "s3://b/a//m/x.jpg", "s3://b/a//m/y.jpg", "s3://b/a//m/sub//z.jpg", "s3://b/a//w.jpg", "s3://other/v.jpg"]
    assert inputs.read_manifest("s3://b/a//list.txt") == [
        "s3://b/a//x.jpg", "s3://b/a//y.jpg", "s3://b/a//sub//z.jpg", "s3://b/a/w.jpg", "s3://other/v.jpg"]
    entries[:] = ["ok.jpg", "../../x.jpg"]
    with pytest.raises(ValueError, match=r"^s3://b/m/list.txt: entry '../../x.jpg' climbs above the bucket 'b'$"):
        inputs.read_manifest("s3://b/m/list.txt")


def test_entries_listed_once_or_without_a_uri_are_said_not_dropped_silently(tmp_path, caplog):
    for name in ("a.jpg", "b.jpg"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "m.csv").write_text("id,uri\n1,a.jpg\n2,\n3,./a.jpg\n4,b.jpg\n")
    with caplog.at_level("WARNING"):
        got = inputs.list_inputs([str(tmp_path / "m.csv")], manifest=True)
    assert [os.path.basename(i.uri) for i in got] == ["a.jpg", "b.jpg"]
    said = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path / 'm.csv'}: 1 row(s) with an empty URI cell skipped" in said
    assert any("1 entr(ies) naming an object already listed skipped" in m for m in said), said
    caplog.clear()
    with caplog.at_level("WARNING"):  # a folder and a photo in it: one row each, said once
        assert len(inputs.list_inputs([str(tmp_path), str(tmp_path / "a.jpg")])) == 2
    assert any("1 of the 3 objects the inputs list were listed by more than one input" in r.getMessage()
               for r in caplog.records), caplog.records


def test_a_parquet_manifest_keeps_each_uri_exactly(tmp_path, caplog):
    (tmp_path / "b.jpg ").write_bytes(b"x")  # a name ending in a space: only Parquet can name it
    pq.write_table(pa.table({"uri": [str(tmp_path / "b.jpg "), None]}), tmp_path / "m.parquet")
    with caplog.at_level("WARNING"):
        assert inputs.read_manifest(str(tmp_path / "m.parquet")) == [str(tmp_path / "b.jpg ")]
    said = [r.getMessage() for r in caplog.records]
    assert f"{tmp_path / 'm.parquet'}: 1 row(s) with an empty URI cell skipped" in said
