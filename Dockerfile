# raymeta's image: the tested environment (torch first, then requirements.lock, then raymeta), the configs and
# sweeps, Ray's CLI, and wget (KubeRay's health probes), running as the non-root user 1000 as Ray's images do.
#
#   CPU (default):  docker build -t raymeta:0.1.0-cpu .
#   CUDA 12.8:      docker build -t raymeta:0.1.0-cu128 \
#                     --build-arg BASE=rayproject/ray:2.60.0-py311-cu128 \
#                     --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#   check:          raymeta cluster check Dockerfile k8s/*.yaml
#
# Assets (SmolLM2, the tokenizer, the task data) are not baked in: RAYMETA_HOME points at shared storage in the k8s
# manifests and `raymeta fetch` fills it once (idempotent). Push the image to your registry with a version tag
# (or pin it by digest) and put that name in k8s/.
ARG BASE=python:3.11.13-slim-bookworm
FROM ${BASE}

ARG TORCH=torch==2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu

USER root
RUN if command -v apt-get >/dev/null; then \
      apt-get update && apt-get install -y --no-install-recommends wget && rm -rf /var/lib/apt/lists/*; fi \
    && (id -u 1000 >/dev/null 2>&1 || useradd --create-home --uid 1000 ray)

WORKDIR /app
COPY requirements.lock pyproject.toml README.md ./
RUN python -m pip install --no-cache-dir "${TORCH}" --index-url "${TORCH_INDEX}" \
    && python -m pip install --no-cache-dir -r requirements.lock
COPY raymeta ./raymeta
COPY configs ./configs
COPY tune_configs ./tune_configs
RUN python -m pip install --no-cache-dir --no-deps . && raymeta --version && ray --version

ENV RAYMETA_HOME=/home/ray/.cache/raymeta \
    RAY_USAGE_STATS_ENABLED=0
USER 1000
CMD ["raymeta", "--help"]
