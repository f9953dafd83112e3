#!/usr/bin/env bash
# The one prepared device run of benchmarks/gpu_step.py: install biovita over the
# machine's own torch (wheels it lacks travel in .whl/, see the device README), run the script
# under a hard limit well inside a 10-minute call, and leave the JSON report and the log in $OUT.
#
#   device run, carry [".whl"], timeout_s 560:  bash benchmarks/gpu_run.sh
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 DS_BUILD_OPS=0
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
# biovita vs the bare eager and compiled loops at the paper's batches and at 256, then the
# largest batch (up to 1024); the card's name goes into the report
timeout 480 python3 benchmarks/gpu_step.py --model vit-l14-htsat-random --batches 64,32 \
  --large 256 --steps 5 --max-batch 1024 --json "$OUT/gpu_step.json" 2>&1 | tee "$OUT/gpu_step.log"
