#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one GPU (~7 minutes on an H200 with 16 cores):
# the CUDA tests, then the training-step, probe (extraction), eval-decode and loader
# benchmarks on the GPU.
#
#     benchmarks/gpu.sh [LOGDIR]      # PY=python3 by default; LOGDIR gets the logs and JSON
#     ONLY="data train-resnet18" benchmarks/gpu.sh     # some of the steps
#
# Most important first: if time runs out, what is left undone is least needed. Each step runs
# under its own time limit (together 8 min) and a failing step does not stop the others; the
# exit status is that of the first failure. Results go to benchmarks/results/ as usual.
# The training runs are whole runs (16 epochs of 20,000 JPEGs for ResNet-18, 3 for ResNet-50)
# with the default pixel cache (on the GPU: filled once, inside the run's wall time) against
# one memory-fed run each, and streaming (--pixel-cache off) beside them; the extraction step
# measures the eval cache's fill and reads against the model's own forward rate.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG=${1:-benchmarks/results}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0
started=$(mktemp)

step() {  # step NAME SECONDS COMMAND... (only the steps named in $ONLY, if it is set)
    local name=$1 limit=$2
    shift 2
    [ -n "${ONLY:-}" ] && [[ " $ONLY " != *" $name "* ]] && return
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee "$LOG/gpu-$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
'gpu.sh: torch sees no CUDA GPU here; run it on a GPU machine')" || exit 2
"$PY" -c "import torch, nvidia.dali as d, os; print('torch', torch.__version__, '| DALI',
d.__version__, '| GPU', torch.cuda.get_device_name(0), '|', os.cpu_count(), 'cores')" || exit 2
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv 2>/dev/null | tee "$LOG/gpu-smi.log"
# The 20,000 JPEGs and their shards every benchmark below shares (~2.2 GB).
step data 50 "$PY" -c "import sys; sys.path.insert(0, 'benchmarks')
from common import imagenet_like; from loader import shards; print(shards(imagenet_like(100, 200)))"
step tests 75 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step train-resnet18 120 "$PY" benchmarks/train_step.py --arch resnet18 --res 176 \
    --batch-size 256 --epochs 16 --images 20000 --variant pixel_cache=off
step probe 60 "$PY" benchmarks/probe.py --extraction-only  # the solver's figures are the CPU's
step train-resnet50 100 "$PY" benchmarks/train_step.py --arch resnet50 --res 224 \
    --batch-size 256 --epochs 3 --images 20000 --variant pixel_cache=off --variant pixel_cache=host
step loader 40 "$PY" benchmarks/loader.py
step eval-decode 30 "$PY" benchmarks/eval_decode.py
# This run's result files only, logs and JSON in one archive (a transfer back may cap the
# number of files).
if [ "$LOG" != benchmarks/results ]; then
    find benchmarks/results -name '*.json' -newer "$started" -exec cp {} "$LOG"/ \;
    (cd "$LOG" && tar -czf gpu-results.tgz --remove-files ./*.log ./*.json)
fi
exit $status
