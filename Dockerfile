# syntax=docker/dockerfile:1
# spendgate server image: `docker build -t spendgate:0.1.0 .`
# Runs `spendgate serve` as UID 10001 from a venv holding only runtime packages; works
# with a read-only root filesystem (bytecode is compiled at build time).
#
# Base image pinned by tag; pin the digest too for reproducible builds, e.g.
#   docker buildx imagetools inspect python:3.11.14-slim-trixie   # prints the digest
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-trixie@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-trixie

# --- builder: wheels and the runtime venv ----------------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
# Build tools live in /opt/build; the runtime venv /opt/venv gets neither pip nor setuptools.
COPY deploy/docker/build-requirements.txt /tmp/build-requirements.txt
RUN python -m venv /opt/build \
 && /opt/build/bin/pip install --no-deps -r /tmp/build-requirements.txt \
 && python -m venv --without-pip /opt/venv
# Dependencies first (their own layer, cached until the lock changes): exact versions,
# wheels only (no compiler needed or present), and nothing resolved beyond the lock.
COPY deploy/docker/requirements.txt /tmp/requirements.txt
RUN /opt/build/bin/pip --python /opt/venv/bin/python install \
      --no-deps --only-binary=:all: -r /tmp/requirements.txt
# spendgate's own packages, built as regular (non-editable) wheels with the pinned
# setuptools; then `pip check` fails the build if the lock misses anything they need,
# and an import proves the venv is whole.
COPY protos/python /src/protos/python
COPY clients/python /src/clients/python
COPY pyproject.toml README.md /src/
COPY server /src/server
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels \
      /src/protos/python /src/clients/python /src \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps --no-index /tmp/wheels/*.whl \
 && /opt/build/bin/pip --python /opt/venv/bin/python check \
 && /opt/venv/bin/python -c 'import spendgate_server.app, spendgate_client'

# --- runtime ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE}
RUN groupadd --system --gid 10001 spendgate \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin spendgate
COPY --from=builder /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    SPENDGATE_HOST=0.0.0.0 \
    SPENDGATE_LOG_FORMAT=json
# Numeric, so Kubernetes runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
EXPOSE 50051 9464
# Exec form: spendgate is PID 1 and receives SIGTERM itself (it drains, then exits).
ENTRYPOINT ["spendgate"]
CMD ["serve"]
