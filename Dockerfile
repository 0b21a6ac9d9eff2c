# syntax=docker/dockerfile:1
# One image for every cdp service; the Helm chart picks the service per pod (`python -m cdp_<name>`).
# Build: docker build -t cdp .   (skaffold builds it as artifact `cdp`)
# The same image plus cdp-training (LightGBM, scikit-learn), for a scoring that trains in its pod
# (TrainModel, scheduled training; the chart's components.scoring.training.enabled):
#        docker build --target training -t cdp:<tag>-training .
# The default target (the last stage) is `runtime`, without it.

# Python must match the workspace's (the Makefile's UV_PYTHON); pin a digest here for reproducible builds:
# python:3.11-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# Only the dependency manifests, so the dependency layer below is rebuilt when a pyproject.toml or the
# lock changes, not on every source edit. Any service folder works without listing it here.
FROM ${PYTHON_IMAGE} AS manifests
WORKDIR /src
COPY . .
RUN mkdir /manifests \
 && find . -name pyproject.toml -not -path './.*' | tar -cf - --files-from=- uv.lock | tar -xf - -C /manifests

FROM ${PYTHON_IMAGE} AS build
# The same uv as the Makefile (UV_VERSION), from PyPI.
ARG UV_VERSION=0.13.9
RUN python -m pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
# Bytecode compiled at build time: the root filesystem is read-only at run time.
ENV UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_PYTHON_DOWNLOADS=never \
    UV_PROJECT_ENVIRONMENT=/app/.venv
WORKDIR /app
COPY --from=manifests /manifests/ ./
# Only the services and what they declare (cdp-kit, cdp-protos and their dependencies), never the
# workspace's other members: cdp-testing (pytest, mongomock, the nats-server binary), cdpctl (an operator's
# tool, run from a workstation) and cdp-training (LightGBM, scikit-learn; `make models`). No dev group
# either. A new service adds its --package to every `uv sync` line (the training target's too):
# tests/deploy/test_dockerfile.py fails until it does, and checks from uv.lock that none of those packages is reachable from this list.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-install-workspace \
      --package cdp-collector --package cdp-identity --package cdp-profile --package cdp-scoring --package cdp-segmentation --package cdp-orchestration --package cdp-crm
COPY libs ./libs
COPY services ./services
# Non-editable: the workspace packages are installed into the venv, so the runtime stage needs no sources.
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
      --package cdp-collector --package cdp-identity --package cdp-profile --package cdp-scoring --package cdp-segmentation --package cdp-orchestration --package cdp-crm

# The training target's venv: the same services plus cdp-training and its closure, from the same lock.
FROM build AS build-training
RUN --mount=type=cache,target=/root/.cache/uv \
    uv sync --frozen --no-dev --no-editable \
      --package cdp-collector --package cdp-identity --package cdp-profile --package cdp-scoring --package cdp-segmentation --package cdp-orchestration --package cdp-crm \
      --package cdp-training

# What both targets share: no installer, the service user, the data directory, the environment.
FROM ${PYTHON_IMAGE} AS base
# pip is not needed to run anything; dropping it leaves no installer in the final image.
RUN python -m pip uninstall --yes --quiet pip setuptools wheel \
 && groupadd --system --gid 10001 cdp \
 && useradd --system --uid 10001 --gid 10001 --home-dir /nonexistent --no-create-home --shell /usr/sbin/nologin cdp \
 && install --directory --owner 10001 --group 10001 --mode 0750 /var/lib/cdp
# PYTHONSAFEPATH keeps the working directory off sys.path. HOME=/tmp: the only writable place besides
# the data volume, for libraries that insist on a home directory.
ENV PATH=/app/.venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PYTHONSAFEPATH=1 \
    HOME=/tmp
WORKDIR /app
EXPOSE 50051 8080 9464

FROM base AS training
# Root-owned and read-only for the service user.
COPY --from=build-training /app/.venv /app/.venv
USER 10001:10001
CMD ["python", "-m", "cdp_scoring"]

FROM base AS runtime
# Root-owned and read-only for the service user.
COPY --from=build /app/.venv /app/.venv
USER 10001:10001
CMD ["python", "-m", "cdp_collector"]
