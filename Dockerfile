# syntax=docker/dockerfile:1.7
# Two images from one build context:
#   docker build --target operator -t tailor-operator .   # kopf operator, no torch (~200 MB)
#   docker build --target trainer  -t tailor-trainer  .   # the pipeline: torch (CUDA), transformers, peft, Ray
# Versions come from requirements.lock, the same pins the test suite runs with.

ARG PYTHON_VERSION=3.11

FROM python:${PYTHON_VERSION}-slim AS source
WORKDIR /src
COPY pyproject.toml README.md requirements.lock ./
COPY operator ./operator
COPY trainer ./trainer

FROM python:${PYTHON_VERSION}-slim AS operator
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
RUN pip install uv
COPY --from=source /src /src
# Only the operator extra: the operator imports tailor_trainer.config and nothing heavier.
RUN uv pip install --system --constraint /src/requirements.lock "/src[operator]" \
    && pip uninstall -y uv
RUN useradd --uid 65532 --create-home tailor
USER 65532
EXPOSE 8080 8081
ENTRYPOINT ["tailor", "operator"]

FROM python:${PYTHON_VERSION}-slim AS trainer
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    HF_HOME=/tmp/hf TRANSFORMERS_CACHE=/tmp/hf
RUN pip install uv
COPY --from=source /src /src
# The trainer image also carries the operator extra's client for the progress ConfigMap sink.
RUN uv pip install --system --constraint /src/requirements.lock "/src[trainer,operator]" \
    && pip uninstall -y uv
RUN useradd --uid 1000 --create-home ray
USER 1000
WORKDIR /home/ray
# KubeRay runs its own command in head/worker containers; the RayJob entrypoint is
# `python -m tailor_trainer run --config /etc/tailor/config.json`.
CMD ["python", "-m", "tailor_trainer", "--help"]
