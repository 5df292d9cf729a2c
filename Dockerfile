# syntax=docker/dockerfile:1
# One image for both services of agentic-airflow (see docs/deployment.md):
#   sidecar (default command): python -m reconciler run --config /etc/agentic/reconciler.toml
#   agent:                     python -m agent --config /etc/agentic/agent.toml
#                              (and AGENTIC_HEALTH_URL=http://127.0.0.1:8791/health for the HEALTHCHECK)
#   CLI for people on call:    agentic jobs list (AGENTIC_SIDECAR_URL, AGENTIC_TOKEN)
# Configuration is mounted at /etc/agentic/, secrets come from the environment or mounted files
# (the TOML names them); nothing secret is built into the image.
#   docker build -t agentic-airflow:0.1.0 .
# Offline, from a wheelhouse built outside (scripts/image does all of it, podman included):
#   docker build --build-arg PIP_SOURCE=wheels --build-context wheels=path/to/wheelhouse -t ... .
# Python packages are installed at exactly the versions locks/dev.txt records (pip constraints).
# tests/test_dockerfile.py lints this file with hadolint and runs the build stage's install steps;
# tests/test_image.py builds the image and runs both services in containers.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm
# Where pip finds packages: "index" (the package index, the default) or "wheels" (only the
# wheelhouse given as the build context named "wheels": no index is asked).
ARG PIP_SOURCE=index

# ---- source: the project's files and its lock
FROM ${PYTHON_IMAGE} AS source
WORKDIR /src
COPY pyproject.toml README.md ./
COPY locks/dev.txt locks/
COPY agent/ agent/
COPY agent_api/ agent_api/
COPY servicekit/ servicekit/
COPY sidecar_api/ sidecar_api/
COPY reconciler/ reconciler/
COPY router_db/ router_db/
COPY agentic_airflow/ agentic_airflow/
COPY agentic_cli/ agentic_cli/

FROM source AS source-index

# Only the stage PIP_SOURCE names is built, so an online build needs no "wheels" context.
FROM source AS source-wheels
# "wheels" is a build context (--build-context wheels=...), not a stage.
# hadolint ignore=DL3022
COPY --from=wheels . /wheels/
ENV PIP_NO_INDEX=1 \
    PIP_FIND_LINKS=/wheels

# ---- build: the project and its dependencies in a venv (binary wheels only: no compiler needed)
# One of the two stages above, not an image.
# hadolint ignore=DL3006
FROM source-${PIP_SOURCE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV PIP_DISABLE_PIP_VERSION_CHECK=1
# pip too at its locked version, so both sources give the same venv whatever the base ships; the
# venv's setuptools goes: it builds the project (in pip's own build environment), the services never use it.
RUN python -m venv /opt/agentic \
    && /opt/agentic/bin/pip install --no-cache-dir -c locks/dev.txt pip \
    && /opt/agentic/bin/pip install --no-cache-dir -c locks/dev.txt --build-constraint locks/dev.txt ".[agent,sidecar,cli]" \
    && /opt/agentic/bin/pip uninstall --yes setuptools \
    && /opt/agentic/bin/pip check

# ---- runtime: the venv, tini as PID 1 (reaps the agent's orphaned job processes), a non-root user
FROM ${PYTHON_IMAGE} AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini=0.19.0-1+b3 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 agentic \
    && useradd --system --uid 10001 --gid agentic --home-dir /var/lib/agentic --shell /usr/sbin/nologin agentic \
    && install -d -o agentic -g agentic -m 0750 /var/lib/agentic /var/lib/agentic-agent \
    && install -d -m 0755 /etc/agentic
COPY --from=build /opt/agentic /opt/agentic
COPY config/ /etc/agentic/examples/
COPY --chmod=0755 deploy/docker/healthcheck.py /usr/local/bin/agentic-healthcheck
ENV PATH=/opt/agentic/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    AGENTIC_HEALTH_URL=http://127.0.0.1:8790/healthz
# The sidecar's SQLite router DB (sqlite:///reconciler.db) lands here unless [router_db] url says otherwise.
WORKDIR /var/lib/agentic
USER 10001:10001
EXPOSE 8790 8791
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 CMD ["agentic-healthcheck"]
ENTRYPOINT ["tini", "--"]
CMD ["python", "-m", "reconciler", "run", "--config", "/etc/agentic/reconciler.toml"]
