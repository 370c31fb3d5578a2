# syntax=docker/dockerfile:1
#
# piqa: DN-PIQA portrait quality scoring on Ray — one image for the Ray head, the Ray workers,
# the KubeRay job submitter and the Ray cluster launcher (cluster/).
#
#   docker build -t registry.example.com/piqa:0.1.0 .
#   docker run --rm registry.example.com/piqa:0.1.0 score --help
#
# Base: the Ray image of the exact Ray version pyproject.toml pins (ray==2.60.0), Python 3.11, CUDA
# capable. KubeRay and the cluster launcher expect Ray, bash and rsync inside the image, and its
# `ray` user (uid 1000, gid 100) is the non-root user everything below runs as.
# Pinned by tag; pin by digest (…@sha256:…) in your registry for bit-for-bit rebuilds.
#
# No model weights are baked in: they come at run time from S3 (`--weights s3://…`, copied once per
# pod into $TORCH_HOME/piqa) or from a volume mounted at /models (`--weights /models/<dir>`).
# No credentials are baked in: IRSA / EKS Pod Identity / EC2 instance roles provide them.
#
# No HEALTHCHECK: the image runs batch processes (a Ray job driver, `ray start` on a node, a one-shot
# `piqa` command). Liveness of Ray nodes is KubeRay's and the Ray autoscaler's business (they probe
# the raylet/GCS themselves) and a job's health is its exit status; a Docker HEALTHCHECK would be
# ignored by Kubernetes and would only add a probe process to every container.
FROM rayproject/ray:2.60.0-py311-gpu

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

ENV NO_ALBUMENTATIONS_UPDATE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    TORCH_HOME=/home/ray/.cache/torch

# Root only for the mount point of optional local weights; checks the base image's user is the
# uid/gid the manifests in cluster/ run as (runAsUser 1000, fsGroup 100). `install -d` gives the
# owner only to the directories on its command line; parents it creates stay root's: name each one
# (/home/ray/.cache too, which the base image may lack) so that all of them belong to 1000:100.
USER 0
RUN test "$(id -u ray)" = 1000 && test "$(id -g ray)" = 100 \
    && install -d -o 1000 -g 100 /models /home/ray/app /home/ray/.cache /home/ray/.cache/torch

# Numeric, so that Kubernetes' runAsNonRoot can verify it.
USER 1000:100
WORKDIR /home/ray/app

# 1) Dependencies only (cached until pyproject.toml changes): the exact pins of
#    [project].dependencies, read from pyproject.toml itself so they cannot drift.
#    Optionally take torch/torchvision from a PyTorch index first (e.g. a CUDA build that matches
#    an older node driver):  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
#    (that branch repeats the torch pins; tests/test_dockerfile.py keeps them equal to pyproject's).
ARG TORCH_INDEX_URL=""
COPY --chown=1000:100 pyproject.toml ./
RUN if [ -n "${TORCH_INDEX_URL}" ]; then \
        pip install --no-cache-dir --index-url "${TORCH_INDEX_URL}" torch==2.14.1 torchvision==0.29.1; \
    fi \
    && python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install --no-cache-dir -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# retinaface-pytorch's metadata pins torch==1.9: install it without its dependencies (only its
# network / box_utils / prior_box modules are used; see piqa_core/faces.py and the Makefile).
RUN pip install --no-cache-dir --no-deps retinaface-pytorch==0.0.8

# 2) The project itself. README.md is not copied: setuptools only warns that the long description
#    is missing, and README edits then do not rebuild this layer.
COPY --chown=1000:100 piqa_core ./piqa_core
COPY --chown=1000:100 ray_jobs ./ray_jobs
RUN pip install --no-cache-dir --no-deps . \
    && rm -rf build ./*.egg-info \
    && piqa --help > /dev/null \
    && python -c "import piqa_core.model, piqa_core.faces, piqa_core.liqe, ray_jobs.score"

# KubeRay and the cluster launcher replace this with their own commands (`ray start …`,
# `ray job submit …`); `docker run IMAGE score …` runs the CLI.
ENTRYPOINT ["piqa"]
CMD ["--help"]
