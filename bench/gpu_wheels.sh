#!/bin/bash
# Prepares .whl/ for bench/gpu_device.sh: the trainer's pure-Python dependencies at the versions
# in requirements.lock, for a GPU machine with Python 3.12 and torch already installed, and no
# network. Run here, in the repo root (needs PyPI); the result is ~55 MB, under the device tool's
# 64 MiB carry limit:   bash bench/gpu_wheels.sh && run(carry=[".whl"], command="bash bench/gpu_device.sh")
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
pin() { grep -E "^$1==" requirements.lock | head -1; }
rm -rf .whl && mkdir -p .whl/tmp
dl() { "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
         --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_28_x86_64 \
         --platform manylinux_2_34_x86_64 -d "$1" "${@:2}"; }
pkgs=()
for p in pydantic pydantic-core annotated-types typing-inspection jsonschema jsonschema-specifications \
         referencing rpds-py transformers peft tokenizers safetensors huggingface-hub; do
  pkgs+=("$(pin "$p")")
done
dl .whl "${pkgs[@]}" "liger-kernel"  # liger: the train stage's fused linear cross-entropy on CUDA
# ray and bitsandbytes are large: keep what the trainer imports, packed as *-slim.tar.xz.
dl .whl/tmp "$(pin ray)" "$(pin bitsandbytes)"
( cd .whl/tmp
  mkdir ray-site bnb-site
  unzip -q ray-*.whl -d ray-site
  rm -rf ray-site/ray/jars ray-site/ray/rllib ray-site/ray/serve ray-site/ray/llm
  find ray-site -name '*.map' -delete
  tar -C ray-site -cJf ../ray-slim.tar.xz .
  unzip -q bitsandbytes-*.whl -d bnb-site
  find bnb-site/bitsandbytes -name 'libbitsandbytes_*' ! -name '*cuda13*' ! -name '*_cpu*' -delete
  tar -C bnb-site -cJf ../bnb-slim.tar.xz . )
rm -rf .whl/tmp
du -sh .whl && ls .whl
