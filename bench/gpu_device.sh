#!/bin/bash
# Runs tests/gpu and bench/gpu.py on a GPU machine whose Python has torch but not the rest of the
# trainer's dependencies (how the figures in bench/RESULTS.md are taken). Prepare the wheels here
# with `bash bench/gpu_wheels.sh` (PyPI only; .whl/, ~55 MB: the lock's pure-Python packages,
# liger-kernel, and ray and bitsandbytes cut down to what the trainer imports), carry .whl/ along,
# and run `bash bench/gpu_device.sh` there with $OUT set to a folder for the logs. One call fits
# the device tool's 10-minute limit: PART=1 (default) runs tests/gpu and the 1B rows with the
# levers; PART=2 runs the 8B rows (LoRA with the levers, then full). Figures are medians of 3.
set -u
OUT=${OUT:-/tmp/tailor-gpu-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false RAY_USAGE_STATS_ENABLED=0 HF_HUB_OFFLINE=1
t0=$(date +%s)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
python3 -c "import glob, tarfile; [tarfile.open(f).extractall('/tmp/site') for f in glob.glob('.whl/*-slim.tar.xz')]" || exit 4
export PYTHONPATH=/tmp/site:$PWD/operator:$PWD/trainer
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
if [ "${PART:-1}" = 1 ]; then
  echo "== tests/gpu $(( $(date +%s) - t0 ))s"
  timeout 150 python3 -m pytest tests/gpu -v -p no:cacheprovider -o addopts="-ra" 2>&1 | tee "$OUT/gpu-tests.log" | tail -20
  echo "== bench 1b $(( $(date +%s) - t0 ))s"
  timeout $(( 560 - ($(date +%s) - t0) )) python3 bench/gpu.py --sizes 1b --repeat 3 --levers --workdir /tmp/bench \
      --json "$OUT/bench-1b.json" 2>&1 | tee "$OUT/bench-1b.log"
else
  echo "== bench 8b lora $(( $(date +%s) - t0 ))s"
  timeout 330 python3 bench/gpu.py --sizes 8b --methods lora --repeat 3 --levers --workdir /tmp/bench \
      --json "$OUT/bench-8b-lora.json" 2>&1 | tee "$OUT/bench-8b-lora.log"
  echo "== bench 8b full $(( $(date +%s) - t0 ))s"
  timeout $(( 560 - ($(date +%s) - t0) )) python3 bench/gpu.py --sizes 8b --methods full --repeat 3 \
      --workdir /tmp/bench --json "$OUT/bench-8b-full.json" 2>&1 | tee "$OUT/bench-8b-full.log"
fi
echo "== done $(( $(date +%s) - t0 ))s"
