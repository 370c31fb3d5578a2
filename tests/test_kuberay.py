"""KubeRay RayCluster and RayJob manifests, and one project image everywhere (split from test_deploy)."""

from __future__ import annotations

import json
import shlex

import pytest

from tests.test_deploy import (
    AUTOSCALER_KEYS,
    CHOICES,
    _containers,
    Doc,
    _gpus,
    HEAD_GROUP_KEYS,
    _is_gpu_group,
    JOB_MODULES,
    _k8s,
    K8S_VERSIONS,
    KUBECTL_IMAGE,
    _launcher_docs,
    _parse_entrypoint,
    _pins,
    _pod_templates,
    POSITIONALS,
    _project_image,
    _ray_cluster_specs,
    RAYCLUSTER_SPEC_KEYS,
    RAYJOB_SPEC_KEYS,
    REQUIRED_FLAGS,
    SUBMISSION_MODES,
    WORKER_GROUP_KEYS,
)


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
        if _is_gpu_group(g) and "resources" in params:  # KubeRay adds num-gpus only if it parses that string
            want = sum(_gpus(c) for c in g["template"]["spec"]["containers"])
            assert params.get("num-gpus") == str(want), f"{gw}: rayStartParams num-gpus \"{want}\" (as the limits)"
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


# ==================================================================================== pod hardening
# docs/operations.md, "Security notes": pods run as uid 1000 with runAsNonRoot, no privilege
# escalation and all capabilities dropped; every Ray pod runs as the IRSA ServiceAccount piqa-ray.
RAY_SERVICE_ACCOUNT = "piqa-ray"
# Env that KubeRay sets on the submitter container itself (appended: setting them too duplicates them).
KUBERAY_SUBMITTER_ENV = {"RAY_DASHBOARD_ADDRESS", "RAY_JOB_SUBMISSION_ID", "PYTHONUNBUFFERED"}


def _hardening_errors(where: str, pod_sc: dict, container: dict) -> list[str]:
    """Why `container` (in a pod with securityContext `pod_sc`) is not hardened; [] when it is."""
    errors = []
    sc = container.get("securityContext") or {}
    name = f"{where}.{container.get('name')}"
    run_as_user = sc.get("runAsUser", pod_sc.get("runAsUser"))
    run_as_non_root = sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot"))
    if run_as_non_root is not True:
        errors.append(f"{name}: runAsNonRoot must be true")
    if not isinstance(run_as_user, int) or isinstance(run_as_user, bool) or run_as_user == 0:
        errors.append(f"{name}: runAsUser must be a numeric non-root uid, got {run_as_user!r}")
    if sc.get("allowPrivilegeEscalation") is not False:
        errors.append(f"{name}: securityContext.allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        errors.append(f"{name}: securityContext.capabilities.drop must contain ALL")
    if (sc.get("capabilities") or {}).get("add"):
        errors.append(f"{name}: no capabilities may be added")
    if sc.get("privileged"):
        errors.append(f"{name}: privileged")
    return errors


def _autoscaler_containers() -> list[tuple[str, dict, dict]]:
    """(where, head pod securityContext, the autoscaler sidecar KubeRay builds) of each autoscaling cluster.

    KubeRay puts the autoscaler in the head pod and copies autoscalerOptions.securityContext onto it
    only when that is set (utils: mergeAutoscalerOverrides), so that is the container-level context.
    """
    out = []
    for where, spec in _ray_cluster_specs():
        if not spec.get("enableInTreeAutoscaling"):
            continue
        opts = spec.get("autoscalerOptions") or {}
        head = spec["headGroupSpec"]["template"]
        container = {"name": "autoscaler",
                     "image": opts.get("image", head["spec"]["containers"][0]["image"]),
                     "resources": opts.get("resources", {})}
        if "securityContext" in opts:
            container["securityContext"] = opts["securityContext"]
        out.append((f"{where}.autoscalerOptions", head["spec"].get("securityContext") or {}, container))
    return out


def test_every_pod_and_container_is_hardened() -> None:
    """Head, worker groups, RayJob submitters, the autoscaler sidecar, the CronJob's launcher."""
    errors, checked = [], []
    for where, template in _pod_templates():
        pod_sc = template["spec"].get("securityContext") or {}
        for c in _containers(template):
            errors += _hardening_errors(where, pod_sc, c)
            checked.append(where)
    for where, pod_sc, c in _autoscaler_containers():
        errors += _hardening_errors(where, pod_sc, c)
        checked.append(where)
    assert not errors, "\n".join(errors)
    # The submitters and the autoscaler are part of what was checked (the test below requires them).
    assert any(w.endswith(".submitter") for w in checked) and any("autoscalerOptions" in w for w in checked)


def test_every_ray_pod_uses_the_ray_service_account() -> None:
    """Pods that talk to Ray or S3 (everything but the kubectl launcher of the CronJob) run as piqa-ray."""
    wrong = [(w, t["spec"].get("serviceAccountName")) for w, t in _pod_templates()
             if "jobTemplate" not in w and t["spec"].get("serviceAccountName") != RAY_SERVICE_ACCOUNT]
    assert not wrong, f"serviceAccountName must be {RAY_SERVICE_ACCOUNT}: {wrong}"
    assert RAY_SERVICE_ACCOUNT in {d.body["metadata"]["name"] for d in _k8s("ServiceAccount")}


@pytest.mark.parametrize("doc", _k8s("RayJob"), ids=repr)
def test_rayjob_has_a_hardened_submitter(doc: Doc) -> None:
    """Without spec.submitterPodTemplate KubeRay's default submitter pod has no securityContext and runs
    as the namespace's `default` ServiceAccount (common/job.go: GetDefaultSubmitterContainer)."""
    spec = doc.body["spec"]
    if spec.get("submissionMode", "K8sJobMode") != "K8sJobMode":
        assert "submitterPodTemplate" not in spec, f"{doc}: only K8sJobMode uses a submitter pod"
        return
    template = spec.get("submitterPodTemplate")
    assert template, f"{doc}: set spec.submitterPodTemplate (KubeRay's default submitter is not hardened)"
    assert set(template) <= {"metadata", "spec"}, f"{doc}: submitterPodTemplate is a PodTemplateSpec"
    pod = template["spec"]
    # KubeRay wraps the template in a batch/v1 Job as is: a Job's pods must not restart Always (the
    # default when unset, which the API server then rejects).
    assert pod.get("restartPolicy") in ("Never", "OnFailure"), f"{doc}: submitter restartPolicy Never"
    assert pod.get("serviceAccountName") == RAY_SERVICE_ACCOUNT, f"{doc}: submitter serviceAccountName"
    # KubeRay treats the first container as the submitter; it fills in the `ray job submit` command
    # only when the container has none, and appends its own env.
    c = pod["containers"][0]
    assert c.get("image") == _project_image(), f"{doc}: the submitter runs the project image (its Ray)"
    assert not c.get("command") and not c.get("args"), f"{doc}: leave command/args to KubeRay"
    env = {e["name"] for e in c.get("env", [])}
    assert not env & KUBERAY_SUBMITTER_ENV, f"{doc}: KubeRay sets {sorted(env & KUBERAY_SUBMITTER_ENV)}"
    res = c.get("resources", {})
    assert {"cpu", "memory"} <= set(res.get("limits", {})), f"{doc}: submitter cpu/memory limits"
    assert {"cpu", "memory"} <= set(res.get("requests", {})), f"{doc}: submitter cpu/memory requests"
    assert not _gpus(c), f"{doc}: the submitter needs no GPU"
    assert not _hardening_errors(f"{doc}.submitter", pod.get("securityContext") or {}, c)


def test_autoscaler_options_match_kubernetes_schemas() -> None:
    """autoscalerOptions' resources and securityContext are core types: validate them as a container's."""
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (test extra)")
    found = _autoscaler_containers()
    assert found, "the long-lived RayCluster autoscales"
    errors = []
    for where, _, container in found:
        body = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"},
                "template": {"spec": {"containers": [container]}}}
        try:
            kv.validate(body, K8S_VERSIONS[-1], strict=True)
        except kv.ValidationError as e:
            errors.append(f"{where}: {'.'.join(map(str, e.path))}: {e.message}")
    assert not errors, "\n".join(errors)
