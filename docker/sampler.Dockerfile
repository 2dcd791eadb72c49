# syntax=docker/dockerfile:1
#
# malt-ops-sampler: vLLM's official image + malt-ops (extras training, tracking). Runs the
# inference stages on GPU nodes: sample, evaluate and promote (which re-evaluates the
# champion). The training extra brings peft & co. for the `hf` backend fallback; torch and
# transformers stay vLLM's.
#
# Build from the repository root, which is the build context:
#   docker build -f docker/sampler.Dockerfile -t ghcr.io/malt-ops/malt-ops-sampler:0.1.0 .
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
# vLLM 0.32.0 is the release built on torch 2.13.0, the lock's torch.
FROM vllm/vllm-openai:v0.32.0 AS sampler

# The lock and the wheel stay in /opt/malt-ops/build, a record of what the image was built from.
COPY requirements/lock.txt docker/constraints.py /opt/malt-ops/build/
COPY --from=builder /dist/ /opt/malt-ops/build/dist/
# vLLM pins its own stack (CUDA torch, transformers, numpy, ...): the constraints leave out
# everything the base already ships (--skip-installed) and torch in any case (the lock's is
# a CPU-only wheel); --expect torch stops the build if vLLM's torch is not the lock's
# version, so the training extra's torch==2.13.0 is satisfied by vLLM's CUDA build and pip
# fetches no other torch. What is added (peft, trl, mlflow, math-verify, ...) is pinned.
RUN python3 /opt/malt-ops/build/constraints.py --skip-installed --expect torch \
        /opt/malt-ops/build/lock.txt > /tmp/malt-constraints.txt \
    && python3 -m pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/malt-constraints.txt \
        "$(echo /opt/malt-ops/build/dist/malt_ops-*.whl)[training,tracking]" \
    && rm /tmp/malt-constraints.txt \
    && python3 -c "import sys, torch; sys.exit(None if torch.version.cuda else 'CPU-only torch ' + torch.__version__)" \
    && malt-ops --help > /dev/null

# uid/gid 1000, as the pods' securityContext expects (runAsUser 1000); an Ubuntu base may
# already have a user there (`ubuntu`), which gives way.
RUN if existing="$(id -nu 1000 2>/dev/null)"; then userdel "${existing}"; fi \
    && if existing="$(getent group 1000)"; then groupdel "${existing%%:*}"; fi \
    && groupadd --gid 1000 malt \
    && useradd --uid 1000 --gid 1000 --home-dir /scratch --no-create-home --shell /usr/sbin/nologin malt \
    && mkdir -p /scratch \
    && chown 1000:1000 /scratch

COPY recipes/ /opt/malt-ops/recipes/

# Pods run with a read-only root filesystem and an emptyDir at /scratch (and one at
# /dev/shm): HOME, temporary files and every cache (Hugging Face, vLLM, triton, FlashInfer,
# torch compile, malt-ops' converted models) live there. No usage reports from the pods.
WORKDIR /scratch
ENV HOME=/scratch \
    TMPDIR=/scratch \
    XDG_CACHE_HOME=/scratch/.cache \
    HF_HOME=/scratch/.cache/huggingface \
    MALT_OPS_CACHE=/scratch/.cache/malt-ops \
    PYTHONUNBUFFERED=1 \
    VLLM_NO_USAGE_STATS=1
USER 1000:1000
# The base's entrypoint is `vllm serve`: these images run a stage instead.
ENTRYPOINT ["malt-ops"]
CMD ["--help"]
