"""Shared fixtures: an in-process S3 (moto) server, fresh buckets, a local Ray instance.

* ``s3_server`` (session): object with ``.endpoint_url``, ``.options`` (S3Options) and ``.env``
  (environment for subprocesses / Ray workers). While the session runs, os.environ holds fake
  AWS credentials (never real ones); endpoint and region are NOT exported, so code under test
  must pass ``.options`` (or a test sets ``.env`` itself). Everything is restored at the end.
* ``s3_bucket`` (function): name of a fresh, empty bucket on that server.
* ``root`` (function, local and s3): ``(base URI, S3Options or None)`` of an empty prefix.
* ``ray_local`` (module): ``ray.init(num_cpus=2)`` with ``s3_server.env`` in the workers'
  environment; yields the RayContext; ``ray.shutdown()`` after the module. Module scope: one
  start (~5-10 s) per test module, and no Ray left running for the modules that do not use it.
  Tests that use it carry ``@pytest.mark.ray``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from ray_jobs.storage import S3Options

_TEST_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="session", autouse=True)
def _test_environment() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for k, v in _TEST_ENV.items():
            mp.setenv(k, v)
        yield


@dataclass
class S3Server:
    endpoint_url: str
    options: S3Options
    env: dict[str, str] = field(default_factory=dict)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()  # the port the OS bound for port=0
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    options = S3Options(endpoint, "us-east-1", access_key="testing", secret_key="testing")
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_EC2_METADATA_DISABLED"):
                mp.setenv(k, env[k])
            for k in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
                mp.delenv(k, raising=False)
            yield S3Server(endpoint, options, env)
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    import boto3

    name = f"test-{uuid.uuid4().hex[:16]}"
    client = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def ray_local(s3_server: S3Server):
    import ray

    os.environ.update(_TEST_ENV)
    # Short path: Ray's unix sockets live under it (limit ~107 chars); pytest's tmp_path is long.
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")
    try:
        ctx = ray.init(
            num_cpus=2,
            include_dashboard=False,
            _temp_dir=temp_dir,
            object_store_memory=128 * 1024**2,
            runtime_env={"env_vars": {**_TEST_ENV, **s3_server.env}},
        )
        yield ctx
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu_items:
        return
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    """(base URI, S3Options or None) of an empty prefix on either backend."""
    if request.param == "local":
        return str(tmp_path / "data"), None
    server = request.getfixturevalue("s3_server")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data", server.options
