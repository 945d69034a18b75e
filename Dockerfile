# mTLS identity sidecar: container image.
#
#   podman build -t mtls-identity-sidecar:0.1.0 .        (or docker build)
#   podman run --read-only -v ./sidecar.yaml:/etc/sidecar/sidecar.yaml:ro ... mtls-identity-sidecar:0.1.0
#
# Two stages on the same slim Python base: "build" makes a virtual environment in /opt/sidecar
# from the project's wheel, its request path compiled with mypyc (setup.py: the build stage
# has a C compiler, the runtime stage none), and its dependencies (prebuilt wheels); the
# runtime stage copies only that folder. Nothing is written at run time except the
# private temporary file the TLS key is loaded through (/tmp), so the root filesystem can be
# read-only. PYTHON_IMAGE may name any Debian-based Python 3.12+ image with python3 on PATH
# (tests/container/smoke.sh makes one with debootstrap where none can be pulled).
ARG PYTHON_IMAGE=docker.io/library/python:3.13-slim-trixie

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    PYTHONDONTWRITEBYTECODE=1
# A C compiler for the build stage only; Python's headers come with the python images (a
# Debian python3 base needs python3-dev).
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc libc6-dev \
 && { python3 -c 'import os, sys, sysconfig; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
      || apt-get install -y --no-install-recommends python3-dev; } \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY sidecar ./sidecar
# SIDECAR_COMPILE=1: compiled or the build fails (never a silently slower image).
# Dependencies only as prebuilt wheels; bytecode compiled now because the root filesystem is
# read-only at run time; the venv's own pip goes once the install is done: the image runs the
# sidecar, it installs nothing. The last line fails the build unless the compiled modules load
# (-I: not the sources in /src, which the current folder would put first).
RUN python3 -m venv /opt/sidecar \
 && SIDECAR_COMPILE=1 /opt/sidecar/bin/pip install --no-cache-dir --only-binary=:all: . \
 && /opt/sidecar/bin/python -m compileall -q /opt/sidecar/lib \
 && /opt/sidecar/bin/pip uninstall --yes pip \
 && /opt/sidecar/bin/sidecar --version \
 && /opt/sidecar/bin/python -I -c 'import sys, sidecar, sidecar.listener; sys.exit(not sidecar.BUILD.compiled)'

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="mtls-identity-sidecar" \
      org.opencontainers.image.description="mTLS identity sidecar: terminates TLS, identifies client certificates, forwards to the application with identity headers" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"

COPY --from=build /opt/sidecar /opt/sidecar

# A fixed numeric user and group, so that Kubernetes' runAsNonRoot can check it and mounted
# secrets can be made readable to it (fsGroup). No home folder, no shell, owns no file.
USER 10001:10001
WORKDIR /tmp
ENV PATH=/opt/sidecar/bin:${PATH} \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml

# TLS listener (listen.port) and the plain-HTTP admin listener (admin.port; set admin.host to
# 0.0.0.0 in a container so that probes and Prometheus can reach it).
EXPOSE 8443/tcp 9090/tcp
STOPSIGNAL SIGTERM
ENTRYPOINT ["/opt/sidecar/bin/sidecar", "run"]
