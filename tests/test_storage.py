"""ray_jobs.storage against a local directory and the moto S3 server."""

from __future__ import annotations

import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pyarrow.fs as pafs
import pytest

from ray_jobs import listing, storage
from ray_jobs.storage import ObjectTooLarge, S3Options


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
    assert [i.size for i in listing.list_images("memory://piqa-test", extensions=None)] == [1]


def test_s3_keys_with_an_empty_segment_are_listed_and_read(s3_server, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    client.put_object(Bucket=s3_bucket, Key="photos//c.jpg", Body=b"0123456789")  # S3 allows it; pyarrow refuses
    uri = f"s3://{s3_bucket}/photos//c.jpg"
    assert [o.uri for o in listing.list_images(f"s3://{s3_bucket}/photos", s3_server.options)] == [uri]
    assert storage.read_bytes(uri, s3_server.options) == b"0123456789"
    with pytest.raises(ObjectTooLarge):
        storage.read_bytes(uri, s3_server.options, max_bytes=9)
    with pytest.raises(FileNotFoundError, match="d.jpg"):
        storage.read_bytes(f"s3://{s3_bucket}/photos//d.jpg", s3_server.options)


def test_s3_keys_with_dot_segments_read_their_own_object(s3_server, s3_bucket):
    import boto3

    client = boto3.client("s3", endpoint_url=s3_server.endpoint_url, region_name="us-east-1")
    objects = {"p/./dot.jpg": b"dot segment", "p/dot.jpg": b"other", "p/q/../up.jpg": b"dot-dot segment",
               "p/up.jpg": b"other up", "./root.jpg": b"at the root"}
    for key, body in objects.items():
        client.put_object(Bucket=s3_bucket, Key=key, Body=body)
    listed = {o.uri: o.size for o in listing.list_images(f"s3://{s3_bucket}", s3_server.options)}
    assert listed == {f"s3://{s3_bucket}/{k}": len(b) for k, b in objects.items()}
    for key, body in objects.items():  # pyarrow collapsed the dots: the bytes of p/dot.jpg, or not found
        assert storage.read_bytes(f"s3://{s3_bucket}/{key}", s3_server.options) == body, key
    assert storage.exists(f"s3://{s3_bucket}/./root.jpg", s3_server.options)
    assert not storage.exists(f"s3://{s3_bucket}/q/../root.jpg", s3_server.options)
    assert storage.is_dir(f"s3://{s3_bucket}/p/q/..", s3_server.options)  # a prefix: p/q/../ holds up.jpg
    client.put_object(Bucket=s3_bucket, Key="m//manifest.txt", Body=b"x")
    assert storage.exists(f"s3://{s3_bucket}/m//manifest.txt", s3_server.options)  # was ArrowInvalid
    assert not storage.is_dir(f"s3://{s3_bucket}/m//manifest.txt", s3_server.options)


def test_a_failed_read_of_an_s3_key_with_an_empty_segment_is_an_oserror(monkeypatch):
    from ray_jobs import reader
    from ray_jobs.storage import ObjectInfo

    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    monkeypatch.setattr(reader, "RETRY_PAUSES_S", ())
    nowhere = S3Options("http://127.0.0.1:9", "us-east-1", access_key="k", secret_key="s")
    with pytest.raises(OSError, match="EndpointConnectionError"):  # botocore's own exception, as pyarrow's are
        storage.read_bytes("s3://b/photos//c.jpg", nowhere)
    got = reader.fetch(ObjectInfo("s3://b/photos//c.jpg", 3, "e"), nowhere, 100)  # a row, not a failed task
    assert got.code == "read_failed" and "EndpointConnectionError" in got.message


@pytest.mark.parametrize("typo", ["s3:/bucket/scores", "s3:bucket/x", "S3:/b", "gs:/b/x", "https:/host/x"])
def test_a_scheme_a_slash_short_is_refused_not_taken_for_a_local_folder(typo, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scheme = typo.split(":")[0]
    for call in (storage.local_path, storage.resolve, lambda u: storage.write_bytes(storage.join(u, "f"), b"x")):
        with pytest.raises(ValueError, match=rf"looks like a mistyped {scheme}:// URI"):
            call(typo)
    assert os.listdir(tmp_path) == []
    assert storage.local_path("s3-archive/x") == str(tmp_path / "s3-archive/x")  # a folder named so is fine


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
    assert [i.size for i in listing.list_images(f"s3://{s3_bucket}/k", keys_only)] == [2]
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "https://s3.example:9000")
    assert S3Options.from_env().endpoint_url == "https://s3.example:9000"


class _ContainerCredentials(BaseHTTPRequestHandler):
    """The ECS/EKS container credential endpoint: the AWS chain asks it for keys; each GET is counted."""

    hits: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 - the handler's API
        self.hits.append(self.path)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 3600))
        body = json.dumps({"AccessKeyId": "testing", "SecretAccessKey": "testing", "Token": "t",
                           "Expiration": expires}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


class _UnsizedStore(BaseHTTPRequestHandler):
    """A store that announces no size: ``big.jpg`` streams 64 MiB, ``small.jpg`` 3 bytes; sent bytes are counted."""

    sent: list[int] = []

    def do_HEAD(self) -> None:  # noqa: N802 - the handler's API
        self.send_response(200)
        self.end_headers()

    def do_GET(self) -> None:  # noqa: N802
        self.send_response(200)
        self.end_headers()  # HTTP/1.0 without Content-Length: the body ends when the connection closes
        chunks = 1024 if "big" in self.path else 0
        try:
            for _ in range(chunks):
                self.wfile.write(b"\xff" * 65536)
                self.sent[0] += 65536
            if not chunks:
                self.wfile.write(b"abc")
        except OSError:  # the reader hung up: what it needed had come
            pass

    def log_message(self, *args) -> None:
        pass


def test_a_body_of_unannounced_size_stops_at_the_limit():
    """Without Content-Length the whole body was downloaded before the size check: an endless or
    huge body would have filled the read task's memory."""
    server = HTTPServer(("127.0.0.1", 0), _UnsizedStore)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base, _UnsizedStore.sent[:] = f"http://127.0.0.1:{server.server_port}", [0]
    try:
        assert storage.read_bytes(f"{base}/small.jpg", max_bytes=1000) == b"abc"
        with pytest.raises(ObjectTooLarge, match="more than 1000000 bytes .size not announced"):
            storage.read_bytes(f"{base}/big.jpg", max_bytes=1_000_000)
        time.sleep(0.5)
        assert _UnsizedStore.sent[0] < 32 * 1024 * 1024, "the body was read past the limit"
    finally:
        server.shutdown()


def test_reads_share_one_credential_chain(s3_server, s3_bucket, monkeypatch):
    """A filesystem per read fetched the credentials once per photo (STS on EKS, metadata on EC2)."""
    server = HTTPServer(("127.0.0.1", 0), _ContainerCredentials)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        monkeypatch.setenv("AWS_CONTAINER_CREDENTIALS_FULL_URI", f"http://127.0.0.1:{server.server_port}/creds")
        chain = S3Options(s3_server.endpoint_url, "us-east-1")  # no keys: the AWS chain finds them
        for i in range(5):
            storage.write_bytes(f"s3://{s3_bucket}/{i}.jpg", b"x" * i, s3_server.options)
        for i in range(5):
            assert storage.read_bytes(f"s3://{s3_bucket}/{i}.jpg", chain) == b"x" * i
        assert _ContainerCredentials.hits == ["/creds"]
    finally:
        server.shutdown()


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
