#!/bin/bash
# Runs tests/gpu and bench/gpu.py on a GPU machine whose Python has torch but not the rest of the
# trainer's dependencies (how the figures in bench/RESULTS.md were taken). Prepare the wheels on
# a machine with network access, in the repo root (x86-64, Python 3.12 on the GPU machine):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
#       -d .whl pydantic pydantic-core annotated-types typing-inspection jsonschema \
#       jsonschema-specifications referencing rpds-py transformers==<lock> peft==<lock>
#   ray: unzip its wheel, drop ray/jars, ray/rllib, ray/serve, ray/llm and the dashboard's source
#   maps, and pack the rest as .whl/ray-slim.tar.xz (79 MB wheel -> 25 MB)
#   bitsandbytes (QLoRA tests; optional): unzip its wheel, keep only the cuda13x and cpu libraries,
#   pack as .whl/bnb-slim.tar.xz (43 MB -> 7 MB)
# then run `bash bench/gpu_device.sh` there with $OUT set to a folder for the logs.
set -u
OUT=${OUT:-/tmp/tailor-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
python3 -c "import glob, tarfile; [tarfile.open(f).extractall('/tmp/site') for f in glob.glob('.whl/*-slim.tar.xz')]" || exit 4
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/trainer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
echo "== tests/gpu $(( $(date +%s) - t0 ))s"
timeout 170 python3 -m pytest tests/gpu -v -p no:cacheprovider -o addopts="-ra" 2>&1 | tee "$OUT/gpu-tests.log" | tail -20
echo "== bench 1b $(( $(date +%s) - t0 ))s"
timeout 150 python3 bench/gpu.py --sizes 1b --workdir /tmp/bench --json "$OUT/bench-1b.json" 2>&1 | tee "$OUT/bench-1b.log"
rm -rf /tmp/bench/llama-1b
left=$(( 545 - ($(date +%s) - t0) ))
echo "== bench 8b $(( $(date +%s) - t0 ))s, ${left}s left"
timeout $left python3 bench/gpu.py --sizes 8b --workdir /tmp/bench --json "$OUT/bench-8b.json" 2>&1 | tee "$OUT/bench-8b.log"
echo "== done $(( $(date +%s) - t0 ))s"
