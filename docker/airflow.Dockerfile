# syntax=docker/dockerfile:1
#
# malt-ops-airflow: the official Apache Airflow image + the cncf.kubernetes and amazon
# providers + malt-ops core (no torch), the DAGs in the image's dags folder and the recipes
# in /opt/malt-ops/recipes. Scheduler, DAG processor, API server and workers of the official
# Airflow Helm chart run it; each stage then runs as a pod in a stage image.
# It keeps the official image's layout: user airflow, AIRFLOW_HOME=/opt/airflow.
#
# Build from the repository root, which is the build context:
#   docker build -f docker/airflow.Dockerfile -t ghcr.io/malt-ops/malt-ops-airflow:0.1.0 .
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
FROM apache/airflow:3.3.2-python3.11 AS airflow

# The lock and the wheel stay in /opt/malt-ops/build, a record of what the image was built from.
COPY requirements/lock.txt docker/constraints.py /opt/malt-ops/build/
COPY --from=builder /dist/ /opt/malt-ops/build/dist/
# As the official image expects: pip runs as the airflow user, with apache-airflow pinned to
# the image's own version so that nothing moves it. The constraints leave out what the image
# already ships (Airflow's own tested set) except the providers, which come at the lock's
# versions; --expect apache-airflow stops the build if the base tag is not the lock's Airflow.
# The airflow extra of malt-ops is exactly the cncf.kubernetes and amazon providers.
# 50000 is the image's `airflow` user (AIRFLOW_UID), numeric so that runAsNonRoot can tell.
USER 50000
RUN python /opt/malt-ops/build/constraints.py --skip-installed --keep "apache-airflow-providers-*" \
        --expect apache-airflow /opt/malt-ops/build/lock.txt > /tmp/malt-constraints.txt \
    && pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/malt-constraints.txt \
        "apache-airflow==${AIRFLOW_VERSION}" \
        "$(echo /opt/malt-ops/build/dist/malt_ops-*.whl)[airflow]" \
    && rm /tmp/malt-constraints.txt \
    && python -c "import importlib.util as u, sys; sys.exit('torch in the airflow image' if u.find_spec('torch') else None)"

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 recipes/ /opt/malt-ops/recipes/

# The DAG is parsed with this recipe unless the deployment sets MALT_OPS_RECIPE (for
# instance to a recipe the Helm chart mounts under /etc/malt-ops/recipes).
ENV MALT_OPS_RECIPE=/opt/malt-ops/recipes/local.yaml \
    MALT_OPS_DAGS_FOLDER=/opt/airflow/dags
