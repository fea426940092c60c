# syntax=docker/dockerfile:1
# One image for every qai component:
#   docker run qai serve --host 0.0.0.0            (all components in one process)
#   docker run qai serve kms --host 0.0.0.0        (kms | ledger | jobs | em-policy | scheduler)
#   docker run qai worker                          (no HTTP server: run it with --no-healthcheck)
#   docker run qai nightly run-once --json
#
# The base is pinned to an exact tag here because this repository is built offline; a release
# build pins the digest as well (see docs/operations.md, "Updating the base image"):
#   --build-arg PYTHON_IMAGE=python:3.11.14-slim-bookworm@sha256:<digest>
ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------------------- builder
FROM ${PYTHON_IMAGE} AS builder

# A hashed lock file, when the build context has one, is installed with --require-hashes before
# the wheel, which is then installed with --no-deps: every third-party byte is pinned. Without one
# pip resolves pyproject.toml's ranges (fine for dev images, not reproducible).
ARG LOCK_FILE=requirements.lock

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# Compilers only here, for any dependency that ships no wheel for this platform; they never reach
# the final stage.
RUN apt-get update \
 && apt-get install -y --no-install-recommends build-essential \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
# .dockerignore keeps the context to the package sources, pyproject.toml, README.md and the locks.
COPY . /src

# The base image's pip is used as is: upgrading it would fetch an unpinned package.
RUN python -m venv /opt/qai \
 && /opt/qai/bin/pip wheel --no-deps --wheel-dir /wheels /src \
 && if [ -f "$LOCK_FILE" ]; then \
      echo "installing locked dependencies from $LOCK_FILE (--require-hashes)"; \
      /opt/qai/bin/pip install --require-hashes --no-deps -r "$LOCK_FILE" \
      && /opt/qai/bin/pip install --no-deps /wheels/qai-*.whl; \
    else \
      echo "no $LOCK_FILE: resolving dependencies from pyproject.toml (not reproducible)"; \
      /opt/qai/bin/pip install /wheels/qai-*.whl; \
    fi \
 && /opt/qai/bin/pip check

# ---------------------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime

# softhsm2 (softhsm2-util + libsofthsm2) is the embedded default's HSM: qai initialises a token
# under $QAI_HOME/softhsm on first use. A production HSM's PKCS#11 library is added by a derived
# image and selected with QAI_PKCS11_MODULE.
RUN apt-get update \
 && apt-get install -y --no-install-recommends softhsm2 libsofthsm2 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 qai \
 && useradd --system --uid 10001 --gid 10001 --home-dir /var/lib/qai --create-home --shell /usr/sbin/nologin qai

# The venv only: no pip cache, no wheels, no compilers.
COPY --from=builder /opt/qai /opt/qai

ENV PATH=/opt/qai/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    QAI_HOME=/var/lib/qai

USER 10001:10001
WORKDIR /var/lib/qai
EXPOSE 8000

# Python's urllib: the image needs no curl. Probes the default port of `qai serve`.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

ENTRYPOINT ["qai"]
# `qai serve` binds 127.0.0.1 by default; a container must listen on every interface.
CMD ["serve", "--host", "0.0.0.0", "--port", "8000"]
