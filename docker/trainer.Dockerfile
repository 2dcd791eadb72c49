# syntax=docker/dockerfile:1
#
# malt-ops-trainer: CUDA PyTorch + transformers, peft, trl, accelerate, datasets + malt-ops
# (extras training, tracking). Runs the `train` stage (TRL SFT/DPO with LoRA) on GPU nodes.
#
# Build from the repository root, which is the build context:
#   docker build -f docker/trainer.Dockerfile -t ghcr.io/malt-ops/malt-ops-trainer:0.1.0 .
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
# The official PyTorch runtime image whose torch is the lock's torch (2.13.0), built for
# CUDA 12.6: it runs on any driver >= 560 (and on older 525+ drivers through CUDA's minor
# version compatibility), which most GPU node pools have.
FROM pytorch/pytorch:2.13.0-cuda12.6-cudnn9-runtime AS trainer

# The lock and the wheel stay in /opt/malt-ops/build, a record of what the image was built from.
COPY requirements/lock.txt docker/constraints.py /opt/malt-ops/build/
COPY --from=builder /dist/ /opt/malt-ops/build/dist/
# The lock pins torch==2.13.0+cpu, a CPU-only wheel; this image must keep the base's CUDA
# build. So the constraints leave out torch and everything the base already ships
# (--skip-installed), and --expect torch stops the build if the base's torch is not the
# lock's version (the training extra's torch==2.13.0 is then already satisfied, and pip
# fetches no other torch). The rest of the lock pins what is added: transformers, peft,
# trl, accelerate, datasets, mlflow, ...
RUN python /opt/malt-ops/build/constraints.py --skip-installed --expect torch \
        /opt/malt-ops/build/lock.txt > /tmp/malt-constraints.txt \
    && python -m pip install --no-cache-dir --disable-pip-version-check \
        --constraint /tmp/malt-constraints.txt \
        "$(echo /opt/malt-ops/build/dist/malt_ops-*.whl)[training,tracking]" \
    && rm /tmp/malt-constraints.txt \
    && python -c "import sys, torch; sys.exit(None if torch.version.cuda else 'CPU-only torch ' + torch.__version__)" \
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
# /dev/shm): HOME, temporary files and every cache (Hugging Face, triton, torch compile,
# malt-ops' converted models) live there.
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
