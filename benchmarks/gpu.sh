#!/usr/bin/env bash
# The GPU checks in one go, for a machine with one GPU (~6 minutes on an H100 with 16 cores):
# the CUDA tests, then the loader, training-step and probe benchmarks on the GPU.
#
#     benchmarks/gpu.sh [LOGDIR]      # PY=python3 by default; LOGDIR gets the logs and JSON
#
# Each step runs under its own time limit (together 9 min 20 s, to fit a 10-minute slot) and
# a failing step does not stop the others; the exit status is that of the first failure.
# Results go to benchmarks/results/ as usual.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
LOG=${1:-benchmarks/results}
mkdir -p "$LOG"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
status=0

step() {  # step NAME SECONDS COMMAND...
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date -u +%H:%M:%S))"
    timeout "$limit" "$@" 2>&1 | grep -v -i "warn" | tee "$LOG/gpu-$name.log"
    local rc=${PIPESTATUS[0]}
    echo "== $name: exit $rc"
    [ "$rc" -ne 0 ] && [ "$status" -eq 0 ] && status=$rc
}

"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else
'gpu.sh: torch sees no CUDA GPU here; run it on a GPU machine')" || exit 2
"$PY" -c "import torch, nvidia.dali as d; print('torch', torch.__version__, '| DALI', d.__version__,
'| GPU', torch.cuda.get_device_name(0))" || exit 2
step tests 150 "$PY" -m pytest -q -m gpu tests
step loader 150 "$PY" benchmarks/loader.py
step train-resnet50 90 "$PY" benchmarks/train_step.py --arch resnet50 --res 224 --batch-size 256
step train-resnet18 60 "$PY" benchmarks/train_step.py --arch resnet18 --res 176 --batch-size 256
step probe 110 "$PY" benchmarks/probe.py
[ "$LOG" != benchmarks/results ] && cp benchmarks/results/*.json "$LOG"/ 2>/dev/null
exit $status
