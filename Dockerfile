# syntax=docker/dockerfile:1.7
# Two images from one build context:
#   docker build --target operator -t tailor-operator .   # kopf operator, no torch
#   docker build --target trainer  -t tailor-trainer  .   # the pipeline: torch (CUDA), transformers, peft, Ray, bitsandbytes
# Versions come from requirements.lock, the same pins the test suite runs with.
#
# Optional inputs:
#   --build-arg BASE_IMAGE=...   any Debian bookworm image whose python3 is 3.11 (default python:3.11-slim;
#                                scripts/images builds one from Debian packages, without a registry)
#   --secret id=cacert,src=...   a CA bundle for reaching PyPI through a TLS-inspecting proxy; only
#                                mounted while installing, never stored in an image
#   --build-arg UV_CACHE_DIR=... where uv keeps its cache during the build (default: a cache mount;
#                                scripts/images bind-mounts the host's uv cache instead)
# Layers: dependencies (from pyproject.toml + requirements.lock) come before the sources, so a code
# change re-runs only the last COPY/RUN steps. Everything lives in the venv /opt/venv.

ARG BASE_IMAGE=python:3.11-slim

FROM ${BASE_IMAGE} AS base
ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 \
    VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH
# Login shells (`bash -l`; KubeRay starts Ray with `/bin/bash -lc`) reset PATH in /etc/profile,
# which then reads /etc/profile.d/: put the venv back in front there too.
RUN python3 -m venv --without-pip /opt/venv \
 && printf '%s\n' 'case ":$PATH:" in *:/opt/venv/bin:*) ;; *) PATH="/opt/venv/bin:$PATH"; export PATH ;; esac' \
      > /etc/profile.d/tailor-venv.sh

# uv, for building only: bind-mounted into the RUN steps that install, never copied into an image.
FROM base AS uv
ARG UV_VERSION=0.13.9
RUN --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export PIP_CERT=/run/secrets/cacert; fi \
 && python3 -m venv /opt/uv \
 && /opt/uv/bin/pip install --no-cache-dir --disable-pip-version-check "uv==${UV_VERSION}"
# An alias stage without instructions: buildah 1.28 bind-mounts a stale root for `from=<stage>`
# when that stage's own steps came from its layer cache; a FROM of it is resolved correctly.
FROM uv AS uvtool

# The pinned dependency set of each image: requirements.lock filtered to what the operator /
# trainer extras need. Its own COPY below is cached by content, so editing pyproject.toml or the
# lock in ways that do not change an image's dependencies (pytest settings, dev pins) does not
# reinstall them.
FROM base AS requirements
ARG UV_CACHE_DIR=/root/.cache/uv
COPY pyproject.toml requirements.lock /src/
RUN --mount=type=bind,from=uvtool,source=/opt/uv,target=/opt/uv \
    --mount=type=cache,id=tailor-uv,target=/root/.cache/uv \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export SSL_CERT_FILE=/run/secrets/cacert; fi \
 && mkdir /requirements \
 && for extras in "operator" "trainer operator"; do \
      set -- $extras; name=$1; args=""; for e; do args="$args --extra $e"; done; \
      /opt/uv/bin/uv pip compile --quiet --python /opt/venv/bin/python --no-header --no-annotate \
        --constraint /src/requirements.lock /src/pyproject.toml $args -o /requirements/$name.txt || exit 1; \
    done

# ------------------------------------------------------------------------------------ operator
FROM base AS operator
ARG UV_CACHE_DIR=/root/.cache/uv
# Only the operator extra: the operator imports tailor_trainer.config and nothing heavier.
COPY --from=requirements /requirements/operator.txt /src/requirements.txt
RUN --mount=type=bind,from=uvtool,source=/opt/uv,target=/opt/uv \
    --mount=type=cache,id=tailor-uv,target=/root/.cache/uv \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export SSL_CERT_FILE=/run/secrets/cacert; fi \
 && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --compile-bytecode \
      -r /src/requirements.txt
RUN groupadd --gid 65532 tailor \
 && useradd --uid 65532 --gid 65532 --no-log-init --create-home --home-dir /home/tailor -K UID_MAX=65534 tailor
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer
RUN --mount=type=bind,from=uvtool,source=/opt/uv,target=/opt/uv \
    --mount=type=cache,id=tailor-uv,target=/root/.cache/uv \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export SSL_CERT_FILE=/run/secrets/cacert; fi \
 && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --no-deps /src \
 && rm -rf /src/build /src/*.egg-info \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/tailor_*
USER 65532
EXPOSE 8080 8081
# The chart runs `python -m tailor_operator.runner`.
ENTRYPOINT ["tailor", "operator"]

# ------------------------------------------------------------------------------------- trainer
FROM base AS trainer
ARG UV_CACHE_DIR=/root/.cache/uv
# KubeRay (v1.5) probes Ray containers with `wget ... | grep success`.
RUN command -v wget >/dev/null || { apt-get update \
      && apt-get install -y --no-install-recommends wget \
      && rm -rf /var/lib/apt/lists/*; }
# The trainer image also carries the operator extra's client for the progress ConfigMap sink.
COPY --from=requirements /requirements/trainer.txt /src/requirements.txt
RUN --mount=type=bind,from=uvtool,source=/opt/uv,target=/opt/uv \
    --mount=type=cache,id=tailor-uv,target=/root/.cache/uv \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export SSL_CERT_FILE=/run/secrets/cacert; fi \
 && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --compile-bytecode \
      -r /src/requirements.txt
# Ray's user (uid 1000) with a writable HOME; caches go below it.
RUN groupadd --gid 1000 ray \
 && useradd --uid 1000 --gid 1000 --no-log-init --create-home --home-dir /home/ray --shell /bin/bash ray \
 && install -d -o 1000 -g 1000 /home/ray/.cache
COPY pyproject.toml README.md /src/
COPY operator /src/operator
COPY trainer /src/trainer
RUN --mount=type=bind,from=uvtool,source=/opt/uv,target=/opt/uv \
    --mount=type=cache,id=tailor-uv,target=/root/.cache/uv \
    --mount=type=secret,id=cacert,required=false \
    if [ -s /run/secrets/cacert ]; then export SSL_CERT_FILE=/run/secrets/cacert; fi \
 && /opt/uv/bin/uv pip install --python /opt/venv/bin/python --link-mode copy --no-deps /src \
 && rm -rf /src/build /src/*.egg-info \
 && python -m compileall -q "$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"/tailor_*
# RAY_USAGE_STATS_ENABLED=0: clusters that train on private data often cannot (and should not)
# reach usage-stats.ray.io; Ray would retry it from every head.
ENV HOME=/home/ray XDG_CACHE_HOME=/home/ray/.cache HF_HOME=/home/ray/.cache/huggingface \
    MPLCONFIGDIR=/home/ray/.cache/matplotlib TRITON_CACHE_DIR=/home/ray/.cache/triton \
    RAY_USAGE_STATS_ENABLED=0
USER 1000
WORKDIR /home/ray
# KubeRay runs its own command in head/worker containers (`/bin/bash -lc 'ray start ...'`); the
# RayJob entrypoint is `python -m tailor_trainer run --config /etc/tailor/config.json`.
CMD ["python", "-m", "tailor_trainer", "--help"]
