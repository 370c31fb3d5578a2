"""The nightly audit CronJob, the AWS cluster-launcher config and the runtime env (split from test_deploy)."""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.test_deploy import (
    KUBECTL_IMAGE,
    _k8s,
    _launcher_docs,
    _project_image,
    _yaml_files,
)


# ================================================================================= nightly audit
_CRON_RANGES = [(0, 59), (0, 23), (1, 31), (1, 12), (0, 7)]
_CRON_NAMES = [{}, {}, {}, {m: i + 1 for i, m in enumerate(
    "jan feb mar apr may jun jul aug sep oct nov dec".split())},
    {d: i for i, d in enumerate("sun mon tue wed thu fri sat".split())}]


def _valid_cron(schedule: str) -> bool:
    fields = schedule.split()
    if len(fields) != 5:
        return False
    for field, (lo, hi), names in zip(fields, _CRON_RANGES, _CRON_NAMES):
        for part in field.split(","):
            base, _, step = part.partition("/")
            if step and not (step.isdigit() and int(step) >= 1):
                return False
            if base in ("*", "?"):
                continue
            ends = base.split("-")
            if len(ends) > 2:
                return False
            values = [names.get(e.lower(), int(e) if e.isdigit() else None) for e in ends]
            if any(v is None or not lo <= v <= hi for v in values) or (len(values) == 2 and values[0] > values[1]):
                return False
    return True


@pytest.mark.parametrize("schedule,ok", [("0 2 * * *", True), ("*/15 0-6 1,15 jan-mar mon-fri", True),
                                         ("0 2 * *", False), ("60 2 * * *", False), ("0 24 * * *", False),
                                         ("0 2 * * 8", False), ("5-1 * * * *", False)])
def test_cron_checker(schedule: str, ok: bool) -> None:
    assert _valid_cron(schedule) is ok


def test_audit_cronjob() -> None:
    (cron,) = _k8s("CronJob")
    spec = cron.body["spec"]
    assert _valid_cron(spec["schedule"]), spec["schedule"]
    assert spec["concurrencyPolicy"] == "Forbid"
    assert isinstance(spec.get("startingDeadlineSeconds"), int) and spec["startingDeadlineSeconds"] > 0
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["restartPolicy"] in ("Never", "OnFailure")
    (container,) = pod["containers"]
    assert KUBECTL_IMAGE.match(container["image"]), container["image"]
    cmd = container.get("command", []) + container.get("args", [])
    assert cmd[:2] == ["kubectl", "create"], "generateName works with `kubectl create`, not `apply`"
    manifest = Path(cmd[cmd.index("-f") + 1])

    # The file comes from a ConfigMap volume, and that ConfigMap carries a RayJob for ray_jobs.audit.
    mount = next(m for m in container["volumeMounts"] if manifest.is_relative_to(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    cm_name, key = volume["configMap"]["name"], str(manifest.relative_to(mount["mountPath"]))
    cm = next(d for d in _k8s("ConfigMap") if d.body["metadata"]["name"] == cm_name)
    rayjob = yaml.safe_load(cm.body["data"][key])
    assert rayjob["kind"] == "RayJob" and rayjob["metadata"].get("generateName")
    assert not rayjob["metadata"].get("name"), "a fixed name would collide on the second night"
    assert rayjob["spec"]["entrypoint"].startswith("python -m ray_jobs.audit ")

    # Two audits must never overlap: once a day, and the RayJob's deadline (+ a late start) < 1 day.
    # Past its deadline a RayJob is only marked Failed: the job runs on until the cluster is deleted.
    minute, hour, dom, month, dow = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and dom == month == dow == "*", "a nightly schedule"
    assert rayjob["spec"]["backoffLimit"] == 0, "a retry could outlive the next night's start"
    assert rayjob["spec"]["shutdownAfterJobFinishes"] is True
    assert (rayjob["spec"]["activeDeadlineSeconds"] + rayjob["spec"]["ttlSecondsAfterFinished"]
            + spec["startingDeadlineSeconds"] < 24 * 3600)

    # RBAC: the pod's ServiceAccount may create (and get/list/delete) rayjobs.ray.io in the namespace.
    sa = pod["serviceAccountName"]
    bindings = [d.body for d in _k8s("RoleBinding")
                if any(s["kind"] == "ServiceAccount" and s["name"] == sa for s in d.body["subjects"])]
    assert bindings, f"no RoleBinding for {sa}"
    roles = {d.body["metadata"]["name"]: d.body for d in _k8s("Role")}
    verbs = set()
    for b in bindings:
        assert b["roleRef"]["kind"] == "Role"
        for rule in roles[b["roleRef"]["name"]]["rules"]:
            if "ray.io" in rule["apiGroups"] and "rayjobs" in rule["resources"]:
                verbs |= set(rule["verbs"])
    assert {"create", "get", "list", "delete"} <= verbs, verbs


# ======================================================================== AWS cluster launcher
def test_launcher_config() -> None:
    (doc,) = _launcher_docs()
    cfg = doc.body
    for key in ("cluster_name", "max_workers", "provider", "available_node_types", "head_node_type",
                "docker", "idle_timeout_minutes"):
        assert key in cfg, key
    assert cfg["provider"]["type"] == "aws" and cfg["provider"]["region"] and cfg["provider"]["availability_zone"]
    types = cfg["available_node_types"]
    assert cfg["head_node_type"] in types
    head = types[cfg["head_node_type"]]
    assert head["resources"].get("CPU") == 0, "no actors on the head"
    workers = {n: t for n, t in types.items() if n != cfg["head_node_type"]}
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"], name
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]
    for name, t in types.items():
        assert t["node_config"].get("IamInstanceProfile"), f"{name}: S3 access via an instance profile"
        # Ray 2.60 maps a missing ImageId or latest_dlami to a 2021 AMI (CUDA 11.2 driver): the image's
        # torch (CUDA 13) needs an R580+ driver, so every node names its AMI.
        assert t["node_config"].get("ImageId", "").lower() not in ("", "latest_dlami"), name
    gpu = [t for t in workers.values() if t["resources"].get("GPU", 0) >= 1]
    cpu = [t for t in workers.values() if not t["resources"].get("GPU")]
    assert gpu and cpu
    for t in gpu:
        assert "--gpus all" in t.get("docker", {}).get("worker_run_options", []) + cfg["docker"].get("run_options", [])
    docker = cfg["docker"]
    assert docker["image"] == _project_image() and docker["container_name"]
    # The image's ENTRYPOINT is piqa; the launcher runs `docker run … IMAGE bash`.
    assert any(re.fullmatch(r"--entrypoint(=| )(\"\"|'')?", o) for o in docker["run_options"]), docker["run_options"]
    assert not cfg.get("setup_commands"), "the image is complete: no setup_commands"


def test_launcher_config_passes_rays_own_validation() -> None:
    try:
        from ray.autoscaler._private.util import prepare_config, validate_config
    except ImportError as e:  # a private API: skip rather than fail if a Ray release moves it
        pytest.skip(f"ray.autoscaler._private.util: {e}")
    import copy

    (doc,) = _launcher_docs()
    validate_config(prepare_config(copy.deepcopy(doc.body)))  # Ray's JSON schema + cross-checks


def test_runtime_env_file() -> None:
    (path,) = [p for p in _yaml_files() if p.name == "runtime-env.yaml"]
    env = yaml.safe_load(path.read_text())
    assert set(env) <= {"working_dir", "excludes", "env_vars", "py_modules", "config"}
    assert "pip" not in env and "conda" not in env, "dependencies belong in the image"
    assert {".venv/", ".git/"} <= set(env["excludes"])
    assert all(isinstance(v, str) for v in env["env_vars"].values())


def test_runtime_env_uploads_code_and_leaves_weights_and_data(tmp_path: Path) -> None:
    """What Ray would zip from a checkout with weights beside it (its 512 MiB cap fails otherwise)."""
    try:
        from ray._private.runtime_env.packaging import _zip_files
    except ImportError as e:  # a private API: skip rather than fail if a Ray release moves it
        pytest.skip(f"ray._private.runtime_env.packaging: {e}")
    (path,) = [p for p in _yaml_files() if p.name == "runtime-env.yaml"]
    env = yaml.safe_load(path.read_text())
    code = ["ray_jobs/score.py", "piqa_core/model.py", "pyproject.toml"]
    left = ["models/dn-piqa/model.safetensors", "PIQ_model.pth", "LIQE.pt",
            "retinaface_resnet50.zip", "out/part-0.parquet", "tests/test_x.py", ".venv/bin/python"]
    for rel in code + left:
        (tmp_path / "repo" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "repo" / rel).write_bytes(b"x")
    # Ray also honours .gitignore by default; test the file's own excludes without it.
    _zip_files(str(tmp_path / "repo"), env["excludes"], str(tmp_path / "pkg.zip"), include_gitignore=False)
    with zipfile.ZipFile(tmp_path / "pkg.zip") as z:
        shipped = {n for n in z.namelist() if not n.endswith("/")}
    assert shipped == set(code)
