# syntax=docker/dockerfile:1.7
#
# Both edgeweave images, as two targets that share one build stage and one runtime base
# (so a build of both compiles the wheels once). Multi-arch, for Raspberry Pi (arm64)
# and x86 nodes; build from the repository root:
#
#   docker buildx build --platform linux/arm64,linux/amd64 --target operator \
#     -t ghcr.io/edgeweave/operator:0.1.0 --push .
#   docker buildx build --platform linux/arm64,linux/amd64 --target worker \
#     -t ghcr.io/edgeweave/worker:0.1.0 --push .
#
# * operator: the kopf operator with the planner and the ONNX splitter (onnx, numpy),
#   plus onnxruntime for the node profiler DaemonSet, which times models exactly as the
#   stage workers run them. It is the last stage, so a build without --target makes it.
# * worker: the stage worker and gateway, run by the pods the operator creates
#   (`edgeweave worker ...`, `edgeweave gateway ...`). It runs on the smallest nodes, so
#   it holds only the data plane: onnxruntime, aiohttp, prometheus-client and the core
#   (onnx, numpy); no Kubernetes client, no kopf.
#
# tests/chart/test_images.py checks that what is copied exists and survives
# .dockerignore, and that each target's entrypoint resolves when installed the same way.

ARG PYTHON_IMAGE=python:3.11-slim

# ---------------------------------------------------------------- build: wheels only
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY edgeweave ./edgeweave
# edgeweave's own wheel plus a wheel of every dependency either image installs, for the
# target platform (binary wheels from PyPI for both architectures: nothing is compiled).
# Each image installs only its own extras from these, so the worker gets no kopf.
RUN pip wheel --wheel-dir /wheels ".[operator,worker]"

# ---------------------------------------------------------------- runtime: shared base
FROM ${PYTHON_IMAGE} AS runtime
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# The unprivileged user every pod runs as (65532: runAsNonRoot in the chart, runAsUser
# in edgeweave/operator/settings.py for the pods the operator creates). Each target
# switches to it only after its pip install, which needs root.
RUN groupadd --gid 65532 edgeweave \
    && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin edgeweave
LABEL org.opencontainers.image.source="https://github.com/edgeweave/edgeweave" \
      org.opencontainers.image.licenses="Apache-2.0"
ENTRYPOINT ["edgeweave"]

# ---------------------------------------------------------------- target: worker
FROM runtime AS worker
# Installed from the build stage's wheels without copying them into a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "edgeweave[worker]"
USER 65532:65532
LABEL org.opencontainers.image.title="edgeweave worker" \
      org.opencontainers.image.description="edgeweave stage worker and gateway (onnxruntime, Open Inference Protocol v2)"
CMD ["--help"]

# ---------------------------------------------------------------- target: operator
FROM runtime AS operator
RUN --mount=type=bind,from=build,source=/wheels,target=/wheels \
    pip install --no-index --find-links=/wheels "edgeweave[operator,worker]"
USER 65532:65532
LABEL org.opencontainers.image.title="edgeweave operator" \
      org.opencontainers.image.description="Plans, deploys and re-plans InferencePipelines across edge nodes"
CMD ["operator"]
