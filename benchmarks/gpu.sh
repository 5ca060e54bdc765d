#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one GPU (~6 minutes on an H200 with 16 cores):
# the CUDA tests, then the training-step, eval-decode, loader and probe benchmarks on the GPU.
#
#     benchmarks/gpu.sh [LOGDIR]      # PY=python3 by default; LOGDIR gets the logs and JSON
#     ONLY="data train-resnet18" benchmarks/gpu.sh     # some of the steps
#
# Most important first: if time runs out, what is left undone is least needed. Each step runs
# under its own time limit (together 7 min 30 s) and a failing step does not stop the others;
# the exit status is that of the first failure. Results go to benchmarks/results/ as usual.
# The training-step runs measure the loader's settings against one memory-fed run each:
# hw_decoder_load 0.65 (DALI's default) and 0.8 and a deeper prefetch beside the defaults
# (ResNet-18), CPU decoding (ResNet-50); eval_decode.py measures which decoder settings
# reproduce PIL's pixels.
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
step data 60 "$PY" -c "import sys; sys.path.insert(0, 'benchmarks')
from common import imagenet_like; from loader import shards; print(shards(imagenet_like(100, 200)))"
step tests 70 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
step train-resnet18 80 "$PY" benchmarks/train_step.py --arch resnet18 --res 176 \
    --batch-size 256 --steps 240 --images 20000 --variant hw_decoder_load=0.65 \
    --variant hw_decoder_load=0.8 --variant hw_decoder_load=0.8,prefetch=4 \
    --variant prefetch=4
step train-resnet50 75 "$PY" benchmarks/train_step.py --arch resnet50 --res 224 \
    --batch-size 256 --steps 200 --images 20000 --variant decode=cpu
step eval-decode 45 "$PY" benchmarks/eval_decode.py
step loader 60 "$PY" benchmarks/loader.py
step probe 60 "$PY" benchmarks/probe.py --extraction-only  # the solver's figures are the CPU's
# This run's result files only, logs and JSON in one archive (a transfer back may cap the
# number of files).
if [ "$LOG" != benchmarks/results ]; then
    find benchmarks/results -name '*.json' -newer "$started" -exec cp {} "$LOG"/ \;
    (cd "$LOG" && tar -czf gpu-results.tgz --remove-files ./*.log ./*.json)
fi
exit $status
