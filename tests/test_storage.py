"""ray_jobs.storage against a local directory and the moto S3 server."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from ray_jobs import storage
from ray_jobs.storage import ObjectTooLarge, S3Options

TREE = {
    "a.JPG": b"aaa",
    "b.png": b"bb",
    "notes.txt": b"not an image",
    "empty.jpeg": b"",
    "sub/c.webp": b"cccc",
    "sub/deeper/d.TIFF": b"d",
}
IMAGES = ["a.JPG", "b.png", "empty.jpeg", "sub/c.webp", "sub/deeper/d.TIFF"]


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(base URI, S3Options or None) of an empty prefix on either backend."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data", server.options


def populate(base: str, s3: S3Options | None) -> None:
    for rel, data in TREE.items():
        storage.write_bytes(storage.join(base, rel), data, s3)
    storage.write_bytes(storage.join(base + "2", "x.jpg"), b"x", s3)  # a sibling, not a child


def test_list_images(root):
    base, s3 = root
    populate(base, s3)
    infos = storage.list_images(base, s3)
    assert [i.uri for i in infos] == sorted(storage.join(base, p) for p in IMAGES)
    assert infos == storage.list_images(base + "/", s3)  # trailing slash, deterministic
    sizes = {i.uri: i.size for i in infos}
    assert sizes[storage.join(base, "empty.jpeg")] == 0
    assert sizes[storage.join(base, "sub/c.webp")] == 4
    assert all(i.etag_or_mtime for i in infos)
    if s3 is None:
        assert infos[0].etag_or_mtime.isdigit()  # mtime_ns
    else:
        assert infos[0].uri.startswith("s3://") and '"' not in infos[0].etag_or_mtime

    everything = storage.list_images(base, s3, extensions=None)
    assert len(everything) == len(TREE)
    assert [i.uri for i in storage.list_images(base, s3, extensions=(".tiff", "PNG"))] == [
        storage.join(base, "b.png"),
        storage.join(base, "sub/deeper/d.TIFF"),
    ]
    top = storage.list_images(base, s3, recursive=False)
    assert [os.path.basename(i.uri) for i in top] == ["a.JPG", "b.png", "empty.jpeg"]
    single = storage.list_images(storage.join(base, "notes.txt"), s3)
    assert [(i.uri, i.size) for i in single] == [(storage.join(base, "notes.txt"), 12)]

    with pytest.raises(FileNotFoundError, match="nope"):
        storage.list_images(storage.join(base, "nope"), s3)
    if s3 is not None:
        with pytest.raises(FileNotFoundError, match="s3://nope-bucket-404/x"):
            storage.list_images("s3://nope-bucket-404/x", s3)


def test_a_file_gone_during_the_listing_keeps_its_place(tmp_path, monkeypatch):
    (tmp_path / "a.jpg").write_bytes(b"aa")
    (tmp_path / "b.jpg").write_bytes(b"b")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    real_walk = os.walk

    def walk_then_delete(top, *args, **kwargs):  # an ingest deletes b.jpg right after the walk saw it
        for entry in real_walk(top, *args, **kwargs):
            (tmp_path / "b.jpg").unlink(missing_ok=True)
            yield entry

    monkeypatch.setattr(storage.os, "walk", walk_then_delete)
    infos = storage.list_images(str(tmp_path))
    assert [(os.path.basename(i.uri), i.size) for i in infos] == [("a.jpg", 2), ("b.jpg", -1), ("dangling.jpg", -1)]
    assert infos[1].etag_or_mtime == "" and infos[0].etag_or_mtime.isdigit()


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

    uris = storage.read_manifest(uri, s3)
    missing, b = storage.join(base, "missing.jpg"), storage.join(base, "b.png")
    assert uris == [a, c, missing, b]
    infos = storage.stat_objects(uris, s3)
    assert [(i.uri, i.size) for i in infos] == [(a, 3), (c, 4), (missing, -1), (b, 2)]
    assert infos[2].etag_or_mtime == "" and infos[0].etag_or_mtime
    listed = {i.uri: i.etag_or_mtime for i in storage.list_images(base, s3)}
    assert infos[0].etag_or_mtime == listed[a]  # listing and stat agree (resume keys on it)


def test_list_inputs(root):
    base, s3 = root
    populate(base, s3)
    sub, top = storage.join(base, "sub"), storage.join(base, "b.png")
    infos = storage.list_inputs([sub, top, base], s3)
    uris = [i.uri for i in infos]
    assert uris[:3] == [storage.join(sub, "c.webp"), storage.join(sub, "deeper/d.TIFF"), top]
    assert sorted(uris) == sorted(storage.join(base, p) for p in IMAGES)  # each URI once
    manifest = storage.join(base, "m.txt")
    storage.write_text(manifest, "b.png\nnothing.jpg\n", s3)
    got = [(i.uri, i.size) for i in storage.list_inputs(manifest, s3, manifest=True)]
    assert got == [(top, 2), (storage.join(base, "nothing.jpg"), -1)]


def test_bytes_round_trip_and_limits(root):
    base, s3 = root
    uri = storage.join(base, "dir", "blob.bin")
    assert not storage.exists(uri, s3)
    storage.write_bytes(uri, b"0123456789", s3)
    assert storage.exists(uri, s3)
    assert storage.read_bytes(uri, s3) == b"0123456789"
    assert storage.read_bytes(uri, s3, max_bytes=10) == b"0123456789"
    with pytest.raises(ObjectTooLarge) as err:
        storage.read_bytes(uri, s3, max_bytes=9)
    assert isinstance(err.value, ValueError) and err.value.size == 10
    with pytest.raises(FileNotFoundError, match="absent.jpg"):
        storage.read_bytes(storage.join(base, "absent.jpg"), s3)

    text_uri = storage.join(base, "t.txt")
    storage.write_text(text_uri, "héllo", s3)
    assert storage.read_text(text_uri, s3) == "héllo"
    storage.atomic_write_bytes(text_uri, b"new", s3)
    storage.atomic_write_bytes(text_uri, b"newer", s3)
    assert storage.read_bytes(text_uri, s3) == b"newer"
    if s3 is None:
        assert sorted(os.listdir(base)) == ["dir", "t.txt"]  # no temp files left
        assert storage.read_bytes("file://" + text_uri) == b"newer"


def test_local_paths_and_join(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fs, path = storage.resolve("rel/x.jpg")
    assert isinstance(fs, pafs.LocalFileSystem) and path == str(tmp_path / "rel/x.jpg")
    assert storage.resolve("file:///data/a%20b.jpg")[1] == "/data/a b.jpg"
    assert storage.join("s3://b/p/", "a", "/c.jpg") == "s3://b/p/a/c.jpg"
    assert storage.join("/data", "a", "c.jpg") == "/data/a/c.jpg"
    fs, path = storage.resolve("memory://piqa-test/x.bin")
    assert isinstance(fs, pafs.PyFileSystem)
    storage.write_bytes("memory://piqa-test/x.bin", b"m")
    assert storage.read_bytes("memory://piqa-test/x.bin") == b"m"
    assert [i.size for i in storage.list_images("memory://piqa-test", extensions=None)] == [1]


def test_resolve_s3_uses_explicit_endpoint(s3_server, s3_bucket, monkeypatch):
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_REGION", "AWS_DEFAULT_REGION"):
        monkeypatch.delenv(var, raising=False)
    fs, path = storage.resolve(f"s3://{s3_bucket}/k/v.jpg", s3_server.options)
    assert isinstance(fs, pafs.S3FileSystem) and path == f"{s3_bucket}/k/v.jpg"
    kwargs = fs.__reduce__()[1][0]  # pyarrow exposes its settings only through pickling
    assert f"{kwargs['scheme']}://{kwargs['endpoint_override']}" == s3_server.endpoint_url
    with fs.open_output_stream(path) as f:
        f.write(b"ok")
    assert storage.read_bytes(f"s3://{s3_bucket}/k/v.jpg", s3_server.options) == b"ok"

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server.endpoint_url)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-3")
    opts = S3Options.from_env()
    assert (opts.endpoint_url, opts.region) == (s3_server.endpoint_url, "eu-west-3")
    # Unset fields of explicit options are filled from the environment (pyarrow and s3fs agree).
    keys_only = S3Options(access_key="testing", secret_key="testing")
    assert storage.read_bytes(f"s3://{s3_bucket}/k/v.jpg", keys_only) == b"ok"
    assert [i.size for i in storage.list_images(f"s3://{s3_bucket}/k", keys_only)] == [2]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:9000")
    assert S3Options.from_env().endpoint_url == "https://s3.example:9000"


def test_s3_options_repr_masks_secrets():
    opts = S3Options("http://h:1", "r", access_key="AKIA_SECRET", secret_key="sk", session_token="tk")
    for text in (repr(opts), str(opts), f"{opts}"):
        assert "AKIA_SECRET" not in text and "sk'" not in text and "tk'" not in text
        assert "http://h:1" in text and "***" in text


@pytest.mark.ray
def test_ray_workers_read_from_s3(ray_local, s3_server, s3_bucket):
    import ray

    uris = [f"s3://{s3_bucket}/r/{i}.jpg" for i in range(3)]
    for i, uri in enumerate(uris):
        storage.write_bytes(uri, bytes([i]) * (i + 1), s3_server.options)

    @ray.remote(num_cpus=1)
    def fetch(uri: str, s3: S3Options) -> tuple[int, bytes]:
        return os.getpid(), storage.read_bytes(uri, s3, max_bytes=1024)

    results = ray.get([fetch.remote(u, s3_server.options) for u in uris], timeout=120)
    assert [data for _, data in results] == [bytes([i]) * (i + 1) for i in range(3)]
    assert os.getpid() not in {pid for pid, _ in results}
