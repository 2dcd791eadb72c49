# syntax=docker/dockerfile:1
#
# malt-ops-light: malt-ops with the tracking extra (mlflow, boto3, matplotlib) and no torch.
# Runs the CPU stages prepare, label and register (KubernetesPodOperator, ENTRYPOINT malt-ops)
# and the MLflow server Deployment of the Helm chart (which sets `command: [mlflow, server]`).
#
# Build from the repository root, which is the build context:
#   docker build -f docker/light.Dockerfile -t ghcr.io/malt-ops/malt-ops-light:0.1.0 .
# (`make images` builds all four images.)

# ---- builder: the malt-ops wheel, from this checkout ----
FROM python:3.11.16-slim-bookworm AS builder
WORKDIR /src
COPY requirements/lock.txt requirements/lock.txt
COPY pyproject.toml README.md ./
COPY malt_ops/ malt_ops/
# PIP_CONSTRAINT reaches pip's isolated build environment: the build backend (setuptools)
# comes at the lock's version too.
RUN PIP_CONSTRAINT=requirements/lock.txt \
    python -m pip wheel --no-cache-dir --disable-pip-version-check --no-deps --wheel-dir /dist .

# ---- the image ----
FROM python:3.11.16-slim-bookworm AS light

# The lock and the wheel stay in /opt/malt-ops/build, a record of what the image was built from.
COPY requirements/lock.txt docker/constraints.py /opt/malt-ops/build/
COPY --from=builder /dist/ /opt/malt-ops/build/dist/
# Nothing is installed on this base yet, so the whole lock (less torch) constrains the install:
# every package is at the version the tests ran with. datasets serves `data.source: hub` in
# prepare and needs no torch. The checks after it fail the build if anything pulled torch
# in or if the CLI does not start.
RUN python /opt/malt-ops/build/constraints.py /opt/malt-ops/build/lock.txt > /tmp/malt-constraints.txt \
    && python -m pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/malt-constraints.txt \
        "$(echo /opt/malt-ops/build/dist/malt_ops-*.whl)[tracking]" datasets==5.2.0 \
    && rm /tmp/malt-constraints.txt \
    && python -c "import importlib.util as u, sys; sys.exit('torch in the light image' if u.find_spec('torch') else None)" \
    && malt-ops --help > /dev/null

# uid/gid 1000, as the pods' securityContext expects (runAsUser 1000).
RUN if existing="$(id -nu 1000 2>/dev/null)"; then userdel "${existing}"; fi \
    && if existing="$(getent group 1000)"; then groupdel "${existing%%:*}"; fi \
    && groupadd --gid 1000 malt \
    && useradd --uid 1000 --gid 1000 --home-dir /scratch --no-create-home --shell /usr/sbin/nologin malt \
    && mkdir -p /scratch \
    && chown 1000:1000 /scratch

# Recipes at a fixed path for `--recipe /opt/malt-ops/recipes/<name>.yaml` (the Helm chart
# can mount its own over /etc/malt-ops/recipes instead).
COPY recipes/ /opt/malt-ops/recipes/

# Pods run with a read-only root filesystem and an emptyDir at /scratch: HOME, temporary
# files and every cache (pip's, matplotlib's, Hugging Face's, malt-ops' assets) live there.
WORKDIR /scratch
ENV HOME=/scratch \
    TMPDIR=/scratch \
    XDG_CACHE_HOME=/scratch/.cache \
    HF_HOME=/scratch/.cache/huggingface \
    MALT_OPS_CACHE=/scratch/.cache/malt-ops \
    PYTHONUNBUFFERED=1
USER 1000:1000
ENTRYPOINT ["malt-ops"]
CMD ["--help"]
